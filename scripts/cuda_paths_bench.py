"""Times the CUDA kernels' performance paths (docs/cuda.md), for the first GPU session
(``bash scripts/gpu_session.sh bench paths``):

- loads: class_feature_stats and feature_terms (paper and released forms), forward and
  forward+backward, B = 2, K = 2048, C = 19, NCHW, at 91x161 (odd h*w: every plane starts at another
  alignment; the head/wrap/tail slots) against 96x160 (h*w a multiple of 8: aligned planes). The
  per-position times should match; a gap is what the unaligned planes still cost.
- smem: the class_feature_stats forward at 91x161 for float32 C = 19, 32, 40, 64 and float64
  C = 19, 40: from C = 32 (float32) and for float64 the per-warp accumulators need more than
  48 KB, so the time per position should stay near C = 19's instead of doubling.
- det: forward+backward with torch.use_deterministic_algorithms on and off; with the fresh
  outputs no longer NaN-filled, "on" should cost only its fixed-order reductions.

    python scripts/cuda_paths_bench.py [--device cuda|cpu] [--parts loads,smem,det] [--rounds N] [--out DIR]

Prints a table (and writes cuda-paths.md and .json to --out): the median of each case, the
feature bytes it must move (forward: one read; the backward adds one write, feature_terms' one
more read, the released form's pre-pass one more read) and the GB/s that makes, against a large
device copy's. On the CPU (cpp backend, tiny rounds) it is a dry run of this script.
"""

import argparse
import json
import os
import statistics
import sys

import torch

import lsr_fast
from lsr_fast.bench.timing import copy_bandwidth, measure

B, K = 2, 2048
PARTS = ("loads", "smem", "det")


def inputs(h, w, C, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(B, K, h, w, generator=g).to(dtype)
    labels = torch.randint(0, C, (B, h, w), generator=g)
    labels[torch.rand(B, h, w, generator=g) < 0.1] = 255
    prototypes = torch.randn(C, K, generator=g)
    return features.to(device), labels.to(device), prototypes.to(device)


def case_fn(op, backward, features, labels, prototypes, C, backend):
    """The timed callable and how many times it moves the feature bytes."""
    x = features.requires_grad_(backward)
    r = float(K) ** 0.5
    if op == "class_feature_stats":
        def fn():
            sums, _ = lsr_fast.class_feature_stats(x, labels, C, backend=backend)
            if backward:
                x.grad = None
                sums.sum().backward()
        return fn, 1 + (1 if backward else 0)
    released = op == "feature_terms_released"
    kwargs = dict(distance="l1_mean", filtered=True, relative_to=r) if released else {}

    def fn():
        t = lsr_fast.feature_terms(x, labels, prototypes, r, mode="source", backend=backend, **kwargs)
        if backward:
            x.grad = None
            (t[0].sum() + t[2].sum() + t[3] + t[4]).backward()
    return fn, 1 + (1 if released else 0) + (2 if backward else 0) + (1 if backward and released else 0)


def cases(parts):
    """(part, op, backward, (h, w), C, dtype, deterministic)."""
    out = []
    ops = ("class_feature_stats", "feature_terms", "feature_terms_released")
    if "loads" in parts:
        for dtype in (torch.float32, torch.bfloat16):
            for op in ops:
                for backward in (False, True):
                    for size in ((91, 161), (96, 160)):
                        out.append(("loads", op, backward, size, 19, dtype, False))
    if "smem" in parts:
        for dtype, Cs in ((torch.float32, (19, 32, 40, 64)), (torch.float64, (19, 40))):
            for C in Cs:
                out.append(("smem", "class_feature_stats", False, (91, 161), C, dtype, False))
    if "det" in parts:
        for op in ("class_feature_stats", "feature_terms"):
            for det in (False, True):
                out.append(("det", op, True, (91, 161), 19, torch.float32, det))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--rounds", type=int, default=None, help="timed calls per case (default 20; CPU 2)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; expected some of {', '.join(PARTS)}")
    cpu = device.type != "cuda"
    backend = "cpp" if cpu else "cuda"
    rounds = args.rounds or (2 if cpu else 20)
    copy = copy_bandwidth(device, warmup=1 if cpu else 3, rounds=2 if cpu else 10)
    rows = []
    lsr_fast.set_value_checks(False)  # no host synchronisation inside the timed calls
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        for part, op, backward, (h, w), C, dtype, det in cases(parts):
            if cpu and dtype == torch.bfloat16:
                continue
            if cpu:  # a dry run: small maps
                h, w = h // 8, w // 8
            features, labels, prototypes = inputs(h, w, C, dtype, device)
            fn, reads = case_fn(op, backward, features, labels, prototypes, C, backend)
            torch.use_deterministic_algorithms(det)
            times = measure(fn, device, warmup=1 if cpu else 3, rounds=rounds, min_time=0.0 if cpu else 0.5)
            torch.use_deterministic_algorithms(previous)
            median = statistics.median(times)
            moved = reads * features.numel() * features.element_size()
            rows.append(dict(part=part, op=op, passes="fwd+bwd" if backward else "fwd", size=f"{h}x{w}", C=C,
                             dtype=str(dtype).replace("torch.", ""), deterministic=det, median_ms=median,
                             ns_per_position=median * 1e6 / (B * h * w), mb=moved / 1e6,
                             gbps=moved / (median * 1e-3) / 1e9))
            print(f"{part:5} {op:23} {rows[-1]['passes']:7} {rows[-1]['size']:>7} C{C:<3} {rows[-1]['dtype']:8} "
                  f"det={'on ' if det else 'off'} {median:8.3f} ms {rows[-1]['ns_per_position']:8.2f} ns/pos "
                  f"{rows[-1]['gbps']:7.1f} GB/s", flush=True)
    finally:
        torch.use_deterministic_algorithms(previous)
        lsr_fast.set_value_checks(True)
    device_name = torch.cuda.get_device_name(device) if not cpu else "cpu"
    lines = [f"# CUDA performance paths on {device_name}", "",
             f"Copy bandwidth {copy['gbps']:.1f} GB/s; backend {backend}; median of >= {rounds} calls, L2 flushed.", "",
             "| part | op | pass | size | C | dtype | det | median ms | ns/position | GB/s | % of copy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['part']} | {r['op']} | {r['passes']} | {r['size']} | {r['C']} | {r['dtype']} | "
                     f"{'on' if r['deterministic'] else 'off'} | {r['median_ms']:.3f} | {r['ns_per_position']:.2f} | "
                     f"{r['gbps']:.1f} | {100 * r['gbps'] / copy['gbps']:.0f} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cuda-paths.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "cuda-paths.json"), "w") as f:
        json.dump(dict(device=device_name, copy=copy, rows=rows), f, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
