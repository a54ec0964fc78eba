#!/usr/bin/env python
"""Seconds per step, peak RSS and the LSR terms' share of a step at the paper's sizes on the CPU.

Runs the paper's GTA5 -> Cityscapes protocol (``lsr-fast experiment -c
configs/gta5_to_cityscapes.yaml``) on fixture datasets at the real sizes (GTA5 1914x1052,
Cityscapes 2048x1024; tests/paper_scale_fixtures.py) with DeepLabV2-ResNet-101 from random
weights, one stage per process so each stage's peak RSS is its own:

1. source pre-training (``--runs source_only``): random 512x512 patches of the 1280x720 images,
   batch ``--source-batch``, BatchNorm statistics learnt;
2. LSR adaptation (the same command again: pre-training is skipped): 1280x720 GTA5 + 1024x512
   Cityscapes, batch 1 + 1, BN frozen, fp32, backend cpp;
then, in this process, ``LSRRegularizer`` forward + backward alone on the features and logits
the adapted network gives for one fixture GTA5 and one Cityscapes image at those sizes.

Seconds per step: the trainer's own ``steps_per_s`` with train.log_every=1 and no checkpoint
or validation between steps (the first step, which pays one-off allocation, is reported apart).
Peak RSS: the VmHWM of the training process when the stage's summary.json appears (the peak up
to the end of training), and ``os.wait4``'s ru_maxrss of the whole process (with evaluation).

    .venv/bin/python scripts/paper_scale_cpu.py            # ~20 min on a shared 2-core machine; writes the report
    .venv/bin/python scripts/paper_scale_cpu.py --help

Only one training process runs at a time (about 13 GiB at these sizes).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from paper_scale_fixtures import (cpu_seconds_per_step, experiment_argv, make_paper_scale_datasets,  # noqa: E402
                                  run_command, seconds_per_step)

GIB_PER_KIB = 1.0 / 2**20


def _machine() -> dict:
    info = {"cpu": platform.processor() or "?", "cores": os.cpu_count(), "memory_gib": None}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                info["cpu"] = value.strip()
            elif key.strip() == "CPU(s)":
                info["cores"] = int(value.strip())
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    with open("/proc/meminfo", "r", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                info["memory_gib"] = int(line.split()[1]) * GIB_PER_KIB
    return info


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _median(values):
    return statistics.median(values) if values else float("nan")


def lsr_terms_seconds(checkpoint: str, repeats: int) -> dict:
    """LSRRegularizer forward + backward alone, on what the network gives at the paper's sizes:
    layer4 features of a 1280x720 GTA5 image and a 1024x512 Cityscapes image, the GTA5 labels at
    720x1280, and the target probabilities (softmax of the logits upsampled to 512x1024, as the
    trainer computes them). Seconds per call, median of ``repeats`` after one warm-up."""
    import torch

    from lsr_fast.train.build import build_eval_dataset, build_regularizer
    from lsr_fast.train.checkpoint import load_for_inference
    from lsr_fast.train.trainer import _upsample
    from lsr_fast.data.transforms import resize_label

    bundle = load_for_inference(checkpoint, "cpu")
    config = bundle.config
    source = build_eval_dataset(config, role="source")[0]  # 1280x720 image; label at full size
    target = build_eval_dataset(config, role="target")[0]  # 1024x512 image
    with torch.no_grad():
        source_logits, source_features = bundle.model(source["image"].unsqueeze(0))
        target_logits, target_features = bundle.model(target["image"].unsqueeze(0))
    labels = resize_label(source["label"], tuple(config["data"]["source"]["resize"])).unsqueeze(0)
    del bundle
    regularizer = build_regularizer(config, source_features.shape[1]).train()
    align = config["model"]["align_corners"]
    target_size = tuple(config["data"]["target"]["resize"])

    with torch.no_grad():
        fixed_probs = torch.softmax(_upsample(target_logits, target_size, align), 1)

    def call(with_softmax: bool):
        """One forward + backward; the inputs are fresh leaves, so MaxSquare's gradient reaches
        the probabilities (or, ``with_softmax``, the logits through the softmax) as in a step."""
        fs = source_features.clone().requires_grad_(True)
        ft = target_features.clone().requires_grad_(True)
        if with_softmax:
            logits = target_logits.clone().requires_grad_(True)
            start, cpu = time.perf_counter(), time.process_time()
            probs = torch.softmax(_upsample(logits, target_size, align), 1)
        else:
            probs = fixed_probs.clone().requires_grad_(True)
            start, cpu = time.perf_counter(), time.process_time()
        terms = regularizer(fs, labels, ft, probs)
        terms["total"].backward()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert fs.grad is not None and ft.grad is not None and bool(torch.isfinite(fs.grad).all())
        assert bool(torch.isfinite(terms["total"]))
        return (seconds, cpu), {k: float(v.detach()) for k, v in terms.items() if v.dim() == 0}

    results = {}
    for with_softmax in (False, True):
        name = "with_softmax" if with_softmax else "regularizer"
        call(with_softmax)  # warm-up (the first call also initialises the prototypes and f-bar_s)
        times = [call(with_softmax)[0] for _ in range(repeats)]
        results[name] = _median([wall for wall, _ in times])
        results[name + "_cpu"] = _median([cpu for _, cpu in times])
        results[name + "_all"] = [wall for wall, _ in times]
    results["shapes"] = {"source_features": tuple(source_features.shape), "target_features": tuple(target_features.shape),
                         "source_labels": tuple(labels.shape), "target_probs": (1, target_logits.shape[1], *target_size)}
    results["terms"] = call(False)[1]
    results["backend"] = regularizer.backend
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", help="folder for the fixtures and runs (default: a temporary folder, removed)")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "paper_scale_cpu.md"))
    parser.add_argument("--source-steps", type=int, default=3)
    parser.add_argument("--source-batch", type=int, default=2)
    parser.add_argument("--adapt-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="timed LSRRegularizer calls")
    parser.add_argument("--test-wall", help="measured wall time of tests/test_paper_scale.py, to record in the report")
    args = parser.parse_args(argv)

    import torch

    import lsr_fast

    holder = None
    if args.work is None:
        holder = tempfile.TemporaryDirectory(prefix="lsr_paper_scale_")
        work = holder.name
    else:
        work = os.path.abspath(args.work)
        os.makedirs(work, exist_ok=True)
    machine = _machine()
    loads = [("start", _load())]
    print(f"fixtures in {work}", flush=True)
    start = time.perf_counter()
    data = make_paper_scale_datasets(os.path.join(work, "data"))
    fixture_seconds = time.perf_counter() - start
    out = os.path.join(work, "run")
    common = dict(adapt_steps=args.adapt_steps, source_steps=args.source_steps, source_batch=args.source_batch,
                  checkpoint_every=0, analysis=False)
    argv_source = experiment_argv(data, out, **common) + ["--runs", "source_only"]
    argv_full = experiment_argv(data, out, **common)

    runs = {}
    for stage, command in (("source_only", argv_source), ("lsr", argv_full)):
        print(f"{stage}: {' '.join(command[1:])}", flush=True)
        finished = run_command(command, REPO, os.path.join(work, f"{stage}.log"),
                               watch={"trained": os.path.join(out, stage, "summary.json")},
                               follow=[os.path.join(out, stage, "metrics.jsonl")])
        if finished.returncode != 0:
            print(finished.output[-6000:])
            raise SystemExit(f"{stage}: the command failed with exit code {finished.returncode}")
        runs[stage] = finished
        loads.append((f"after {stage}", _load()))
        print(f"{stage}: {finished}", flush=True)

    steps = {stage: seconds_per_step(os.path.join(out, stage, "metrics.jsonl")) for stage in runs}
    cpu_steps = {stage: cpu_seconds_per_step(os.path.join(out, stage, "metrics.jsonl"),
                                             runs[stage].lines[os.path.join(out, stage, "metrics.jsonl")]) for stage in runs}
    lsr = lsr_terms_seconds(os.path.join(out, "lsr", "last.pt"), args.repeats)
    loads.append(("after LSR timing", _load()))

    steady = {stage: _median([s for step, s in steps[stage].items() if step > 1]) for stage in steps}
    steady_cpu = {stage: _median(list(cpu_steps[stage].values())) for stage in cpu_steps}
    threads = torch.get_num_threads()
    share = {name: (lsr[name] / steady["lsr"], lsr[name + "_cpu"] / steady_cpu["lsr"]) for name in ("regularizer", "with_softmax")}
    versions = {"torch": torch.__version__, "python": platform.python_version(), "lsr_fast": lsr_fast.__version__}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"

    def peak(stage):
        seen = runs[stage].appeared.get("trained", (None, None))[1]
        return "?" if seen is None else f"{seen * GIB_PER_KIB:.2f}"

    def fmt_steps(stage, table):
        return ", ".join(f"{step}: {s:.1f}" for step, s in sorted(table[stage].items())) or "-"

    command_shown = "lsr-fast " + " ".join(argv_full[3:]).replace(work, "$WORK")
    lines = [
        "# DeepLabV2-ResNet-101 at the paper's sizes on the CPU (issue 14, item 8)",
        "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']:.1f} GiB; torch threads "
        f"{torch.get_num_threads()}. The machine was shared: load averages (1/5/15 min) "
        + "; ".join(f"{when}: {value}" for when, value in loads) + ".",
        f"- Versions: Python {versions['python']}, torch {versions['torch']}, lsr_fast {versions['lsr_fast']} "
        f"(commit {commit} plus the working tree).",
        f"- Command: `.venv/bin/python scripts/paper_scale_cpu.py --source-steps {args.source_steps} --source-batch "
        f"{args.source_batch} --adapt-steps {args.adapt_steps} --repeats {args.repeats}`, which runs (fixtures in $WORK, "
        f"written in {fixture_seconds:.0f} s) first with `--runs source_only`, then as is:",
        "",
        f"      {command_shown}",
        "",
        "- Model: random init (`model.pretrained=null`; no weights here), fp32 (`train.amp: none`), "
        "`backend=cpp` (the compiled CPU kernels), `data.workers=0`.",
        "",
        "## Seconds per step",
        "",
        "Wall: the trainer's `steps_per_s` with `train.log_every=1` and no checkpoint or validation between steps "
        "(data loading and augmentation, forward, backward, SGD step). Step 1 pays one-off allocation; the steady "
        "value is the median of the later steps. CPU: user + system time of the training process (all threads) "
        "between two steps' metrics records (/proc/PID/stat, polled every 0.2 s), which other processes on a shared "
        f"machine do not inflate; CPU / {threads} threads estimates the wall time on an otherwise idle machine with "
        "perfect intra-op scaling (a lower bound).",
        "",
        "| stage | input | batch | BN | wall s/step (steady) | wall, every step | CPU s/step | CPU / threads |",
        "|---|---|---:|---|---:|---|---:|---:|",
        f"| source pre-training | random 512x512 patches of 1280x720 GTA5 | {args.source_batch} | train | "
        f"{steady['source_only']:.1f} | {fmt_steps('source_only', steps)} | {steady_cpu['source_only']:.1f} | "
        f"{steady_cpu['source_only'] / threads:.1f} |",
        f"| LSR adaptation | 1280x720 GTA5 + 1024x512 Cityscapes | 1 + 1 | frozen | {steady['lsr']:.1f} | "
        f"{fmt_steps('lsr', steps)} | {steady_cpu['lsr']:.1f} | {steady_cpu['lsr'] / threads:.1f} |",
        "",
        "CPU seconds of every step after the first: pre-training " + fmt_steps("source_only", cpu_steps)
        + "; adaptation " + fmt_steps("lsr", cpu_steps) + ".",
        "",
        "## Peak RSS",
        "",
        "| process | peak RSS to the end of training (VmHWM) | peak RSS of the whole process (ru_maxrss) | wall |",
        "|---|---:|---:|---:|",
        f"| source pre-training, then evaluation of its best.pt | {peak('source_only')} GiB | "
        f"{runs['source_only'].max_rss_kib * GIB_PER_KIB:.2f} GiB | {runs['source_only'].seconds:.0f} s |",
        f"| LSR adaptation, then evaluation of both stages | {peak('lsr')} GiB | "
        f"{runs['lsr'].max_rss_kib * GIB_PER_KIB:.2f} GiB | {runs['lsr'].seconds:.0f} s |",
        "",
        "## The LSR terms' share of an adaptation step",
        "",
        f"`LSRRegularizer` (preset gta5_released, backend {lsr['backend']}) forward + backward of its total alone, "
        "on the adapted network's outputs for one fixture GTA5 and one Cityscapes image: source features "
        f"{lsr['shapes']['source_features']}, labels {lsr['shapes']['source_labels']}, target features "
        f"{lsr['shapes']['target_features']}, probabilities {lsr['shapes']['target_probs']}. Median of "
        f"{args.repeats} calls after a warm-up.",
        "",
        "| what | wall s/call | share of a steady step (wall) | CPU s/call | share of a steady step (CPU) |",
        "|---|---:|---:|---:|---:|",
        f"| regulariser (label downsampling, pseudo-labels, clustering, perpendicularity, norms, MaxSquare) | "
        f"{lsr['regularizer']:.3f} | {100 * share['regularizer'][0]:.2f}% | {lsr['regularizer_cpu']:.3f} | "
        f"{100 * share['regularizer'][1]:.2f}% |",
        f"| the same plus the target softmax of the logits upsampled to 1024x512 (only LSR needs it) | "
        f"{lsr['with_softmax']:.3f} | {100 * share['with_softmax'][0]:.2f}% | {lsr['with_softmax_cpu']:.3f} | "
        f"{100 * share['with_softmax'][1]:.2f}% |",
        "",
        "Every timed call (s): regulariser " + ", ".join(f"{t:.3f}" for t in lsr["regularizer_all"])
        + "; with softmax " + ", ".join(f"{t:.3f}" for t in lsr["with_softmax_all"]) + ".",
        "",
        "## The test",
        "",
        "`LSR_FAST_PAPER_SCALE=1 .venv/bin/python -m pytest -m paper_scale tests/test_paper_scale.py -s` runs the "
        "same protocol through the one command with a SIGTERM after the adaptation's first checkpoint and a rerun "
        "(2 pre-training steps of batch 2, 3 adaptation steps, evaluation on 2 val images under both protocols, "
        "analysis). " + (f"Wall time: {args.test_wall}." if args.test_wall else "Its wall time was not measured with this report."),
        "",
    ]
    report = "\n".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(report)
    print(report)
    print(f"written to {args.out}")
    if holder is not None:
        holder.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
