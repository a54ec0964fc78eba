"""Clustering (Eq. 5), perpendicularity (Eq. 6), norm alignment (Eqs. 7-8) and the fused
feature_terms pass: hand-worked values, float64 gradcheck, every backend against the reference."""

import math

import pytest
import torch

import lsr_fast
from lsr_fast import reference
from conftest import all_params, assert_accumulated_close, assert_rounded_close, fast_params, feature_terms_magnitudes

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
def test_fused_backend_matches_reference(device, backend, dtype, shape, layout, mode):
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last applies to (B, K, h, w) maps")
    C = 4
    features, labels, prototypes = fused_case(shape, C, dtype, layout, seed=sum(shape))
    r = float(math.sqrt(shape[1]))  # about the mean norm: both signs of r - |f| occur
    ref_features = features.detach().clone().requires_grad_()
    ref_terms = reference.feature_terms(ref_features, labels, prototypes, r, mode)
    loss_of_terms(ref_terms, 2.0, 0).backward()

    test_features = features.detach().to(device).requires_grad_()
    terms = lsr_fast.feature_terms(test_features, labels.to(device), prototypes.to(device), torch.tensor(r, dtype=torch.float64, device=device), mode=mode, backend=backend)
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
