"""The Triton feature_terms' own paths for the released code's forms (``distance`` squared_l2 |
l1, ``filtered``), beside the backend-generic tests in test_feature_losses.py: against the
float64-exact reference, forward and backward, on adversarial inputs, through every path the
filtered norm takes in this backend, plus its raw outputs, opcheck and torch.compile:

* K <= BLOCK_K of the class pass: the class pass has whole vectors and writes the mean and both
  norms itself (K = 1, 8);
* K > BLOCK_K: _vector_stats_kernel first, one register tile per vector (K = 256 under the
  interpreter, 256 and 512 on a GPU);
* K beyond one tile: _vector_stats_kernel's two sweeps (K = 512 under the interpreter).

Integer channels (exact in every dtype, K a power of two, so every mean is exact and the
reference and the kernels agree on which channels sit exactly at it), rows at their mean, all
equal, all zero, equal to their prototype (sign(0) = 0), absent classes, ignore labels, a
reference r equal to a vector's (filtered) norm (the kink of |g| and of the hinge).
"""

import math

import pytest
import torch

import lsr_fast
from lsr_fast import reference
from conftest import assert_accumulated_close, assert_rounded_close, feature_terms_magnitudes, unusable_reason

V = 255
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(bool(unusable_reason(DEVICE, "triton")), reason=unusable_reason(DEVICE, "triton") or "-")
SWITCHES = [("squared_l2", False), ("l1_mean", False), ("squared_l2", True), ("l1_mean", True)]
C = 6  # classes 2..5 absent
LABELS = torch.tensor([0, 1, 0, 1, 1, V, 0, 1, V, 0, 1, 0])


def triton_backend():
    import lsr_fast.triton as backend

    return backend


def adversarial_rows(K, dtype, seed=0):
    """(rows (12, K), labels (12,), prototypes (C, K)): integer values."""
    g = torch.Generator().manual_seed(seed + K)
    rows = torch.randint(-3, 4, (12, K), generator=g).to(torch.float64)
    prototypes = torch.randint(-2, 3, (C, K), generator=g).to(torch.float64)
    if K >= 8:
        rows[0] = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 4.0, 2.0, 2.0]).repeat(K // 8)  # mean 2, half the channels at it
    rows[1] = 5.0  # all equal: all kept
    rows[2] = 0.0  # all zero: norms 0, gradient 0
    rows[3] = prototypes[1]  # on its prototype: sign(0) = 0
    rows[4] = prototypes[1]
    rows[4, : K // 2] += 1.0  # half its channels on the prototype
    rows[5] = -3.0  # all equal and negative
    rows[6] = 0.0
    rows[6, K // 3] = 4.0  # one channel above the mean, the zeros below it
    return rows.to(dtype), LABELS.clone(), prototypes


def as_layout(rows, labels, layout):
    """(leaf, view, labels): a dense leaf tensor and the function that makes the features from it
    (applied after requires_grad_, so the op sees the layout and the gradient reaches the leaf):
    the same 12 vectors as (N, K) rows or a (2, K, 2, 3) map in a given memory layout."""
    K = rows.shape[1]
    if layout == "rows":
        return rows, (lambda t: t), labels
    maps = rows.reshape(2, 2, 3, K).permute(0, 3, 1, 2)  # channels_last strides
    map_labels = labels.reshape(2, 2, 3)
    if layout == "nchw":
        return maps.contiguous(), (lambda t: t), map_labels
    if layout == "channels_last":
        return maps.contiguous(memory_format=torch.channels_last), (lambda t: t), map_labels
    if layout == "strided_channels":  # every other channel of a wider map
        wide = torch.zeros(2, 2 * K, 2, 3, dtype=rows.dtype)
        wide[:, ::2] = maps
        return wide, (lambda t: t[:, ::2]), map_labels
    if layout == "strided_positions":  # every other column: positions do not merge into one stride
        wide = torch.zeros(2, K, 2, 6, dtype=rows.dtype)
        wide[..., ::2] = maps
        return wide, (lambda t: t[..., ::2]), map_labels
    if layout == "expanded":  # one image seen twice (stride 0 over the batch)
        return maps[:1].contiguous(), (lambda t: t.expand(2, K, 2, 3)), map_labels
    raise ValueError(layout)


def weighted_loss(terms, seed):
    sums, _, dist, norm_loss, norm_sum = terms[:5]
    g = torch.Generator().manual_seed(seed)
    w_sums = torch.rand(sums.shape, generator=g, dtype=torch.float64).to(sums)
    w_dist = torch.rand(dist.shape, generator=g, dtype=torch.float64).to(dist)
    return (sums * w_sums).sum() + (dist * w_dist).sum() + 0.7 * norm_loss + 0.3 * norm_sum


def references_values(K):
    """(mode, r) pairs: r at the all-equal row's norm (the kink) and one crossing the others."""
    kink = math.sqrt(25.0 * K)
    return [("source", kink), ("source", 1.5 * math.sqrt(K)), ("target", kink), ("target", 2.5 * math.sqrt(K))]


def check_against_reference(leaf, view, labels, prototypes, distance, filtered, mode, r, dtype, seed=0):
    a = leaf.detach().clone().requires_grad_()
    b = leaf.detach().clone().to(DEVICE).requires_grad_()
    features = view(a)
    want = reference.feature_terms(features, labels, prototypes, r, mode, V, distance, filtered)
    got = triton_backend().feature_terms(view(b), labels.to(DEVICE), prototypes.to(DEVICE), r, mode, V, distance, filtered)
    what = f"{distance} filtered={filtered} {mode} r={r:g}"
    assert torch.equal(got[1].cpu(), want[1]), what
    magnitudes = list(feature_terms_magnitudes(features.detach(), labels, C, r, want))
    if distance == "l1_mean":  # the distance sums are of |f - p| >= 0: themselves
        magnitudes[2] = want[2].abs()
    for name, g_, w_, magnitude in zip(("sums", "counts", "dist", "norm loss", "norm sum"), got, want, magnitudes):
        if magnitude is not None:
            assert_accumulated_close(g_, w_, dtype, magnitude, f"{what} {name}")
    weighted_loss(want, seed).backward()
    weighted_loss(got, seed).backward()
    assert_rounded_close(b.grad, a.grad, dtype, f"{what} gradient")


FULL = [(K, layout) for K in (8,) for layout in
        ("rows", "nchw", "channels_last", "strided_channels", "strided_positions", "expanded")]
WIDE = [(1, "rows"), (1, "nchw"), (256, "rows"), (256, "nchw"), (256, "channels_last"), (256, "strided_positions"),
        (512, "rows"), (512, "nchw"), (512, "strided_channels")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K,layout", FULL + WIDE)
@pytest.mark.parametrize("distance,filtered", SWITCHES)
def test_released_forms_triton_adversarial(dtype, K, layout, distance, filtered):
    if K > 8 and dtype in (torch.float16, torch.bfloat16) and layout not in ("rows", "nchw"):
        pytest.skip("the wide paths' layouts are covered in float32 / float64")
    rows, labels, prototypes = adversarial_rows(K, dtype)
    leaf, view, map_labels = as_layout(rows, labels, layout)
    if layout != "rows":  # the op sees the layout asked for
        assert view(leaf).is_contiguous() == (layout == "nchw")
    for mode, r in references_values(K):
        check_against_reference(leaf, view, map_labels, prototypes, distance, filtered, mode, r, dtype)


@pytest.mark.parametrize("distance,filtered", SWITCHES)
@pytest.mark.parametrize("K", [8, 256, 512])
def test_released_forms_triton_random_float64(distance, filtered, K):
    # Continuous values (no ties) on a map with more positions than one block, C > BLOCK_C.
    g = torch.Generator().manual_seed(K)
    features = torch.randn(2, K, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 40, (2, 5, 7), generator=g)
    labels[0, 0] = V
    prototypes = torch.randn(40, K, generator=g, dtype=torch.float64)
    for mode in ("source", "target"):
        a = features.clone().requires_grad_()
        b = features.clone().to(DEVICE).requires_grad_()
        want = reference.feature_terms(a, labels, prototypes, 0.8 * math.sqrt(K), mode, V, distance, filtered)
        got = triton_backend().feature_terms(b, labels.to(DEVICE), prototypes.to(DEVICE), 0.8 * math.sqrt(K), mode, V,
                                             distance, filtered)
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_.cpu(), w_, rtol=1e-10, atol=1e-10)
        weighted_loss(want, 3).backward()
        weighted_loss(got, 3).backward()
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-10, atol=1e-10)


def test_filtered_norm_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    for K in (6, 300):  # fast mode: random projections, a few evaluations instead of one per element
        features = torch.randn(2, K, 2, 3, dtype=torch.float64, generator=g).to(DEVICE).requires_grad_()
        labels = torch.randint(0, 3, (2, 2, 3), generator=g).to(DEVICE)
        labels[0, 1] = V
        prototypes = torch.randn(3, K, dtype=torch.float64, generator=g).to(DEVICE)
        for mode in ("source", "target"):
            for distance, filtered in SWITCHES:
                assert torch.autograd.gradcheck(
                    lambda f: triton_backend().feature_terms(f, labels, prototypes, 0.9 * math.sqrt(K), mode, V, distance,
                                                             filtered)[::2], (features,), fast_mode=True)


@pytest.mark.parametrize("K", [3, 8, 256, 512])
def test_filtered_raw_outputs(K):
    """The raw op's 6th output (unfiltered norms, differentiable) and 7th (||f~||, m per vector,
    not differentiable; (2, 0) unfiltered), and the gradient through the norms output."""
    rows, labels, prototypes = adversarial_rows(max(K, 8), torch.float64)
    rows = rows[:, :K].contiguous()
    prototypes = prototypes[:, :K].contiguous()
    op = torch.ops.lsr_fast_triton.feature_terms
    r = torch.tensor(2.0 * math.sqrt(K), dtype=torch.float64)
    f = rows.clone().to(DEVICE).requires_grad_()
    outputs = op(f, labels.to(DEVICE), prototypes.to(DEVICE), r.to(DEVICE), 0, V, 1, True)
    assert len(outputs) == 7
    norms, stats = outputs[5], outputs[6]
    mean = rows.mean(1)
    kept = torch.where(rows >= mean[:, None], rows, 0.0)
    torch.testing.assert_close(norms.cpu(), rows.norm(dim=1), rtol=1e-12, atol=0)
    assert stats.shape == (2, 12) and not stats.requires_grad
    torch.testing.assert_close(stats[1].cpu(), mean, rtol=0, atol=0)
    torch.testing.assert_close(stats[0].cpu(), kept.norm(dim=1), rtol=1e-12, atol=0)
    # d/df of sum(w * ||f||) through the norms output alone.
    w = torch.linspace(0.5, 1.5, 12, dtype=torch.float64)
    (norms * w.to(DEVICE)).sum().backward()
    nrm = rows.norm(dim=1, keepdim=True)
    want = torch.where(nrm > 0, w[:, None] * rows / nrm.clamp(min=1e-300), 0.0)
    torch.testing.assert_close(f.grad.cpu(), want, rtol=1e-12, atol=1e-12)
    unfiltered = op(f.detach(), labels.to(DEVICE), prototypes.to(DEVICE), r.to(DEVICE), 0, V)  # defaults: today
    assert unfiltered[6].shape == (2, 0)
    for x, y in zip(unfiltered[:6], op(f.detach(), labels.to(DEVICE), prototypes.to(DEVICE), r.to(DEVICE), 0, V, 0, False)[:6]):
        assert torch.equal(x, y)


def test_filtered_all_equal_vector_keeps_every_channel():
    """Channels all equal to v: m rounds to a value above v for many (v, K) in float32 (the
    rounded sum / K); m never exceeds the largest channel, so every channel is kept."""
    Ks = (3, 5, 7, 11, 13, 33, 100)
    for K in Ks:
        rows = torch.full((4, K), 0.1, dtype=torch.float32)
        rows[1] = 0.3
        rows[2] = 1.1
        rows[3] = 3.3
        labels = torch.full((4,), V)
        protos = torch.zeros(1, K)
        for mode in ("source", "target"):
            f = rows.clone().to(DEVICE).requires_grad_()
            plain = triton_backend().feature_terms(f, labels.to(DEVICE), protos.to(DEVICE), 0.0, mode, V, "squared_l2", False)
            filt = triton_backend().feature_terms(f, labels.to(DEVICE), protos.to(DEVICE), 0.0, mode, V, "squared_l2", True)
            torch.testing.assert_close(filt[3], plain[3], rtol=0, atol=0)
            stats = torch.ops.lsr_fast_triton.feature_terms(f.detach(), labels.to(DEVICE), protos.to(DEVICE),
                                                            torch.zeros((), device=DEVICE), 0, V, 0, True)[6]
            assert (stats[1].cpu() <= rows.max(1).values).all()


def test_empty_maps_and_no_classes():
    for filtered in (False, True):
        for distance in ("squared_l2", "l1_mean"):
            f = torch.zeros(0, 5, 3, 4, device=DEVICE, requires_grad=True)
            terms = triton_backend().feature_terms(f, torch.zeros(0, 3, 4, dtype=torch.long, device=DEVICE),
                                                   torch.randn(3, 5, device=DEVICE), 1.0, "source", V, distance, filtered)
            assert terms[3].item() == 0 and terms[4].item() == 0
            weighted_loss(terms, 0).backward()
            assert f.grad.shape == f.shape
            # No classes at all (the norm-alignment route): only the norm terms.
            rows, _, _ = adversarial_rows(8, torch.float64)
            a = rows.clone().requires_grad_()
            b = rows.clone().to(DEVICE).requires_grad_()
            void = torch.zeros(12, dtype=torch.uint8)
            none = torch.zeros(0, 8, dtype=torch.float64)
            want = reference.feature_terms(a, void, none, 3.0, "target", 0, distance, filtered)
            got = triton_backend().feature_terms(b, void.to(DEVICE), none.to(DEVICE), 3.0, "target", 0, distance, filtered)
            for g_, w_ in zip(got, want):
                torch.testing.assert_close(g_.cpu(), w_, rtol=1e-12, atol=1e-12)
            (want[3] + want[4]).backward()
            (got[3] + got[4]).backward()
            torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-12, atol=1e-12)


def test_raw_op_rejects_bad_distance():
    f, labels, protos = torch.randn(4, 3, device=DEVICE), torch.zeros(4, dtype=torch.long, device=DEVICE), torch.randn(2, 3, device=DEVICE)
    with pytest.raises(RuntimeError, match="distance"):
        torch.ops.lsr_fast_triton.feature_terms(f, labels, protos, torch.ones((), device=DEVICE), 0, V, 2, False)


def test_opcheck_and_compile_with_switches():
    pytest.importorskip("expecttest")
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 6, 3, 4, generator=g).to(DEVICE).requires_grad_()
    small = torch.randint(0, 4, (2, 3, 4), generator=g).to(DEVICE)
    small[1, 0] = V
    prototypes = torch.randn(4, 6, generator=g).to(DEVICE)
    r = torch.tensor(2.0, device=DEVICE)
    op = torch.ops.lsr_fast_triton.feature_terms
    for args in ((features, small, prototypes, r, 0, V, 1, True), (features, small, prototypes, r, 1, V, 0, True),
                 (features, small, prototypes, r, 1, V, 1, False), (features, small, prototypes, r, 0, V)):
        torch.library.opcheck(op, args)

    def step(f):
        terms = triton_backend().feature_terms(f, small, prototypes, 1.5, "target", V, "l1_mean", True)
        sums, _, dist, norm_loss, norm_sum = terms
        return (sums * sums).sum() + (dist * dist).sum() + 0.7 * norm_loss + 0.3 * norm_sum

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = features.detach().clone().requires_grad_()
    b = features.detach().clone().requires_grad_()
    want = step(a)
    got = compiled(b)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(b.grad, a.grad)
