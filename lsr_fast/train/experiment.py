"""The main job: target-supervised, source-only and LSR runs in turn, then one comparison table.

1. target_only — trained on labelled target images: the supervised reference of mASR (Eq. 9).
2. source_only — trained on labelled source images.
3. lsr — initialised from the source-only run's best weights and adapted with LSR (L+).
4. source_only_continued (``experiment.control``) — the same start, steps and learning rate as
   run 3 without the LSR terms: what the extra steps alone give.
Each run keeps its checkpoints, metrics.jsonl and TensorBoard logs in its own folder; ``best.pt``
is chosen by validation mIoU (data.val). The final table evaluates each run's best checkpoint on
held-out target images (for the synthetic scenes a separate seed, used neither for training nor
for selection), with mASR against run 1.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any, Dict, List, Optional

import torch

from ..eval.evaluate import evaluate, markdown_table, per_class_iou, report
from .build import build_eval_dataset
from .._atomic import atomic_write_text
from .checkpoint import load_for_inference
from .trainer import train

RUNS = ("target_only", "source_only", "lsr", "source_only_continued")


def _run_config(base: Dict[str, Any], run: str, out_dir: str) -> Dict[str, Any]:
    config = copy.deepcopy(base)
    config["mode"] = "source_only" if run == "source_only_continued" else run
    config["name"] = run
    config["out_dir"] = os.path.join(out_dir, run)
    if run in ("lsr", "source_only_continued"):
        config["init"] = os.path.join(out_dir, "source_only", "best.pt")
        config["train"]["steps"] = base["experiment"]["adapt_steps"]
        if base["experiment"]["adapt_lr"] is not None:
            config["optim"]["lr"] = base["experiment"]["adapt_lr"]
    return config


def _test_config(base: Dict[str, Any]) -> Dict[str, Any]:
    config = copy.deepcopy(base)
    val = config["data"]["val"]
    if val["name"] == "synthetic":
        val["seed"], val["num_images"], val["max_images"] = base["experiment"]["test_seed"], base["experiment"]["test_images"], None
    return config


def run_experiment(base: Dict[str, Any], *, runs: Optional[List[str]] = None, resume: bool = False,
                   analyze: bool = True) -> Dict[str, Any]:
    out_dir = base["out_dir"]
    os.makedirs(out_dir, exist_ok=True)
    runs = list(runs or (RUNS if base["experiment"]["control"] else RUNS[:3]))
    timings: Dict[str, float] = {}
    for run in runs:
        config = _run_config(base, run, out_dir)
        last = os.path.join(config["out_dir"], "last.pt")
        print(f"\n== {run}: {config['train']['steps']} steps -> {config['out_dir']}", flush=True)
        start = time.perf_counter()
        summary = train(config, resume="auto" if resume and os.path.isfile(last) else None)
        timings[run] = time.perf_counter() - start
        if summary["status"] == "interrupted":  # a signal stops the whole job, not just this run
            print(f"experiment stopped during {run}; continue it with the same config and overrides plus "
                  f"out_dir={out_dir} --resume", flush=True)
            return {"results": {}, "seconds": timings, "summary": None, "figures": None, "interrupted": run}

    test_config = _test_config(base)
    device = torch.device("cuda" if base["device"] in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    test_set = build_eval_dataset(test_config)
    confusions, results = {}, {}
    for run in RUNS:
        path = os.path.join(out_dir, run, "best.pt")
        if not os.path.isfile(path):
            continue
        bundle = load_for_inference(path, device)
        confusions[run] = evaluate(bundle.model, test_set, bundle.num_classes, device=device)
    supervised = per_class_iou(confusions["target_only"]) if "target_only" in confusions else None
    for run, confusion in confusions.items():
        results[run] = report(confusion, supervised_iou=supervised,
                               supervised_source="target_only run" if supervised is not None else "paper")
        results[run]["name"] = run

    test = test_config["data"]["val"]
    where = (f"{len(test_set)} held-out synthetic target images (seed {test['seed']})" if test["name"] == "synthetic"
             else f"{test['name']} {test['split']} ({len(test_set)} images)")
    table = markdown_table(results)
    lines = [f"# LSR main job: {base['name']}", "",
             f"Evaluated on {where}, best checkpoint of each run (selected on data.val); mASR relative to the target_only run "
             "(classes present in the test images).", "", table]
    lines.append("Runs: " + ", ".join(f"{m} {timings[m]:.0f} s" for m in timings) if timings else "")
    summary_md = "\n".join(lines) + "\n"
    atomic_write_text(os.path.join(out_dir, "summary.md"), summary_md)
    atomic_write_text(os.path.join(out_dir, "summary.json"),
                      json.dumps({"results": results, "seconds": timings, "evaluated_on": where}, indent=2) + "\n")
    print("\n" + summary_md)

    figures = None
    if analyze and {"source_only", "lsr"} <= set(confusions):
        figures = _analyze(out_dir, device)
    print("Where things went:")
    for run in confusions:
        print(f"  {run:22s} {os.path.join(out_dir, run)}  (last.pt, best.pt, metrics.jsonl, tb/)")
    print(f"  {'table':22s} {os.path.join(out_dir, 'summary.md')} (and .json)")
    if figures:
        print(f"  {'plots':22s} {figures}")
    print(f"  TensorBoard: tensorboard --logdir {out_dir}")
    return {"results": results, "seconds": timings, "summary": os.path.join(out_dir, "summary.md"), "figures": figures}


def _analyze(out_dir: str, device: torch.device) -> Optional[str]:
    """The paper's latent-space figures for source-only vs LSR (lsr_fast.analysis)."""
    try:
        from ..analysis import analyze_checkpoints
    except ImportError:
        return None
    figures = os.path.join(out_dir, "analysis")
    analyze_checkpoints(os.path.join(out_dir, "source_only", "best.pt"), os.path.join(out_dir, "lsr", "best.pt"),
                        out=figures, device=str(device))
    return figures
