"""The raw ops' argument checks (issue 17): every ``torch.ops.lsr_fast.*`` entry point, on the CPU
and on CUDA, rejects what the Python API rejects, with the same meaning.

Table-driven: each case is one op's good baseline call with one argument made bad. On each
device the raw call must raise a RuntimeError whose message names the op and the argument as
the schema (csrc/ops.cpp) names it ("<op>: <argument> ..."), and, for the forward ops, the public
``lsr_fast.<op>`` must reject the same input with a TypeError/ValueError naming the same
argument (or its public name: ``size`` for out_h/out_w, ``mode`` for norm_mode). A test checks
that every baseline succeeds, so no case passes because its baseline was bad. The checks live in
csrc/arg_checks.h, shared by both devices; the one deliberate difference (value checks: the CPU
kernel of hist_downsample checks class_weights' values, CUDA trusts them) has its own test.
The meta-tensor cases (the fake kernels) stay in tests/test_bad_input.py.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import pytest
import torch

import lsr_fast
from lsr_fast.ops import DISTANCES
from lsr_fast.ops._checks import MAX_CLASSES, MAX_HIST_CLASSES
from conftest import unusable_reason

DEVICES = [
    pytest.param(device, marks=pytest.mark.skipif(bool(unusable_reason(device, backend)),
                                                  reason=unusable_reason(device, backend) or "usable"))
    for device, backend in (("cpu", "cpp"), ("cuda", "cuda"))
]
NORM_MODES = ("source", "target")
C, K = 4, 3


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _features_labels():
    return torch.randn(2, K, 4, 5, generator=_gen(1)), torch.randint(0, C, (2, 4, 5), generator=_gen(2))


def _probs(B=2, H=8, W=10):
    return torch.softmax(torch.randn(B, 3, H, W, generator=_gen(3)) * 3, 1)


# The good call of every op: its raw arguments in schema order (CPU tensors, moved per device).
def _baseline(op):
    features, labels = _features_labels()
    prototypes, reference = torch.randn(C, K, generator=_gen(4)), torch.tensor(1.0)
    terms = dict(features=features, labels=labels, prototypes=prototypes, reference=reference, norm_mode=0,
                 ignore_index=255, distance=0, filtered=False)
    return {
        "hist_downsample": lambda: dict(labels=torch.randint(0, C, (2, 8, 10), generator=_gen(0)), out_h=3, out_w=4,
                                        num_classes=C, threshold=0.5, ignore_index=255, class_weights=torch.ones(C)),
        "pseudo_label_downsample": lambda: dict(probs=_probs(), out_h=3, out_w=4, threshold=0.5, confidence=0.5,
                                                ignore_index=255),
        "class_feature_stats": lambda: dict(features=features, labels=labels, num_classes=C, ignore_index=255),
        "class_feature_stats_backward": lambda: dict(grad_sums=torch.ones(C, K), features=features, labels=labels,
                                                     ignore_index=255),
        "feature_terms": lambda: terms,
        "feature_terms_backward": lambda: dict(grad_sums=torch.ones(C, K), grad_sq_dist_sums=torch.ones(C),
                                               grad_norm_loss_sum=torch.tensor(1.0), grad_norm_sum=torch.tensor(0.5),
                                               **terms),
        "maxsquare_loss": lambda: dict(probs=_probs(2, 4, 5), alpha=0.2),
        "maxsquare_loss_backward": lambda: dict(grad_loss=torch.tensor(1.0), probs=_probs(2, 4, 5),
                                                class_weight=torch.ones(2, 3)),
    }[op]()


def _code(names, code):
    return names[code] if 0 <= code < len(names) else f"<code {code}>"


# The public op taking the same input (forward ops only).
PUBLIC: Dict[str, Callable] = {
    "hist_downsample": lambda a: lsr_fast.hist_downsample(
        a["labels"], (a["out_h"], a["out_w"]), a["num_classes"], threshold=a["threshold"],
        ignore_index=a["ignore_index"], class_weights=a["class_weights"]),
    "pseudo_label_downsample": lambda a: lsr_fast.pseudo_label_downsample(
        a["probs"], (a["out_h"], a["out_w"]), threshold=a["threshold"], confidence=a["confidence"],
        ignore_index=a["ignore_index"]),
    "class_feature_stats": lambda a: lsr_fast.class_feature_stats(
        a["features"], a["labels"], a["num_classes"], ignore_index=a["ignore_index"]),
    "feature_terms": lambda a: lsr_fast.feature_terms(
        a["features"], a["labels"], a["prototypes"], a["reference"], mode=_code(NORM_MODES, a["norm_mode"]),
        ignore_index=a["ignore_index"], distance=_code(DISTANCES, a["distance"]), filtered=a["filtered"]),
    "maxsquare_loss": lambda a: lsr_fast.maxsquare_loss(a["probs"], alpha=a["alpha"]),
}
PUBLIC_NAME = {"out_h": "size", "out_w": "size", "norm_mode": "mode"}


def _on(args, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _raw(op, args):
    return getattr(torch.ops.lsr_fast, op)(*args.values())


def _cast(dtype):
    """A change that converts a tensor argument (through the CPU: any dtype moves as bytes)."""
    return lambda t, d: t.cpu().to(dtype).to(d)


def _huge(*shape):
    """A zero tensor of this shape that takes no memory (stride 0): the checks must not read it."""
    return lambda t, d: torch.zeros((), dtype=t.dtype, device=d).expand(*shape)


@dataclass
class Case:
    op: str
    name: str
    changes: dict  # argument -> new value, or f(old value, device) -> new value
    argument: str  # what the raw op's message names (the schema's name)

    def build(self, device):
        args = _on(_baseline(self.op), device)
        for key, change in self.changes.items():
            args[key] = change(args[key], device) if callable(change) else change
        return args


def _cases(op, argument, table):
    return [Case(op, name, changes if isinstance(changes, dict) else {argument: changes}, argument)
            for name, changes in table]


def _feature_label_cases(op):
    rows = {"features": lambda t, d: t[:, :, 0, 0].contiguous(), "labels": lambda t, d: t.reshape(-1)[:3]}
    return (_cases(op, "features", [("features int64", _cast(torch.int64)), ("features float8", _cast(torch.float8_e4m3fn)),
                                    ("features (K, h, w)", lambda t, d: t[0]), ("features 5-d", lambda t, d: t[None])])
            + _cases(op, "labels", [("labels float32", _cast(torch.float32)), ("labels uint16", _cast(torch.uint16)),
                                    ("labels bool", _cast(torch.bool)), ("labels (B, h, w + 1)", lambda t, d: t[:, :, :1].repeat(1, 1, 6)),
                                    ("labels (B*h*w,) for maps", lambda t, d: t.reshape(-1)), ("rows (N, K): labels (N + 1,)", rows),
                                    # Empty batch: the dtype is checked before the early return.
                                    ("empty batch, float labels", {"features": lambda t, d: t[:0],
                                                                   "labels": lambda t, d: t[:0].float()})]))


FRACTIONS = [("nan", float("nan")), ("1.5", 1.5), ("-0.1", -0.1)]

CASES = (
    _cases("hist_downsample", "labels", [("labels float32", _cast(torch.float32)), ("labels uint16", _cast(torch.uint16)),
                                         ("labels bool", _cast(torch.bool)), ("labels (H, W)", lambda t, d: t[0]),
                                         ("labels 4-d", lambda t, d: t[None])])
    + _cases("hist_downsample", "out_h", [("empty image (B, 0, W)", {"labels": lambda t, d: t[:, :0]}),
                                          ("out_h=0", 0), ("out_h=H+1", 9)])
    + _cases("hist_downsample", "out_w", [("out_w=-1", -1), ("out_w=W+1", 11)])
    + _cases("hist_downsample", "num_classes", [("num_classes=0", 0), ("num_classes=-1", -1),
                                                ("num_classes=2**16+1", MAX_HIST_CLASSES + 1), ("num_classes=2**27", 2**27)])
    + _cases("hist_downsample", "threshold", [(f"threshold={n}", v) for n, v in FRACTIONS])
    + _cases("hist_downsample", "class_weights", [("class_weights int64", _cast(torch.int64)),
                                                  ("class_weights complex64", _cast(torch.complex64)),
                                                  ("class_weights (C+1,)", lambda t, d: torch.ones(C + 1, device=d)),
                                                  ("class_weights (1, C)", lambda t, d: t[None])])
    + _cases("pseudo_label_downsample", "probs", [
        ("probs int64", _cast(torch.int64)), ("probs float8", _cast(torch.float8_e4m3fn)),
        ("probs complex64", _cast(torch.complex64)), ("probs (C, H, W)", lambda t, d: t[0]),
        ("zero classes", lambda t, d: t[:, :0]), ("empty batch, zero classes", lambda t, d: t[:0, :0]),
        ("too many classes", {"probs": _huge(1, MAX_CLASSES + 1, 1, 1), "out_h": 1, "out_w": 1})])
    + _cases("pseudo_label_downsample", "out_h", [("empty image (B, C, 0, W)", {"probs": lambda t, d: t[:, :, :0]}),
                                                  ("out_h=0", 0)])
    + _cases("pseudo_label_downsample", "out_w", [("out_w=0", 0), ("out_w=W+1", 11)])
    + _cases("pseudo_label_downsample", "threshold", [(f"threshold={n}", v) for n, v in FRACTIONS])
    + _cases("pseudo_label_downsample", "confidence", [(f"confidence={n}", v) for n, v in FRACTIONS])
    + _feature_label_cases("class_feature_stats")
    + _cases("class_feature_stats", "num_classes", [("num_classes=0", 0), ("num_classes=2**24+1", MAX_CLASSES + 1)])
    + _feature_label_cases("class_feature_stats_backward")
    + _cases("class_feature_stats_backward", "grad_sums", [
        ("grad_sums complex64", _cast(torch.complex64)), ("grad_sums int64", _cast(torch.int64)),
        ("grad_sums (C, K+1)", lambda t, d: torch.ones(C, K + 1, device=d)), ("grad_sums (C*K,)", lambda t, d: t.reshape(-1)),
        ("zero classes: grad_sums (0, K)", lambda t, d: t[:0]), ("too many classes", _huge(MAX_CLASSES + 1, K))])
    + _feature_label_cases("feature_terms")
    + _cases("feature_terms", "prototypes", [
        ("prototypes int64", _cast(torch.int64)), ("prototypes (K,)", lambda t, d: t[0]),
        ("prototypes (C, K+1)", lambda t, d: torch.ones(C, K + 1, device=d)), ("too many classes", _huge(MAX_CLASSES + 1, K))])
    + _cases("feature_terms", "reference", [("reference (2,)", lambda t, d: torch.ones(2, device=d)),
                                            ("reference int64", _cast(torch.int64))])
    + _cases("feature_terms", "norm_mode", [("norm_mode=2", 2), ("norm_mode=-1", -1)])
    + _cases("feature_terms", "distance", [("distance=2", 2), ("distance=-1", -1)])
    + _cases("feature_terms_backward", "labels", [("labels float32", _cast(torch.float32))])
    + _cases("feature_terms_backward", "prototypes", [("prototypes (C, K+1)", lambda t, d: torch.ones(C, K + 1, device=d))])
    + _cases("feature_terms_backward", "reference", [("reference (2,)", lambda t, d: torch.ones(2, device=d))])
    + _cases("feature_terms_backward", "norm_mode", [("norm_mode=2", 2)])
    + _cases("feature_terms_backward", "distance", [("distance=-1", -1)])
    + _cases("feature_terms_backward", "grad_sums", [
        ("grad_sums (C, K+1)", lambda t, d: torch.ones(C, K + 1, device=d)),
        ("grad_sums (C+1, K)", lambda t, d: torch.ones(C + 1, K, device=d)), ("grad_sums complex64", _cast(torch.complex64))])
    + _cases("feature_terms_backward", "grad_sq_dist_sums", [
        ("grad_sq_dist_sums (C+1,)", lambda t, d: torch.ones(C + 1, device=d)),
        ("grad_sq_dist_sums 0-dim", lambda t, d: t[0]), ("grad_sq_dist_sums int64", _cast(torch.int64))])
    + _cases("feature_terms_backward", "grad_norm_loss_sum", [("grad_norm_loss_sum (1,)", lambda t, d: t[None]),
                                                             ("grad_norm_loss_sum int64", _cast(torch.int64))])
    + _cases("feature_terms_backward", "grad_norm_sum", [("grad_norm_sum (1,)", lambda t, d: t[None]),
                                                        ("grad_norm_sum bool", _cast(torch.bool))])
    + _cases("maxsquare_loss", "probs", [
        ("probs int64", _cast(torch.int64)), ("probs float8", _cast(torch.float8_e4m3fn)), ("probs (C, H, W)", lambda t, d: t[0]),
        ("empty batch (B = 0)", lambda t, d: t[:0]), ("zero classes (C = 0)", lambda t, d: t[:, :0]),
        ("empty batch, zero classes", lambda t, d: t[:0, :0]), ("empty image (H = 0)", lambda t, d: t[:, :, :0]),
        ("too many classes", _huge(1, MAX_CLASSES + 1, 1, 1))])
    + _cases("maxsquare_loss", "alpha", [(f"alpha={n}", v) for n, v in FRACTIONS])
    + _cases("maxsquare_loss_backward", "grad_loss", [("grad_loss (1,)", lambda t, d: t[None]),
                                                      ("grad_loss int64", _cast(torch.int64))])
    + _cases("maxsquare_loss_backward", "probs", [
        ("probs int64", _cast(torch.int64)), ("probs (C, H, W)", lambda t, d: t[0]),
        ("empty batch (B = 0)", {"probs": lambda t, d: t[:0], "class_weight": lambda t, d: t[:0]}),
        ("zero classes (C = 0)", {"probs": lambda t, d: t[:, :0], "class_weight": lambda t, d: t[:, :0]})])
    + _cases("maxsquare_loss_backward", "class_weight", [
        ("class_weight (B, C+1)", lambda t, d: torch.ones(2, 4, device=d)), ("class_weight (B*C,)", lambda t, d: t.reshape(-1)),
        ("class_weight int64", _cast(torch.int64))])
)
OPS = tuple(dict.fromkeys(case.op for case in CASES))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_every_baseline_succeeds(op, device):
    args = _on(_baseline(op), device)
    outputs = _raw(op, args)
    for out in outputs if isinstance(outputs, tuple) else (outputs,):
        assert out.device.type == device
    if op in PUBLIC:
        PUBLIC[op](args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.name}" for c in CASES])
def test_raw_op_rejects_what_the_python_api_rejects(case, device):
    args = case.build(device)
    with pytest.raises(RuntimeError) as raised:
        _raw(case.op, args)
    assert f"{case.op}: {case.argument}" in str(raised.value), str(raised.value)
    if case.op in PUBLIC:
        public_name = PUBLIC_NAME.get(case.argument, case.argument)
        with pytest.raises((TypeError, ValueError)) as public_raised:
            PUBLIC[case.op](args)
        assert public_name in str(public_raised.value), str(public_raised.value)


def test_the_table_covers_every_op():
    from lsr_fast.ops._compiled import OPS as REGISTERED

    assert set(OPS) == set(REGISTERED)


# ---- empty batches are valid where the Python API takes them -----------------------------------


EMPTY_BATCH = {
    "hist_downsample": {"labels": lambda t, d: t[:0]},
    "pseudo_label_downsample": {"probs": lambda t, d: t[:0]},
    "class_feature_stats": {"features": lambda t, d: t[:0], "labels": lambda t, d: t[:0]},
    "class_feature_stats_backward": {"features": lambda t, d: t[:0], "labels": lambda t, d: t[:0]},
    "feature_terms": {"features": lambda t, d: t[:0], "labels": lambda t, d: t[:0]},
    "feature_terms_backward": {"features": lambda t, d: t[:0], "labels": lambda t, d: t[:0]},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", list(EMPTY_BATCH))
def test_empty_batch_gives_empty_or_zero_outputs(op, device):
    args = Case(op, "B=0", EMPTY_BATCH[op], "").build(device)
    outputs = _raw(op, args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    if op.endswith("_backward") or op.endswith("downsample"):
        assert outputs[0].shape[0] == 0 and outputs[0].device.type == device
    else:
        assert all(int((t != 0).sum()) == 0 for t in outputs)
    if op in PUBLIC:
        PUBLIC[op](args)


# ---- value checks: the CPU reads class_weights, CUDA trusts them (csrc/arg_checks.h) ----------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -2.0])
def test_class_weight_values_are_checked_on_the_cpu_and_trusted_on_cuda(device, value):
    args = _on(_baseline("hist_downsample"), device)
    args["class_weights"] = torch.tensor([1.0, value, 1.0, 1.0], device=device)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="hist_downsample: class_weights must be finite and >= 0"):
            _raw("hist_downsample", args)
    else:  # reading them would synchronise: no error, and a label map of the right shape
        out = _raw("hist_downsample", args)
        assert out.shape == (2, 3, 4) and out.dtype == torch.int64
    with pytest.raises(ValueError, match="class_weights must be finite and >= 0"):
        PUBLIC["hist_downsample"](args)


# ---- CUDA: a tensor on another device is named -------------------------------------------------


def _tensor_names(op):
    return [name for name, value in _baseline(op).items() if isinstance(value, torch.Tensor)]


# Ops with one tensor argument are valid CPU calls once it moves; the others must name it.
TENSOR_ARGS = [(op, name) for op in OPS for name in _tensor_names(op) if len(_tensor_names(op)) > 1]


@pytest.mark.parametrize("op,argument", TENSOR_ARGS, ids=[f"{op}-{name}" for op, name in TENSOR_ARGS])
@pytest.mark.skipif(bool(unusable_reason("cuda", "cuda")), reason=unusable_reason("cuda", "cuda") or "usable")
def test_cuda_op_names_a_tensor_left_on_the_cpu(op, argument):
    args = _on(_baseline(op), "cuda")
    args[argument] = args[argument].cpu()
    with pytest.raises(RuntimeError) as raised:
        _raw(op, args)
    assert f"{op}: {argument}" in str(raised.value), str(raised.value)


@pytest.mark.parametrize("device", DEVICES)
def test_feature_terms_takes_zero_prototypes(device):
    # Zero classes are valid for feature_terms alone: norm_alignment_loss is its norm terms with
    # (0, K) prototypes and all-void labels (lsr_fast/ops/_derived.py), forward and backward.
    args = _on(_baseline("feature_terms_backward"), device)
    args.update(prototypes=args["prototypes"][:0], grad_sums=args["grad_sums"][:0],
                grad_sq_dist_sums=args["grad_sq_dist_sums"][:0], labels=torch.full_like(args["labels"], 255))
    grad = _raw("feature_terms_backward", args)
    assert grad.shape == args["features"].shape
    forward = {k: args[k] for k in _baseline("feature_terms")}
    sums, counts, dist_sums, norm_loss_sum, norm_sum = _raw("feature_terms", forward)
    assert sums.shape == (0, K) and counts.shape == (0,) and float(norm_sum) > 0
    PUBLIC["feature_terms"](forward)
