"""The `lsr-fast` command: train, eval, experiment, prepare-data, bench, analyze, demo, backends, build.

``lsr-fast <command> --help`` documents every option; ``lsr-fast train --help`` lists every
config key with its default.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

import torch

import lsr_fast
from lsr_fast import reference


def street_labels(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """A street-like Cityscapes trainId map: sky, buildings, road and sidewalk bands, poles,
    cars and people as blocks, and a void border, so histogram downsampling has real edges."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.empty(batch, height, width, dtype=torch.int64)
    rows = torch.arange(height).view(-1, 1).expand(height, width)
    cols = torch.arange(width).view(1, -1).expand(height, width)
    for b in range(batch):
        horizon = int(height * (0.35 + 0.1 * torch.rand(1, generator=g).item()))
        scene = torch.full((height, width), 10)  # sky
        scene[rows >= horizon // 2] = 2  # building
        scene[(rows >= horizon // 2) & (cols % max(width // 7, 2) < width // 40 + 1)] = 8  # vegetation strips
        scene[rows >= horizon] = 1  # sidewalk
        scene[(rows >= horizon + height // 12)] = 0  # road
        for _ in range(6):  # cars, people, poles
            cls = [13, 11, 5][int(torch.randint(0, 3, (1,), generator=g))]
            x0 = int(torch.randint(0, width - 8, (1,), generator=g))
            w = max(2, width // (30 if cls == 13 else 90))
            h = max(3, height // (10 if cls != 5 else 3))
            y1 = int(torch.randint(horizon, height, (1,), generator=g))
            scene[max(0, y1 - h):y1, x0:x0 + w] = cls
        scene[:, : max(1, width // 100)] = 255
        labels[b] = scene
    return labels


def _time(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    H, W, h, w, K, C = args.height, args.width, args.height // 8 + 1, args.width // 8 + 1, args.feature_dim, 19
    labels = street_labels(1, H, W, args.seed)
    print(f"lsr_fast {lsr_fast.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, state in lsr_fast.available_backends().items():
        print(f"  backend {name:9s}: {state}")
    backends = [b for b, s in lsr_fast.available_backends().items() if s == "available" and b != "cuda"]
    print(f"\nExample: a {H}x{W} street-like label map -> {h}x{w} features with K={K}, C={C}")

    small = reference.hist_downsample(labels, (h, w), C)
    nearest = torch.nn.functional.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
    kept = (small != 255).float().mean().item()
    print(f"hist_downsample keeps {100 * kept:.1f}% of cells; nearest disagrees with it on "
          f"{100 * ((nearest != small) & (small != 255)).float().mean().item():.1f}% of the kept ones")

    probs = torch.softmax(torch.nn.functional.one_hot(labels.clamp(max=C - 1), C).permute(0, 3, 1, 2).float() * 3
                          + torch.randn(1, C, H, W), 1)
    features = torch.randn(1, K, h, w).relu_()
    prototypes = torch.randn(C, K)
    ops = {
        "hist_downsample": lambda b: lsr_fast.hist_downsample(labels, (h, w), C, backend=b),
        "pseudo_label_downsample": lambda b: lsr_fast.pseudo_label_downsample(probs, (h, w), backend=b),
        "class_feature_stats": lambda b: lsr_fast.class_feature_stats(features, small, C, backend=b)[0],
        "clustering_loss": lambda b: lsr_fast.clustering_loss(features, small, prototypes, backend=b),
        "norm_alignment_loss": lambda b: lsr_fast.norm_alignment_loss(features, 10.0, backend=b),
        "maxsquare_loss": lambda b: lsr_fast.maxsquare_loss(probs, backend=b),
    }
    print(f"\n{'op':26s}" + "".join(f"{b + ' ms':>14s}" for b in backends) + "   matches reference")
    failures = 0
    for name, run in ops.items():
        expected = run("reference")
        times, matches = [], []
        for b in backends:
            out = run(b)
            ok = torch.equal(out, expected) if out.dtype == torch.int64 else torch.allclose(out, expected, rtol=1e-4, atol=1e-4)
            matches.append(ok)
            times.append(_time(lambda: run(b)) * 1e3)
        failures += not all(matches)
        print(f"{name:26s}" + "".join(f"{t:14.2f}" for t in times) + f"   {'yes' if all(matches) else 'NO'}")

    reg = lsr_fast.LSRRegularizer.from_preset("gta5", feature_dim=K)
    for step in range(3):
        src = (torch.randn(1, K, h, w) + 0.1 * step).relu_().requires_grad_()
        tgt = torch.randn(1, K, h, w).relu_().requires_grad_()
        out = reg(src, labels, tgt, probs)
        out["total"].backward()
    terms = ", ".join(f"{k}={out[k].item():.4f}" for k in ("clustering_source", "clustering_target", "perpendicularity", "norm_source", "norm_target", "entropy", "total"))
    print(f"\nLSRRegularizer (GTA5 preset), step 3: {terms}")
    print(f"classes with a prototype: {int(reg.seen.sum())}/{C}, mean prototype angle {reg.mean_prototype_angle().item():.1f} deg")
    return 1 if failures else 0


def backends(args: argparse.Namespace) -> int:
    for name, state in lsr_fast.available_backends().items():
        print(f"{name}: {state}")
    return 0


def _config_from_args(args: argparse.Namespace):
    from .train.config import load_config

    return load_config(args.config, args.overrides)


def train_command(args: argparse.Namespace) -> int:
    from .train import train

    config = _config_from_args(args)
    summary = train(config, resume=args.resume)
    best = summary["best"]
    print(f"{summary['status']} at step {summary['step']}; best val mIoU "
          f"{best['miou']:.2f} at step {best['step']}" if best else f"{summary['status']} at step {summary['step']}")
    print(f"checkpoints, metrics.jsonl and TensorBoard logs in {summary['out_dir']}")
    return 0


def experiment_command(args: argparse.Namespace) -> int:
    import json

    from .train.experiment import plan, run_experiment

    config = _config_from_args(args)
    if args.plan:
        print(json.dumps(plan(config, args.source), indent=2))
        return 0
    run_experiment(config, runs=args.runs, analyze=not args.no_analysis, source_overrides=args.source)
    return 0


def eval_command(args: argparse.Namespace) -> int:
    from .eval.evaluate import (PROTOCOL_TITLES, PROTOCOLS, evaluate, load_iou_table, markdown_table, per_class_iou,
                                report, write_protocol_report)
    from .train.build import build_eval_dataset
    from .train.checkpoint import load_for_inference

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    bundle = load_for_inference(args.checkpoint, device)
    dataset = build_eval_dataset(bundle.config, dataset=args.dataset, root=args.root, split=args.split)

    def confusions_of(bundle):
        return evaluate(bundle.model, dataset, bundle.num_classes, device=device, flip=args.flip,
                        align_corners=bundle.config["model"]["align_corners"], max_images=args.max_images,
                        progress=True, protocols=PROTOCOLS)

    supervised, source = {}, "paper target-only table (DESIGN.md)"
    if args.supervised_checkpoint:
        reference = load_for_inference(args.supervised_checkpoint, device)
        supervised = {p: per_class_iou(c) for p, c in confusions_of(reference).items()}
        source = f"checkpoint {args.supervised_checkpoint} (same protocol)"
    elif args.supervised_table:
        table = load_iou_table(args.supervised_table, bundle.num_classes)
        supervised, source = {p: table for p in PROTOCOLS}, f"table {args.supervised_table}"
    results = {p: report(c, supervised_iou=supervised.get(p), supervised_source=source)
               for p, c in confusions_of(bundle).items()}
    name = os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint))) or "result"
    images = len(dataset) if args.max_images is None else min(len(dataset), args.max_images)
    print(markdown_table({PROTOCOL_TITLES[p]: r for p, r in results.items()}))
    print(f"{name}, step {bundle.step}, {images} images; mASR against the {source}")
    out = args.out or os.path.splitext(args.checkpoint)[0] + "_eval"
    info = dict(name=name, checkpoint=args.checkpoint, step=bundle.step, images=images, flip=args.flip,
                align_corners=bundle.config["model"]["align_corners"], masr_reference=source)
    write_protocol_report(results, out, title=f"Evaluation of {args.checkpoint}", info=info)
    print(f"results written to {out}.json and {out}.md")
    return 0


def _forward(module: str, name: str):
    """Subcommands implemented in their own modules expose configure_parser(p) and run(args)."""
    import importlib

    target = importlib.import_module(module)
    return target.configure_parser, target.run


def _training_stack():
    """The trainer's config schema and error types, or the ImportError of a missing optional
    dependency (pyyaml etc., the ``training`` extra): backends, build, demo and bench work without."""
    try:
        from .train.checkpoint import CheckpointError
        from .train.config import ConfigError, describe
        from .train.trainer import NonFiniteLossError
    except ImportError as error:
        return None, error
    return (describe, (ConfigError, CheckpointError, NonFiniteLossError)), None


def main(argv: Optional[List[str]] = None) -> int:
    stack, missing = _training_stack()
    describe = stack[0] if stack else (lambda: f"  (unavailable: {missing}; pip install 'lsr_fast[training]')")

    parser = argparse.ArgumentParser(prog="lsr-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    for name, helptext, func in (
        ("train", "train DeepLabV2 (source_only, target_only or lsr) from a YAML config", train_command),
        ("experiment", "the main job: target-supervised, source-only and LSR runs, then one comparison table", experiment_command),
    ):
        p = sub.add_parser(name, help=helptext, formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="config keys (set in the YAML file or as key=value):\n" + describe())
        p.add_argument("--config", "-c", help="YAML config (configs/ has gta5_to_cityscapes, synthia_to_cityscapes, synthetic)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100 data.workers=2")
        if name == "train":
            p.add_argument("--resume", action="store_const", const="auto", default=None,
                           help="continue the run exactly from out_dir/last.pt")
            p.add_argument("--resume-from", dest="resume", metavar="CHECKPOINT",
                           help="continue the run exactly from this checkpoint")
        else:
            p.add_argument("--resume", action="store_true",
                           help="accepted for old scripts: a rerun always skips finished stages and resumes the others")
            p.add_argument("--runs", nargs="+", choices=("target_only", "source_only", "lsr", "source_only_continued"),
                           help="train only these stages (default: all of experiment.target_only, source_only, lsr, "
                                "source_only_continued when experiment.control)")
            p.add_argument("--plan", action="store_true",
                           help="print every stage's resolved protocol as JSON and exit (trains nothing, reads no image)")
            p.add_argument("--source", action="append", default=[], metavar="key=value",
                           help="override for the source pre-training stage only (after experiment.source_config)")
            p.add_argument("--no-analysis", action="store_true", help="skip the latent-space figures")
        p.set_defaults(func=func)

    p = sub.add_parser("eval", help="evaluate a checkpoint: per-class IoU, mIoU, mASR with labels at full resolution "
                       "and at the network's input size, side by side")
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (last.pt / best.pt)")
    p.add_argument("--dataset", choices=("synthetic", "cityscapes", "gta5", "synthia"), help="default: the run's validation dataset")
    p.add_argument("--root", help="dataset root folder (real datasets)")
    p.add_argument("--split", choices=("train", "val", "test"), help="Cityscapes split (default: the config's)")
    p.add_argument("--flip", action="store_true", help="also average horizontally flipped predictions")
    p.add_argument("--max-images", type=int, help="evaluate only the first N images")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--supervised-checkpoint", help="mASR against this target-supervised checkpoint (evaluated on the same images)")
    group.add_argument("--supervised-table", help="mASR against a JSON list of per-class IoUs in percent (or an eval result JSON)")
    p.add_argument("--out", help="output prefix for .json and .md (default: next to the checkpoint)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=eval_command)

    for name, module, helptext in (
        ("prepare-data", "lsr_fast.data.prepare", "validate a dataset folder and optionally write 8-bit trainId labels"),
        ("bench", "lsr_fast.bench", "benchmark every op and backend against the reference; writes JSON, Markdown and a chart"),
        ("analyze", "lsr_fast.analysis.cli", "the paper's latent-space figures from one or two checkpoints"),
    ):
        p = sub.add_parser(name, help=helptext, description=helptext)
        try:
            configure, run = _forward(module, name)
        except ImportError as error:  # a missing optional dependency: say so when the command is used
            p.set_defaults(func=lambda args, error=error: print(f"lsr-fast {args.command} is unavailable: {error}", file=sys.stderr) or 2)
            continue
        configure(p)
        p.set_defaults(func=run)

    p = sub.add_parser("demo", help="run every op and the regulariser on a built-in example, per backend")
    p.add_argument("--height", type=int, default=720, help="label height (default 720, the paper's GTA5 size)")
    p.add_argument("--width", type=int, default=1280, help="label width (default 1280)")
    p.add_argument("--feature-dim", type=int, default=2048, help="feature channels K (default 2048, ResNet-101)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=demo)
    p = sub.add_parser("backends", help="say which backends are usable here and why not")
    p.set_defaults(func=backends)
    from . import build as build_kernels  # `lsr-fast build` is `python -m lsr_fast.build`

    p = sub.add_parser("build", help=build_kernels.HELP, description=build_kernels.HELP)
    build_kernels.configure_parser(p)
    p.set_defaults(func=build_kernels.run)
    args = parser.parse_args(argv)
    for name in ("height", "width", "feature_dim"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if stack is None and args.command in ("train", "experiment", "eval"):
        print(f"lsr-fast {args.command} is unavailable: {missing} (pip install 'lsr_fast[training]')", file=sys.stderr)
        return 2
    expected = (FileNotFoundError, *stack[1]) if stack else (FileNotFoundError,)
    try:
        return args.func(args)
    except expected as error:
        print(f"lsr-fast {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
