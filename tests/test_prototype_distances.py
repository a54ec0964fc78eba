"""prototype_distances: hand-worked values, a plain per-pair formula in float64, gradcheck,
zero and coinciding vectors, layouts and dtypes, bad input.

The op has no kernel of its own (a GEMM plus norms in lsr_fast.reference), so there is no
backend to compare; the expected values come from the definition, pair by pair."""

import pytest
import torch
import torch.nn.functional as F

import lsr_fast
from conftest import devices

METRICS = ["l2", "cosine"]


def plain(features, prototypes, metric):
    """The definition, one (vector, prototype) pair at a time (broadcast), in float64: the
    difference is formed explicitly, so there is no GEMM cancellation in the expected values."""
    rows = features.dim() == 2
    f = features.double() if rows else features.double().movedim(1, -1)  # (..., K)
    p = prototypes.double()
    if metric == "l2":
        out = (f.unsqueeze(-2) - p).pow(2).sum(-1).sqrt()
    else:
        out = F.cosine_similarity(f.unsqueeze(-2), p, dim=-1, eps=1e-8)
    return out if rows else out.movedim(-1, 1)


def test_hand_worked():
    features = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    prototypes = torch.tensor([[0.0, 0.0], [3.0, 0.0], [-6.0, -8.0]])
    l2 = lsr_fast.prototype_distances(features, prototypes)
    assert torch.allclose(l2, torch.tensor([[5.0, 4.0, 15.0], [0.0, 3.0, 10.0]]))
    cos = lsr_fast.prototype_distances(features, prototypes, metric="cosine")
    # A zero vector (either side) has cosine 0; (3,4).(3,0) / (5*3) = 0.6; opposite vectors -1.
    assert torch.allclose(cos, torch.tensor([[0.0, 0.6, -1.0], [0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("layout", ["rows", "contiguous", "channels_last", "strided"])
def test_matches_plain_formula_float64(metric, layout):
    g = torch.Generator().manual_seed(1)
    prototypes = torch.randn(5, 7, dtype=torch.float64, generator=g)
    if layout == "rows":
        features = torch.randn(23, 7, dtype=torch.float64, generator=g)
    else:
        features = torch.randn(2, 7, 4, 6, dtype=torch.float64, generator=g)
        if layout == "channels_last":
            features = features.to(memory_format=torch.channels_last)
        elif layout == "strided":  # every other column of a wider map
            features = torch.randn(2, 7, 4, 12, dtype=torch.float64, generator=g)[..., ::2]
    got = lsr_fast.prototype_distances(features, prototypes, metric=metric)
    want = plain(features, prototypes, metric)
    assert got.dtype == torch.float64 and got.shape == want.shape
    assert got.shape == ((23, 5) if layout == "rows" else (2, 5, 4, 6))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_float32(metric, dtype):
    g = torch.Generator().manual_seed(2)
    features = torch.randn(2, 16, 3, 5, generator=g).to(dtype)
    prototypes = torch.randn(4, 16, generator=g).to(dtype)
    got = lsr_fast.prototype_distances(features, prototypes, metric=metric)
    assert got.dtype == torch.float32
    # The same (rounded) inputs in float64: only float32 arithmetic separates the two. The GEMM
    # form of ||f - p||^2 loses about u * (|f|^2 + |p|^2) (|f|^2 ~ K = 16), so distances of ~6
    # carry errors of about 1e-6 absolute.
    torch.testing.assert_close(got.double(), plain(features, prototypes, metric), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("rows", [False, True])
def test_gradcheck_float64(metric, rows):
    g = torch.Generator().manual_seed(3)
    shape = (9, 4) if rows else (2, 4, 3, 2)
    features = torch.randn(shape, dtype=torch.float64, generator=g).requires_grad_()
    prototypes = torch.randn(3, 4, dtype=torch.float64, generator=g).requires_grad_()
    fn = lambda f, p: lsr_fast.prototype_distances(f, p, metric=metric)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (features, prototypes))


@pytest.mark.parametrize("metric", METRICS)
def test_gradients_match_plain_formula_channels_last(metric):
    g = torch.Generator().manual_seed(4)
    features = torch.randn(2, 6, 3, 4, generator=g).to(memory_format=torch.channels_last)
    prototypes = torch.randn(5, 6, generator=g)
    upstream = torch.randn(2, 5, 3, 4, generator=g)
    grads = []
    for fn in (lambda f, p: lsr_fast.prototype_distances(f, p, metric=metric), lambda f, p: plain(f, p, metric)):
        f, p = features.double().requires_grad_(), prototypes.double().requires_grad_()
        f = f.to(memory_format=torch.channels_last)
        grads.append(torch.autograd.grad((fn(f, p) * upstream.double()).sum(), (f, p)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_l2_zero_and_coinciding_vectors_have_bounded_gradients():
    # Zero features against a zero prototype (distance exactly 0), and features that coincide
    # with a prototype (distance 0 up to the GEMM's rounding): no NaN, and the gradient of one
    # distance never exceeds ||d ||f - p|| / df|| = 1 (plus rounding).
    g = torch.Generator().manual_seed(5)
    prototypes = torch.cat([torch.zeros(1, 32), 100 * torch.randn(2, 32, generator=g)])
    features = torch.stack([torch.zeros(32), prototypes[1], prototypes[2], torch.randn(32, generator=g)])
    for dtype in (torch.float32, torch.float64):
        f = features.to(dtype).requires_grad_()
        p = prototypes.to(dtype).requires_grad_()
        d = lsr_fast.prototype_distances(f, p)
        assert d[0, 0] == 0 and d[1, 1] == 0 and d[2, 2] == 0
        torch.testing.assert_close(d[0, 1:], p.detach()[1:].norm(dim=1))  # distance to 0 is the norm
        for i in range(4):
            for c in range(3):
                gf, gp = torch.autograd.grad(d[i, c], (f, p), retain_graph=True)
                assert torch.isfinite(gf).all() and torch.isfinite(gp).all()
                assert gf.norm() <= 1 + 1e-3 and gp.norm() <= 1 + 1e-3, (i, c, gf.norm(), gp.norm())
        # Where the distance is exactly 0 the gradient is 0, not a 1/eps spike or NaN.
        for i, c in ((0, 0), (1, 1), (2, 2)):
            gf, gp = torch.autograd.grad(d[i, c], (f, p), retain_graph=True)
            assert gf.abs().max() == 0 and gp.abs().max() == 0


def test_cosine_zero_vectors_have_similarity_zero_and_no_gradient():
    g = torch.Generator().manual_seed(6)
    features = torch.randn(1, 8, 2, 3, generator=g)
    features[0, :, 1, 2] = 0  # a zero feature vector (a ReLU map's dead position)
    prototypes = torch.randn(4, 8, generator=g)
    prototypes[2] = 0  # a class whose prototype is still 0 (the paper's initialisation)
    f, p = features.requires_grad_(), prototypes.requires_grad_()
    cos = lsr_fast.prototype_distances(f, p, metric="cosine")
    assert torch.isfinite(cos).all()
    assert (cos[0, :, 1, 2] == 0).all() and (cos[:, 2] == 0).all()
    gf, gp = torch.autograd.grad(cos.sum(), (f, p))
    assert torch.isfinite(gf).all() and torch.isfinite(gp).all()
    assert (gf[0, :, 1, 2] == 0).all() and (gp[2] == 0).all()
    assert gf.abs().sum() > 0 and gp.abs().sum() > 0  # everything else does get a gradient
    # The other entries are the plain cosine.
    want = plain(features.detach(), prototypes.detach(), "cosine")
    torch.testing.assert_close(cos.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", METRICS)
def test_prototypes_updated_in_place_before_backward(metric):
    # A PrototypeBank's buffer changes in place after the loss is built (the EMA update of the
    # step); backward must still work, with the prototypes the forward saw.
    g = torch.Generator().manual_seed(7)
    features = torch.randn(6, 4, generator=g, requires_grad=True)
    bank = lsr_fast.PrototypeBank(3, 4)
    bank.update(torch.randn(3, 4, generator=g), torch.ones(3))
    before = bank.prototypes.clone()
    out = lsr_fast.prototype_distances(features, bank.prototypes, metric=metric)
    bank.update(torch.randn(3, 4, generator=g), torch.ones(3))
    (got,) = torch.autograd.grad(out.sum(), features)
    (want,) = torch.autograd.grad(lsr_fast.prototype_distances(features, before, metric=metric).sum(), features)
    assert not torch.equal(bank.prototypes, before)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("metric", METRICS)
def test_empty_inputs(metric):
    prototypes = torch.randn(3, 4)
    assert lsr_fast.prototype_distances(torch.randn(0, 4), prototypes, metric=metric).shape == (0, 3)
    assert lsr_fast.prototype_distances(torch.randn(0, 4, 2, 2), prototypes, metric=metric).shape == (0, 3, 2, 2)
    assert lsr_fast.prototype_distances(torch.randn(1, 4, 0, 2), prototypes, metric=metric).shape == (1, 3, 0, 2)


@pytest.mark.skipif("cuda" not in devices(), reason="synchronisation is observable on a CUDA device only")
def test_no_host_synchronisation():
    device = "cuda"
    features = torch.randn(2, 8, 5, 6, device=device, requires_grad=True)
    prototypes = torch.randn(4, 8, device=device, requires_grad=True)
    with lsr_fast.value_checks(False):
        torch.cuda.set_sync_debug_mode("error")
        try:
            for metric in METRICS:
                lsr_fast.prototype_distances(features, prototypes, metric=metric).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_bad_input():
    features, prototypes = torch.randn(2, 4, 3, 3), torch.randn(5, 4)
    with pytest.raises(ValueError, match="metric must be one of 'l2', 'cosine', got 'dot'"):
        lsr_fast.prototype_distances(features, prototypes, metric="dot")
    with pytest.raises(ValueError, match=r"prototypes must have width K=4 .* got shape \(5, 3\)"):
        lsr_fast.prototype_distances(features, prototypes[:, :3])
    with pytest.raises(ValueError, match=r"prototypes must be \(C, K\)"):
        lsr_fast.prototype_distances(features, prototypes[0])
    with pytest.raises(ValueError, match=r"features must be \(B, K, h, w\) or \(N, K\)"):
        lsr_fast.prototype_distances(features[0], prototypes)
    with pytest.raises(TypeError, match="features must be a floating-point"):
        lsr_fast.prototype_distances(features.long(), prototypes)
    with pytest.raises(TypeError, match="prototypes must be a floating-point"):
        lsr_fast.prototype_distances(features, prototypes.int())
    with pytest.raises(ValueError, match="prototypes is a meta tensor"):
        lsr_fast.prototype_distances(features, prototypes.to("meta"))
    bad = prototypes.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="prototypes contains non-finite"):
        lsr_fast.prototype_distances(features, bad)
    bad = features.clone()
    bad[0, 1, 2, 2] = float("inf")
    with pytest.raises(ValueError, match="features contains non-finite"):
        lsr_fast.prototype_distances(bad, prototypes)
