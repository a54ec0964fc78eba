"""The `lsr-fast` command.

Subcommands so far: ``backends`` (what is usable here) and ``demo`` (every op and the
regulariser on a built-in street-like example, each backend checked against the reference and
timed). ``train``, ``eval``, ``prepare-data``, ``bench`` and ``analyze`` come with their issues.
"""

from __future__ import annotations

import argparse
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


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lsr-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run every op and the regulariser on a built-in example, per backend")
    p.add_argument("--height", type=int, default=720, help="label height (default 720, the paper's GTA5 size)")
    p.add_argument("--width", type=int, default=1280, help="label width (default 1280)")
    p.add_argument("--feature-dim", type=int, default=2048, help="feature channels K (default 2048, ResNet-101)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=demo)
    p = sub.add_parser("backends", help="say which backends are usable here and why not")
    p.set_defaults(func=backends)
    args = parser.parse_args(argv)
    for name in ("height", "width", "feature_dim"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
