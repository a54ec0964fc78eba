"""hist_downsample and pseudo_label_downsample: hand-worked cases, every backend against the
reference, invalid inputs."""

import pytest
import torch
import torch.nn.functional as F

import lsr_fast
from lsr_fast import reference
from conftest import all_params, fast_params

V = 255  # ignore_index


def hand_labels():
    """A 16x16 map whose 4x4 windows (16 pixels each) hold known histograms."""
    cells = {}

    def cell(i, j):
        cells[i, j] = cells.get((i, j), torch.full((16,), V, dtype=torch.int64))
        return cells[i, j]

    cell(0, 0)[:] = 1                                          # one class: 1
    c = cell(0, 1); c[:12] = 2; c[12:] = 3                     # 12 vs 4 < 0.5*12: 2
    c = cell(0, 2); c[:10] = 2; c[10:] = 3                     # 10 vs 6 >= 5: void
    c = cell(0, 3); c[:8] = 0; c[8:] = 5                       # tie 8 vs 8: void
    cell(1, 0)                                                 # all void: void
    c = cell(1, 1); c[:6] = 4                                  # 6 of class 4, rest void: 4
    c = cell(1, 2); c[:7] = 6; c[7:10] = 1                     # 7 vs 3 < 3.5, void ignored: 6
    c = cell(1, 3); c[:9] = 3; c[9:12] = 0; c[12:] = 1         # 9 vs 4 (not 3+4) < 4.5: 3
    cell(2, 0)[:] = torch.arange(16) % 4                       # 4 each: void
    c = cell(2, 1); c[:5] = 2; c[5:7] = 1                      # 5 vs 2: 2
    c = cell(2, 2); c[:1] = 6                                  # a single voting pixel: 6
    c = cell(2, 3); c[:9] = 1; c[9:] = 0                       # 9 vs 7: void
    for j in range(4):
        cell(3, j)[:] = j                                      # uniform rows: 0 1 2 3
    labels = torch.empty(16, 16, dtype=torch.int64)
    for (i, j), values in cells.items():
        # Shuffle inside the window: the histogram, not the layout, decides.
        values = values[torch.randperm(16, generator=torch.Generator().manual_seed(4 * i + j))]
        labels[4 * i : 4 * i + 4, 4 * j : 4 * j + 4] = values.view(4, 4)
    expected = torch.tensor([[1, 2, V, V], [V, 4, 6, 3], [V, 2, 6, V], [0, 1, 2, 3]])
    return labels, expected


def test_hand_worked_16x16():
    labels, expected = hand_labels()
    out = reference.hist_downsample(labels[None], (4, 4), 7)
    assert out.dtype == torch.int64
    assert torch.equal(out[0], expected)


def test_threshold_changes_the_decision():
    labels, _ = hand_labels()
    # cell (0, 2) has 10 vs 6: kept once threshold > 0.6, as is cell (2, 3) (9 vs 7) above 7/9.
    out = reference.hist_downsample(labels[None], (4, 4), 7, threshold=0.8)[0]
    assert out[0, 2] == 2 and out[2, 3] == 1 and out[0, 3] == V  # the tie stays void


def test_class_weights_scale_counts():
    labels, _ = hand_labels()
    weights = torch.ones(7)
    weights[5] = 2.0  # cell (0, 3): 8 of class 0 vs 16 (weighted) of class 5: 8 < 8? no -> void
    out = reference.hist_downsample(labels[None], (4, 4), 7, class_weights=weights)[0]
    assert out[0, 3] == V
    weights[5] = 2.5  # 8 < 0.5 * 20: class 5 wins
    out = reference.hist_downsample(labels[None], (4, 4), 7, class_weights=weights)[0]
    assert out[0, 3] == 5
    weights = torch.ones(7)
    weights[3] = 0.0  # class 3 no longer votes: cell (0, 2) becomes pure class 2
    out = reference.hist_downsample(labels[None], (4, 4), 7, class_weights=weights)[0]
    assert out[0, 2] == 2


def test_non_dividing_windows():
    # 5 -> 3: rows/cols windows [0, 2), [1, 4), [3, 5) (adaptive_avg_pool2d's), overlapping.
    start, end = reference.window_bounds(5, 3)
    assert start.tolist() == [0, 1, 3] and end.tolist() == [2, 4, 5]
    labels = torch.tensor(
        [
            [0, 0, 1, 1, 1],
            [0, 0, 1, 1, 1],
            [2, 2, 2, 1, 1],
            [2, 2, 2, V, V],
            [2, 2, 2, V, V],
        ]
    )
    # window (0,0): rows 0-1, cols 0-1 -> 4x class 0 -> 0
    # window (0,1): rows 0-1, cols 1-3 -> 0,1,1 / 0,1,1 -> 2 vs 4 -> 2 < 2? no -> void
    # window (0,2): rows 0-1, cols 3-4 -> 1 x4 -> 1
    # window (1,0): rows 1-3, cols 0-1 -> 0,0 / 2,2 / 2,2 -> 4 vs 2: 2 < 2? no -> void
    # window (1,1): rows 1-3, cols 1-3 -> 0,1,1 / 2,2,1 / 2,2,V -> 1:3, 2:4, 0:1 -> 3 < 2? no -> void
    # window (1,2): rows 1-3, cols 3-4 -> 1,1 / 1,1 / V,V -> 1
    # window (2,0): rows 3-4, cols 0-1 -> 2 x4 -> 2
    # window (2,1): rows 3-4, cols 1-3 -> 2,2,V / 2,2,V -> 2
    # window (2,2): rows 3-4, cols 3-4 -> all void -> void
    expected = torch.tensor([[0, V, 1], [V, V, 1], [2, 2, V]])
    assert torch.equal(reference.hist_downsample(labels[None], (3, 3), 3)[0], expected)


def test_same_size_is_identity_on_valid_labels():
    labels = torch.randint(0, 5, (2, 7, 9))
    labels[0, 0, 0] = V
    assert torch.equal(reference.hist_downsample(labels, (7, 9), 5), labels)


def test_paper_size_windows_match_adaptive_pooling():
    # 720x1280 -> 91x161, the paper's case: window counts equal adaptive_avg_pool2d * area.
    labels = torch.randint(0, 3, (1, 720, 1280))
    one_hot = F.one_hot(labels, 3).permute(0, 3, 1, 2)
    counts = reference.window_counts(one_hot, (91, 161)).double()
    y0, y1 = reference.window_bounds(720, 91)
    x0, x1 = reference.window_bounds(1280, 161)
    area = (y1 - y0).view(-1, 1) * (x1 - x0).view(1, -1)
    pooled = F.adaptive_avg_pool2d(one_hot.double(), (91, 161)) * area
    assert torch.allclose(counts, pooled)


# ---- every backend against the reference --------------------------------------------------


def adversarial_label_maps(C=5):
    g = torch.Generator().manual_seed(0)
    maps = {
        "random": torch.randint(0, C, (2, 37, 53), generator=g),
        "all_void": torch.full((1, 16, 16), V),
        "one_class": torch.full((1, 16, 20), 3),
        "blocks": torch.arange(4).repeat_interleave(4).repeat(16, 1).unsqueeze(0) % C,
        "sparse_void": torch.where(torch.rand(2, 29, 31, generator=g) < 0.7, V, torch.randint(0, C, (2, 29, 31), generator=g)),
    }
    ties = torch.zeros(1, 8, 8, dtype=torch.int64)
    ties[0, :, 4:] = 1  # every 4x4... and 8x8 window split evenly
    maps["ties"] = ties
    return maps


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("name", list(adversarial_label_maps()))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
@pytest.mark.parametrize("size", [(1, 1), (3, 5), (7, 9), "same"])
def test_backend_matches_reference(device, backend, name, dtype, size):
    labels = adversarial_label_maps()[name].to(dtype)
    if size == "same":
        size = tuple(labels.shape[1:])
    size = (min(size[0], labels.shape[1]), min(size[1], labels.shape[2]))
    expected = reference.hist_downsample(labels, size, 5)
    out = lsr_fast.hist_downsample(labels.to(device), size, 5, backend=backend)
    assert out.dtype == torch.int64
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 1.0])
def test_backend_weights_and_thresholds(device, backend, threshold):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 6, (2, 24, 30), generator=g)
    weights = torch.rand(6, generator=g) * 2
    weights[2] = 0.0
    expected = reference.hist_downsample(labels, (5, 7), 6, threshold=threshold, class_weights=weights)
    out = lsr_fast.hist_downsample(labels.to(device), (5, 7), 6, threshold=threshold, class_weights=weights.to(device), backend=backend)
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("device,backend", fast_params())
def test_backend_paper_shape(device, backend):
    g = torch.Generator().manual_seed(2)
    # Blocky labels so that most windows are decided, not void.
    coarse = torch.randint(0, 19, (1, 45, 80), generator=g)
    labels = coarse.repeat_interleave(16, 1).repeat_interleave(16, 2)
    labels[:, ::7, ::5] = V
    expected = reference.hist_downsample(labels, (91, 161), 19)
    out = lsr_fast.hist_downsample(labels.to(device), (91, 161), 19, backend=backend)
    assert torch.equal(out.cpu(), expected)
    assert (expected != V).float().mean() > 0.5


@pytest.mark.parametrize("device,backend", fast_params())
def test_backend_many_classes(device, backend):
    labels = torch.randint(0, 300, (1, 40, 40), generator=torch.Generator().manual_seed(3))
    labels[:, :20] = 299
    expected = reference.hist_downsample(labels, (4, 4), 300)
    assert torch.equal(lsr_fast.hist_downsample(labels.to(device), (4, 4), 300, backend=backend).cpu(), expected)


# ---- pseudo_label_downsample ----------------------------------------------------------------


def test_pseudo_labels_hand_worked():
    # 4x4 probabilities of 3 classes -> 2x2. Window (0,0): argmax 0 everywhere with max 0.9:
    # kept. (0,1): argmax 1, max 0.4 -> mean 0.4 <= 0.5: void. (1,0): argmax 2 on 3 pixels and
    # 0 on one -> 3 vs 1 < 1.5: 2, confidence 0.6: kept. (1,1): mean confidence exactly 0.5: void.
    probs = torch.zeros(1, 3, 4, 4)
    probs[0, :, :2, :2] = torch.tensor([0.9, 0.05, 0.05]).view(3, 1, 1)
    probs[0, :, :2, 2:] = torch.tensor([0.3, 0.4, 0.3]).view(3, 1, 1)
    probs[0, :, 2:, :2] = torch.tensor([0.2, 0.2, 0.6]).view(3, 1, 1)
    probs[0, :, 2, 0] = torch.tensor([0.6, 0.2, 0.2])
    probs[0, :, 2:, 2:] = torch.tensor([0.5, 0.25, 0.25]).view(3, 1, 1)
    out = reference.pseudo_label_downsample(probs, (2, 2))
    assert out.tolist() == [[[0, V], [2, V]]]
    # A lower confidence threshold keeps window (0,1) and (1,1).
    out = reference.pseudo_label_downsample(probs, (2, 2), confidence=0.3)
    assert out.tolist() == [[[0, 1], [2, 0]]]


def test_pseudo_labels_first_argmax_on_ties():
    probs = torch.full((1, 4, 2, 2), 0.25)
    out = reference.pseudo_label_downsample(probs, (1, 1), confidence=0.2)
    assert out.item() == 0


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,size", [((2, 5, 24, 30), (5, 7)), ((1, 3, 9, 9), (9, 9)), ((1, 19, 33, 47), (4, 6)), ((1, 2, 5, 5), (1, 1))])
def test_pseudo_backend_matches_reference(device, backend, dtype, shape, size):
    g = torch.Generator().manual_seed(4)
    coarse = torch.randn(shape[0], shape[1], 3, 3, generator=g) * 4
    logits = F.interpolate(coarse, size=shape[2:], mode="nearest") + 0.3 * torch.randn(shape, generator=g)
    probs = torch.softmax(logits, 1).to(dtype)
    expected = reference.pseudo_label_downsample(probs, size, confidence=0.6)
    out = lsr_fast.pseudo_label_downsample(probs.to(device), size, confidence=0.6, backend=backend)
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("ignore_index", [0, 1, 3, -1])
def test_ignore_index_inside_the_classes(device, backend, ignore_index):
    """An ignore_index in [0, C) marks void: those labels (or predictions) never vote."""
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 4, (2, 8, 8), generator=g).repeat_interleave(2, 1).repeat_interleave(2, 2)
    expected = reference.hist_downsample(labels, (4, 5), 4, ignore_index=ignore_index)
    out = lsr_fast.hist_downsample(labels.to(device), (4, 5), 4, ignore_index=ignore_index, backend=backend)
    assert torch.equal(out.cpu(), expected)
    probs = torch.softmax(torch.randn(2, 4, 4, 4, generator=g) * 3, 1).repeat_interleave(2, 2).repeat_interleave(2, 3)
    expected = reference.pseudo_label_downsample(probs, (3, 3), confidence=0.0, ignore_index=ignore_index)
    out = lsr_fast.pseudo_label_downsample(probs.to(device), (3, 3), confidence=0.0, ignore_index=ignore_index, backend=backend)
    assert torch.equal(out.cpu(), expected)


def test_pseudo_labels_ignore_index_in_range_hand_worked():
    # 2x2 -> 1x1, predictions 1, 1, 1, 0 with ignore_index=1: only class 0 votes -> 0.
    probs = torch.tensor([[0.2, 0.8], [0.3, 0.7], [0.1, 0.9], [0.9, 0.1]]).t().reshape(1, 2, 2, 2)
    assert reference.pseudo_label_downsample(probs, (1, 1), confidence=0.0, ignore_index=1).item() == 0


# ---- invalid inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", all_params())
def test_invalid_inputs(device, backend):
    labels = torch.randint(0, 3, (1, 8, 8), device=device)
    kw = dict(backend=backend)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        lsr_fast.hist_downsample(labels.float(), (4, 4), 3, **kw)
    with pytest.raises(ValueError, match=r"labels must be \(B, H, W\)"):
        lsr_fast.hist_downsample(labels[0], (4, 4), 3, **kw)
    bad = labels.clone()
    bad[0, 3, 3] = 7
    with pytest.raises(ValueError, match="value 7"):
        lsr_fast.hist_downsample(bad, (4, 4), 3, **kw)
    bad[0, 3, 3] = -1
    with pytest.raises(ValueError, match="value -1"):
        lsr_fast.hist_downsample(bad, (4, 4), 3, **kw)
    bad[0, 0, 0] = V  # void beside a bad value: still found
    bad[0, 3, 3] = 4
    with pytest.raises(ValueError, match="value 4"):
        lsr_fast.hist_downsample(bad, (4, 4), 3, **kw)
    with pytest.raises(ValueError, match="value 4"):
        lsr_fast.hist_downsample(bad.to(torch.uint8), (4, 4), 3, **kw)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        lsr_fast.hist_downsample(labels, (4, 4), 0, **kw)
    with pytest.raises(ValueError, match="size must not be larger"):
        lsr_fast.hist_downsample(labels, (9, 4), 3, **kw)
    with pytest.raises(ValueError, match="threshold must be in"):
        lsr_fast.hist_downsample(labels, (4, 4), 3, threshold=1.5, **kw)
    with pytest.raises(ValueError, match="class_weights must have shape"):
        lsr_fast.hist_downsample(labels, (4, 4), 3, class_weights=torch.ones(4, device=device), **kw)
    with pytest.raises(ValueError, match="class_weights must be finite and >= 0"):
        lsr_fast.hist_downsample(labels, (4, 4), 3, class_weights=torch.tensor([1.0, -1.0, 1.0], device=device), **kw)
    probs = torch.rand(1, 3, 8, 8, device=device)
    with pytest.raises(TypeError, match="probs must be a floating-point"):
        lsr_fast.pseudo_label_downsample(probs.long(), (4, 4), **kw)
    with pytest.raises(ValueError, match="size must not be larger"):
        lsr_fast.pseudo_label_downsample(probs, (4, 16), **kw)
    probs[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="probs contains non-finite"):
        lsr_fast.pseudo_label_downsample(probs, (4, 4), **kw)
