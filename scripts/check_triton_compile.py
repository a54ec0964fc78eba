"""Compile every Triton kernel of lsr_fast for real GPUs, on a machine without one.

    python scripts/check_triton_compile.py              # sm_90 (H100/H200) and sm_80 (A100)
    python scripts/check_triton_compile.py --arch 90 -v # one architecture, list every kernel
    python scripts/check_triton_compile.py --only feature_terms   # one group of ops (repeatable)

Triton's interpreter (what the tests use without a GPU) runs kernels in NumPy and accepts much
that the compiler rejects (Python control flow such as `break`, type rules, instructions a
target lacks). This script
runs each op of the Triton backend through the public API on CPU tensors, as a GPU run would
launch it, but with Triton's driver replaced by a stand-in that reports a GPU of the chosen
architecture, so every kernel specialisation is compiled by Triton's own compiler (TTIR ->
TTGIR -> LLVM -> PTX -> cubin with the ptxas Triton ships) -- for each autotuning config -- and
never launched. Nothing is computed: it proves that the kernels compile, not that they are right
(the tests on a GPU do that).

Inputs cover what changes a specialisation: feature/probability dtypes (float32, float16,
bfloat16, float64), layouts (NCHW, channels_last, (N, K) rows, strided views), class counts and
widths (C = 4/16/19/40, K = 3/64/2048/256), sizes that are and are not multiples of 16, class
weights, both norm modes, feature_terms' distances (squared_l2, l1_mean) and filtered norm
(each path: in the class pass for K <= BLOCK_K, whole-vector register tiles, and the two-sweep
stats kernel for K = 8200 beyond a tile), forward and backward.

Compiled kernels go to a fresh temporary Triton cache (removed at exit) unless TRITON_CACHE_DIR
is set. Exit status 0 when every specialisation compiled, 1 otherwise (each failure is printed with
the kernel, its constants and the compiler's message). Uses private Triton internals
(``triton.runtime.driver``, ``JITFunction._do_compile``); fails with a clear message when this
Triton no longer has them.
"""

from __future__ import annotations

import argparse
import atexit
import inspect
import os
import shutil
import sys
import tempfile
import time
import traceback

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("check_triton_compile: unset TRITON_INTERPRET (this compiles the kernels; the interpreter compiles nothing)")
if __name__ == "__main__" and not os.environ.get("TRITON_CACHE_DIR"):
    # A fresh cache, so every kernel is compiled now rather than read from an earlier run's cubins.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="lsr_fast_triton_check_")
    atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], True)

import torch  # noqa: E402
import triton  # noqa: E402

try:
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver as triton_driver
    from triton.runtime.jit import JITFunction
except ImportError as error:  # pragma: no cover - depends on the Triton release
    sys.exit(f"check_triton_compile: this Triton ({triton.__version__}) lacks an internal the check needs: {error}")

_EXPECTED = ["self", "key", "signature", "device", "constexprs", "options", "attrs", "warmup"]
if list(inspect.signature(JITFunction._do_compile).parameters) != _EXPECTED:  # pragma: no cover
    sys.exit(f"check_triton_compile: this Triton ({triton.__version__}) has another JITFunction._do_compile "
             f"{inspect.signature(JITFunction._do_compile)}; the check was written for triton 3.6 to 3.9")


class CompileOnlyDriver:
    """Triton's view of "the current GPU": an architecture, device 0, stream 0, and a benchmarker
    that calls the kernel once (which compiles it) and reports the same time for every config."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        def bench(kernel_call, quantiles=None, **_):
            kernel_call()
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        return bench


class Compiler:
    """Replaces JITFunction._do_compile: compile for the stand-in's target, record, launch nothing."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.done = {}  # (kernel, arch, cache key) -> None or the error text
        self.seconds = 0.0

    def __call__(self, fn, key, signature, device, constexprs, options, attrs, warmup):
        _, _, target, _, _ = fn.device_caches[device]
        name = f"{fn.module}.{fn.__name__}"
        entry = (name, target.arch, key)
        if entry in self.done:
            return None
        constants = {str(path[0] if len(path) == 1 else path): value for path, value in constexprs.items()}
        start = time.perf_counter()
        try:
            fn.compile(fn.ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
            self.done[entry] = None
            if self.verbose:
                print(f"  ok   sm_{target.arch} {name} {constants}")
        except Exception as error:  # noqa: BLE001 - every compiler error is a finding
            message = "".join(traceback.format_exception_only(type(error), error)).strip()[-1500:]
            self.done[entry] = f"{name} (sm_{target.arch}) constants {constants}:\n    {message}"
            print(f"  FAIL sm_{target.arch} {name} {constants}\n    {message}")
        self.seconds += time.perf_counter() - start
        return None  # no kernel: JITFunction.run returns before launching


def allow_triton_on_cpu_tensors() -> None:
    """Let backend="triton" take CPU tensors (their data pointers are only read for alignment)."""
    import lsr_fast.triton as triton_backend
    from lsr_fast.ops import _backends

    triton_backend.unavailable_reason = lambda backend="triton": ""
    _backends._MODULES["triton"] = ("lsr_fast.triton", None)
    _backends._loaded.pop("triton", None)


GROUPS = ("downsample", "class_feature_stats", "feature_terms")

# feature_terms' (mode, distance, filtered): the paper's forms in both modes, and each released
# form with one mode (the norm mode is a runtime integer: it changes no code but Triton's "== 1"
# specialisation). The released forms at K = 2048 (the filtered norm's whole-vector stats kernel)
# and K = 3 (filtered in the class pass, K <= BLOCK_K), every layout and dtype; K = 64 and 256
# take the same paths with other block sizes.
PAPER_FORMS = [("source", "squared_l2", False), ("target", "squared_l2", False)]
RELEASED_FORMS = [("source", "l1_mean", False), ("source", "squared_l2", True), ("target", "l1_mean", True)]
RELEASED_FORM_WIDTHS = (2048, 3)


def exercise_ops(groups=GROUPS) -> int:
    """Call the ops of the Triton backend in ``groups`` (all by default), forward and backward,
    over the inputs that change a specialisation. Returns the number of calls."""
    import lsr_fast

    calls = 0
    g = torch.Generator().manual_seed(0)

    def grad(loss, *inputs):
        # The outputs are never computed (nothing launches); only the backward launches matter.
        torch.autograd.grad(loss, inputs, allow_unused=True)

    def feature_terms(f, lab, prototypes, switches):
        mode, distance, filtered = switches
        sums, _, dist, norm_loss, norm_sum = lsr_fast.feature_terms(
            f, lab, prototypes, 1.5, mode=mode, distance=distance, filtered=filtered, backend="triton")
        grad(sums.sum() + dist.sum() + norm_loss + norm_sum, f)
        return 2

    # Downsampling: labels (int64, uint8, a strided view), probabilities of every float dtype.
    for (H, W), (h, w), C in ([] if "downsample" not in groups else [((720, 1280), (91, 161), 19), ((64, 96), (8, 12), 16), ((33, 50), (7, 9), 4)]):
        labels = torch.randint(0, C, (2, H, W), generator=g)
        for lab in (labels, labels.to(torch.uint8), torch.randint(0, C, (2, H, 2 * W), generator=g)[..., ::2]):
            for weights in (None, torch.rand(C, generator=g)):
                lsr_fast.hist_downsample(lab, (h, w), C, class_weights=weights, backend="triton")
                calls += 1
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            probs = torch.rand(2, C, H, W, generator=g).softmax(1).to(dtype)
            lsr_fast.pseudo_label_downsample(probs, (h, w), backend="triton")
            p = probs.detach().requires_grad_()
            grad(lsr_fast.maxsquare_loss(p, alpha=0.2, backend="triton"), p)
            calls += 2
        p = torch.rand(2, C, H, W, generator=g).softmax(1).to(memory_format=torch.channels_last).requires_grad_()
        lsr_fast.pseudo_label_downsample(p.detach(), (h, w), backend="triton")
        grad(lsr_fast.maxsquare_loss(p, alpha=0.0, backend="triton"), p)
        calls += 2

    # Feature passes: class_feature_stats and feature_terms (every switch), every layout and dtype.
    feature_groups = {"class_feature_stats", "feature_terms"} & set(groups)
    for K, (h, w), C in ([] if not feature_groups else [(2048, (91, 161), 19), (64, (17, 33), 16), (3, (5, 7), 4), (256, (16, 32), 40)]):
        base = torch.randn(2, K, h, w, generator=g).relu_()
        labels = torch.randint(0, C, (2, h, w), generator=g)
        prototypes = torch.randn(C, K, generator=g)
        maps = {
            "nchw": (base, labels),
            "channels_last": (base.to(memory_format=torch.channels_last), labels),
            "rows": (base.permute(0, 2, 3, 1).reshape(-1, K), labels.reshape(-1)),
            "strided": (torch.randn(2, K, h, 2 * w, generator=g)[..., ::2], labels),
        }
        for features, lab in maps.values():
            for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                f = features.to(dtype).detach().requires_grad_()
                if "class_feature_stats" in groups:
                    sums, _ = lsr_fast.class_feature_stats(f, lab, C, backend="triton")
                    grad(sums.sum(), f)
                    calls += 2
                if "feature_terms" in groups:
                    for switches in PAPER_FORMS + (RELEASED_FORMS if K in RELEASED_FORM_WIDTHS else []):
                        calls += feature_terms(f, lab, prototypes.to(dtype), switches)
    # The filtered norm's other paths: K = 1 (Triton makes an integer 1 a constant; the mean divides
    # by it) and K = 8200, beyond one register tile of whole vectors (two sweeps over the channels).
    for K, (h, w), C in ([] if "feature_terms" not in groups else [(1, (5, 7), 4), (8200, (3, 5), 4)]):
        base = torch.randn(2, K, h, w, generator=g)
        labels = torch.randint(0, C, (2, h, w), generator=g)
        prototypes = torch.randn(C, K, generator=g)
        for features in (base, base.to(memory_format=torch.channels_last), base[..., ::2]):
            for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                f = features.to(dtype).detach().requires_grad_()
                lab = labels[..., ::2] if features.shape[-1] != w else labels
                calls += feature_terms(f, lab, prototypes.to(dtype), ("source", "l1_mean", True))
    return calls


def compile_only(archs, exercise, verbose: bool = False) -> Compiler:
    """Run ``exercise()`` (which launches Triton kernels and returns how many op calls it made)
    once per architecture with every launch compiled for it instead of run."""
    compiler = Compiler(verbose)
    original, active = JITFunction._do_compile, getattr(triton_driver, "_active", None)
    JITFunction._do_compile = lambda fn, *rest: compiler(fn, *rest)
    try:
        for arch in archs:
            triton_driver.set_active(CompileOnlyDriver(arch))
            _forget_compiled_kernels()
            print(f"compiling for sm_{arch} (triton {triton.__version__}) ...", flush=True)
            calls = exercise()
            done = [e for e in compiler.done if e[1] == arch]
            print(f"sm_{arch}: {calls} op calls, {len(done)} kernel specialisations (every autotuning config)", flush=True)
    finally:
        JITFunction._do_compile = original
        triton_driver._active = active  # reset_active() would look for a real GPU driver
    return compiler


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=(80, 86, 89, 90),
                        help="compute capability x10 to compile for (repeatable; default 90 and 80)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every compiled specialisation")
    parser.add_argument("--only", action="append", choices=GROUPS,
                        help="compile the kernels of these ops only (repeatable; default all)")
    args = parser.parse_args(argv)
    groups = tuple(args.only or GROUPS)

    import lsr_fast

    lsr_fast.set_value_checks(False)
    allow_triton_on_cpu_tensors()
    start = time.perf_counter()
    compiler = compile_only(args.arch or [90, 80], lambda: exercise_ops(groups), args.verbose)
    failures = [error for error in compiler.done.values() if error]
    kernels = sorted({e[0] for e in compiler.done})
    print(f"{len(compiler.done)} compilations of {len(kernels)} kernels in {compiler.seconds:.0f} s "
          f"({time.perf_counter() - start:.0f} s in all); {len(failures)} failed")
    for name in kernels:
        print(f"  {name}: {sum(e[0] == name for e in compiler.done)}")
    if failures:
        print("\nFAILED:\n" + "\n".join(failures))
        return 1
    return 0


def _forget_compiled_kernels() -> None:
    """Drop every kernel's per-device cache (target, binder), so the next call sees the new target;
    and the autotuners' picks, so every config compiles again."""
    import gc
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() touches deprecated attributes of some modules
        for obj in gc.get_objects():
            if isinstance(obj, JITFunction):
                obj.device_caches.clear()
            elif isinstance(obj, triton.runtime.Autotuner):
                obj.cache.clear()


if __name__ == "__main__":
    sys.exit(main())
