"""Clustering (Eq. 5), perpendicularity (Eq. 6), norm alignment (Eqs. 7-8) and the fused
feature_terms pass: hand-worked values, float64 gradcheck, every backend against the reference."""

import math

import pytest
import torch

import lsr_fast
from lsr_fast import reference
from conftest import (all_params, assert_accumulated_close, assert_rounded_close, fast_params, feature_terms_magnitudes,
                      unusable_reason)

V = 255


# ---- clustering -------------------------------------------------------------------------------


def test_clustering_hand_worked():
    # K=2 rows. Class 0 vectors (1,0),(3,0) vs p0=(1,0): distances 0, 4 -> mean 2.
    # Class 1 vector (0,2) vs p1=(0,0): 4 -> mean 4. Class 2 absent. Void (9,9) ignored.
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [9.0, 9.0]])
    labels = torch.tensor([0, 0, 1, V])
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    assert reference.clustering_loss(features, labels, prototypes).item() == pytest.approx(3.0)
    # Only class 0 estimated so far: its mean alone.
    valid = torch.tensor([True, False, True])
    assert reference.clustering_loss(features, labels, prototypes, valid).item() == pytest.approx(2.0)
    # No class qualifies: 0.
    assert reference.clustering_loss(features, labels, prototypes, torch.zeros(3, dtype=torch.bool)).item() == 0.0
    assert reference.clustering_loss(features, torch.full((4,), V), prototypes).item() == 0.0


def test_clustering_prototypes_get_no_gradient():
    features = torch.randn(6, 3, requires_grad=True)
    prototypes = torch.randn(2, 3, requires_grad=True)
    reference.clustering_loss(features, torch.tensor([0, 1, 0, 1, V, 0]), prototypes).backward()
    assert prototypes.grad is None and features.grad is not None


# ---- perpendicularity -------------------------------------------------------------------------


def test_perpendicularity_hand_worked():
    orthogonal = torch.eye(3)
    assert reference.perpendicularity_loss(orthogonal).item() == pytest.approx(0.0)
    same = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    assert reference.perpendicularity_loss(same).item() == pytest.approx(1.0)
    # (1,0), (1,1)/sqrt2, (-1,0): cosines 1/sqrt2, -1, -1/sqrt2 -> twice their sum / (3*2) = -1/3
    three = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    assert reference.perpendicularity_loss(three).item() == pytest.approx(-1.0 / 3.0)
    # Absent classes are left out: only rows 0 and 1 -> 1/sqrt2.
    present = torch.tensor([True, True, False])
    assert reference.perpendicularity_loss(three, present).item() == pytest.approx(1 / math.sqrt(2))
    # Fewer than two present: 0.
    assert reference.perpendicularity_loss(three, torch.tensor([False, True, False])).item() == 0.0
    # A zero prototype has cosine 0 with everything (no NaN).
    zero = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    assert reference.perpendicularity_loss(zero).item() == 0.0


def test_perpendicularity_zero_prototype_has_no_gradient():
    # A present class whose features are all zero: its cosines are 0 and its gradient is 0, not
    # of order 1/COSINE_EPS (which overflowed float16/bfloat16).
    prototypes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = lsr_fast.perpendicularity_loss(prototypes)
    loss.backward()
    assert loss.item() == 0.0  # (1,0) and (0,1) are orthogonal, the zero row contributes 0
    assert torch.equal(prototypes.grad[0], torch.zeros(2))
    assert torch.isfinite(prototypes.grad).all()


def test_perpendicularity_gradcheck():
    prototypes = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    present = torch.tensor([True, False, True, True, True])
    assert torch.autograd.gradcheck(lambda p: lsr_fast.perpendicularity_loss(p, present), (prototypes,))


# ---- norm alignment ---------------------------------------------------------------------------


def test_norm_alignment_hand_worked():
    features = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]])  # norms 5, 1, 0
    assert reference.norm_alignment_loss(features, 2.0, "source").item() == pytest.approx((3 + 1 + 2) / 3)
    assert reference.norm_alignment_loss(features, 2.0, "target").item() == pytest.approx((0 + 1 + 2) / 3)
    assert reference.norm_alignment_loss(features, torch.tensor(6.0), "target").item() == pytest.approx((1 + 5 + 6) / 3)
    # (B, K, h, w) maps use dim 1 as the feature axis.
    maps = features.t().reshape(1, 2, 3, 1)
    assert reference.norm_alignment_loss(maps, 2.0, "source").item() == pytest.approx(2.0)


def test_norm_alignment_gradient_at_zero_is_zero():
    features = torch.zeros(2, 3, requires_grad=True)
    reference.norm_alignment_loss(features, 1.0, "source").backward()
    assert torch.equal(features.grad, torch.zeros(2, 3))


@pytest.mark.parametrize("device,backend", all_params())
@pytest.mark.parametrize("mode", ["source", "target"])
def test_gradchecks_float64(device, backend, mode):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=g).to(device).requires_grad_()
    labels = torch.randint(0, 3, (2, 3, 3), generator=g).to(device)
    labels[1, 0] = V
    prototypes = torch.randn(3, 4, dtype=torch.float64, generator=g).to(device)
    valid = torch.tensor([True, True, False], device=device)
    assert torch.autograd.gradcheck(
        lambda f: lsr_fast.clustering_loss(f, labels, prototypes, valid=valid, backend=backend), (features,))
    assert torch.autograd.gradcheck(
        lambda f: lsr_fast.norm_alignment_loss(f, 2.0, mode=mode, backend=backend), (features,))
    assert torch.autograd.gradcheck(
        lambda f: lsr_fast.feature_terms(f, labels, prototypes, 2.0, mode=mode, backend=backend)[::2], (features,))


# ---- the fused pass: every backend against the reference ---------------------------------------


def fused_case(shape, C, dtype, layout, seed):
    g = torch.Generator().manual_seed(seed)
    features = (torch.randn(shape, generator=g) + 0.5).to(dtype)
    if len(shape) == 4:
        labels = torch.randint(0, C, (shape[0], *shape[2:]), generator=g)
        if layout == "channels_last":
            features = features.to(memory_format=torch.channels_last)
    else:
        labels = torch.randint(0, C, (shape[0],), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.25] = V
    prototypes = torch.randn(C, shape[1], generator=g)
    return features, labels, prototypes


TERM_NAMES = ("sums", "counts", "squared distances", "norm loss sum", "norm sum")


def loss_of_terms(terms, batch_prototypes_weight, seed):
    """A scalar that touches every differentiable output, including the perpendicularity path
    through the batch prototypes, with fixed random weights."""
    sums, counts, sq, norm_loss, norm_sum = terms
    g = torch.Generator().manual_seed(seed)
    batch_prototypes = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
    perp = reference.perpendicularity_loss(batch_prototypes, counts > 0)
    w = torch.rand(sq.shape, generator=g, dtype=sq.dtype).to(sq.device)
    return (sq * w).sum() + 0.7 * norm_loss + 0.3 * norm_sum + batch_prototypes_weight * perp


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 7, 5, 6), (1, 9, 1, 1), (1, 16, 4, 3), (23, 5)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["source", "target"])
@pytest.mark.parametrize("form", ["paper", "released"])
def test_fused_backend_matches_reference(device, backend, dtype, shape, layout, mode, form):
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last applies to (B, K, h, w) maps")
    C = 4
    features, labels, prototypes = fused_case(shape, C, dtype, layout, seed=sum(shape))
    # The released code's forms: L1 distances and the filtered norm (channels below the mean zeroed).
    switches = dict(distance="l1_mean", filtered=True) if form == "released" else {}
    r = float(math.sqrt(shape[1])) * (0.6 if switches else 1.0)  # both signs of r - |f| occur
    ref_features = features.detach().clone().requires_grad_()
    ref_terms = reference.feature_terms(ref_features, labels, prototypes, r, mode, 255, **switches)
    loss_of_terms(ref_terms, 2.0, 0).backward()

    test_features = features.detach().to(device).requires_grad_()
    terms = lsr_fast.feature_terms(test_features, labels.to(device), prototypes.to(device), torch.tensor(r, dtype=torch.float64, device=device), mode=mode, backend=backend, **switches)
    assert terms[1].dtype == torch.int64 and torch.equal(terms[1].cpu(), ref_terms[1])
    # Sums and norm sums are accumulated in float32 (float64) whatever the input dtype.
    magnitudes = feature_terms_magnitudes(features, labels, C, r, ref_terms)
    for name, got, want, magnitude in zip(TERM_NAMES, terms, ref_terms, magnitudes):
        if magnitude is not None:
            assert_accumulated_close(got, want, dtype, magnitude, name)
    loss_of_terms(terms, 2.0, 0).backward()
    # The gradient is rounded to the features' dtype: that dtype's tolerance.
    assert test_features.grad.dtype == dtype
    assert_rounded_close(test_features.grad, ref_features.grad, dtype)


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("mode", ["source", "target"])
def test_public_losses_backend_matches_reference(device, backend, mode):
    features, labels, prototypes = fused_case((2, 6, 4, 5), 3, torch.float32, "contiguous", seed=3)
    features[0, :, 0, 0] = 0.0  # a zero vector: norm gradient 0
    valid = torch.tensor([True, False, True])
    # Clustering: a mean of squared distances (terms >= 0, magnitude |loss|); norm alignment:
    # the mean of |r - ||f||| carries the rounding of r and ||f||, magnitude |r| + mean ||f||.
    mean_norm = reference.norm_alignment_loss(features, 0.0, "source")
    for name, fn_ref, fn, magnitude in (
        ("clustering", lambda f: reference.clustering_loss(f, labels, prototypes, valid),
         lambda f: lsr_fast.clustering_loss(f, labels.to(device), prototypes.to(device), valid=valid.to(device), backend=backend), None),
        ("norm alignment", lambda f: reference.norm_alignment_loss(f, 2.5, mode),
         lambda f: lsr_fast.norm_alignment_loss(f, 2.5, mode=mode, backend=backend), 2.5 + mean_norm),
    ):
        a = features.clone().requires_grad_()
        b = features.clone().to(device).requires_grad_()
        want, got = fn_ref(a), fn(b)
        want.backward()
        got.backward()
        assert_accumulated_close(got, want, torch.float32, magnitude, name)
        assert_rounded_close(b.grad, a.grad, torch.float32, f"{name} gradient")


@pytest.mark.parametrize("device,backend", fast_params())
def test_fused_no_classes_and_all_void(device, backend):
    features = torch.randn(1, 5, 3, 3)
    labels = torch.full((1, 3, 3), V)
    prototypes = torch.randn(2, 5)
    want = reference.feature_terms(features, labels, prototypes, 1.0, "source")
    got = lsr_fast.feature_terms(features.to(device), labels.to(device), prototypes.to(device), 1.0, backend=backend)
    assert torch.equal(got[1].cpu(), want[1]) and not want[1].any()
    # No class: the class sums and squared distances are exactly 0; the norm terms cover every vector.
    assert not want[0].any() and not want[2].any()
    magnitudes = feature_terms_magnitudes(features, labels, 2, 1.0, want)
    for name, g, w, magnitude in zip(TERM_NAMES, got, want, magnitudes):
        if magnitude is not None:
            assert_accumulated_close(g, w, torch.float32, magnitude, name)


# ---- the released code's forms (DESIGN.md): L1-mean clustering, relative filtered norms ---------


def test_l1_mean_clustering_hand_worked():
    # K=2, C=3. Class 0: (1,0),(3,0) vs p0=(1,0): |d| sums 0, 2 -> mean over 2 vectors x 2
    # channels = 0.5. Class 1: (0,2) vs (0,0): 2 / 2 = 1. Class 2 absent. (0.5 + 1) / C = 0.5.
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [9.0, 9.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, V])
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    loss = reference.clustering_loss(features, labels, prototypes, distance="l1_mean")
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    # sign(f - p) / (count * K * C): 0 at equality (the first vector), void gets nothing.
    expected = torch.tensor([[0.0, 0.0], [1 / 12, 0.0], [0.0, 1 / 6], [0.0, 0.0]])
    torch.testing.assert_close(features.grad, expected)
    # Only class 1 estimated: 1 / C, still divided by every class.
    valid = torch.tensor([False, True, True])
    assert reference.clustering_loss(features, labels, prototypes, valid, distance="l1_mean").item() == pytest.approx(1 / 3)


def test_filtered_relative_norm_hand_worked():
    # (3, 0, 4, 1): mean 2, channels 3 and 4 kept (the 1 and the 0 are below): |f~| = 5.
    # (2, 2, 2, 2): every channel equals the mean and is kept: |f~| = 4.
    # (0, 0, 0, 0): |f~| = 0, no gradient. r = 4.5, relative to n = 2.
    features = torch.tensor([[3.0, 0.0, 4.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    loss = reference.norm_alignment_loss(features, 4.5, "source", relative_to=2.0, filtered=True)
    assert loss.item() == pytest.approx((0.5 + 0.5 + 4.5) / 3 / 2)
    loss.backward()
    # d/df of |r - |f~|| / (3 n): -sign(r - |f~|) f~ / |f~| / 6 on kept channels only
    # (|f~| = 5 > r: the term grows with |f~|; |f~| = 4 < r: it shrinks).
    expected = torch.tensor([[0.6, 0.0, 0.8, 0.0], [-0.5, -0.5, -0.5, -0.5], [0.0, 0.0, 0.0, 0.0]]) / 6
    torch.testing.assert_close(features.grad, expected)
    # The norm sum of the fused pass stays unfiltered (it feeds f-bar_s).
    _, _, _, _, norm_sum = reference.feature_terms(features, torch.full((3,), V), torch.zeros(1, 4), 4.5, "source", V, filtered=True)
    assert norm_sum.item() == pytest.approx(math.sqrt(26) + 4.0)


def adversarial_case(dtype):
    """Integer channels with K = 8, so every vector's mean is exact in every dtype: channels
    exactly at the mean, a vector whose channels are all equal, an all-zero vector, vectors equal
    to their prototype (|f - p| = 0), an absent class, void labels."""
    g = torch.Generator().manual_seed(11)
    rows = torch.randint(-3, 4, (12, 8), generator=g).to(torch.float64)
    rows[0] = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 4.0, 2.0, 2.0])  # mean 2: four channels at it
    rows[1] = 5.0
    rows[2] = 0.0
    prototypes = torch.randint(-2, 3, (4, 8), generator=g).to(torch.float64)
    rows[3] = prototypes[1]
    rows[4] = prototypes[1]
    labels = torch.tensor([0, 1, 0, 1, 1, V, 0, 1, V, 0, 1, 0])  # classes 2 and 3 absent
    return rows.to(dtype), labels, prototypes


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["rows", "planes", "channels_last", "strided"])
@pytest.mark.parametrize("distance,filtered", [("l1_mean", False), ("squared_l2", True), ("l1_mean", True)])
def test_released_forms_adversarial(device, backend, dtype, layout, distance, filtered):
    rows, labels, prototypes = adversarial_case(dtype)
    if layout == "rows":
        features, map_labels = rows, labels
    else:  # (B, K, h, w) = (2, 8, 2, 3) maps of the same vectors
        features = rows.reshape(2, 2, 3, 8).permute(0, 3, 1, 2)  # channels_last strides
        map_labels = labels.reshape(2, 2, 3)
        if layout == "planes":
            features = features.contiguous()
        elif layout == "strided":  # every other channel of a wider map: neither dense layout
            wide = torch.zeros(2, 16, 2, 3, dtype=dtype)
            wide[:, ::2] = features
            features = wide[:, ::2]
    for mode, r in (("source", 4.0), ("target", 6.0)):
        a = features.detach().clone().requires_grad_()
        b = features.detach().clone().to(device).requires_grad_()
        want = reference.feature_terms(a, map_labels, prototypes, r, mode, V, distance, filtered)
        got = lsr_fast.feature_terms(b, map_labels.to(device), prototypes.to(device), r, mode=mode, distance=distance,
                                     filtered=filtered, backend=backend)
        assert torch.equal(got[1].cpu(), want[1])
        magnitudes = feature_terms_magnitudes(features, map_labels, 4, r, want)
        for name, g_, w_, magnitude in zip(TERM_NAMES, got, want, magnitudes):
            if magnitude is not None:
                assert_accumulated_close(g_, w_, dtype, magnitude, f"{mode} {name}")
        loss_of_terms(want, 2.0, 1).backward()
        loss_of_terms(got, 2.0, 1).backward()
        assert_rounded_close(b.grad, a.grad, dtype, f"{mode} gradient")


@pytest.mark.parametrize("device,backend", all_params())
def test_released_forms_gradcheck_float64(device, backend):
    # Continuous inputs (no channel at its mean, no f = p): float64 gradcheck of both switches.
    g = torch.Generator().manual_seed(5)
    features = torch.randn(2, 6, 3, 3, dtype=torch.float64, generator=g).to(device).requires_grad_()
    labels = torch.randint(0, 3, (2, 3, 3), generator=g).to(device)
    labels[0, 1] = V
    prototypes = torch.randn(3, 6, dtype=torch.float64, generator=g).to(device)
    assert torch.autograd.gradcheck(
        lambda f: lsr_fast.clustering_loss(f, labels, prototypes, distance="l1_mean", backend=backend), (features,))
    for mode in ("source", "target"):
        assert torch.autograd.gradcheck(
            lambda f: lsr_fast.norm_alignment_loss(f, 1.2, mode=mode, relative_to=1.7, filtered=True, backend=backend), (features,))


def test_released_forms_bad_arguments():
    features, labels, prototypes = torch.randn(2, 4, 3, 3), torch.randint(0, 3, (2, 3, 3)), torch.randn(3, 4)
    with pytest.raises(ValueError, match="distance must be one of 'squared_l2', 'l1_mean', got 'l1'"):
        lsr_fast.clustering_loss(features, labels, prototypes, distance="l1")
    with pytest.raises(ValueError, match="distance must be one of"):
        lsr_fast.feature_terms(features, labels, prototypes, 1.0, distance="cosine")
    for bad in (0.0, -1.0, float("nan"), float("inf"), torch.tensor(-2.0)):
        with pytest.raises(ValueError, match="relative_to must be"):
            lsr_fast.norm_alignment_loss(features, 1.0, relative_to=bad)
    with pytest.raises(ValueError, match="filtered must be True or False, got 1"):
        lsr_fast.norm_alignment_loss(features, 1.0, filtered=1)
    with pytest.raises(ValueError, match="filtered must be True or False"):
        lsr_fast.feature_terms(features, labels, prototypes, 1.0, filtered="yes")



def released_check(device, backend, features, labels, prototypes, r, mode, distance, filtered, reach=None):
    """One case against the reference: forward outputs, and the gradient of a fixed random
    combination of the outputs (``reach``: only the distance sums, norm-loss sum or norm sum)."""
    dtype, C = features.dtype, prototypes.shape[0]
    a = features.detach().clone().requires_grad_()
    b = features.detach().clone().to(device).requires_grad_()
    want = reference.feature_terms(a, labels, prototypes, r, mode, V, distance, filtered)
    got = lsr_fast.feature_terms(b, labels.to(device), prototypes.to(device), r, mode=mode, distance=distance,
                                 filtered=filtered, backend=backend)
    assert torch.equal(got[1].cpu(), want[1])
    for name, g_, w_, magnitude in zip(TERM_NAMES, got, want, feature_terms_magnitudes(features, labels, C, r, want)):
        if magnitude is not None:
            assert_accumulated_close(g_, w_, dtype, magnitude, f"{mode} {name}")
    w = torch.rand(C, features.shape[1] + 1, generator=torch.Generator().manual_seed(3), dtype=want[0].dtype)
    on = {None: (1, 1, 0.7, 0.3), "distance": (0, 1, 0, 0), "norm_loss": (0, 0, 1, 0), "norm_sum": (0, 0, 0, 1)}[reach]

    def total(t):
        parts = ((t[0] * w[:, 1:].to(t[0].device)).sum(), (t[2] * w[:, 0].to(t[2].device)).sum(), t[3], t[4])
        return sum(c * x for c, x in zip(on, parts) if c)

    total(want).backward()
    total(got).backward()
    assert_rounded_close(b.grad, a.grad, dtype, f"{mode} gradient")
    return want, got


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["rows", "planes"])
def test_released_forms_equal_channels_keep_all(device, backend, dtype, layout):
    """Equal channels whose rounded mean exceeds them (0.1 * K / K > 0.1 for many K): the filter's
    threshold is capped at the largest channel, so the filtered norm is the norm."""
    for K in (3, 5, 7, 10, 19):
        rows = torch.tensor([0.1, 0.3, -0.7], dtype=dtype)[:, None].expand(3, K).contiguous()
        labels = torch.tensor([0, 1, V])
        features = rows if layout == "rows" else rows.t().reshape(1, K, 1, 3).contiguous()
        labels = labels if layout == "rows" else labels.reshape(1, 1, 3)
        # source mode with r = 0: the norm-loss sum is the sum of the (filtered) norms
        want, got = released_check(device, backend, features, labels, torch.full((2, K), 0.1), 0.0, "source",
                                   "l1_mean", True)
        for t in (want, got):
            torch.testing.assert_close(t[3].cpu(), t[4].cpu(), rtol=1e-6, atol=0, msg=lambda m: f"K = {K}: {m}")


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("filtered", [False, True])
def test_released_forms_norm_exactly_r(device, backend, dtype, filtered):
    """|f| = r exactly (the norm term's kink: abs' gradient is 0 there, clamp's passes), and a
    vector whose filtered norm is exactly r while its norm is sqrt(30)."""
    rows = torch.tensor([[3.0, 4, 0, 0, 0, 0, 0, 0], [4, 0, 0, 3, -1, -2, 0, 0], [3, 0, 4, 0, 0, 0, 0, 0]], dtype=dtype)
    prototypes = torch.tensor([[1.0, 0, 0, 2, 0, 0, 0, -1], [0, 1, 0, 0, 0, 0, 2, 0]])
    for mode in ("source", "target"):
        want, _ = released_check(device, backend, rows[:2] if filtered else rows[::2], torch.tensor([0, 1]),
                                 prototypes, 5.0, mode, "l1_mean", filtered)
        assert want[3].item() == 0.0


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("layout", ["planes", "channels_last"])
@pytest.mark.parametrize("filtered", [False, True])
@pytest.mark.parametrize("reach", ["norm_loss", "norm_sum", "distance"])
def test_released_forms_partial_gradients(device, backend, layout, filtered, reach):
    """A gradient that reaches one output only (the backward's filter switch depends on the
    norm-loss gradient; with no norm gradient the plane passes skip the norms)."""
    features, labels, prototypes = fused_case((1, 12, 3, 4), 3, torch.float32, layout, 7)
    released_check(device, backend, features, labels, prototypes, 2.0, "source", "l1_mean", filtered, reach)


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("K", [1, 13, 1027])
@pytest.mark.parametrize("layout", ["planes", "channels_last"])
def test_released_forms_geometry(device, backend, K, layout):
    """K = 1 and K not a multiple of the 8 lanes; K = 1027 (compiled backends only): several
    position tiles per image in the filtered plane passes, the last one partial."""
    if K == 1027 and backend == "triton" and device == "cpu":
        pytest.skip("too slow in Triton's interpreter")
    features, labels, prototypes = fused_case((2, K, 13, 11) if K > 13 else (2, K, 5, 3), 5, torch.float32, layout, K)
    for distance, filtered in (("l1_mean", True), ("squared_l2", True), ("l1_mean", False)):
        released_check(device, backend, features, labels, prototypes, math.sqrt(K), "target", distance, filtered)


@pytest.mark.parametrize("distance", ["squared_l2", "l1_mean"])
def test_released_forms_cpp_layouts_bit_equal(distance):
    """cpp: the filtered plane passes process tiles of positions as rows, so NCHW and channels_last
    give the same forward and backward to the bit, channels at (about) their mean included."""
    if unusable_reason("cpu", "cpp"):
        pytest.skip(f"cpp backend: {unusable_reason('cpu', 'cpp')}")
    features, labels, prototypes = fused_case((2, 200, 17, 19), 4, torch.float32, "planes", 8)
    features[:, 5] = features.mean(1)
    features[:, 17] = features.double().mean(1).float()
    results = []
    for f in (features, features.contiguous(memory_format=torch.channels_last)):
        f = f.clone().requires_grad_()
        terms = lsr_fast.feature_terms(f, labels, prototypes, 9.0, mode="target", distance=distance, filtered=True,
                                       backend="cpp")
        loss_of_terms(terms, 0.0, 4).backward()
        results.append([t.detach() for t in terms] + [f.grad.contiguous()])
    assert all(torch.equal(x, y) for x, y in zip(*results))

# ---- invalid inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", all_params())
def test_invalid_inputs(device, backend):
    features = torch.randn(2, 4, 3, 3, device=device)
    labels = torch.randint(0, 3, (2, 3, 3), device=device)
    prototypes = torch.randn(3, 4, device=device)
    kw = dict(backend=backend)
    with pytest.raises(ValueError, match="prototypes must have width K=4"):
        lsr_fast.clustering_loss(features, labels, prototypes[:, :3], **kw)
    with pytest.raises(ValueError, match="valid must have shape"):
        lsr_fast.clustering_loss(features, labels, prototypes, valid=torch.ones(2, dtype=torch.bool, device=device), **kw)
    with pytest.raises(TypeError, match="valid must be a bool tensor"):
        lsr_fast.clustering_loss(features, labels, prototypes, valid=torch.ones(3, device=device), **kw)
    with pytest.raises(ValueError, match="value 3"):
        lsr_fast.clustering_loss(features, labels + 1, prototypes, **kw)
    with pytest.raises(ValueError, match="mode must be 'source' or 'target'"):
        lsr_fast.norm_alignment_loss(features, 1.0, mode="both", **kw)
    with pytest.raises(ValueError, match="reference must be a float or a 0-dim tensor"):
        lsr_fast.norm_alignment_loss(features, torch.ones(2, device=device), **kw)
    with pytest.raises(ValueError, match="reference must be finite"):
        lsr_fast.norm_alignment_loss(features, float("nan"), **kw)
    nan_features = features.clone()
    nan_features[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="features contains non-finite"):
        lsr_fast.norm_alignment_loss(nan_features, 1.0, **kw)
    with pytest.raises(ValueError, match=r"prototypes must be \(C, K\)"):
        lsr_fast.perpendicularity_loss(prototypes[0])
