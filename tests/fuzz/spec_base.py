"""The Spec base class of every op specification, and the scalar kinds of cases the specs share."""

from __future__ import annotations

from typing import Dict, List, Tuple

from .values import Kind

# Set by child._child_setup (imported lazily so the parent stays light).
torch = None


# =============================================================================================
# Op specifications. A spec knows how to draw a valid case, build its arguments, call the op
# under test and the reference, and which arguments are labels, floats, differentiable.
# =============================================================================================


class Spec:
    api = "public"  # or "raw"
    name = ""
    tensors: Tuple[str, ...] = ()  # tensor arguments, in call order
    labels: Tuple[str, ...] = ()  # integer label tensors (checked against [0, C) + ignore_index)
    floats: Tuple[str, ...] = ()  # float tensors that must be finite (value checks)
    weights: Tuple[str, ...] = ()  # class weights: finite and >= 0
    masks: Tuple[str, ...] = ()  # bool class masks
    diff: Tuple[str, ...] = ()  # differentiable float tensors (gradients compared)
    optional: Dict[str, str] = {}  # optional tensor -> params key that forces it present
    outputs: Tuple[str, ...] = ()  # "label" | "count" | "float" | "bool" per output
    partners: Dict[str, Tuple[str, ...]] = {}  # names an error about this tensor's shape may give instead
    void_rule = True  # labels outside [0, C) count as void with the checks off
    sanitize_oracle = True  # the oracle sees such labels replaced by ignore_index (else as they are,
    # with the checks off: the reference backend's own void rule, for modules built on the ops)
    exact_label_dtype = True  # integer outputs must be int64 like the reference's
    fixed_ignore = False  # ignore_index is not an argument (the regulariser's is 255)
    generic_rank = True  # one dim more / less must raise
    meta_mode = "raise"  # every tensor on meta, public op: "raise", or "meta" (meta outputs allowed)
    backends = True  # takes backend=
    primary = ""  # the main tensor: every layout kind runs on it, fewer on the others

    def target(self, backend):
        return f"{self.api}.{self.name}" + (f"[{backend}]" if self.api == "public" and self.backends else "")

    def params(self, draw, ov, small):  # -> dict
        raise NotImplementedError

    def build(self, p):  # -> dict name -> value (valid, CPU)
        raise NotImplementedError

    def call(self, a, backend):
        raise NotImplementedError

    def oracle(self, a):
        raise NotImplementedError

    def classes(self, a):
        return a.get("num_classes")

    def ignore(self, a):
        return a.get("ignore_index", 255)

    def tol_dtype(self, a):
        for name in self.diff + self.floats:
            v = a.get(name)
            if isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
                return v.dtype
        return torch.float32

    def oor_where(self, name, a):
        return None

    def scalar_kinds(self) -> List[Kind]:
        return []

    def zero_kinds_names(self):
        return [k.name for k in self.zero_kinds()]

    def zero_kinds(self) -> List[Kind]:
        return []

    def extra_kinds(self) -> List[Kind]:
        return []

    def keep_kind(self, kind: Kind) -> bool:
        """Whether ``kinds()`` keeps a generated kind (a spec of a variant of an op fuzzed
        elsewhere keeps only the kinds its variant decides)."""
        return True


def as_tuple(out):
    if isinstance(out, (tuple, list)):
        return tuple(out)
    return (out,)


# ---- scalar kinds shared by the specs -------------------------------------------------------------


def set_arg(name, value):
    def apply(m, p, spec):
        m.a[name] = value(m.a, p) if callable(value) else value

    return apply


BIG_INTS = {2**64: "2**64", -(2**63) - 1: "-2**63-1", 2**63 - 1: "2**63-1", -(2**63): "-2**63", 2**22: "2**22", 2**27: "2**27",
            2**31 - 1: "2**31-1", 2**40: "2**40"}
# Huge num_classes: a map with many windows, where per-window work proportional to C shows
# (the cpp kernel once took 20 s here for 2**22 classes); the Triton interpreter gets a small one.
WIDE = dict(B=1, H=96, W=128, h=48, w=64)
WIDE_SMALL = dict(B=1, H=8, W=10, h=3, w=4)
WIDE_MAP = dict(rows=False, B=1, h=1, w=2, K=2)  # class_feature_stats: the (C, K) output is the cost


def show(value):
    return BIG_INTS.get(value, repr(value)) if isinstance(value, int) and not isinstance(value, bool) else repr(value)


def fraction_kinds(name, raw=False):
    bad = [-0.1, 1.5, float("nan"), float("inf"), float("-inf"), "0.5", None] if not raw else [-0.1, 1.5, float("nan"), float("inf"), "0.5"]
    kinds = [Kind(f"{name}={v!r}", "raise", (name,), apply=set_arg(name, v)) for v in bad]
    kinds += [Kind(f"{name}={v!r}", "match", (name,), apply=set_arg(name, v)) for v in (0.0, 1.0)]
    if not raw:
        kinds.append(Kind(f"{name}=True", "either", (name,), apply=set_arg(name, True)))
    return kinds


def ignore_kinds(raw=False):
    kinds = [Kind(f"ignore_index={show(v)}", "raise", ("ignore_index",), {"void": 0.0}, set_arg("ignore_index", v))
             for v in ([2**64, -(2**63) - 1] + ([] if raw else [1.5, "255", None]))]
    kinds += [Kind(f"ignore_index={show(v)}", "either", ("ignore_index",), {"void": 0.0}, set_arg("ignore_index", v))
              for v in (2**63 - 1, -(2**63))]
    if not raw:
        kinds.append(Kind("ignore_index=True", "either", ("ignore_index",), {"void": 0.0}, set_arg("ignore_index", True)))
    return kinds


def backend_kinds():
    return [Kind("backend='bogus'", "raise", ("backend",), apply=lambda m, p, s: setattr(m, "backend", "bogus"))]
