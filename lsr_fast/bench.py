"""`lsr-fast bench`: time every LSR op on every backend, and a DeepLabV2 training step with LSR.

One source of truth for what is measured: the cases (op x backend x shape x pass x dtype), their
inputs, the bytes each must move and the way it is timed live here. ``lsr-fast bench`` runs them
and writes ``<out>/<device>-<date>.json``, ``.md`` and ``.png``; ``benchmarks/`` runs the same
cases under pytest-benchmark. See benchmarks/README.md for what every number means.

    lsr-fast bench --quick                       # small shapes, few rounds
    lsr-fast bench --shapes gta5 --backends reference,cpp --ops losses,train_step
    lsr-fast bench --shapes gta5 --time-budget 8   # stop starting cases after 8 minutes
    lsr-fast bench --merge part1.json part2.json   # one report from runs split by shape or op
"""

from __future__ import annotations

import argparse
import datetime
import gc
import io
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import lsr_fast
from lsr_fast import reference
from lsr_fast._atomic import atomic_write_bytes
from lsr_fast.ops._checks import value_checks_enabled

# ---------------------------------------------------------------------------------------------
# What is measured


@dataclass(frozen=True)
class Shape:
    """Labels / probabilities B x H x W (B = 1, the paper's batch), features K x h x w, C classes."""

    H: int
    W: int
    h: int
    w: int
    K: int
    C: int


SHAPES = {
    "gta5": Shape(720, 1280, 91, 161, 2048, 19),  # GTA5 source at the paper's 1280x720
    "synthia": Shape(760, 1280, 96, 161, 2048, 16),  # SYNTHIA source, 16 classes
    "cityscapes": Shape(512, 1024, 65, 129, 2048, 19),  # Cityscapes target at 1024x512
    "small": Shape(128, 256, 17, 33, 256, 19),
    "tiny": Shape(32, 64, 5, 9, 32, 19),  # smoke tests only
}
PAPER_SHAPES = ("gta5", "synthia", "cityscapes")
DEFAULT_SHAPES = ("gta5", "synthia", "cityscapes", "small")

# op -> the passes it has. "losses" is clustering + norm alignment + perpendicularity of one feature
# map through lsr_fast.feature_terms (what LSRRegularizer computes per domain), "losses_released"
# the same with the released code's forms (L1-mean clustering, relative filtered norm); "regularizer" is a
# whole LSRRegularizer call (GTA5 preset, or SYNTHIA's for 16 classes) on one source and one target.
OPS = {
    "hist_downsample": ("fwd",),
    "pseudo_label_downsample": ("fwd",),
    "class_feature_stats": ("fwd", "fwd+bwd"),
    "losses": ("fwd", "fwd+bwd"),
    "losses_released": ("fwd", "fwd+bwd"),
    "maxsquare_loss": ("fwd", "fwd+bwd"),
    "regularizer": ("fwd", "fwd+bwd"),
}
STEP = "train_step"  # selectable with --ops like an op
BACKENDS = ("reference", "compile", "cpp", "cuda", "triton")  # "compile" = torch.compile(reference)
PASSES = ("fwd", "fwd+bwd")
DTYPES = ("float32", "bfloat16")
FAST_BACKENDS = ("cpp", "cuda", "triton")


@dataclass(frozen=True)
class Case:
    op: str
    shape: str
    backward: bool
    dtype: str  # of the float inputs; "int64" for hist_downsample, whose only input is labels
    backend: str

    @property
    def pass_name(self) -> str:
        return "fwd+bwd" if self.backward else "fwd"

    @property
    def name(self) -> str:
        return f"{self.op}-{self.shape}-{self.pass_name}-{self.dtype}-{self.backend}"


def backend_skip_reason(backend: str, device: torch.device) -> str:
    """Why ``backend`` is not timed on ``device`` ("" when it is)."""
    if backend == "reference":
        return ""
    if backend == "compile":
        return "" if hasattr(torch, "compile") else f"torch {torch.__version__} has no torch.compile"
    runs_on = "cpu" if backend == "cpp" else "cuda"
    if device.type != runs_on:
        if backend == "triton":
            return "runs on CPU tensors only in Triton's interpreter (a testing aid); not timed"
        return f"runs on {runs_on} tensors; this run is on {device.type}"
    state = lsr_fast.available_backends()[backend]
    return "" if state == "available" else state


def cases(
    device: torch.device,
    ops: Sequence[str] = tuple(OPS),
    backends: Sequence[str] = BACKENDS,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    passes: Sequence[str] = PASSES,
    dtypes: Sequence[str] = DTYPES,
) -> Tuple[List[Case], Dict[str, str]]:
    """The cases that run on ``device``, and {what: why not} for the backends and dtypes left out.

    Order: shape, dtype, op, pass, backend (reference first), so inputs are made once per shape
    and dtype and each speed-up's reference is already measured.
    """
    for name, given, known in (("ops", ops, tuple(OPS) + (STEP,)), ("backends", backends, BACKENDS),
                               ("shapes", shapes, tuple(SHAPES)), ("passes", passes, PASSES), ("dtypes", dtypes, DTYPES)):
        unknown = [item for item in given if item not in known]
        if unknown:
            raise ValueError(f"{name}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    skipped: Dict[str, str] = {}
    usable = []
    for backend in BACKENDS:
        if backend in backends:
            reason = backend_skip_reason(backend, device)
            if reason:
                skipped[f"backend {backend}"] = reason
            else:
                usable.append(backend)
    float_dtypes = []
    for dtype in DTYPES:
        if dtype in dtypes:
            if dtype == "bfloat16" and device.type != "cuda":
                skipped["dtype bfloat16"] = "measured on GPU only"
            else:
                float_dtypes.append(dtype)
    out = []
    for shape in shapes:
        for dtype in ["int64"] + float_dtypes:
            for op in OPS:
                if op not in ops or (dtype == "int64") != (op == "hist_downsample"):
                    continue
                for pass_name in OPS[op]:
                    if pass_name in passes:
                        out.extend(Case(op, shape, pass_name == "fwd+bwd", dtype, b) for b in usable)
    return out, skipped


# ---------------------------------------------------------------------------------------------
# Inputs, the callables that are timed, and the bytes they must move

_inputs_cache: Dict[tuple, dict] = {}


def make_inputs(shape: str, dtype: str, device: torch.device, seed: int = 0) -> dict:
    """Deterministic inputs of a shape (made on the CPU, then moved); the last set is cached.

    Labels are 16x16 blocks of random classes with a sprinkle of void pixels; probabilities are a
    softmax that favours the label (most windows confident, as pseudo-labels need); features are
    post-ReLU. ``dtype`` is that of features and probabilities ("int64" gives float32 ones).
    """
    key = (shape, dtype, str(device), seed)
    if key in _inputs_cache:
        return _inputs_cache[key]
    _inputs_cache.clear()
    s = SHAPES[shape]
    float_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, s.C, (1, s.H // 16 + 1, s.W // 16 + 1), generator=g)
    labels = coarse.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, : s.H, : s.W].contiguous()
    labels[:, ::11, ::7] = 255
    logits = torch.randn(1, s.C, s.H, s.W, generator=g)
    logits.scatter_add_(1, labels.clamp(max=s.C - 1).unsqueeze(1), torch.full((1, 1, s.H, s.W), 4.0))
    probs = logits.softmax(1)
    del logits
    features = torch.randn(1, s.K, s.h, s.w, generator=g).relu_()
    target_features = torch.randn(1, s.K, s.h, s.w, generator=g).relu_()
    small = reference.hist_downsample(labels, (s.h, s.w), s.C)
    sums, counts = reference.class_feature_stats(features, small, s.C)
    prototypes = sums / counts.clamp(min=1).unsqueeze(1)  # the EMA bank after one step with "first" init
    inputs = dict(
        labels=labels,
        probs=probs.to(float_dtype),
        features=features.to(float_dtype),
        target_features=target_features.to(float_dtype),
        small=small,
        prototypes=prototypes,
        norm_reference=torch.linalg.vector_norm(features, dim=1).mean() + 0.002,
        grad_weights=torch.randn(s.C, s.K, generator=g),
    )
    inputs = {k: v.to(device) for k, v in inputs.items()}
    _inputs_cache[key] = inputs
    return inputs


def _forward(op: str, x: dict, s: Shape, backend: str, backward: bool) -> Tuple[Callable, list]:
    """(forward, leaves): ``forward()`` returns what a backward pass would differentiate (a scalar
    for the differentiable ops), ``leaves`` the inputs that require grad (none for ``fwd``)."""
    size = (s.h, s.w)

    def leaf(name):
        return x[name].detach().requires_grad_(backward)  # shares storage: no copy

    if op == "hist_downsample":
        return (lambda: lsr_fast.hist_downsample(x["labels"], size, s.C, backend=backend)), []
    if op == "pseudo_label_downsample":
        return (lambda: lsr_fast.pseudo_label_downsample(x["probs"], size, backend=backend)), []
    if op == "class_feature_stats":
        f = leaf("features")

        def forward():
            sums, _ = lsr_fast.class_feature_stats(f, x["small"], s.C, backend=backend)
            return (sums * x["grad_weights"]).sum()

        return forward, [f]
    if op in ("losses", "losses_released"):
        f = leaf("features")
        vectors = s.h * s.w
        released = op == "losses_released"
        form = dict(distance="l1_mean", filtered=True, relative_to=x["norm_reference"]) if released else {}
        distance = form.get("distance", "squared_l2")

        def forward():
            sums, counts, dist, norm_loss, _ = lsr_fast.feature_terms(
                f, x["small"], x["prototypes"], x["norm_reference"], mode="source", backend=backend, **form)
            batch_prototypes = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
            return (reference.clustering_from_sums(dist, counts, distance=distance, width=s.K) + norm_loss / vectors
                    + lsr_fast.perpendicularity_loss(batch_prototypes, counts > 0))

        return forward, [f]
    if op == "maxsquare_loss":
        p = leaf("probs")
        return (lambda: lsr_fast.maxsquare_loss(p, alpha=0.2, backend=backend)), [p]
    if op == "regularizer":
        preset = "synthia" if s.C == 16 else "gta5"
        reg = lsr_fast.LSRRegularizer.from_preset(preset, feature_dim=s.K, num_classes=s.C, backend=backend)
        reg = reg.to(x["features"].device)
        fs, ft, p = leaf("features"), leaf("target_features"), leaf("probs")
        return (lambda: reg(fs, x["labels"], ft, p)["total"]), [fs, ft, p]
    raise ValueError(f"op must be one of {tuple(OPS)}, got {op!r}")


def bytes_moved(case: Case, x: dict) -> int:
    """Hand model of the fewest bytes the case must read and write in DRAM: every input element
    read once and every output written once per pass (backward re-reads what its gradient needs;
    a regularizer call is the sum of its ops, so the probabilities are read by two of them)."""
    s = SHAPES[case.shape]

    def nb(t):
        return t.numel() * t.element_size()

    table = s.C * s.K * 4  # one float32 (C, K) table: prototypes, sums or their gradient
    small = nb(x["small"])  # int64 labels at feature resolution (also the downsampling outputs)
    feats = nb(x["features"])
    hist = nb(x["labels"]) + small
    pseudo = nb(x["probs"]) + small
    terms_fwd = feats + small + 2 * table  # features, labels, prototypes in; sums out
    terms_bwd = 2 * feats + small + 2 * table  # features, labels, prototypes, grad sums in; grad out
    forward = {
        "hist_downsample": hist,
        "pseudo_label_downsample": pseudo,
        "class_feature_stats": feats + small + table,
        "losses": terms_fwd,
        "losses_released": terms_fwd,
        "maxsquare_loss": nb(x["probs"]),
        "regularizer": hist + pseudo + 2 * terms_fwd + nb(x["probs"]),
    }[case.op]
    backward = {
        "class_feature_stats": feats + small + table,  # labels and grad sums in; grad out
        "losses": terms_bwd,
        "losses_released": terms_bwd,
        "maxsquare_loss": 2 * nb(x["probs"]),
        "regularizer": 2 * terms_bwd + 2 * nb(x["probs"]),
    }.get(case.op, 0)
    return forward + (backward if case.backward else 0)


@dataclass
class Prepared:
    fn: Callable[[], object]  # one timed call
    bytes: int
    compile_s: Optional[float]  # first call of a torch.compile case (compilation), else None


def prepare(case: Case, device: torch.device) -> Prepared:
    """The timed callable of a case. A ``compile`` case is compiled here, by one call outside the
    timed region; an error there (no compiler, unsupported op) propagates to the caller."""
    s = SHAPES[case.shape]
    x = make_inputs(case.shape, case.dtype, device)
    backend = "reference" if case.backend == "compile" else case.backend
    forward, leaves = _forward(case.op, x, s, backend, case.backward)
    if case.backend == "compile":
        torch._dynamo.reset()  # every case compiles afresh: no recompile limits, no shape guards
        forward = torch.compile(forward, dynamic=False)
    fn = (lambda: torch.autograd.grad(forward(), leaves)) if case.backward else forward
    compile_s = None
    if case.backend == "compile":
        start = time.perf_counter()
        fn()
        synchronize(device)
        compile_s = time.perf_counter() - start
    return Prepared(fn, bytes_moved(case, x), compile_s)


# ---------------------------------------------------------------------------------------------
# Timing, memory, copy bandwidth


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_l2_flush: Dict[str, torch.Tensor] = {}


def timed_calls(calls: Sequence[Callable], device: torch.device) -> List[float]:
    """Milliseconds of each call, made in order. CPU: time.perf_counter around each call. CUDA: a
    pair of CUDA events around each call on the current stream, with L2 (50 MB on an H100)
    flushed before it by zeroing a 256 MB buffer outside the events, so no input is served from
    cache; one synchronisation after the last call, before the events are read."""
    if device.type != "cuda":
        times = []
        for fn in calls:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    flush = _l2_flush.get(str(device))
    if flush is None:
        flush = _l2_flush[str(device)] = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    events = []
    for fn in calls:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush.zero_()
        begin.record()
        fn()
        end.record()
        events.append((begin, end))
    torch.cuda.synchronize(device)
    return [begin.elapsed_time(end) for begin, end in events]


def measure(fn: Callable, device: torch.device, *, warmup: int, rounds: int, min_time: float,
            max_rounds: int = 200) -> List[float]:
    """Milliseconds of each timed call of ``fn`` (see :func:`timed_calls`), after ``warmup``
    untimed calls and a synchronisation (the warm-up also runs Triton's autotuning).

    Rounds: at least ``rounds``, more (up to ``max_rounds``) until about ``min_time`` seconds are
    timed, estimated from the fastest of up to three synchronised calls after the warm-up (one
    slow call on a busy machine does not cut the rounds).
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    estimate = math.inf
    for _ in range(3):
        start = time.perf_counter()
        fn()
        synchronize(device)
        estimate = min(estimate, time.perf_counter() - start)
        if estimate * rounds >= min_time:
            break
    n = max(rounds, min(max_rounds, math.ceil(min_time / max(estimate, 1e-6))))
    return timed_calls([fn] * n, device)


def measure_interleaved(fns: Dict[str, Callable], device: torch.device, *, warmup: int, rounds: int) -> Dict[str, List[float]]:
    """Milliseconds per call of each of ``fns``, timed in interleaved rounds (a, b, c, a, b, c,
    ...) so that a slow phase of a shared machine, or clock drift, hits every one alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    names = list(fns)
    times = timed_calls([fns[name] for _ in range(rounds) for name in names], device)
    return {name: times[i::len(names)] for i, name in enumerate(names)}


def peak_memory(fn: Callable, device: torch.device) -> Tuple[Optional[int], str]:
    """(bytes, "") of the memory allocated during one call of ``fn`` above what was allocated
    before it, or (None, why not).

    CUDA: torch.cuda.max_memory_allocated. CPU: the running sum of torch's allocator events
    recorded by torch.profiler(profile_memory=True) -- every tensor, also those the C++ kernels
    allocate, but not the kernels' own std::vector scratch (per-thread tables of O(C*K) or a
    few window rows; the out-of-memory test in tests/test_bench_smoke.py bounds all of it).
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, ""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            stack.extend(node.children)
    except Exception as error:  # the event tree is a private profiler API; say so, don't fail
        return None, f"CPU allocation events unavailable: {type(error).__name__}: {error}"
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak, ""


def copy_bandwidth(device: torch.device, warmup: int = 3, rounds: int = 10) -> dict:
    """GB/s of a large same-device copy (bytes read + bytes written over the median time): the
    yardstick for the achieved bandwidth of every kernel. 1 GiB on a GPU (far above L2), 256 MiB
    on the CPU."""
    size = 2**30 if device.type == "cuda" else 2**28
    if device.type == "cuda":
        size = min(size, torch.cuda.mem_get_info(device)[0] // 4)
    src = torch.ones(size // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = measure(lambda: dst.copy_(src), device, warmup=warmup, rounds=rounds, min_time=0.0)
    median = statistics.median(times)
    return dict(bytes=2 * size, median_ms=median, gbps=2 * size / (median * 1e-3) / 1e9)


# ---------------------------------------------------------------------------------------------
# Training step: DeepLabV2, source-only vs LSR


@dataclass(frozen=True)
class StepSize:
    backbone: str
    width: int
    source: Tuple[int, int]  # H, W
    target: Tuple[int, int]


STEP_SIZES = {
    "paper": StepSize("resnet101", 64, (720, 1280), (512, 1024)),  # GTA5 1280x720 + Cityscapes 1024x512
    "small": StepSize("resnet18", 16, (256, 512), (256, 512)),
    "tiny": StepSize("resnet18", 8, (64, 128), (64, 128)),  # smoke tests only
}
STEP_CLASSES = 19


def step_variants(device: torch.device, backends: Sequence[str]) -> List[str]:
    """source_only, two_domain, and one LSR step per selected backend usable here (not compile)."""
    names = ["source_only", "two_domain"]
    for backend in ("reference",) + FAST_BACKENDS:
        if backend in backends and not backend_skip_reason(backend, device):
            names.append(f"lsr-{backend}")
    return names


def prepare_step(variant: str, size: str, device: torch.device) -> Callable[[], None]:
    """One SGD training step of DeepLabV2 at batch 1 (frozen BN, fp32), as a callable.

    source_only: source forward, CE on the upsampled source logits, backward, SGD step.
    two_domain: also the target forward, with a zero-weight sum of the target logits and both
      feature maps in the loss, so backward runs through the same network as the LSR step;
      this is the network cost of an LSR step without the regulariser.
    lsr-<backend>: the UDA step: CE + LSRRegularizer (GTA5 preset, L+) on the source features
      with the source labels and the target features with the softmax of the upsampled target
      logits.
    """
    from lsr_fast.models import DeepLabV2, parameter_groups

    s = STEP_SIZES[size]
    torch.manual_seed(0)
    model = DeepLabV2(STEP_CLASSES, s.backbone, width=s.width, batchnorm="frozen").to(device).train()
    optimizer = torch.optim.SGD(parameter_groups(model, lr=2.5e-4), lr=2.5e-4, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    source = torch.randn(1, 3, *s.source, generator=g).to(device)
    target = torch.randn(1, 3, *s.target, generator=g).to(device)
    coarse = torch.randint(0, STEP_CLASSES, (1, s.source[0] // 16 + 1, s.source[1] // 16 + 1), generator=g)
    labels = coarse.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, : s.source[0], : s.source[1]]
    labels = labels.contiguous().to(device)
    regularizer = None
    if variant.startswith("lsr-"):
        backend = variant[len("lsr-"):]
        regularizer = lsr_fast.LSRRegularizer.from_preset("gta5", feature_dim=model.feature_dim, backend=backend).to(device)
    elif variant not in ("source_only", "two_domain"):
        raise ValueError(f"variant must be source_only, two_domain or lsr-<backend>, got {variant!r}")

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits_s, features_s = model(source)
        up_s = F.interpolate(logits_s, size=s.source, mode="bilinear", align_corners=False)
        loss = F.cross_entropy(up_s, labels, ignore_index=255)
        if variant != "source_only":
            logits_t, features_t = model(target)
            if regularizer is None:
                loss = loss + 0.0 * (logits_t.sum() + features_t.sum() + features_s.sum())
            else:
                up_t = F.interpolate(logits_t, size=s.target, mode="bilinear", align_corners=False)
                loss = loss + regularizer(features_s, labels, features_t, up_t.softmax(1))["total"]
        loss.backward()
        optimizer.step()

    return step


# ---------------------------------------------------------------------------------------------
# Running


def device_name(device: torch.device) -> str:
    """"cpu-2core" (cores this process may use) or the GPU's name as "nvidia-h100"."""
    if device.type == "cuda":
        words = re.split(r"[\s_-]+", torch.cuda.get_device_name(device).lower())
        words = [w for w in words if w and not re.fullmatch(r"\d+gb|hbm\d*e?|pcie|sxm\d*|nvl", w)]
        return "-".join(words)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return f"cpu-{cores}core"


def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}, "
                f"CUDA {torch.version.cuda}")
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {device_name(device)[4:-4]} cores usable, torch threads {torch.get_num_threads()}"


def _versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return dict(python=platform.python_version(), torch=torch.__version__, triton=triton_version,
                lsr_fast=lsr_fast.__version__, commit=commit)


def _error_text(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def run_case(case: Case, device: torch.device, timing: dict) -> dict:
    """Time one case; a failure is recorded in the result, not raised."""
    result = {"op": case.op, "shape": case.shape, "pass": case.pass_name, "dtype": case.dtype, "backend": case.backend}
    try:
        prepared = prepare(case, device)
    except Exception as error:
        what = "torch.compile failed" if case.backend == "compile" else "setup failed"
        return dict(result, status="failed", reason=f"{what}: {_error_text(error)}")
    try:
        times = measure(prepared.fn, device, **timing)
        peak, peak_note = peak_memory(prepared.fn, device)
    except Exception as error:  # e.g. out of memory: recorded, the run goes on
        return dict(result, status="failed", reason=_error_text(error))
    median = statistics.median(times)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [median] * 3
    result.update(
        status="ok", median_ms=median, min_ms=min(times), rounds=len(times), iqr_ms=quartiles[2] - quartiles[0],
        bytes=prepared.bytes, gbps=prepared.bytes / (median * 1e-3) / 1e9,
        peak_bytes=peak, compile_s=prepared.compile_s,
    )
    if peak_note:
        result["peak_note"] = peak_note
    return result


def add_speedups(results: List[dict]) -> None:
    """speedup = reference median / this median, for the same op, shape, pass and dtype."""
    ref = {(r["op"], r["shape"], r["pass"], r["dtype"]): r["median_ms"]
           for r in results if r["backend"] == "reference" and r["status"] == "ok"}
    for r in results:
        base = ref.get((r["op"], r["shape"], r["pass"], r["dtype"]))
        r["speedup"] = base / r["median_ms"] if r["status"] == "ok" and base else None


def add_step_overheads(steps: List[dict]) -> None:
    """vs_source_only = median / source_only's median; LSR overhead of an lsr-* step, in percent:
    the median over the interleaved rounds of (its time - two_domain's time in the same round),
    over source_only's median."""
    ok = {s["variant"]: s for s in steps if s["status"] == "ok"}
    for s in steps:
        s["vs_source_only"] = s["lsr_overhead_pct"] = None
        if s["status"] != "ok" or "source_only" not in ok:
            continue
        base = ok["source_only"]["median_ms"]
        s["vs_source_only"] = s["median_ms"] / base
        if s["variant"].startswith("lsr-") and "two_domain" in ok:
            extra = [a - b for a, b in zip(s["times_ms"], ok["two_domain"]["times_ms"])]
            s["lsr_overhead_pct"] = 100.0 * statistics.median(extra) / base


# ---------------------------------------------------------------------------------------------
# Goals

CPU_GOALS = (  # (op, pass, the cpp backend's minimum speed-up over the reference)
    ("hist_downsample", "fwd", 10.0),
    ("pseudo_label_downsample", "fwd", 5.0),
    ("class_feature_stats", "fwd+bwd", 2.0),
    ("losses", "fwd+bwd", 3.0),
)
GPU_BANDWIDTH_GOAL = 0.70  # fraction of the measured copy bandwidth, every GPU kernel
GPU_COMPILE_GOAL = 1.5  # fused losses vs torch.compile(reference)
GPU_STEP_GOAL_PCT = 2.0  # LSR overhead, percent of a source-only step


def _copy_gbps(r: dict, meta: dict) -> float:
    """The copy bandwidth measured in the run that timed ``r`` (merged reports hold several)."""
    return r.get("copy_gbps") or meta["copy"]["gbps"]


def _where(r: dict) -> str:
    return f"{r['shape']} {r['pass']} {r['dtype']}"


def _goal(goal: str, target: str, values: List[Tuple[float, str]], met: Callable[[float], bool],
          show: Callable[[float], str], miss: Callable[[float], str], lower_is_better: bool = False) -> dict:
    """One goal row from its measured (value, where) pairs; the worst value decides."""
    if not values:
        return dict(goal=goal, target=target, measured="not measured in this run", met=None, shortfall="")
    worst, where = max(values) if lower_is_better else min(values)
    if len(values) <= 3:
        measured = ", ".join(f"{show(v)} ({w})" for v, w in values)
    else:
        measured = f"worst {show(worst)} ({where}) of {len(values)} cases"
    return dict(goal=goal, target=target, measured=measured, met=met(worst),
                shortfall="" if met(worst) else f"{miss(worst)} ({where})")


def evaluate_goals(report: dict) -> List[dict]:
    """The issue's goals for this run's device, each judged on its worst case over the paper
    shapes (all three), dtypes and passes, with by how much it is missed."""
    ok = [r for r in report["results"] if r["status"] == "ok" and r["shape"] in PAPER_SHAPES]
    if report["meta"]["device_type"] == "cpu":
        goals = []
        for op, pass_name, target in CPU_GOALS:
            values = [(r["speedup"], r["shape"]) for r in ok
                      if r["op"] == op and r["pass"] == pass_name and r["backend"] == "cpp" and r["speedup"]]
            goals.append(_goal(
                f"cpp vs reference, {op} {pass_name}", f">= {target:g}x", values,
                met=lambda v, t=target: v >= t, show=lambda v: f"{v:.1f}x",
                miss=lambda v, t=target: f"{v:.1f}x is {100 * (1 - v / t):.0f}% short of {t:g}x"))
        return goals

    goals = []
    meta = report["meta"]
    copy = "measured per part" if meta.get("parts") else f"{meta['copy']['gbps']:.0f} GB/s"
    for backend in ("cuda", "triton"):
        for op in OPS:
            values = [(r["gbps"] / _copy_gbps(r, meta), _where(r)) for r in ok if r["op"] == op and r["backend"] == backend]
            goals.append(_goal(
                f"{backend} {op}: share of copy bandwidth ({copy})", f">= {100 * GPU_BANDWIDTH_GOAL:.0f}%",
                values, met=lambda v: v >= GPU_BANDWIDTH_GOAL, show=lambda v: f"{100 * v:.0f}%",
                miss=lambda v: f"{100 * (GPU_BANDWIDTH_GOAL - v):.0f} points short"))
    compiled = {(r["shape"], r["pass"], r["dtype"]): r["median_ms"]
                for r in ok if r["op"] == "losses" and r["backend"] == "compile"}
    for backend in ("cuda", "triton"):
        values = [(compiled[(r["shape"], r["pass"], r["dtype"])] / r["median_ms"], _where(r)) for r in ok
                  if r["op"] == "losses" and r["backend"] == backend and (r["shape"], r["pass"], r["dtype"]) in compiled]
        goals.append(_goal(
            f"{backend} losses vs torch.compile(reference)", f">= {GPU_COMPILE_GOAL:g}x", values,
            met=lambda v: v >= GPU_COMPILE_GOAL, show=lambda v: f"{v:.2f}x",
            miss=lambda v: f"{v:.2f}x is {100 * (1 - v / GPU_COMPILE_GOAL):.0f}% short of {GPU_COMPILE_GOAL:g}x"))
    for backend in ("cuda", "triton"):
        values = [(s["lsr_overhead_pct"], f"{s['size']} step") for s in report["steps"]
                  if s["variant"] == f"lsr-{backend}" and s.get("lsr_overhead_pct") is not None]
        goals.append(_goal(
            f"LSR overhead in a training step ({backend})", f"<= {GPU_STEP_GOAL_PCT:g}% of source_only", values,
            met=lambda v: v <= GPU_STEP_GOAL_PCT, show=lambda v: f"{v:.1f}%",
            miss=lambda v: f"{v - GPU_STEP_GOAL_PCT:.1f} points over", lower_is_better=True))
    return goals


# ---------------------------------------------------------------------------------------------
# Report: Markdown, chart, files


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _num(value: Optional[float]) -> str:
    """4 significant digits, no exponent: 0.07726, 12.06, 2736."""
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}" if abs(value) >= 0.001 else f"{value:.6f}"


def render_markdown(report: dict) -> str:
    meta = report["meta"]
    v = meta["versions"]
    gpu = meta["device_type"] == "cuda"
    out = [
        f"# lsr_fast benchmarks: {meta['device']}, {meta['date']}",
        "",
        f"- Command: `{meta['command']}`",
        f"- Device: {meta['device_description']}",
        f"- Versions: Python {v['python']}, torch {v['torch']}, triton {v['triton']}, lsr_fast {v['lsr_fast']} (commit {v['commit']})",
        (f"- Copy bandwidth: {meta['copy']['gbps']:.1f} GB/s (a {meta['copy']['bytes'] // 2**21} MiB same-device copy: "
         "bytes read + written over the median time)"
         + (", measured in each part; every case is set against its own part's" if meta.get("parts") else "")),
        (f"- Timing: median of at least {meta['timing']['rounds']} timed calls (more until ~{meta['timing']['min_time']} s) after "
         f"{meta['timing']['warmup']} warm-up call(s), one run; ")
        + ("CUDA events around each call, L2 flushed before it. " if gpu else "time.perf_counter around each call. ")
        + f"Value checks {'on' if meta['value_checks'] else 'off'} (as in a captured training step). Batch 1.",
        "- Peak memory: " + ("torch.cuda.max_memory_allocated above what was allocated before the call."
                             if gpu else "torch allocations live during one call (torch.profiler memory events; "
                             "kernels' std::vector scratch not included)."),
    ]
    if meta.get("parts"):
        out += [f"- Merged from {len(meta['parts'])} runs on this device and commit; speed-ups compare cases of one run:"]
        out += [f"  - `{part['file']}`: `{part['command']}` ({part['date']}, copy {part['copy']['gbps']:.1f} GB/s)"
                for part in meta["parts"]]
    out += [
        "",
        "## Goals",
        "",
        "| goal | target | measured | met |",
        "|---|---|---|---|",
    ]
    for g in report["goals"]:
        met = {True: "yes", False: f"**no**: {g['shortfall']}", None: "not measured"}[g["met"]]
        out.append(f"| {g['goal']} | {g['target']} | {g['measured']} | {met} |")
    out += ["", "## Ops", "",
            "Speed-up = reference median / this median (same op, shape, pass, dtype). MB moved = a hand model of "
            "the fewest bytes the case must read and write"
            + ("; GB/s = that over the median; % copy = that over the copy bandwidth." if gpu else
               " (GB/s against the copy bandwidth is reported for GPU runs; it is in the JSON here too).")]
    for op in OPS:
        rows = [r for r in report["results"] if r["op"] == op]
        if not rows:
            continue
        columns = ["shape", "pass", "dtype", "backend", "median ms", "speed-up", "MB moved"]
        columns += ["GB/s", "% copy"] if gpu else []
        columns += ["peak MB", "note"]
        out += ["", f"### {op}", "", "| " + " | ".join(columns) + " |",
                "|---|---|---|---|" + "---:|" * (len(columns) - 5) + "---|"]
        for r in rows:
            cells = [r["shape"], r["pass"], r["dtype"], r["backend"]]
            if r["status"] != "ok":
                out.append("| " + " | ".join(cells + [r["status"]] + [""] * (len(columns) - 6) + [r["reason"]]) + " |")
                continue
            cells += [_num(r["median_ms"]), _fmt(r["speedup"], ".2f") + ("x" if r["speedup"] else ""), _num(r["bytes"] / 1e6)]
            if gpu:
                cells += [_num(r["gbps"]), f"{100 * r['gbps'] / _copy_gbps(r, meta):.0f}%"]
            cells.append(_num(None if r["peak_bytes"] is None else r["peak_bytes"] / 1e6))
            cells.append(f"compiled in {r['compile_s']:.1f} s" if r.get("compile_s") is not None else r.get("peak_note", ""))
            out.append("| " + " | ".join(cells) + " |")
    if report["steps"] or report["step_note"]:
        out += ["", "## Training step", ""]
        if report["steps"]:
            s0 = report["steps"][0]
            out += [(f"DeepLabV2-{s0['backbone']} (width {s0['width']}, frozen BN, fp32, batch 1), source "
                     f"{s0['source'][1]}x{s0['source'][0]}, target {s0['target'][1]}x{s0['target'][0]}, SGD. "
                     f"The variants are timed in {s0['rounds']} interleaved rounds. LSR overhead = the median over the "
                     "rounds of (LSR step - two_domain step in the same round) / the source_only median: the "
                     "regulariser's cost (with the target upsampling and softmax it needs) as a share of a "
                     "source-only step."), "",
                    "| variant | median ms | vs source_only | LSR overhead | peak MB |", "|---|---:|---:|---:|---:|"]
            for s in report["steps"]:
                if s["status"] != "ok":
                    out.append(f"| {s['variant']} | {s['status']}: {s['reason']} | | | |")
                    continue
                overhead = _fmt(s["lsr_overhead_pct"], ".1f")
                out.append(f"| {s['variant']} | {_num(s['median_ms'])} | {_fmt(s['vs_source_only'], '.2f')}x | "
                           f"{overhead}{'%' if s['lsr_overhead_pct'] is not None else ''} | "
                           f"{_num(None if s['peak_bytes'] is None else s['peak_bytes'] / 1e6)} |")
        if report["step_note"]:
            out += ["", report["step_note"]]
    if report["skipped"]:
        out += ["", "## Not measured", ""] + [f"- {what}: {why}" for what, why in report["skipped"].items()]
    return "\n".join(out) + "\n"


def render_chart(report: dict) -> bytes:
    """PNG: per op, the speed-up of every backend over the reference (log scale), per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    measured = [r for r in report["results"] if r.get("speedup") and r["backend"] != "reference"]
    ops = [op for op in OPS if any(r["op"] == op for r in measured)]
    backends = [b for b in BACKENDS if any(r["backend"] == b for r in measured)]
    fig, axes = plt.subplots(max(len(ops), 1), 1, figsize=(11, 2.6 * max(len(ops), 1) + 0.6), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        rows = [r for r in measured if r["op"] == op]
        groups = list(dict.fromkeys((r["shape"], r["pass"], r["dtype"]) for r in rows))
        width = 0.8 / max(len(backends), 1)
        for i, backend in enumerate(backends):
            values = {(r["shape"], r["pass"], r["dtype"]): r["speedup"] for r in rows if r["backend"] == backend}
            xs = [g for g, key in enumerate(groups) if key in values]
            bars = ax.bar([x + (i - (len(backends) - 1) / 2) * width for x in xs], [values[groups[x]] for x in xs],
                          width=width, label=backend)
            ax.bar_label(bars, fmt="%.3g", fontsize=6)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.margins(y=0.15)  # room for the bar labels
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(["\n".join(g) for g in groups], fontsize=7)
        ax.set_ylabel("speed-up vs reference")
        ax.set_title(op, fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    if not ops:
        axes[0, 0].text(0.5, 0.5, "no speed-up measured (needs the reference and another backend)", ha="center", va="center")
        axes[0, 0].set_axis_off()
    meta = report["meta"]
    fig.suptitle(f"lsr_fast: speed-up over the reference, {meta['device']} {meta['date']} (torch {meta['versions']['torch']})",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def free_stem(out_dir: str, stem: str) -> str:
    """``stem``, or stem-2, stem-3, ... so no earlier report is overwritten."""
    candidate, n = stem, 1
    while any(os.path.exists(os.path.join(out_dir, candidate + ext)) for ext in (".json", ".md", ".png")):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def write_report(report: dict, out_dir: str) -> Dict[str, str]:
    """Write <device>-<date>.json, .md and .png into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    stem = free_stem(out_dir, f"{report['meta']['device']}-{report['meta']['date']}")
    paths = {ext: os.path.join(out_dir, stem + "." + ext) for ext in ("json", "md", "png")}
    atomic_write_bytes(paths["json"], (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(paths["md"], render_markdown(report).encode())
    atomic_write_bytes(paths["png"], render_chart(report))
    return paths


# ---------------------------------------------------------------------------------------------
# Merging the reports of a run split into parts (a GPU lent for calls of at most a few minutes)

CASE_KEY = ("op", "shape", "pass", "dtype", "backend")
SAME_IN_EVERY_PART = ("device", "device_type", "versions", "value_checks")


def merge_reports(parts: Sequence[Tuple[str, dict]]) -> dict:
    """One report from ``[(file name, report), ...]`` of runs on one device and commit.

    Cases and training steps are taken as measured (speed-ups stay within their own run, so split
    a run by shape or op, not by backend); each case keeps the copy bandwidth of its own run. A
    case one part did not run (its time budget was spent) is taken from the part that ran it. A
    case measured in two parts, steps in two parts, or parts of different devices, versions or
    commits are errors naming the files.
    """
    if len(parts) < 2:
        raise ValueError(f"--merge needs at least two reports, got {len(parts)}")
    first_name, first = parts[0]
    measured: Dict[tuple, Tuple[str, dict]] = {}  # case -> (part it came from, result)
    not_run: Dict[tuple, dict] = {}
    steps, skipped, step_notes, part_meta = [], {}, [], []
    steps_from = None
    for name, report in parts:
        for key in ("meta", "results", "steps", "step_note", "skipped"):
            if key not in report:
                raise ValueError(f"{name}: not an lsr-fast bench report (no {key!r})")
        meta = report["meta"]
        for key in SAME_IN_EVERY_PART:
            if meta.get(key) != first["meta"].get(key):
                raise ValueError(f"{name}: {key} {meta.get(key)!r} differs from {first_name}'s {first['meta'].get(key)!r}; "
                                 "only runs on one device with one build can be merged")
        for r in report["results"]:
            key = tuple(r[k] for k in CASE_KEY)
            if r["status"] == "not run":
                not_run.setdefault(key, r)
                continue
            if key in measured:
                raise ValueError(f"{name}: case {'-'.join(key)} was also measured in {measured[key][0]}; merge parts "
                                 "that split the cases (by --shapes or --ops)")
            measured[key] = (name, dict(r, copy_gbps=_copy_gbps(r, meta)))
        if report["steps"]:
            if steps_from is not None:
                raise ValueError(f"{name}: training steps were also measured in {steps_from}; keep them in one part")
            steps, steps_from = report["steps"], name
        if report["step_note"]:
            step_notes.append(report["step_note"])
        for what, why in report["skipped"].items():
            if skipped.get(what, why) != why:
                raise ValueError(f"{name}: {what} is left out for {why!r} but for {skipped[what]!r} in an earlier part")
            skipped[what] = why
        part_meta.append(dict(file=name, command=meta["command"], date=meta["date"], copy=meta["copy"], timing=meta["timing"]))
    meta = dict(first["meta"], date=max(p["date"] for p in part_meta), parts=part_meta,
                command="lsr-fast bench --merge " + " ".join(p["file"] for p in part_meta))
    results = [r for _, r in measured.values()] + [r for key, r in not_run.items() if key not in measured]
    merged = dict(meta=meta, results=results, steps=steps, step_note=" ".join(step_notes) if not steps else "", skipped=skipped)
    merged["goals"] = evaluate_goals(merged)
    return merged


def _run_merge(args: argparse.Namespace) -> int:
    given = [name for name in MEASURING if getattr(args, name, None) not in (None, False, "auto")]
    if given:
        raise SystemExit("lsr-fast bench: --merge measures nothing, so it takes no "
                         + ", ".join("--" + name.replace("_", "-") for name in given))
    parts = []
    for path in args.merge:
        try:
            with open(path) as f:
                parts.append((path, json.load(f)))
        except (OSError, ValueError) as error:
            raise SystemExit(f"lsr-fast bench --merge: cannot read {path}: {error}") from None
    try:
        report = merge_reports(parts)
    except ValueError as error:
        raise SystemExit(f"lsr-fast bench --merge: {error}") from None
    for path in write_report(report, args.out).values():
        print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# Command line


def _list_of(name: str, allowed: Sequence[str]) -> Callable[[str], List[str]]:
    def parse(text: str) -> List[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"{name}: unknown {', '.join(map(repr, unknown)) or 'empty list'}; choose from {', '.join(allowed)}")
        return items

    parse.__name__ = name  # argparse names the type in its messages
    return parse


def _positive(kind: type, name: str, minimum) -> Callable[[str], object]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a {kind.__name__}, got {text!r}") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {text}")
        return value

    return parse


QUICK = dict(shapes=["small"], rounds=5, warmup=1, min_time=0.25, step_size="tiny", step_rounds=2)
DEFAULTS = dict(shapes=list(DEFAULT_SHAPES), rounds=10, warmup=3, min_time=1.0, step_rounds=10)
LISTS = dict(ops=list(OPS) + [STEP], backends=list(BACKENDS), passes=list(PASSES), dtypes=list(DTYPES))
MEASURING = ("quick", "device", "ops", "backends", "shapes", "passes", "dtypes", "step_size", "rounds", "warmup",
             "min_time", "step_rounds", "time_budget", "value_checks")  # options --merge refuses


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``lsr-fast bench`` to ``parser``."""
    parser.add_argument("--quick", action="store_true",
                        help="small shapes, a tiny training step and few rounds (a smoke run); explicit options win")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run (default: cuda when visible, else cpu)")
    parser.add_argument("--ops", type=_list_of("--ops", tuple(OPS) + (STEP,)), default=None,
                        help=f"comma-separated ops (default all): {', '.join(OPS)}, {STEP}")
    parser.add_argument("--backends", type=_list_of("--backends", BACKENDS), default=None,
                        help="comma-separated backends (default all usable here): " + ", ".join(BACKENDS)
                        + "; compile = torch.compile(reference)")
    parser.add_argument("--shapes", type=_list_of("--shapes", tuple(SHAPES)), default=None,
                        help=f"comma-separated shapes (default {','.join(DEFAULT_SHAPES)}; --quick: small): "
                        + ", ".join(f"{k} {s.H}x{s.W}->{s.h}x{s.w} K={s.K} C={s.C}" for k, s in SHAPES.items()))
    parser.add_argument("--passes", type=_list_of("--passes", PASSES), default=None,
                        help="comma-separated: fwd, fwd+bwd (default both)")
    parser.add_argument("--dtypes", type=_list_of("--dtypes", DTYPES), default=None,
                        help="comma-separated: float32, bfloat16 (default both; bfloat16 on GPU only)")
    parser.add_argument("--step-size", choices=tuple(STEP_SIZES), default=None,
                        help="training-step size (default paper on GPU, small on CPU, tiny with --quick): "
                        + "; ".join(f"{k} {s.backbone} width {s.width}, {s.source[1]}x{s.source[0]} + "
                                    f"{s.target[1]}x{s.target[0]}" for k, s in STEP_SIZES.items()))
    parser.add_argument("--rounds", type=_positive(int, "--rounds", 1), default=None,
                        help=f"minimum timed calls per case (default {DEFAULTS['rounds']}; --quick {QUICK['rounds']})")
    parser.add_argument("--warmup", type=_positive(int, "--warmup", 0), default=None,
                        help=f"untimed calls before timing (default {DEFAULTS['warmup']}; --quick {QUICK['warmup']})")
    parser.add_argument("--min-time", type=_positive(float, "--min-time", 0.0), default=None,
                        help=f"seconds to time per case at least (default {DEFAULTS['min_time']}; --quick {QUICK['min_time']})")
    parser.add_argument("--step-rounds", type=_positive(int, "--step-rounds", 1), default=None,
                        help=f"interleaved rounds of timed training steps (default {DEFAULTS['step_rounds']}; --quick {QUICK['step_rounds']})")
    parser.add_argument("--time-budget", type=_positive(float, "--time-budget", 0.0), default=None, metavar="MINUTES",
                        help="start no case after this many minutes; the cases not started are reported as 'not run' "
                        "(default: no limit)")
    parser.add_argument("--value-checks", action="store_true",
                        help="keep the ops' value checks (label range, finiteness) on while timing (default off)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"),
                        help="folder for <device>-<date>.json/.md/.png (default benchmarks/results; never overwrites)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help="measure nothing: write one report from the JSON reports of several runs on one device "
                        "and commit (a run split by --shapes or --ops); only --out may be given with it")
    return parser


def _resolve(args: argparse.Namespace) -> dict:
    """Options with --quick and the defaults filled in."""
    preset = dict(LISTS, **(QUICK if args.quick else DEFAULTS))
    return {name: getattr(args, name) if getattr(args, name) is not None else preset.get(name)
            for name in ("ops", "backends", "passes", "dtypes", "shapes", "rounds", "warmup", "min_time",
                         "step_size", "step_rounds")}


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` and write the report. 0 when every case ran (a
    torch.compile failure is recorded, not counted), 1 otherwise (a failure, or cases left for
    the time budget)."""
    if getattr(args, "merge", None):
        return _run_merge(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("lsr-fast bench: --device cuda, but torch sees no CUDA device")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    opts = _resolve(args)
    step_size = opts["step_size"] or ("paper" if device.type == "cuda" else "small")
    timing = dict(warmup=opts["warmup"] + (2 if device.type == "cuda" else 0), rounds=opts["rounds"], min_time=opts["min_time"])
    command = getattr(args, "command_line", None) or " ".join(["lsr-fast"] + sys.argv[1:])  # argv[1] is "bench"

    todo, skipped = cases(device, opts["ops"], opts["backends"], opts["shapes"], opts["passes"], opts["dtypes"])
    with_step = STEP in opts["ops"]
    print(f"lsr-fast bench on {device_name(device)}: {len(todo)} op cases" + (f" + training step ({step_size})" if with_step else ""))
    started = time.monotonic()
    budget_s = None if args.time_budget is None else 60.0 * args.time_budget

    def out_of_time() -> bool:
        return budget_s is not None and time.monotonic() - started >= budget_s

    for what, why in skipped.items():
        print(f"  not measured: {what}: {why}")
    checks_before = value_checks_enabled()
    lsr_fast.set_value_checks(args.value_checks)
    try:
        copy = copy_bandwidth(device)
        print(f"copy bandwidth: {copy['gbps']:.1f} GB/s")
        results = []
        for i, case in enumerate(todo, 1):
            if out_of_time():
                results.append(dict(op=case.op, shape=case.shape, dtype=case.dtype, backend=case.backend, status="not run",
                                    reason=f"time budget of {args.time_budget:g} min spent", **{"pass": case.pass_name}))
                continue
            result = run_case(case, device, timing)
            result["copy_gbps"] = copy["gbps"]
            results.append(result)
            add_speedups(results)
            if result["status"] == "ok":
                speedup = f" ({result['speedup']:.2f}x)" if result["speedup"] else ""
                print(f"[{i}/{len(todo)}] {case.name}: {result['median_ms']:.3f} ms{speedup}", flush=True)
            else:
                print(f"[{i}/{len(todo)}] {case.name}: {result['reason']}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            gc.collect()
        _inputs_cache.clear()
        steps, step_note, step_not_run = [], "", False
        if with_step and out_of_time():
            step_not_run = True
            step_note = f"Training step not run: the time budget of {args.time_budget:g} min was spent."
            print(step_note)
        elif with_step:
            steps, step_note = _run_steps(device, opts["backends"], step_size, opts)
    finally:
        lsr_fast.set_value_checks(checks_before)

    report = dict(
        meta=dict(
            device=device_name(device), device_type=device.type, device_description=_device_description(device),
            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), command=command,
            versions=_versions(), copy=copy, timing=timing, value_checks=args.value_checks,
        ),
        results=results, steps=steps, step_note=step_note, skipped=skipped,
    )
    report["goals"] = evaluate_goals(report)
    paths = write_report(report, args.out)
    for path in paths.values():
        print(f"wrote {path}")
    not_run = sum(r["status"] == "not run" for r in results) + step_not_run
    if not_run:
        print(f"time budget spent: {not_run} case(s) not run")
    hard_failures = [r for r in results + steps if r["status"] == "failed" and r.get("backend") != "compile"]
    return 1 if hard_failures or not_run else 0


def _run_steps(device: torch.device, backends: Sequence[str], size: str, opts: dict) -> Tuple[List[dict], str]:
    """Every step variant, prepared and run once each, then timed in interleaved rounds."""
    try:
        import lsr_fast.models  # noqa: F401
    except ImportError as error:
        note = f"Training step not measured: lsr_fast.models is not importable ({error})."
        print(note)
        return [], note
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed sizes: let cuDNN pick its algorithms in the warm-up
    steps, fns = {}, {}
    for variant in step_variants(device, backends):
        steps[variant] = dict(variant=variant, size=size, **vars(STEP_SIZES[size]))
        try:
            fns[variant] = prepare_step(variant, size, device)
            fns[variant]()
        except Exception as error:  # recorded; the other variants still run
            fns.pop(variant, None)
            steps[variant].update(status="failed", reason=_error_text(error))
            print(f"[step {size}] {variant}: {steps[variant]['reason']}", flush=True)
    try:
        times = measure_interleaved(fns, device, warmup=opts["warmup"] + (2 if device.type == "cuda" else 0),
                                    rounds=opts["step_rounds"])
        for variant, fn in fns.items():
            peak, _ = peak_memory(fn, device)
            steps[variant].update(status="ok", median_ms=statistics.median(times[variant]), min_ms=min(times[variant]),
                                  rounds=len(times[variant]), times_ms=times[variant], peak_bytes=peak)
            print(f"[step {size}] {variant}: {steps[variant]['median_ms']:.1f} ms", flush=True)
    except Exception as error:
        for variant in fns:
            steps[variant].update(status="failed", reason=_error_text(error))
        print(f"[step {size}] failed: {_error_text(error)}", flush=True)
    fns.clear()
    gc.collect()
    steps = list(steps.values())
    add_step_overheads(steps)
    return steps, ""


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m lsr_fast.bench [options]`` (the same as ``lsr-fast bench``)."""
    parser = configure_parser(argparse.ArgumentParser(prog="lsr-fast bench", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    args.command_line = "python -m lsr_fast.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
