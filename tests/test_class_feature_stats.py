"""class_feature_stats: hand-worked sums, float64 gradcheck, every backend against the reference."""

import pytest
import torch

import lsr_fast
from lsr_fast import reference
from conftest import all_params, assert_accumulated_close, assert_rounded_close, fast_params

V = 255


def test_hand_worked():
    # Two images of 1x3 positions, K=2. Class 0: (1,2) + (3,4); class 1: (5,6); class 2 absent.
    features = torch.tensor([[[[1.0, 5.0, 9.0]], [[2.0, 6.0, 9.0]]], [[[3.0, 0.0, 0.0]], [[4.0, 0.0, 0.0]]]])
    labels = torch.tensor([[[0, 1, V]], [[0, V, V]]])
    sums, counts = reference.class_feature_stats(features, labels, 3)
    assert torch.equal(sums, torch.tensor([[4.0, 6.0], [5.0, 6.0], [0.0, 0.0]]))
    assert counts.dtype == torch.int64 and counts.tolist() == [2, 1, 0]
    # The same vectors as (N, K) rows.
    rows = features.permute(0, 2, 3, 1).reshape(-1, 2)
    sums_rows, counts_rows = reference.class_feature_stats(rows, labels.reshape(-1), 3)
    assert torch.equal(sums_rows, sums) and torch.equal(counts_rows, counts)


def test_backward_is_a_gather():
    features = torch.randn(2, 3, 2, 2, requires_grad=True)
    labels = torch.tensor([[[0, 1], [V, 1]], [[2, 2], [0, V]]])
    sums, _ = reference.class_feature_stats(features, labels, 3)
    grad_sums = torch.arange(9.0).view(3, 3)
    sums.backward(grad_sums)
    expected = torch.zeros(2, 3, 2, 2)
    for b in range(2):
        for i in range(2):
            for j in range(2):
                if labels[b, i, j] != V:
                    expected[b, :, i, j] = grad_sums[labels[b, i, j]]
    assert torch.equal(features.grad, expected)


@pytest.mark.parametrize("device,backend", all_params())
def test_gradcheck_float64(device, backend):
    features = torch.randn(2, 5, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.randint(0, 4, (2, 3, 4), device=device)
    labels[0, 0] = V
    fn = lambda f: lsr_fast.class_feature_stats(f, labels, 4, backend=backend)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (features,))


def random_case(shape, C, dtype, layout, seed=0, void=0.2):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(shape, generator=g).to(dtype)
    if len(shape) == 4:
        labels = torch.randint(0, C, (shape[0], *shape[2:]), generator=g)
        if layout == "channels_last":
            features = features.to(memory_format=torch.channels_last)
    else:
        labels = torch.randint(0, C, (shape[0],), generator=g)
    labels[torch.rand(labels.shape, generator=g) < void] = V
    return features, labels


SHAPES = [(2, 7, 5, 6), (1, 13, 1, 1), (1, 3, 9, 11), (37, 5), (0, 4)]


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backend_matches_reference(device, backend, dtype, shape, layout):
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last applies to (B, K, h, w) maps")
    C = 4
    features, labels = random_case(shape, C, dtype, layout)
    ref_features = features.detach().clone().requires_grad_()
    sums_ref, counts_ref = reference.class_feature_stats(ref_features, labels, C)
    grad_sums = torch.randn(sums_ref.shape, dtype=sums_ref.dtype)
    sums_ref.backward(grad_sums)

    test_features = features.detach().to(device).requires_grad_()
    sums, counts = lsr_fast.class_feature_stats(test_features, labels.to(device), C, backend=backend)
    assert counts.dtype == torch.int64
    assert torch.equal(counts.cpu(), counts_ref)
    # Sums are accumulated in float32 (float64) whatever the input: float32-level tolerance
    # relative to the sum of |f| of each class and channel.
    magnitude, _ = reference.class_feature_stats(features.abs(), labels, C)
    assert_accumulated_close(sums, sums_ref, dtype, magnitude, "sums")
    sums.backward(grad_sums.to(device))
    # The gradient is rounded to the features' dtype: that dtype's tolerance.
    assert test_features.grad.dtype == dtype and test_features.grad.shape == features.shape
    assert_rounded_close(test_features.grad, ref_features.grad, dtype)


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("case", ["all_void", "one_class", "absent_classes"])
def test_backend_adversarial(device, backend, case):
    features = torch.randn(2, 6, 4, 5)
    labels = {
        "all_void": torch.full((2, 4, 5), V),
        "one_class": torch.full((2, 4, 5), 2),
        "absent_classes": torch.randint(0, 2, (2, 4, 5)),
    }[case]
    sums_ref, counts_ref = reference.class_feature_stats(features, labels, 6)
    sums, counts = lsr_fast.class_feature_stats(features.to(device), labels.to(device), 6, backend=backend)
    assert torch.equal(counts.cpu(), counts_ref)
    magnitude, _ = reference.class_feature_stats(features.abs(), labels, 6)
    assert_accumulated_close(sums, sums_ref, torch.float32, magnitude, "sums")


@pytest.mark.parametrize("device,backend", all_params())
def test_invalid_inputs(device, backend):
    features = torch.randn(2, 4, 3, 3, device=device)
    labels = torch.randint(0, 3, (2, 3, 3), device=device)
    kw = dict(backend=backend)
    with pytest.raises(ValueError, match="labels must have shape"):
        lsr_fast.class_feature_stats(features, labels[:, :2], 3, **kw)
    with pytest.raises(ValueError, match=r"features must be \(B, K, h, w\) or \(N, K\)"):
        lsr_fast.class_feature_stats(features[0], labels[0], 3, **kw)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        lsr_fast.class_feature_stats(features, labels.float(), 3, **kw)
    with pytest.raises(TypeError, match="features must be a floating-point"):
        lsr_fast.class_feature_stats(features.long(), labels, 3, **kw)
    bad = labels.clone()
    bad[1, 2, 2] = 3
    with pytest.raises(ValueError, match="value 3"):
        lsr_fast.class_feature_stats(features, bad, 3, **kw)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        lsr_fast.class_feature_stats(features, labels, 0, **kw)
    bad_features = features.clone()
    for value in (float("inf"), float("-inf"), float("nan")):
        bad_features[0, 1, 1, 1] = value
        with pytest.raises(ValueError, match="features contains non-finite"):
            lsr_fast.class_feature_stats(bad_features, labels, 3, **kw)
        with pytest.raises(ValueError, match="features contains non-finite"):
            lsr_fast.class_feature_stats(bad_features.half(), labels, 3, **kw)


# ---- per-vector weights ------------------------------------------------------------------------


def test_weighted_hand_worked():
    # The vectors of test_hand_worked with weights: class 0: 0.5*(1,2) + 2*(3,4) = (6.5, 9),
    # weight sum 2.5; class 1: 0*(5,6): sum 0 with weight sum 0 (present, weightless).
    features = torch.tensor([[[[1.0, 5.0, 9.0]], [[2.0, 6.0, 9.0]]], [[[3.0, 0.0, 0.0]], [[4.0, 0.0, 0.0]]]])
    labels = torch.tensor([[[0, 1, V]], [[0, V, V]]])
    weights = torch.tensor([[[0.5, 0.0, 7.0]], [[2.0, 3.0, 1.0]]])  # void vectors' weights unused
    sums, counts = reference.class_feature_stats(features, labels, 3, weights=weights)
    assert torch.equal(sums, torch.tensor([[6.5, 9.0], [0.0, 0.0], [0.0, 0.0]]))
    assert counts.dtype == torch.float32 and counts.tolist() == [2.5, 0.0, 0.0]
    # Unit weights give the unweighted sums, the counts as floats.
    sums1, counts1 = reference.class_feature_stats(features, labels, 3, weights=torch.ones(2, 1, 3))
    sums0, counts0 = reference.class_feature_stats(features, labels, 3)
    assert torch.equal(sums1, sums0) and torch.equal(counts1, counts0.float())


@pytest.mark.parametrize("device,backend", all_params())
def test_weighted_gradcheck_float64(device, backend):
    # Small, and fast_mode (random projections of the Jacobian): each check is a few dozen
    # forward calls, which Triton's interpreter makes slow.
    features = torch.randn(2, 3, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.randint(0, 3, (2, 2, 3), device=device)
    labels[0, 0] = V
    weights = torch.rand(2, 2, 3, dtype=torch.float64, device=device)
    weights[1, 1] = 0
    fn = lambda f: lsr_fast.class_feature_stats(f, labels, 3, weights=weights, backend=backend)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (features,), fast_mode=True)


WEIGHTED_SHAPES = [(2, 7, 5, 6), (37, 5), (0, 4)]


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", WEIGHTED_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_weighted_backend_matches_reference(device, backend, dtype, shape, layout):
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last applies to (B, K, h, w) maps")
    C = 4
    features, labels = random_case(shape, C, dtype, layout, seed=1)
    g = torch.Generator().manual_seed(2)
    weights = torch.rand(labels.shape, generator=g) * 3  # weights above 1 too
    weights[torch.rand(labels.shape, generator=g) < 0.2] = 0
    weights = weights.to(dtype)  # weights in the features' dtype; the op takes any float dtype
    ref_features = features.detach().clone().requires_grad_()
    sums_ref, counts_ref = reference.class_feature_stats(ref_features, labels, C, weights=weights)
    grad_sums = torch.randn(sums_ref.shape, dtype=sums_ref.dtype, generator=g)
    sums_ref.backward(grad_sums)

    test_features = features.detach().to(device).requires_grad_()
    test_weights = weights.to(device).requires_grad_()  # constants: must get no gradient
    sums, counts = lsr_fast.class_feature_stats(test_features, labels.to(device), C, weights=test_weights, backend=backend)
    acc = sums_ref.dtype
    assert counts.dtype == acc and counts_ref.dtype == acc
    w_magnitude, _ = reference.class_feature_stats(weights.unsqueeze(-1) if len(shape) == 2 else weights.unsqueeze(1),
                                                   labels, C)
    assert_accumulated_close(counts, counts_ref, dtype, w_magnitude.reshape(C), "weight sums")
    magnitude, _ = reference.class_feature_stats(features.abs(), labels, C, weights=weights)
    assert_accumulated_close(sums, sums_ref, dtype, magnitude, "sums")
    sums.backward(grad_sums.to(device))
    assert test_weights.grad is None
    assert test_features.grad.dtype == dtype and test_features.grad.shape == features.shape
    assert_rounded_close(test_features.grad, ref_features.grad, dtype)
    if features.numel():
        assert ref_features.grad.abs().sum() > 0


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("case", ["all_zero_weights", "all_void", "tiny_and_huge"])
def test_weighted_backend_adversarial(device, backend, case):
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 6, 4, 5, generator=g)
    labels = torch.randint(0, 3, (2, 4, 5), generator=g)
    weights = torch.rand(2, 4, 5, generator=g)
    if case == "all_zero_weights":
        weights.zero_()
    elif case == "all_void":
        labels.fill_(V)
    else:  # weights spanning 1e-30 .. 1e30: the weight sums must not lose the small classes
        weights = torch.where(labels == 0, torch.tensor(1e-30), torch.tensor(1e30))
    sums_ref, counts_ref = reference.class_feature_stats(features, labels, 6, weights=weights)
    sums, counts = lsr_fast.class_feature_stats(features.to(device), labels.to(device), 6, weights=weights.to(device),
                                                backend=backend)
    assert_accumulated_close(counts, counts_ref, torch.float32, what="weight sums")
    magnitude, _ = reference.class_feature_stats(features.abs(), labels, 6, weights=weights)
    assert_accumulated_close(sums, sums_ref, torch.float32, magnitude, "sums")
    if case != "all_void":
        assert counts_ref[:3].ne(0).any() == (case != "all_zero_weights")


@pytest.mark.parametrize("device,backend", all_params())
def test_weighted_invalid_inputs(device, backend):
    features = torch.randn(2, 4, 3, 3, device=device)
    labels = torch.randint(0, 3, (2, 3, 3), device=device)
    weights = torch.rand(2, 3, 3, device=device)
    kw = dict(backend=backend)
    with pytest.raises(ValueError, match=r"weights must have the shape of labels \(2, 3, 3\), got \(2, 3\)"):
        lsr_fast.class_feature_stats(features, labels, 3, weights=weights[:, 0], **kw)
    with pytest.raises(TypeError, match="weights must be a floating-point"):
        lsr_fast.class_feature_stats(features, labels, 3, weights=labels, **kw)
    with pytest.raises(ValueError, match="weights is a meta tensor"):
        lsr_fast.class_feature_stats(features, labels, 3, weights=weights.to("meta"), **kw)
    for value in (-0.5, float("nan"), float("inf"), float("-inf")):
        bad = weights.clone()
        bad[1, 2, 0] = value
        with pytest.raises(ValueError, match="weights must be finite and >= 0"):
            lsr_fast.class_feature_stats(features, labels, 3, weights=bad, **kw)
