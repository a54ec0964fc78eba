"""Regression tests of the fuzz campaign's findings (issue 18): unusual layouts, bad arguments to
the public ops and meta tensors given to the raw torch.ops.lsr_fast.* entry points, and the one
rule for labels outside [0, C) when the value checks are off. tests/test_fuzz.py searches for
more such cases; tests/test_raw_op_checks.py checks every raw op's arguments on both devices."""

import pytest
import torch

import lsr_fast
from lsr_fast import reference
from conftest import fast_params

C = 4


def _expanded(seed=0, B=2, K=5, h=3, w=4, dtype=torch.float32):
    """A (B, K, h, w) map expanded from (1, K, 1, 1): stride 0 in batch, height and width."""
    g = torch.Generator().manual_seed(seed)
    leaf = torch.randn(1, K, 1, 1, generator=g, dtype=dtype).requires_grad_()
    labels = torch.randint(0, C, (B, h, w), generator=g)
    labels[0, 0, 0] = 255
    return leaf, leaf.expand(B, K, h, w), labels


def _grad(leaf, loss):
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad


# ---- finding 1: gradients of expanded (stride-0) and overlapping feature maps ----------------


@pytest.mark.parametrize("device,backend", fast_params())
def test_expanded_features_get_the_reference_gradient(device, backend):
    leaf, features, labels = _expanded()
    prototypes = torch.randn(C, 5, generator=torch.Generator().manual_seed(1))

    def losses(name):
        sums, counts = lsr_fast.class_feature_stats(features, labels, C, backend=name)
        return {
            "class_feature_stats": (sums * torch.arange(1.0, 6.0)).sum(),
            "clustering_loss": lsr_fast.clustering_loss(features, labels, prototypes, backend=name),
            "norm_alignment_loss": lsr_fast.norm_alignment_loss(features, 1.5, mode="source", backend=name),
            "feature_terms": sum(t.float().sum() for t in lsr_fast.feature_terms(features, labels, prototypes, 2.0, backend=name)),
        }

    expected, actual = losses("reference"), losses(backend)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(_grad(leaf, actual[name]), _grad(leaf, expected[name]), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("device,backend", fast_params())
def test_overlapping_view_of_features_gets_the_reference_gradient(device, backend):
    # as_strided with windows that share memory: rows n and n+1 overlap in K - 1 channels.
    leaf = torch.randn(40, requires_grad=True)
    features = leaf.as_strided((12, 6), (2, 1))
    labels = torch.arange(12) % C
    expected = reference.class_feature_stats(features, labels, C)[0]
    actual = lsr_fast.class_feature_stats(features, labels, C, backend=backend)[0]
    torch.testing.assert_close(actual, expected)
    weights = torch.arange(24.0).view(C, 6)
    torch.testing.assert_close(_grad(leaf, (actual * weights).sum()), _grad(leaf, (expected * weights).sum()))


def test_expanded_features_through_the_regulariser_match_the_reference():
    leaf, source, labels = _expanded(seed=2, K=6)
    target = torch.randn(2, 6, 3, 4, generator=torch.Generator().manual_seed(3))
    probs = torch.softmax(torch.randn(2, C, 3, 4, generator=torch.Generator().manual_seed(4)) * 4, 1)
    outputs = {}
    for name in ("reference", "cpp") if lsr_fast.available_backends()["cpp"] == "available" else ("reference",):
        reg = lsr_fast.LSRRegularizer(C, 6, backend=name)
        reg(source.detach(), labels, target, probs)  # a first step, so the clustering terms count
        total = reg(source, labels, target, probs)["total"]
        outputs[name] = (total, _grad(leaf, total))
    for name, (total, grad) in outputs.items():
        torch.testing.assert_close(total, outputs["reference"][0], msg=name)
        torch.testing.assert_close(grad, outputs["reference"][1], msg=name)


# ---- finding 2: raw ops with a meta tensor among CPU tensors ---------------------------------


@pytest.mark.skipif(lsr_fast.available_backends()["cpp"] != "available", reason="the compiled extension is not built")
@pytest.mark.parametrize(
    "call,argument",
    [
        (lambda: torch.ops.lsr_fast.hist_downsample(torch.randint(0, 4, (1, 8, 10)), 3, 4, 4, 0.5, 255, torch.ones(4, device="meta")), "class_weights"),
        (lambda: torch.ops.lsr_fast.class_feature_stats(torch.randn(1, 3, 4, 5), torch.zeros(1, 4, 5, dtype=torch.long, device="meta"), 4, 255), "labels"),
        (lambda: torch.ops.lsr_fast.feature_terms(torch.randn(1, 3, 4, 5), torch.zeros(1, 4, 5, dtype=torch.long), torch.zeros(4, 3, device="meta"), torch.tensor(1.0), 0, 255), "prototypes"),
        (lambda: torch.ops.lsr_fast.class_feature_stats_backward(torch.ones(4, 3, device="meta"), torch.randn(1, 3, 4, 5), torch.zeros(1, 4, 5, dtype=torch.long), 255), "grad_sums"),
        (lambda: torch.ops.lsr_fast.maxsquare_loss_backward(torch.tensor(1.0), torch.rand(1, 3, 2, 2), torch.ones(1, 3, device="meta")), "class_weight"),
    ],
    ids=["hist_downsample", "class_feature_stats", "feature_terms", "class_feature_stats_backward", "maxsquare_loss_backward"],
)
def test_raw_op_with_a_meta_tensor_among_cpu_tensors_raises(call, argument):
    with pytest.raises(RuntimeError, match=f"{argument} is on meta but"):
        call()


@pytest.mark.skipif(lsr_fast.available_backends()["cpp"] != "available", reason="the compiled extension is not built")
def test_raw_op_on_meta_tensors_only_propagates_shapes():
    out = torch.ops.lsr_fast.hist_downsample(torch.zeros(2, 8, 10, dtype=torch.long, device="meta"), 3, 4, 4, 0.5, 255, None)
    assert out.device.type == "meta" and out.shape == (2, 3, 4) and out.dtype == torch.int64


# ---- finding 4: labels outside [0, C) are void in every backend when not checked -------------


def _backends():
    available = lsr_fast.available_backends()
    return ["reference"] + [name for name in ("cpp", "triton") if available[name] == "available"]


@pytest.mark.parametrize("backend", _backends())
def test_unchecked_out_of_range_labels_are_void_in_every_backend(backend):
    # Values -1, C, 2C and -(2**40) are neither classes nor ignore_index; with the value checks
    # off they count as void, so each result equals the one with those pixels set to 255.
    labels = torch.tensor([[[-1, 4, 0, 1, 1, 2], [2, 3, 8, -(2**40), 1, 1]]], dtype=torch.int64)
    voided = torch.where((labels < 0) | (labels >= C), 255, labels)
    features = torch.randn(1, 3, 2, 6, generator=torch.Generator().manual_seed(5))
    prototypes = torch.randn(C, 3, generator=torch.Generator().manual_seed(6))
    with lsr_fast.value_checks(False):
        got_hist = lsr_fast.hist_downsample(labels, (1, 3), C, backend=backend)
        got_sums, got_counts = lsr_fast.class_feature_stats(features, labels, C, backend=backend)
        got_terms = lsr_fast.feature_terms(features, labels, prototypes, 1.0, backend=backend)
    assert torch.equal(got_hist, reference.hist_downsample(voided, (1, 3), C))
    sums, counts = reference.class_feature_stats(features, voided, C)
    assert torch.equal(got_counts, counts) and counts.sum() == 8
    torch.testing.assert_close(got_sums, sums)
    for got, expected in zip(got_terms, reference.feature_terms(features, voided, prototypes, 1.0)):
        torch.testing.assert_close(got, expected)


def test_checked_out_of_range_labels_are_an_error():
    with pytest.raises(ValueError, match=r"labels contains the value -1, which is neither a class in \[0, 4\)"):
        lsr_fast.hist_downsample(torch.tensor([[[0, -1], [1, 2]]]), 1, C)


# ---- finding 5: hist_downsample's work does not grow with num_classes ------------------------


@pytest.mark.parametrize("backend", _backends())
def test_many_classes_are_fast_and_too_many_are_an_error(backend):
    labels = torch.randint(0, 7, (1, 16, 20), generator=torch.Generator().manual_seed(7))
    labels[0, :2] = 65535  # the largest class id allowed
    # The old CPU kernel zero-filled num_classes counters per cell (13 s at 2**22); the cap
    # bounds every backend's work, and the answer must equal the one with 8 classes.
    out = lsr_fast.hist_downsample(labels, (5, 6), 2**16, backend=backend)
    small = reference.hist_downsample(torch.where(labels == 65535, 7, labels), (5, 6), 8)
    assert torch.equal(out, torch.where(small == 7, 65535, small))
    with pytest.raises(ValueError, match="num_classes must be <= 65536, got 65537"):
        lsr_fast.hist_downsample(labels, (5, 6), 2**16 + 1, backend=backend)


def test_reference_pairwise_histogram_equals_the_one_hot_one():
    # The reference switches to per-window pairwise counts for large class counts; both paths
    # must decide alike, ties, weights and void included.
    g = torch.Generator().manual_seed(8)
    for trial in range(60):
        B, H, W = 2, int(torch.randint(1, 12, (), generator=g)), int(torch.randint(1, 12, (), generator=g))
        h, w = int(torch.randint(1, H + 1, (), generator=g)), int(torch.randint(1, W + 1, (), generator=g))
        labels = torch.randint(-1, 7, (B, H, W), generator=g)
        labels[torch.rand(B, H, W, generator=g) < 0.2] = 255
        weights = None if trial % 3 else torch.rand(5, generator=g) * (torch.rand(5, generator=g) > 0.3)
        threshold = (0.0, 0.3, 0.5, 1.0)[trial % 4]
        index = reference._class_index(labels, 5, 255)
        one_hot = torch.zeros(B, 6, H, W, dtype=torch.int32).scatter_(1, index.unsqueeze(1), 1)[:, :5]
        dense = reference._peak_ratio_decision(reference.window_counts(one_hot, (h, w)), threshold, 255, weights)
        pairwise = reference._hist_downsample_pairwise(index, (h, w), 5, threshold, 255, weights)
        assert torch.equal(pairwise, dense), (trial, H, W, h, w)


# ---- finding 8: messages that name the argument ----------------------------------------------


def test_public_op_messages_name_the_argument():
    labels = torch.randint(0, 4, (1, 8, 10))
    with pytest.raises(ValueError, match=r"ignore_index must fit in int64"):
        lsr_fast.hist_downsample(labels, 3, 4, ignore_index=2**64)
    with pytest.raises(TypeError, match="labels must be an integer tensor of dtype uint8, int8, int16, int32 or int64, got torch.uint16"):
        lsr_fast.hist_downsample(labels.to(torch.uint16), 3, 4)
    with pytest.raises(ValueError, match="labels is a meta tensor"):
        lsr_fast.hist_downsample(labels.to("meta"), 3, 4)
    with pytest.raises(ValueError, match="features is a meta tensor"):
        lsr_fast.class_feature_stats(torch.randn(1, 3, 8, 10, device="meta"), labels, 4)
    with pytest.raises(ValueError, match="prototypes is a meta tensor"):
        lsr_fast.clustering_loss(torch.randn(1, 3, 8, 10), labels, torch.zeros(4, 3, device="meta"))


# The raw ops' argument checks (formerly RAW_ARGUMENT_ERRORS here) are table-driven, on both
# devices and against the public API, in tests/test_raw_op_checks.py.
