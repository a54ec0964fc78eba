"""Running one case: build its arguments, apply the value rules, call the op and the reference,
compare outputs and gradients."""

from __future__ import annotations

import math
import time

from .config import GPU_SLACK, SLOW_CASE_S
from .values import CaseFailure, Expect, Mutated, describe_args, describe_value, gen, sanitize, short_error, tolerances
from .spec_base import as_tuple

# Set by child._child_setup (imported lazily so the parent stays light).
torch = None
lsr_fast = None


# =============================================================================================
# Running one case.
# =============================================================================================


def materialize(spec, m, oracle, device="cpu"):
    args, leaves = {}, {}
    for name, value in m.a.items():
        if isinstance(value, torch.Tensor):
            t = value
            if name in spec.diff and t.dtype.is_floating_point and t.device.type == "cpu":
                t = t.detach().clone().requires_grad_()
                leaves[name] = t
            for fn in m.tf.get(name, []):
                t = fn(t)
            if oracle:
                if name in spec.labels and spec.sanitize_oracle and not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
                    t = t.to(torch.int64)
                elif t.device.type == "cpu":
                    t = t.contiguous()
            elif name in m.dev:
                t = t.detach().to(m.dev[name])
            elif device != "cpu":
                t = t.to(device)  # differentiable: gradients reach the CPU leaf
            args[name] = t
        else:
            args[name] = value
    return args, leaves


def value_rules(spec, m, oa, expect):
    """Upgrade a case's expectation from the values it holds (see the module docstring)."""
    public = spec.api == "public"
    try:
        C = spec.classes(oa)
    except Exception:  # noqa: BLE001 (a malformed tensor the kind made; its own expectation holds)
        return expect
    ii = spec.ignore(oa)
    for name in spec.labels:
        t = oa.get(name)
        if (not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool
                or t.device.type == "meta" or not isinstance(C, int) or not isinstance(ii, int)):
            continue
        if isinstance(ii, bool) or not (-(2**63) <= ii < 2**63):
            continue
        clean, bad = sanitize(t.to(torch.int64), C, ii)
        where = spec.oor_where(name, oa)
        if where is not None and where.shape == bad.shape:
            bad = bad & where
        if bool(bad.any()):
            if (public and m.checks) or not spec.void_rule:
                return Expect("raise", (name,))
            if spec.sanitize_oracle:
                oa[name] = clean
    for name in spec.floats + spec.weights:
        t = oa.get(name)
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.device.type != "cpu":
            continue
        bad = ~torch.isfinite(t)
        if name in spec.weights:
            bad = bad | (t < 0)
        if bool(bad.any()):
            if (public and m.checks) or (name in spec.weights and not public):
                return Expect("raise", (name,))
            expect = Expect("shapes", expect.names or (name,))
    return expect


def cleaned(spec, oa):
    out = dict(oa)
    for name in spec.floats + spec.weights:
        t = out.get(name)
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
            out[name] = torch.nan_to_num(t, nan=0.0, posinf=1.0, neginf=-1.0).abs() if name in spec.weights else torch.nan_to_num(t, nan=0.0, posinf=1.0, neginf=-1.0)
        elif isinstance(t, float) and not math.isfinite(t):
            out[name] = 0.0
    return out


def float_outputs(spec, outs):
    return [i for i, kind in enumerate(spec.outputs) if kind == "float" and i < len(outs)
            and isinstance(outs[i], torch.Tensor) and outs[i].requires_grad]


def grad_weights(outs, indices, seed):
    g = gen(seed)
    return {i: torch.randn(outs[i].shape, generator=g, dtype=torch.float64) for i in indices}


def backward(outs, indices, weights):
    total = None
    for i in indices:
        term = (outs[i] * weights[i].to(outs[i].dtype)).sum()
        total = term if total is None else total + term
    if total is not None:
        total.backward()


def close(got, want, tol_dtype):
    """'' when got (same shape and dtype) is within the tolerances of want (NaN equal to NaN),
    else a description of the largest differences; torch.testing.assert_close costs more than
    most cases here. The tolerance is the looser of the input's dtype and the output's."""
    tol = max(tolerances(tol_dtype), tolerances(want.dtype), key=lambda t: t["rtol"])
    a, b = got.detach().to(torch.float64), want.detach().to(torch.float64)
    same = (a == b) | (a.isnan() & b.isnan())
    ok = same | ((a - b).abs() <= tol["atol"] + tol["rtol"] * b.abs())
    if bool(ok.all()):
        return ""
    bad = (~ok).nonzero().tolist()
    worst = (a - b).abs().nan_to_num(float("inf")).max().item()
    return (f"{len(bad)} of {a.numel()} values differ (rtol {tol['rtol']}, atol {tol['atol']}; largest difference {worst:.3g}); "
            f"first at {bad[:6]}: got {[a[tuple(i)].item() for i in bad[:6]]}, reference {[b[tuple(i)].item() for i in bad[:6]]}")


def compare_outputs(spec, got, want, tol_dtype, shapes_only=False, device="cpu"):
    problems = []
    if len(got) != len(want):
        return [f"returned {len(got)} outputs, the reference {len(want)}"]
    for i, (kind, g_, w_) in enumerate(zip(spec.outputs, got, want)):
        label = f"output {i} ({kind})"
        if not isinstance(g_, torch.Tensor):
            problems.append(f"{label} is a {type(g_).__name__}, not a tensor")
            continue
        if g_.device.type != device:
            problems.append(f"{label} is on {g_.device}, expected {device}")
            continue
        if kind == "label" and not spec.exact_label_dtype and g_.dtype.is_floating_point is False and g_.dtype != torch.bool:
            g_, w_ = g_.to(torch.int64), w_.to(torch.int64)
        if tuple(g_.shape) != tuple(w_.shape) or g_.dtype != w_.dtype:
            problems.append(f"{label}: shape {tuple(g_.shape)} dtype {g_.dtype}, the reference {tuple(w_.shape)} {w_.dtype}")
            continue
        if shapes_only or device == "meta":
            continue
        g_ = g_.cpu()
        if kind in ("label", "count", "bool"):
            if not torch.equal(g_, w_):
                diff = (g_ != w_).nonzero().tolist()[:8]
                problems.append(f"{label} differs at {diff}: got {g_.reshape(-1)[:24].tolist()}, reference {w_.reshape(-1)[:24].tolist()}")
        else:
            problem = close(g_, w_, tol_dtype)
            if problem:
                problems.append(f"{label}: {problem}")
    return problems


def check_case(case):
    spec, kind, backend, p = case.spec, case.kind, case.backend, case.p
    case.timing = dict(began=time.perf_counter())
    m = Mutated(spec.build(p))
    m.checks = kind.checks
    m.expect = Expect(kind.mode, kind.names)
    if kind.apply is not None:
        kind.apply(m, p, spec)
    oa, oleaves = materialize(spec, m, oracle=True)
    expect = m.expect
    if expect.mode in ("match", "either", "shapes", "meta"):
        expect = value_rules(spec, m, oa, expect)
    want, oracle_error = None, None
    if expect.mode != "raise":
        try:
            with lsr_fast.value_checks(m.checks):
                want = as_tuple(spec.oracle(cleaned(spec, oa) if expect.mode == "shapes" else oa))
        except Exception as error:  # noqa: BLE001
            oracle_error = error
            if expect.mode == "either":
                expect = Expect("raise", expect.names)
    aa, leaves = materialize(spec, m, oracle=False, device=case.device)
    public = spec.api == "public"
    allowed = (ValueError, TypeError) if public else (RuntimeError, ValueError, TypeError)
    if public and not m.checks:
        allowed = allowed + (RuntimeError,)

    case.timing["oracle"] = time.perf_counter() - case.timing["began"]

    def fail(what):
        text = (f"{spec.target(backend)}: {kind.name}" + ("" if m.checks else " [value checks off]") + f"\n    {what}\n"
                f"    expected: {expect.describe()}\n    arguments:\n{describe_args(aa)}")
        if m.backend:
            text += f"\n      backend = {m.backend!r}"
        raise CaseFailure(text)

    began = time.perf_counter()
    error = None
    try:
        with lsr_fast.value_checks(m.checks):
            got = as_tuple(spec.call(aa, m.backend or backend))
    except Exception as e:  # noqa: BLE001
        error = e
    elapsed = time.perf_counter() - began
    slow = SLOW_CASE_S * (GPU_SLACK if case.device == "cuda" else 1)
    if elapsed > slow:
        fail(f"took {elapsed:.1f} s (limit {slow:.0f} s); " + (f"then raised {short_error(error)}" if error else "then returned"))
    if error is not None:
        if expect.mode == "match":
            if oracle_error is not None:
                fail(f"raised {short_error(error)}; the reference raised too: {short_error(oracle_error)}")
            fail(f"raised {short_error(error)}")
        if not isinstance(error, allowed):
            fail(f"raised {short_error(error)} (not {' / '.join(t.__name__ for t in allowed)})")
        if not any(n in str(error) for n in expect.names):
            fail(f"raised {short_error(error)}, whose message names none of {list(expect.names)}")
        return
    if expect.mode == "raise":
        shown = "; ".join(describe_value(o) for o in got)[:600]
        fail(f"returned {shown}" + (f"\n    (the reference raised {short_error(oracle_error)})" if oracle_error else ""))
    if oracle_error is not None:
        fail(f"returned, but the reference raised {short_error(oracle_error)} on the same input")
    tol = spec.tol_dtype(aa)
    if expect.mode == "meta":
        problems = compare_outputs(spec, got, want, tol, shapes_only=True, device="meta")
        if problems:
            fail("; ".join(problems))
        return
    problems = compare_outputs(spec, got, want, tol, shapes_only=expect.mode == "shapes", device=case.device)
    if problems:
        fail("; ".join(problems))
    # Gradients: the same weighted sum of the float outputs, backward to the leaves.
    indices = float_outputs(spec, got)
    if not leaves or not indices:
        return
    weights = grad_weights(got, indices, p["seed"] + 7)
    try:
        backward(got, indices, weights)
    except Exception as e:  # noqa: BLE001
        fail(f"forward matched, backward raised {short_error(e)}")
    if expect.mode == "shapes":
        for name, leaf in leaves.items():
            if leaf.grad is not None and (leaf.grad.shape != leaf.shape or leaf.grad.dtype != leaf.dtype):
                fail(f"gradient of {name}: shape {tuple(leaf.grad.shape)} dtype {leaf.grad.dtype}")
        return
    want_indices = float_outputs(spec, want)
    backward(want, [i for i in indices if i in want_indices], weights)
    for name, leaf in leaves.items():
        got_grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        want_grad = oleaves[name].grad if oleaves[name].grad is not None else torch.zeros_like(leaf)
        if got_grad.dtype != want_grad.dtype or got_grad.shape != want_grad.shape:
            fail(f"gradient of {name}: {tuple(got_grad.shape)} {got_grad.dtype}, reference {tuple(want_grad.shape)} {want_grad.dtype}")
        problem = close(got_grad, want_grad, tol)
        if problem:
            fail(f"gradient of {name} (the leaf: {describe_value(leaf.detach())}) differs from the reference's:\n"
                 f"      got       {got_grad.reshape(-1)[:16].tolist()}\n      reference {want_grad.reshape(-1)[:16].tolist()}\n"
                 f"      {problem}")
