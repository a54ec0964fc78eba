"""Shared child-side helpers: tolerances, what a case expects (Expect, Mutated, Kind), value and
tensor generators, describing values for reports, and layout transforms."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

# Set by child._child_setup (imported lazily so the parent stays light).
torch = None
st = None


# ---- tolerances (as tests/conftest.py TOLERANCES; duplicated so the child needs no pytest) ----


def tolerances(dtype):
    table = {
        torch.float64: dict(rtol=1e-9, atol=1e-9),
        torch.float32: dict(rtol=1e-4, atol=1e-4),
        torch.float16: dict(rtol=1e-2, atol=1e-2),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    }
    return table.get(dtype, table[torch.float32])


# ---- what a case expects ------------------------------------------------------------------------


@dataclass
class Expect:
    mode: str  # "match" | "raise" | "either" | "shapes" | "meta"
    names: Tuple[str, ...] = ()

    def describe(self) -> str:
        names = " or ".join(repr(n) for n in self.names)
        return {
            "match": "the reference's result",
            "raise": f"an error naming {names}",
            "either": f"an error naming {names}, or the reference's result",
            "shapes": f"no crash and the reference's shapes/dtypes (or an error naming {names})",
            "meta": f"meta outputs of the reference's shapes/dtypes, or an error naming {names}",
        }[self.mode]


@dataclass
class Mutated:
    """A case's arguments: ``a`` maps argument name -> value (tensors are the bases: the
    differentiable ones become leaves), ``tf`` the transforms from base to the argument passed
    (layouts, dtypes), ``dev`` the arguments moved to another device."""

    a: Dict[str, object]
    tf: Dict[str, List[Callable]] = field(default_factory=dict)
    dev: Dict[str, str] = field(default_factory=dict)
    expect: Expect = field(default_factory=lambda: Expect("match"))
    checks: bool = True
    backend: Optional[str] = None
    note: str = ""

    def transform(self, name, fn):
        self.tf.setdefault(name, []).append(fn)


@dataclass
class Kind:
    name: str
    mode: str = "match"
    names: Tuple[str, ...] = ()
    overrides: Dict[str, object] = field(default_factory=dict)
    apply: Optional[Callable] = None  # apply(m, p, spec)
    checks: bool = True
    factor: int = 1  # examples multiplier


class CaseFailure(AssertionError):
    pass


# ---- building blocks ----------------------------------------------------------------------------


def gen(seed):
    return torch.Generator().manual_seed(seed)


class _Strategies:
    """Cached strategy constructors: building and validating a new strategy object for every
    draw costs more than the case itself."""

    def __init__(self):
        self._cache = {}

    def integers(self, low, high):
        return self._get(("i", low, high), lambda: _st().integers(low, high))

    def floats(self, low, high):
        return self._get(("f", low, high), lambda: _st().floats(low, high))

    def sampled_from(self, values):
        values = tuple(values)
        return self._get(("s", values), lambda: _st().sampled_from(values))

    def booleans(self):
        return self._get(("b",), lambda: _st().booleans())

    def __getattr__(self, name):  # anything else: hypothesis' own
        return getattr(_st(), name)

    def _get(self, key, make):
        try:
            return self._cache[key]
        except KeyError:
            value = self._cache[key] = make()
            return value
        except TypeError:  # unhashable values
            return make()


def _st():
    from hypothesis import strategies

    return strategies


def pick(draw, ov, key, strategy):
    """The override of ``key`` (a value, or a strategy to draw it from), else a draw of ``strategy``."""
    if key in ov:
        value = ov[key]
        return draw(value) if isinstance(value, st.SearchStrategy) else value
    return draw(strategy)


def big():
    """Overrides for layout kinds: every dimension >= 2, so a stride-0, overlapping or strided
    view really differs from a dense one (hypothesis' first example is the smallest)."""
    two = lambda top: st.integers(2, top)  # noqa: E731
    return dict(B=two(2), H=two(6), W=two(6), h=two(4), w=two(4), N=two(8), K=two(5), C=two(5))


def fractions():
    return st._get(("fractions",), lambda: st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.floats(0.0, 1.0)))


def label_setup(draw, ov, C):
    ii = pick(draw, ov, "ii", st._get(("ii", C), lambda: st.one_of(st.sampled_from([255, -1, C]), st.integers(0, max(C - 1, 0)))))
    dtypes = [torch.int64, torch.int32] + ([torch.uint8] if 0 <= ii <= 255 else [])
    ldt = pick(draw, ov, "ldt", st.sampled_from(dtypes))
    void = pick(draw, ov, "void", st.sampled_from([0.0, 0.3]))
    return dict(ii=ii, ldt=ldt, void=void)


def make_labels(shape, C, ii, dtype, void, g):
    labels = torch.randint(max(C, 1), shape, generator=g) if C >= 1 else torch.full(shape, ii)
    if void > 0 or C < 1:
        labels = torch.where(torch.rand(shape, generator=g) < (void if C >= 1 else 2.0), torch.tensor(ii), labels)
    return labels.to(dtype)


def dyadic_probs(shape, g):
    """(B, C, H, W) probabilities in multiples of 1/8 summing to 1: window means often equal
    ``confidence`` exactly, so the pseudo-label tie (void) is exercised on every backend."""
    B, C, H, W = shape
    if C == 0 or B * H * W == 0:
        return torch.zeros(shape)
    units = torch.multinomial(torch.rand(B * H * W, C, generator=g) + 0.05, 8, replacement=True, generator=g)
    counts = torch.zeros(B * H * W, C).scatter_add_(1, units, torch.ones_like(units, dtype=torch.float32))
    return (counts / 8).view(B, H, W, C).permute(0, 3, 1, 2).contiguous()


def sanitize(labels, C, ii):
    labels = labels.long()
    bad = ((labels < 0) | (labels >= C)) & (labels != ii)
    return torch.where(bad, torch.full_like(labels, ii), labels), bad


def norm_size(size):
    if isinstance(size, int):
        return (size, size)
    return tuple(int(s) for s in size)


def effective_classes(labels, C, ii):
    """A class count that gives the same answer as a huge C: one past the largest class present."""
    if C <= 4096:
        return C
    labels = labels.long()
    present = labels[(labels >= 0) & (labels < C) & (labels != ii)]
    return max(1, int(present.max()) + 1 if present.numel() else 1)


def pad_rows(t, rows):
    if t.shape[0] >= rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))])


# ---- describing a case ----------------------------------------------------------------------------


def describe_value(v) -> str:
    if isinstance(v, torch.Tensor):
        text = (f"tensor(shape={tuple(v.shape)}, dtype={v.dtype}, stride={tuple(v.stride())}, "
                f"offset={v.storage_offset()}, device={v.device.type}")
        if v.requires_grad:
            text += ", requires_grad"
        if v.device.type != "meta" and v.numel() <= 48:
            try:
                text += f", values={v.detach().cpu().tolist()}"
            except Exception:  # noqa: BLE001 (uint32 etc. without tolist)
                text += f", values={v.detach().cpu().to(torch.int64).tolist()}"
        elif v.device.type != "meta":
            text += f", {v.numel()} values"
        return text + ")"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return repr(v)


def describe_args(args) -> str:
    return "\n".join(f"      {k} = {describe_value(v)}" for k, v in args.items())


def short_error(error: BaseException, limit: int = 600) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else text[:limit] + " ..."


# ---- layouts and other transforms --------------------------------------------------------------------


def channels_last(t):
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def sliced(t):  # every other element of a tensor twice as wide: stride 2 in the last dim
    return t.repeat_interleave(2, dim=-1)[..., ::2] if t.dim() >= 1 else t


def transposed(t):  # last two dims swapped in memory
    return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t


def offset(t):  # contiguous, storage offset 1
    flat = t.reshape(-1)
    return torch.cat([flat[:1], flat])[1:].view(t.shape) if t.numel() else t


def overlap_base(t):
    """(base, view_fn): base (..., a + b - 1) whose as_strided view (..., a, b) has element
    (i, j) = base[..., i + j]: the last two dims overlap in memory."""
    if t.dim() < 2 or t.shape[-1] == 0 or t.shape[-2] == 0:
        return t, lambda x: x
    a, b = t.shape[-2], t.shape[-1]
    base = torch.cat([t[..., :, 0], t[..., -1, 1:]], dim=-1).contiguous()
    shape = tuple(t.shape)

    def view(x):
        strides = tuple(x.stride()[:-1]) + (1, 1)
        return x.as_strided(shape, strides, x.storage_offset())

    return base, view


def expand_base(t, dims):
    """(base, view_fn): base with size 1 in ``dims``, expanded back to t's shape (stride 0)."""
    dims = [d % t.dim() for d in dims if t.dim()]
    base = t
    for d in dims:
        base = base.narrow(d, 0, min(1, base.shape[d]))
    base = base.contiguous().clone()
    shape = tuple(t.shape)
    return base, (lambda x: x.expand(shape))


def grow(t):
    return t.unsqueeze(0)


def drop_dim(t):
    return t[0] if t.shape[0] else t.sum(0)


ZERO_DIM = ("reference", "grad_norm_loss_sum", "grad_norm_sum", "grad_loss")  # 0-dim tensor arguments
