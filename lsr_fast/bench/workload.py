"""What ``lsr-fast bench`` measures: the shapes, ops, backends and cases, the inputs of a case,
the callable that is timed and the bytes it must move."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import lsr_fast
from lsr_fast import reference

from . import toolkit
from .timing import synchronize
from .toolkit import PLAIN, TOOLKIT_OPS


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
# The toolkit_* ops are one step of each toolkit method (examples/*.py, see toolkit.py), timed on
# every lsr_fast backend but compile and in plain torch (backend "plain", their speed-ups' baseline).
OPS = {
    "hist_downsample": ("fwd",),
    "pseudo_label_downsample": ("fwd",),
    "class_feature_stats": ("fwd", "fwd+bwd"),
    "losses": ("fwd", "fwd+bwd"),
    "losses_released": ("fwd", "fwd+bwd"),
    "maxsquare_loss": ("fwd", "fwd+bwd"),
    "regularizer": ("fwd", "fwd+bwd"),
    **{op: ("fwd", "fwd+bwd") for op in TOOLKIT_OPS},
}
OP_GROUPS = {"toolkit": TOOLKIT_OPS}  # selectable with --ops as one name
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


def baseline(op: str) -> str:
    """The backend every speed-up of ``op`` is measured against."""
    return PLAIN if op in TOOLKIT_OPS else "reference"


def expand_ops(ops: Sequence[str]) -> List[str]:
    """``ops`` with each group name (``toolkit``) replaced by its ops, without repeats."""
    return list(dict.fromkeys(op for name in ops for op in OP_GROUPS.get(name, (name,))))


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

    Order: shape, dtype, op, pass, backend (the baseline first: reference, or plain for the
    toolkit ops), so inputs are made once per shape and dtype and each speed-up's baseline is
    already measured. ``ops`` may name a group of ops (``toolkit``).
    """
    ops = expand_ops(ops)
    for name, given, known in (("ops", ops, tuple(OPS) + (STEP,) + tuple(OP_GROUPS)), ("backends", backends, BACKENDS),
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
                run_on = [PLAIN] + [b for b in usable if b != "compile"] if op in TOOLKIT_OPS else usable
                for pass_name in OPS[op]:
                    if pass_name in passes:
                        out.extend(Case(op, shape, pass_name == "fwd+bwd", dtype, b) for b in run_on)
    if "compile" in usable and any(op in TOOLKIT_OPS for op in ops):
        skipped["toolkit ops on compile"] = "torch.compile is timed on the LSR ops only; the toolkit ops' baseline is plain torch"
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
        # The toolkit ops': mask coverage of each cell (few-shot), target logits that favour the label (ProDA).
        coverage=torch.rand(1, s.h, s.w, generator=g) * 0.75 + 0.25,
        target_logits=(2 * torch.randn(1, s.C, s.h, s.w, generator=g)).scatter_add_(
            1, small.clamp(max=s.C - 1).unsqueeze(1), torch.full((1, 1, s.h, s.w), 3.0)).to(float_dtype),
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
    if op in TOOLKIT_OPS:
        step, leaves, _ = toolkit.build(op, x, s.C, backend, backward)
        return step, leaves
    raise ValueError(f"op must be one of {tuple(OPS)}, got {op!r}")


def bytes_moved(case: Case, x: dict) -> int:
    """Hand model of the fewest bytes the case must read and write in DRAM: every input element
    read once and every output written once per pass (backward re-reads what its gradient needs;
    a regularizer call is the sum of its ops, so the probabilities are read by two of them)."""
    s = SHAPES[case.shape]
    if case.op in TOOLKIT_OPS:
        return toolkit.bytes_moved(case.op, case.backward, x)

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
