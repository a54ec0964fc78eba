"""pseudo_label_downsample's confidence test at and next to the threshold.

Every backend decides ``S > confidence * n`` in float64, S the exact sum of the window's float32
maxima (reference.pseudo_label_downsample). Here the reference is checked against exact
rational arithmetic, and every backend against the reference bit for bit on cells whose mean
equals ``confidence`` or lies within rounding of it, where summing in another order (as
adaptive_avg_pool2d does at output size (1, 1)) used to decide differently.
"""

import math
from fractions import Fraction

import pytest
import torch

import lsr_fast
from lsr_fast import reference
from conftest import fast_params

V = 255  # ignore_index
HALVES = (torch.float32, torch.float16, torch.bfloat16)


def probs_with_maxima(maxima, num_classes):
    """(B, C, H, W) float64 probabilities whose per-pixel maximum is ``maxima`` (B, H, W), on
    class 0 (the first on ties), the rest spread evenly over the other classes."""
    rest = (1 - maxima) / (num_classes - 1)
    return torch.cat([maxima.unsqueeze(1), rest.unsqueeze(1).expand(-1, num_classes - 1, -1, -1)], 1)


def windows(in_size, out_size):
    start, end = reference.window_bounds(in_size, out_size)
    return list(zip(start.tolist(), end.tolist()))


def exact_decision(probs, size, confidence, threshold=0.5):
    """The definition in rational arithmetic: keep the histogram's label iff the exact window sum
    of the float32 maxima exceeds float64(confidence * n) (one IEEE product, as the kernels)."""
    maxima = probs.max(dim=1).values.float().double()
    labels = reference.hist_downsample(probs.max(dim=1).indices, size, probs.shape[1], threshold, V)
    ties = 0
    for b in range(probs.shape[0]):
        for i, (y0, y1) in enumerate(windows(probs.shape[2], size[0])):
            for j, (x0, x1) in enumerate(windows(probs.shape[3], size[1])):
                total = sum(map(Fraction, maxima[b, y0:y1, x0:x1].flatten().tolist()))
                bound = Fraction(confidence * ((y1 - y0) * (x1 - x0)))
                ties += total == bound
                if not total > bound:
                    labels[b, i, j] = V
    return labels, ties


def run(probs, size, confidence, device, backend, layout="contiguous"):
    probs = probs.to(device)
    if layout == "channels_last":
        probs = probs.contiguous(memory_format=torch.channels_last)
    return lsr_fast.pseudo_label_downsample(probs, size, confidence=confidence, backend=backend).cpu()


# ---- the reference, by hand and against exact arithmetic ---------------------------------------


def test_mean_equal_to_confidence_is_void():
    # Maxima 0.25 (a uniform pixel) and 0.75, all predicting class 0: mean exactly 0.5.
    probs = probs_with_maxima(torch.tensor([[[0.25, 0.75], [0.75, 0.25]]], dtype=torch.float64), 4)
    assert reference.pseudo_label_downsample(probs, (1, 1), confidence=0.5).item() == V
    assert reference.pseudo_label_downsample(probs, (1, 1), confidence=math.nextafter(0.5, 0)).item() == 0
    assert reference.pseudo_label_downsample(probs, (1, 1), confidence=math.nextafter(0.5, 1)).item() == V


def test_confidence_is_a_double_not_rounded_to_float32():
    # Every maximum is float32(0.3) = 0.300000011920928955...: equal to that confidence (void),
    # above the double 0.3 (kept), which a float32 comparison would round up to float32(0.3).
    maxima = torch.full((1, 3, 5), 0.3).double()
    probs = probs_with_maxima(maxima, 4).float()
    assert reference.pseudo_label_downsample(probs, (1, 1), confidence=float(maxima[0, 0, 0])).item() == V
    assert reference.pseudo_label_downsample(probs, (1, 1), confidence=0.3).item() == 0


def rounding_trap():
    """Four maxima whose float32 row-major sum rounds to 2.5 (mean 0.625) while the exact sum is
    2.5 + 2^-23: 1 + (0.5 + 2^-24) rounds to 1.5, + (0.5 + 2^-24) rounds to 2, + 0.5 is 2.5."""
    a = 0.5 + 2.0**-24
    return probs_with_maxima(torch.tensor([[[1.0, a], [a, 0.5]]], dtype=torch.float64), 2)


@pytest.mark.parametrize("device,backend", [("cpu", "reference")] + fast_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_sum_not_float32_mean(device, backend, dtype):
    probs = rounding_trap().to(dtype)
    row_major = torch.zeros((), dtype=torch.float32)
    for value in probs[0, 0].flatten().float():
        row_major = row_major + value
    assert row_major.item() == 2.5  # a float32 mean would be exactly 0.625: void
    assert run(probs, (1, 1), 0.625, device, backend).item() == 0
    tie = 0.625 + 2.0**-25  # exactly S / 4
    assert run(probs, (1, 1), tie, device, backend).item() == V
    assert run(probs, (1, 1), math.nextafter(tie, 0), device, backend).item() == 0


@pytest.mark.parametrize("dtype", HALVES)
def test_reference_matches_exact_arithmetic(dtype):
    g = torch.Generator().manual_seed(11)
    for trial in range(20):
        C, H, W = 2 + trial % 7, 1 + trial % 9, 1 + (trial * 5) % 11
        probs = torch.softmax(torch.randn(2, C, H, W, generator=g, dtype=torch.float64) * 2, 1).to(dtype)
        for size in [(1, 1), (1, W), (H, 1), (max(1, H // 2), max(1, (2 * W) // 3))]:
            maxima = probs.max(dim=1).values.float().double()
            confidence = float(Fraction(maxima[0].sum().item()) / (H * W))  # the (1, 1) mean: a near tie
            want, _ = exact_decision(probs, size, confidence)
            assert torch.equal(reference.pseudo_label_downsample(probs, size, confidence=confidence), want)


# ---- every backend against the reference, bit for bit -------------------------------------------


SIZES = [((8, 8), (1, 1)), ((6, 7), (1, 3)), ((7, 5), (3, 1)), ((7, 9), (3, 4)), ((5, 6), (5, 6))]


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("dtype,layout", [
    (torch.float32, "contiguous"), (torch.float32, "channels_last"), (torch.float16, "contiguous"),
    (torch.bfloat16, "channels_last"), (torch.float64, "contiguous"),
])
def test_exact_ties(device, backend, dtype, layout):
    """Maxima 0.25/0.5/0.75/1 (exact in every dtype) against confidences they average to: many
    windows whose mean equals the confidence exactly, so ties decide."""
    g = torch.Generator().manual_seed(12)
    ties = 0
    for (H, W), size in SIZES:
        maxima = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)[torch.randint(4, (2, H, W), generator=g)]
        probs = probs_with_maxima(maxima, 4).to(dtype)
        for confidence in (0.5, 0.625):
            want, n = exact_decision(probs, size, confidence)
            ties += n
            assert torch.equal(reference.pseudo_label_downsample(probs, size, confidence=confidence), want)
            assert torch.equal(run(probs, size, confidence, device, backend, layout), want)
    assert ties >= 10  # the case exercises ties


def interior_shuffle(maxima, size, g):
    """Each image's maxima permuted within the pixels that belong to one window only: every
    window keeps its multiset of values (so its exact sum) but sums them in another order."""
    B, H, W = maxima.shape
    owners = {}
    for i, (y0, y1) in enumerate(windows(H, size[0])):
        for j, (x0, x1) in enumerate(windows(W, size[1])):
            for y in range(y0, y1):
                for x in range(x0, x1):
                    owners.setdefault((y, x), []).append((i, j))
    groups = {}
    for pixel, cells in owners.items():
        if len(cells) == 1:
            groups.setdefault(cells[0], []).append(pixel)
    out = maxima.clone()
    for b in range(B):
        for pixels in groups.values():
            ys, xs = torch.tensor(pixels).t()
            order = torch.randperm(len(pixels), generator=g)
            out[b, ys, xs] = maxima[b, ys[order], xs[order]]
    return out


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("dtype", HALVES)
def test_near_threshold_random_maps(device, backend, dtype):
    """Random (non-dyadic) maxima, each map's pixels shuffled within their windows in every image
    of the batch, and the confidence set to one cell's exact mean rounded to a double and to the
    doubles next to it: hundreds of cells whose mean is within rounding of the confidence."""
    g = torch.Generator().manual_seed(13)
    images = 16
    near = 0
    for (H, W), size in SIZES[:4]:
        top = 0.25 + 0.75 * torch.rand(1, H, W, generator=g, dtype=torch.float64)
        maxima = interior_shuffle(top.expand(images, H, W), size, g)
        probs = probs_with_maxima(maxima, 4).to(dtype)
        exact = probs.max(dim=1).values.float().double()
        cell = (int(torch.randint(size[0], (1,), generator=g)), int(torch.randint(size[1], (1,), generator=g)))
        (y0, y1), (x0, x1) = windows(H, size[0])[cell[0]], windows(W, size[1])[cell[1]]
        mean = float(sum(map(Fraction, exact[0, y0:y1, x0:x1].flatten().tolist())) / ((y1 - y0) * (x1 - x0)))
        for confidence in (math.nextafter(mean, 0), mean, math.nextafter(mean, 1)):
            want = reference.pseudo_label_downsample(probs, size, confidence=confidence)
            assert torch.equal(run(probs, size, confidence, device, backend), want), (size, confidence)
            # The shuffled copies of the cell are decided alike, as the exact sums are equal.
            assert want[:, cell[0], cell[1]].unique().numel() == 1
            near += images
    assert near >= 150


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("batch", [0, 1, 2])
def test_batch_sizes(device, backend, batch):
    g = torch.Generator().manual_seed(14 + batch)
    maxima = torch.tensor([0.25, 0.75], dtype=torch.float64)[torch.randint(2, (batch, 6, 5), generator=g)]
    probs = probs_with_maxima(maxima, 4).float()
    for size in [(1, 1), (4, 3)]:
        want = reference.pseudo_label_downsample(probs, size, confidence=0.5)
        assert want.shape == (batch, *size)
        assert torch.equal(run(probs, size, 0.5, device, backend, "channels_last"), want)
