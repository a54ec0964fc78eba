"""Kinds of cases, generated from a spec's roles (tensor, dtype, layout, value and scalar kinds)."""

from __future__ import annotations

import os
import random
from dataclasses import replace
from typing import List

from .config import BASELINE_FACTOR
from .values import Kind, ZERO_DIM, big, channels_last, drop_dim, expand_base, grow, offset, overlap_base, sliced, transposed
from .spec_base import Spec, WIDE, WIDE_SMALL
from .public_specs import ClusteringSpec, NormSpec
from .metric_specs import RegularizerSpec

# Set by child._child_setup (imported lazily so the parent stays light).
torch = None


# =============================================================================================
# Kinds of cases, generated from a spec's roles.
# =============================================================================================


def to_dtype(dtype):
    def fn(t):
        if dtype.is_floating_point and t.dtype.is_floating_point:
            return t.to(dtype)
        return t.detach().to(dtype)

    return fn


def tensor_kind(name, label, mode, names, fn, overrides=None, checks=True):
    def apply(m, p, spec):
        if m.a.get(name) is not None:
            m.transform(name, fn)

    return Kind(f"{name}: {label}", mode, names, dict(overrides or {}), apply, checks)


def base_kind(name, label, mode, names, base_fn, overrides=None):
    """Replace a tensor by a base and a view of it (expanded, overlapping): the base is the leaf."""

    def apply(m, p, spec):
        value = m.a.get(name)
        if isinstance(value, torch.Tensor):
            base, view = base_fn(value, p)
            m.a[name] = base
            m.transform(name, view)

    return Kind(f"{name}: {label}", mode, names, dict(overrides or {}), apply)


def inject(name, what):
    """A label outside [0, C): -1, C or the dtype's largest value, at one position."""

    def apply(m, p, spec):
        labels = m.a[name]
        if labels.numel() == 0:
            return
        C = spec.classes(m.a)
        value = {"-1": -1, "C": C, "big": torch.iinfo(labels.dtype).max if labels.dtype != torch.uint8 else 254}[what]
        flat = labels.reshape(-1).clone()
        where = random.Random(p["seed"]).randrange(flat.numel())
        if spec.oor_where(name, m.a) is not None:  # a position where the value counts
            allowed = spec.oor_where(name, m.a).reshape(-1).nonzero().reshape(-1).tolist()
            if not allowed:
                return
            where = allowed[where % len(allowed)]
        flat[where] = value
        m.a[name] = flat.view(labels.shape)

    return apply


def poison(name, value):
    def apply(m, p, spec):
        t = m.a.get(name)
        if isinstance(t, torch.Tensor) and t.numel():
            t = t.clone()
            t.reshape(-1)[random.Random(p["seed"]).randrange(t.numel())] = value
            m.a[name] = t
        elif isinstance(t, float):
            m.a[name] = value

    return apply


def kinds(spec: Spec, group: str) -> List[Kind]:
    out = [Kind("valid input", "match", factor=BASELINE_FACTOR)]
    public = spec.api == "public"
    tensor_names = [n for n in spec.tensors]

    def force(name):
        return {spec.optional[name]: "yes"} if name in spec.optional else {}

    def names_for(name):
        return (name,) + tuple(spec.partners.get(name, ()))

    for name in spec.labels:
        ov = force(name)
        for dt in ("float32", "bool", "complex64"):
            out.append(tensor_kind(name, f"dtype {dt}", "raise", (name,), to_dtype(getattr(torch, dt)), ov))
        for dt in ("int8", "int16", "uint16", "uint32"):
            out.append(tensor_kind(name, f"dtype {dt}", "either", (name,), to_dtype(getattr(torch, dt)), ov))
        for what in ("-1", "C", "big"):
            ov2 = dict(ov, ii=255, void=0.3, ldt=torch.int64 if what != "big" else torch.int32)
            out.append(Kind(f"{name}: value {what} (outside [0, C))", "match", (name,), ov2, inject(name, what)))
            if public and spec.void_rule:
                out.append(Kind(f"{name}: value {what}, checks off", "match", (name,), ov2, inject(name, what), checks=False))
        if not spec.fixed_ignore:
            out.append(Kind(f"{name}: value -1 with ignore_index=-1 (void)", "match", (name,), dict(ov, ii=-1, void=0.3, ldt=torch.int64)))

    for name in spec.floats + spec.weights:
        if name == "reference" and spec.api == "public":
            continue  # a float by default; its own kinds in scalar_kinds
        ov = force(name)
        for dt in ("int64", "bool", "complex64"):
            out.append(tensor_kind(name, f"dtype {dt}", "raise", (name,), to_dtype(getattr(torch, dt)), ov))
        for dt in ("float16", "bfloat16", "float64"):
            out.append(tensor_kind(name, f"dtype {dt}", "either", (name,), to_dtype(getattr(torch, dt)), ov))
        for label, value in (("NaN", float("nan")), ("inf", float("inf"))):
            if label == "NaN" or name == spec.primary or name in spec.weights:
                out.append(Kind(f"{name}: a {label}", "match", (name,), ov, poison(name, value)))
        if public and spec.name not in ("per_class_iou", "mean_iou", "masr"):
            out.append(Kind(f"{name}: a NaN, checks off", "shapes", (name,), ov, poison(name, float("nan")), checks=False))

    for name in tensor_names:
        ov = dict(force(name), **big())
        if spec.generic_rank:
            out.append(tensor_kind(name, "one more dim", "raise", names_for(name), grow, ov))
            if name not in ZERO_DIM:
                out.append(tensor_kind(name, "one dim less", "raise", names_for(name), drop_dim, ov))
        main = name == spec.primary or name in spec.labels or name in spec.diff
        if main and name not in spec.labels:  # labels are never 4-d
            out.append(tensor_kind(name, "channels_last", "match", (name,), channels_last, ov))
        out.append(tensor_kind(name, "non-contiguous (stride 2)", "match", (name,), sliced, ov))
        if main:
            out.append(tensor_kind(name, "transposed memory", "match", (name,), transposed, ov))
            out.append(tensor_kind(name, "storage offset 1", "match", (name,), offset, ov))
        out.append(base_kind(name, "stride 0 in the last dims (expanded)", "either", (name,),
                             lambda t, p: expand_base(t, [-2, -1] if t.dim() >= 3 else [0]), ov))
        if main:
            out.append(base_kind(name, "stride 0 in dim 0 (expanded)", "either", (name,), lambda t, p: expand_base(t, [0]), ov))
            out.append(base_kind(name, "overlapping memory (as_strided)", "either", (name,), lambda t, p: overlap_base(t), ov))
        if len([n for n in tensor_names if n not in spec.optional or n == name]) > 1:
            out.append(Kind(f"{name}: on meta, the others on cpu", "raise", (name,), ov,
                            lambda m, p, s, name=name: m.dev.__setitem__(name, "meta") if m.a.get(name) is not None else None))
            if public and spec.void_rule and spec.backends:
                out.append(Kind(f"{name}: on meta, the others on cpu, checks off", "raise", (name,), ov,
                                lambda m, p, s, name=name: m.dev.__setitem__(name, "meta") if m.a.get(name) is not None else None,
                                checks=False))

    def all_meta(m, p, s):
        for n in tensor_names:
            if isinstance(m.a.get(n), torch.Tensor):
                m.dev[n] = "meta"

    everything = {spec.optional[n]: "yes" for n in spec.optional}
    if public:
        out.append(Kind("every tensor on meta", spec.meta_mode, tuple(tensor_names), everything, all_meta))
        if spec.backends and spec.void_rule:
            out.append(Kind("every tensor on meta, checks off", "meta", tuple(tensor_names), everything, all_meta, checks=False))
    else:
        out.append(Kind("every tensor on meta", "meta", tuple(tensor_names), everything, all_meta))

    out += spec.zero_kinds() + spec.scalar_kinds() + spec.extra_kinds()
    out = [k for k in out if spec.keep_kind(k)]
    if group in ("public-cpp", "public-triton", "public-cuda"):
        # A public op checks its arguments before it picks a backend: a case that must raise with
        # the checks on runs the same code on every backend, so the reference group runs it.
        out = [k for k in out if k.mode != "raise" or not k.checks]
    elif isinstance(spec, RegularizerSpec):  # the reference module against itself: only its errors
        out = [k for k in out if k.mode == "raise" and k.checks]
    if group == "public-triton":  # the interpreter costs ~0.1 s a call: the kinds a kernel decides
        out = [k for k in out if triton_worthy(spec, k)]
        out = [replace(k, overrides={**k.overrides, **WIDE_SMALL}) if k.overrides.get("H") == WIDE["H"] else k for k in out]
    return out


TRITON_KINDS = ("valid input", "channels_last", "non-contiguous (stride 2)", "stride 0 in the last dims (expanded)",
                "stride 0 in dim 0 (expanded)", "overlapping memory (as_strided)", "dtype float16", "dtype bfloat16",
                "a NaN, checks off", "every tensor on meta, checks off", "B=0", "B=0 maps", "num_classes=2**22")


# Left out in the Triton interpreter, known gaps named in issue 18's closing note:
# - NaN probabilities with the checks off, for the kernels that take an argmax: the
#   interpreter's NumPy argmax raises on an all-NaN slice (a compiled kernel runs no NumPy);
# - class_feature_stats with 2**22 classes: its grid has one program per block of classes and
#   each scans every position, so the work grows with C * N (minutes in the interpreter).
TRITON_INTERPRETER_GAPS = {
    ("pseudo_label_downsample", "probs: a NaN, checks off"),
    ("maxsquare_loss", "probs: a NaN, checks off"),
    ("class_feature_stats", "num_classes=2**22"),
}


def triton_worthy(spec, kind):
    if os.environ.get("TRITON_INTERPRET") == "1" and (spec.name, kind.name) in TRITON_INTERPRETER_GAPS:
        return False
    if isinstance(spec, RegularizerSpec):
        return kind.name in ("valid input", "source_features: stride 0 in the last dims (expanded)", "source_labels: value C, checks off")
    if isinstance(spec, (ClusteringSpec, NormSpec)):  # built on the same fused kernel as feature_terms
        return kind.name in ("valid input", "features: stride 0 in the last dims (expanded)", "features: channels_last")
    if kind.name in TRITON_KINDS:
        return True
    if kind.name in spec.zero_kinds_names() or kind.name.startswith("num_classes="):
        return False
    subject, _, what = kind.name.partition(": ")
    if subject in spec.labels and what.startswith("value") and not kind.checks:
        return True
    return subject == spec.primary and what in TRITON_KINDS
