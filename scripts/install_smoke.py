"""Smoke test of an installed lsr_fast (scripts/check_install.sh runs it in a fresh virtualenv):
every public op on the cpp backend, forward and backward, against the reference backend, and
where the compiled extension came from.

    python scripts/install_smoke.py --origin package   # the wheel's lsr_fast/_C*.so
    python scripts/install_smoke.py --origin cache     # compiled on first use

Run it from outside the source tree, so that `import lsr_fast` finds the installed package.
Exit status 0 when everything matches; otherwise the failures are listed.
"""

import argparse
import os
import sys

import torch

import lsr_fast
from lsr_fast import _loader


def close(a, b, name, failures, rtol=1e-4, atol=1e-5):
    if a.dtype in (torch.int64, torch.int32) or b.dtype in (torch.int64, torch.int32):
        ok = torch.equal(a, b)
    else:
        ok = torch.allclose(a, b, rtol=rtol, atol=atol)
    if not ok:
        failures.append(f"{name}: cpp {a.flatten()[:4].tolist()} vs reference {b.flatten()[:4].tolist()}")
    return ok


def run_both(fn, *tensors):
    """fn(backend, *leaves) for cpp and reference; returns [(outputs, grads of the leaves)]."""
    results = []
    for backend in ("cpp", "reference"):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
        out = fn(backend, *leaves)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum(o.float().sum() * (i + 1) for i, o in enumerate(outs) if o.requires_grad)
        grads = torch.autograd.grad(loss, [t for t in leaves if t.requires_grad]) if torch.is_tensor(loss) else ()
        results.append((outs, grads))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--origin", choices=("package", "cache"), required=True,
                        help="where the extension must come from: the installed package or the compile cache")
    args = parser.parse_args()
    failures = []
    state = lsr_fast.available_backends()
    info = _loader.extension_info() or {}
    print(f"lsr_fast {lsr_fast.__version__} from {os.path.dirname(lsr_fast.__file__)}; torch {torch.__version__}")
    print(f"extension: {info.get('origin')} {info.get('path')}")
    if state["cpp"] != "available":
        print(f"FAIL: the cpp backend is not usable: {state['cpp']}")
        return 1
    if info.get("origin") != args.origin:
        failures.append(f"the extension came from {info.get('origin')!r} ({info.get('path')}), expected {args.origin!r}")

    torch.manual_seed(0)
    C, K = 6, 8
    labels = torch.randint(0, C, (2, 37, 53))
    labels[:, :3] = 255
    probs = torch.softmax(torch.randn(2, C, 37, 53), 1)
    features = torch.randn(2, K, 9, 11).relu_() + 0.1
    prototypes = torch.randn(C, K)
    small = lsr_fast.hist_downsample(labels, (9, 11), C, backend="reference")

    ops = {
        "hist_downsample": (lambda b: lsr_fast.hist_downsample(labels, (9, 11), C, backend=b), ()),
        "pseudo_label_downsample": (lambda b: lsr_fast.pseudo_label_downsample(probs, (9, 11), backend=b), ()),
        "class_feature_stats": (lambda b, f: lsr_fast.class_feature_stats(f, small, C, backend=b), (features,)),
        "clustering_loss": (lambda b, f: lsr_fast.clustering_loss(f, small, prototypes, backend=b), (features,)),
        "clustering_loss l1_mean": (
            lambda b, f: lsr_fast.clustering_loss(f, small, prototypes, distance="l1_mean", backend=b), (features,)),
        "perpendicularity_loss": (lambda b, f: _perpendicularity(b, f, small, C), (features,)),
        "norm_alignment_loss source": (lambda b, f: lsr_fast.norm_alignment_loss(f, 3.0, backend=b), (features,)),
        "norm_alignment_loss target": (
            lambda b, f: lsr_fast.norm_alignment_loss(f, 3.0, mode="target", relative_to=2.0, filtered=True, backend=b),
            (features,)),
        "maxsquare_loss": (lambda b, p: lsr_fast.maxsquare_loss(p, backend=b), (probs,)),
        "feature_terms": (lambda b, f: lsr_fast.feature_terms(f, small, prototypes, 3.0, backend=b), (features,)),
    }
    for name, (fn, tensors) in ops.items():
        (cpp_out, cpp_grad), (ref_out, ref_grad) = run_both(fn, *tensors)
        ok = all(close(a, b, f"{name} output {i}", failures) for i, (a, b) in enumerate(zip(cpp_out, ref_out)))
        ok &= all(close(a, b, f"{name} gradient", failures) for a, b in zip(cpp_grad, ref_grad))
        print(f"  {name:28s} {'ok' if ok else 'MISMATCH'}")
    for failure in failures:
        print(f"FAIL: {failure}")
    return 1 if failures else 0


def _perpendicularity(backend, features, labels, num_classes):
    """Eq. 6 on the batch prototypes, whose gradient flows through class_feature_stats."""
    sums, counts = lsr_fast.class_feature_stats(features, labels, num_classes, backend=backend)
    present = counts > 0
    prototypes = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
    return lsr_fast.perpendicularity_loss(prototypes, present)


if __name__ == "__main__":
    sys.exit(main())
