"""Shared test configuration: the backends the op tests run on (and those that must be usable),
and the tolerances by kind of output.

Backends. The op tests are parametrised over every (device, fast backend) pair that can exist:
cpu-cpp, cpu-triton (Triton's interpreter), cuda-cuda and cuda-triton. A pair that cannot run
here is a skipped case whose reason says why (``-ra`` in pytest's addopts prints it), never a
case that silently vanishes.

Required backends. ``LSR_FAST_REQUIRE_BACKENDS`` (comma-separated names from
``lsr_fast.BACKENDS``) lists the backends that must be usable. If one is not, the session stops
before running anything with an error that names it and gives ``lsr_fast.available_backends()``'s
reason: a failed build of the extension, or a Triton that cannot interpret, must not turn
hundreds of cases into skips on a green CI. ``scripts/test.sh`` (and so ``.ci/run``) sets
``cpp,triton`` unless the variable is set already; set it to ``cpp,cuda,triton`` on a GPU machine
with the CUDA build, or to the empty string to require nothing.
"""

import contextlib
import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be chosen
# before any Triton kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lsr_fast  # noqa: E402

REQUIRE_ENV = "LSR_FAST_REQUIRE_BACKENDS"


def required_backends():
    """The backend names LSR_FAST_REQUIRE_BACKENDS lists (empty when unset or empty)."""
    names = [name.strip() for name in os.environ.get(REQUIRE_ENV, "").split(",") if name.strip()]
    unknown = [name for name in names if name not in lsr_fast.BACKENDS]
    if unknown:
        raise pytest.UsageError(f"{REQUIRE_ENV}={os.environ[REQUIRE_ENV]!r}: unknown backend(s) {unknown}; "
                                f"expected comma-separated names from {lsr_fast.BACKENDS}")
    return names


def pytest_configure(config):
    """Fail the whole session (exit status 4, nothing runs) when a required backend is not usable."""
    config.addinivalue_line("markers", "paper_scale: DeepLabV2-ResNet-101 at the paper's image sizes on the CPU "
                            "(~10 min on 2 cores, ~12 GiB); runs only with LSR_FAST_PAPER_SCALE=1 (tests/test_paper_scale.py)")
    config.addinivalue_line("markers", "gpu_paper_shape: every op and a training step on the GPU at the paper's shape "
                            "(tests/test_gpu_paper_shape.py; skipped without CUDA, LSR_FAST_GPU_TEST_DEVICE=cpu dry-runs it)")
    available = lsr_fast.available_backends()
    missing = [name for name in required_backends() if available[name] != "available"]
    if missing:
        reasons = "; ".join(f"{name}: {available[name]}" for name in missing)
        raise pytest.UsageError(
            f"{REQUIRE_ENV}={os.environ[REQUIRE_ENV]!r} requires backend(s) {missing}, not usable here ({reasons}). "
            f"lsr_fast.available_backends() = {available}. Fix the build or environment, or change {REQUIRE_ENV}.")


# ---- backends -----------------------------------------------------------------------------------


@contextlib.contextmanager
def sync_debug_error(device):
    """torch.cuda.set_sync_debug_mode("error") inside the block (a host synchronisation raises),
    the previous mode restored after; nothing on the CPU."""
    if torch.device(device).type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# Every (device, fast backend) pair the op tests cover: what gets compared with the reference.
FAST_PAIRS = [("cpu", "cpp"), ("cpu", "triton"), ("cuda", "cuda"), ("cuda", "triton")]


def unusable_reason(device, backend):
    """Empty when ``backend`` runs on ``device`` tensors here, else why not."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    state = lsr_fast.available_backends()[backend]
    if state != "available":
        return state
    if device == "cpu" and backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs compiled on the GPU here (TRITON_INTERPRET is not 1): see the cuda-triton cases"
    return ""


def usable_backends(device="cpu"):
    """Backends that run on tensors of ``device`` here (always at least "reference")."""
    return ["reference"] + [b for d, b in FAST_PAIRS if d == device and not unusable_reason(d, b)]


def _param(device, backend):
    reason = unusable_reason(device, backend)
    marks = [pytest.mark.skip(reason=f"{backend} backend on {device} tensors: {reason}")] if reason else []
    return pytest.param(device, backend, id=f"{device}-{backend}", marks=marks)


def fast_params():
    """Every (device, fast backend) pair; those that cannot run here are skipped with the reason."""
    return [_param(d, b) for d, b in FAST_PAIRS]


def all_params():
    """fast_params() plus the reference on each device. For tests that check each backend on its
    own (gradcheck, input checks); a comparison with the reference takes fast_params()."""
    return [_param(d, "reference") for d in ("cpu", "cuda")] + fast_params()


# ---- tolerances ---------------------------------------------------------------------------------

# Per-element outputs returned in the input's dtype (gradients above all): computed in float32
# and rounded to the input's dtype at the end, so half precision gets half-precision tolerances
# (unit roundoff 2^-11 = 4.9e-4 for float16, 2^-8 = 3.9e-3 for bfloat16).
TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}

# Outputs the kernels accumulate (class sums, squared-distance sums, norm sums, every loss) are
# float32 for float16, bfloat16 and float32 inputs, float64 for float64 ones, as in the reference
# (reference._accumulate_dtype), which upcasts the same input before summing. Compared with the
# reference on the same input, the two differ only in summation order, whatever the input dtype.
# A sum of n terms x_i in float32 (unit roundoff u = 2^-24 = 6.0e-8) errs by at most about
# n*u*sum|x_i| (an unreachable worst case) and by about sqrt(n)*u*sum|x_i| in practice; the bound
# 1e-5*sum|x_i| (170 u) covers sqrt(n) up to 170, i.e. sums of 28,000 terms, and the tests sum at
# most about 10,000 (K*N terms of the squared distances). A sum accumulated in float16 instead, or
# rounded to float16 at the end, errs by about u16 = 2^-11 = 4.9e-4 relative: 49 times the bound
# (bfloat16: 390 times). Float64 (u = 1.1e-16): 1e-12, about 9,000 u. Measured on the CPU
# (cpp and the Triton interpreter, every op test): the largest error was 3% of the bound.
ACCUMULATED_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def accumulate_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_accumulated_close(got, want, input_dtype, magnitude=None, what="value"):
    """``got``, a kernel's accumulated output, against ``want``, the reference's on the same input:
    both in the accumulation dtype of ``input_dtype``, and |got - want| <= ACCUMULATED_RTOL *
    ``magnitude`` element by element. ``magnitude`` is the sum of the absolute values of the
    summed terms (computed by the caller, with the reference); by default |want|, which it is
    when the terms share one sign (squared distances, norms, MaxSquare). The bound is relative,
    so a value near 0 is compared to its own size: returning 0 for a loss of 1e-6 fails."""
    acc = accumulate_dtype(input_dtype)
    got, want = got.detach().cpu(), want.detach().cpu()
    assert want.dtype == acc, f"{what}: the reference returned {want.dtype} for {input_dtype} input, expected {acc}"
    assert got.dtype == acc, f"{what}: dtype {got.dtype} for {input_dtype} input, expected {acc} (accumulated)"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    magnitude = want.abs() if magnitude is None else torch.as_tensor(magnitude).detach().cpu()
    # finfo.tiny: where every term is 0 the result must be 0 (up to a flushed subnormal).
    bound = ACCUMULATED_RTOL[acc] * magnitude.double().expand(want.shape) + torch.finfo(acc).tiny
    error = (got.double() - want.double()).abs()
    bad = ~(error <= bound)  # NaN is bad too
    if bad.any():
        i = int((error - bound).masked_fill(~bad, float("-inf")).reshape(-1).argmax()) if bad.numel() > 1 else 0
        got_i, want_i = got.reshape(-1)[i].item(), want.reshape(-1)[i].item()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements outside {ACCUMULATED_RTOL[acc]:g} * sum|terms|; "
            f"worst at flat index {i}: got {got_i!r}, expected {want_i!r}, error {error.reshape(-1)[i].item():.3e}, "
            f"bound {bound.reshape(-1)[i].item():.3e} (sum|terms| {magnitude.double().expand(want.shape).reshape(-1)[i].item():.3e})")


def feature_terms_magnitudes(features, labels, num_classes, reference_value, want, ignore_index=255):
    """sum|terms| of each output of feature_terms (None for the exact counts), for
    assert_accumulated_close, from the reference's outputs ``want`` on the same input:
    class sums: the class sums of |f|; squared distances and norms: themselves (terms >= 0);
    the norm-alignment sum: sum over vectors of |r| + ||f||, since each term |r - ||f||| (or
    max(0, r - ||f||)) carries the rounding of ||f|| and r, not of their difference."""
    from lsr_fast import reference

    abs_sums, _ = reference.class_feature_stats(features.detach().abs(), labels, num_classes, ignore_index)
    vectors = features.numel() // features.shape[1]
    r = abs(float(reference_value))
    norm_sum = want[4].detach()
    return (abs_sums, None, want[2].detach().abs(), vectors * r + norm_sum, norm_sum.abs())


def assert_rounded_close(got, want, dtype, what="gradient"):
    """``got``, an output returned in the input's ``dtype`` (a gradient: computed in float32 and
    rounded to ``dtype``), against the reference's ``want``: TOLERANCES[dtype]'s rtol, and its
    atol but never more than rtol * max|want|, so a gradient whose entries are all small (features
    sitting on their prototypes, MaxSquare's 1/N weights) is compared to its own size instead of
    passing whatever it holds. Floor: one subnormal step of ``dtype`` (two roundings of nearly
    equal values may differ by it) plus float32's smallest normal (a GPU flushes subnormals)."""
    assert got.dtype == want.dtype == dtype, f"{what}: dtype {got.dtype}, reference {want.dtype}, expected {dtype}"
    got, want = got.detach().cpu(), want.detach().cpu()
    tol = TOLERANCES[dtype]
    scale = float(want.abs().max()) if want.numel() else 0.0
    info = torch.finfo(dtype)
    atol = min(tol["atol"], tol["rtol"] * scale) + info.tiny * info.eps + torch.finfo(torch.float32).tiny
    torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=atol, msg=lambda m: f"{what} (atol {atol:.3g}): {m}")
