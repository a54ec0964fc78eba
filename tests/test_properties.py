"""Property-based tests (hypothesis): every public op on every backend usable here against
lsr_fast.reference, values and gradients.

Hypothesis draws shapes (windows that do not divide the input, h or w = 1, output size equal to
the input's, batches > 1, empty sets of rows), dtypes (float32, float64, float16, bfloat16;
uint8, int32, int64 labels), memory layouts (contiguous, channels_last, strided views),
label distributions (all void, one class, every class, random with and without void, coarse
blocks with tied windows), ignore_index inside and outside [0, C), thresholds, confidences and
alpha in [0, 1], class weights, features sitting on their prototypes and zero feature vectors.
Labels must agree bit for bit; sums and losses, which every backend accumulates in float32
(float64 for float64 input), within float32 (float64) rounding of the reference on the same
input, relative to the size of their terms (conftest.assert_accumulated_close: values near 0,
such as the clustering loss of features sitting on their prototypes, are compared to their own
size); gradients, returned in the features' dtype, within tests/conftest.py TOLERANCES for it
(conftest.assert_rounded_close). A few properties check the reference itself against direct
per-window and per-pair loops of DESIGN.md's definitions, and perpendicularity_loss (one
implementation for every backend) against such a loop only.

Profiles, chosen with the environment variable LSR_FAST_HYPOTHESIS_PROFILE:
- "ci" (default): 8 examples per test case, a case being one op x backend x input kind (the
  label distribution, the kind of probabilities, the loss mode or the dtype are pytest
  parameters, so every kind runs on every backend in every run; left to hypothesis, small
  budgets skew towards a few kinds). The Triton interpreter (about 0.8 ms per program
  instance) gets half the examples, on tiny shapes: about 550 examples in all. Derandomized:
  every run draws the same examples, so CI is reproducible and a failure it reports
  reproduces anywhere; exploring new inputs is the long profile's job.
- "long": 10,000 examples per test case (half for the Triton interpreter) from random seeds,
  with hypothesis' example database (.hypothesis/), so each run explores new inputs and
  replays earlier failures first. Many hours on a CPU, most of them in the Triton
  interpreter (``-k "not triton"`` leaves it out); on a GPU the Triton kernels run compiled:

      LSR_FAST_HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py
"""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lsr_fast
from lsr_fast import reference
from conftest import TOLERANCES, assert_accumulated_close, assert_rounded_close, devices, fast_params, feature_terms_magnitudes

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True, database=None, print_blob=True, suppress_health_check=_HEALTH)
settings.register_profile("long", max_examples=10_000, deadline=None, print_blob=True, suppress_health_check=_HEALTH)
PROFILE_NAME = os.environ.get("LSR_FAST_HYPOTHESIS_PROFILE", "ci")
if PROFILE_NAME not in ("ci", "long"):
    raise ValueError(f"LSR_FAST_HYPOTHESIS_PROFILE must be 'ci' or 'long', got {PROFILE_NAME!r}")
PROFILE = settings.get_profile(PROFILE_NAME)
INTERPRETER_SHARE = 2  # the Triton interpreter runs 1/INTERPRETER_SHARE of the examples

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SEEDS = st.integers(0, 2**31 - 1)
FRACTIONS = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.floats(0.0, 1.0))
LABEL_KINDS = ("random", "random_void", "all_void", "one_class", "every_class", "blocks")
PROB_KINDS = ("peaked", "flat", "ties", "blocks", "dyadic")
LAYOUTS = ("contiguous", "channels_last", "strided")


def interpreted(device, backend):
    return device == "cpu" and backend == "triton"


def run_property(device, backend, check, cases, *args, **kwargs):
    """check(device, backend, case) on the examples of ``cases(small, *args, **kwargs)`` under
    the profile; ``small`` (tiny shapes, half the examples) for the Triton interpreter."""
    small = interpreted(device, backend)
    examples = max(1, PROFILE.max_examples // INTERPRETER_SHARE) if small else PROFILE.max_examples

    @settings(PROFILE, max_examples=examples)
    @given(case=cases(small, *args, **kwargs))
    def prop(case):
        check(device, backend, case)

    prop()


def assert_close(got, want, dtype, what):
    """Outputs in the input's dtype (gradients): that dtype's tolerance, atol capped by their size."""
    assert_rounded_close(got, want, dtype, what)


# ---- building blocks -----------------------------------------------------------------------------


@st.composite
def batch_sizes(draw, small, minimum=0):
    # B = 0 is a valid batch for every op except the means over vectors or images (norm, MaxSquare).
    return draw(st.integers(minimum, 2 if small else 3))


@st.composite
def label_setups(draw, num_classes):
    """(ignore_index, dtype): ignore_index 255, -1, -100, C (just outside) or a class in [0, C)."""
    ignore_index = draw(st.one_of(st.sampled_from([255, -1, -100, num_classes]), st.integers(0, num_classes - 1)))
    dtypes = [torch.int64, torch.int32] + ([torch.uint8] if 0 <= ignore_index <= 255 else [])
    return ignore_index, draw(st.sampled_from(dtypes))


def make_labels(shape, num_classes, kind, ignore_index, dtype, g):
    """Labels of ``shape`` ((B, H, W) or (N,)) with values in [0, C) or ignore_index."""
    numel = math.prod(shape)
    if kind == "all_void":
        labels = torch.full(shape, ignore_index)
    elif kind == "one_class":
        labels = torch.full(shape, int(torch.randint(num_classes, (1,), generator=g)))
    elif kind == "every_class":  # every class appears when there are enough positions
        labels = (torch.arange(numel) % num_classes)[torch.randperm(numel, generator=g)].reshape(shape)
    elif kind == "blocks" and len(shape) == 3:  # 2x2 blocks: windows with clear majorities and ties
        B, H, W = shape
        coarse = torch.randint(-1, num_classes, (B, (H + 1) // 2, (W + 1) // 2), generator=g)
        labels = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, :H, :W]
        labels = torch.where(labels < 0, ignore_index, labels)
    else:
        labels = torch.randint(num_classes, shape, generator=g)
        if kind != "random":
            labels = torch.where(torch.rand(shape, generator=g) < 0.3, ignore_index, labels)
    return labels.to(dtype)


def make_features(shape, dtype, scale, zero_fraction, g):
    features = torch.randn(shape, generator=g) * scale
    if zero_fraction > 0:  # whole zero vectors: the norm's gradient is 0 there
        rows = torch.rand((shape[0],) + tuple(shape[2:]), generator=g) < zero_fraction
        features = features * ~rows.unsqueeze(1)
    return features.to(dtype)


def laid_out(tensor, layout):
    """The same values in another memory layout, as a differentiable function of ``tensor``
    (so gradients still reach the contiguous leaf the test holds)."""
    if layout == "channels_last" and tensor.dim() == 4:
        return tensor.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other element of a tensor twice as wide: stride 2 in the last dim
        return tensor.repeat_interleave(2, dim=-1)[..., ::2]
    return tensor


@st.composite
def feature_shapes(draw, small, min_rows=0):
    """(B, K, h, w) maps or (N, K) rows (N may be 0), and a memory layout."""
    K = draw(st.integers(1, 20 if small else 40))
    if draw(st.booleans()):
        shape = (draw(st.integers(min_rows, 12 if small else 64)), K)
        return shape, draw(st.sampled_from(["contiguous", "strided"]))
    side = 4 if small else 9
    shape = (draw(batch_sizes(small, min(min_rows, 1))), K, draw(st.integers(1, side)), draw(st.integers(1, side)))
    return shape, draw(st.sampled_from(LAYOUTS))


def labels_for(shape):
    return (shape[0],) if len(shape) == 2 else (shape[0],) + tuple(shape[2:])


@st.composite
def feature_cases(draw, small, kind, min_rows=0):
    shape, layout = draw(feature_shapes(small, min_rows))
    num_classes = draw(st.integers(1, 5 if small else 8))
    ignore_index, label_dtype = draw(label_setups(num_classes))
    return dict(
        shape=shape, layout=layout, dtype=draw(st.sampled_from(FLOATS)), num_classes=num_classes,
        kind=kind, ignore_index=ignore_index, label_dtype=label_dtype,
        scale=draw(st.sampled_from([0.05, 1.0, 4.0])), zero_fraction=draw(st.sampled_from([0.0, 0.0, 0.3])),
        seed=draw(SEEDS),
    )


def build_features_and_labels(case, g):
    features = make_features(case["shape"], case["dtype"], case["scale"], case["zero_fraction"], g)
    labels = make_labels(labels_for(case["shape"]), case["num_classes"], case["kind"], case["ignore_index"], case["label_dtype"], g)
    return features, labels


def build_prototypes(case, features, labels, near, dtype, g):
    """(C, K) prototypes; with ``near`` the features of each labelled vector are moved onto
    their class's prototype plus a little noise (clustering distances near 0)."""
    num_classes, width = case["num_classes"], case["shape"][1]
    prototypes = (torch.randn(num_classes, width, generator=g) * case["scale"]).to(dtype)
    if near:
        rows = features.float().movedim(1, -1) if features.dim() == 4 else features.float()
        labelled = (labels.long() != case["ignore_index"]) & (labels.long() >= 0) & (labels.long() < num_classes)
        index = labels.long().clamp(0, num_classes - 1)
        moved = prototypes.float()[index] + 1e-3 * torch.randn(rows.shape, generator=g)
        rows = torch.where(labelled.unsqueeze(-1), moved, rows)
        features = (rows.movedim(-1, 1) if features.dim() == 4 else rows).to(features.dtype).contiguous()
    return features, prototypes


def leaf(tensor, device):
    return tensor.detach().clone().to(device).requires_grad_()


# ---- hist_downsample -------------------------------------------------------------------------------


@st.composite
def hist_cases(draw, small, kind):
    H, W = draw(st.integers(1, 6 if small else 16)), draw(st.integers(1, 6 if small else 16))
    num_classes = draw(st.integers(1, 5 if small else 8))
    ignore_index, dtype = draw(label_setups(num_classes))
    weights = draw(st.none() | st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]) | st.floats(0.0, 4.0, width=32), min_size=num_classes, max_size=num_classes))
    return dict(
        shape=(draw(batch_sizes(small)), H, W), size=(draw(st.integers(1, H)), draw(st.integers(1, W))),
        num_classes=num_classes, kind=kind, ignore_index=ignore_index, dtype=dtype,
        layout=draw(st.sampled_from(["contiguous", "strided"])), threshold=draw(FRACTIONS), weights=weights, seed=draw(SEEDS),
    )


def build_hist(case):
    g = torch.Generator().manual_seed(case["seed"])
    labels = make_labels(case["shape"], case["num_classes"], case["kind"], case["ignore_index"], case["dtype"], g)
    weights = None if case["weights"] is None else torch.tensor(case["weights"], dtype=torch.float32)
    return labels, weights


def check_hist(device, backend, case):
    labels, weights = build_hist(case)
    want = reference.hist_downsample(labels, case["size"], case["num_classes"], case["threshold"], case["ignore_index"], weights)
    got = lsr_fast.hist_downsample(
        laid_out(labels.to(device), case["layout"]), case["size"], case["num_classes"], threshold=case["threshold"],
        ignore_index=case["ignore_index"], class_weights=None if weights is None else weights.to(device), backend=backend,
    )
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got.cpu(), want), f"labels differ at {(got.cpu() != want).nonzero().tolist()}"


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_hist_downsample(device, backend, kind):
    run_property(device, backend, check_hist, hist_cases, kind)


def window(i, size, out):
    """Rows (or columns) of output cell i: floor(i*S/s) to ceil((i+1)*S/s), DESIGN.md's windows."""
    return (i * size) // out, -((-(i + 1) * size) // out)


def naive_hist(labels, size, num_classes, threshold, ignore_index, weights):
    """DESIGN.md's hist_downsample, one window at a time, decisions in float32."""
    B, H, W = labels.shape
    h, w = size
    weights = np.ones(num_classes, np.float32) if weights is None else weights.numpy().astype(np.float32)
    out = torch.empty(B, h, w, dtype=torch.int64)
    for b in range(B):
        for i in range(h):
            y0, y1 = window(i, H, h)
            for j in range(w):
                x0, x1 = window(j, W, w)
                values = labels[b, y0:y1, x0:x1].reshape(-1).tolist()
                scores = [np.float32(sum(v == c for v in values if v != ignore_index)) * weights[c] for c in range(num_classes)]
                c1 = max(range(num_classes), key=lambda c: (scores[c], -c))  # lowest index on ties
                n1 = scores[c1]
                n2 = max((scores[c] for c in range(num_classes) if c != c1), default=np.float32(0))
                keep = n1 > 0 and n2 < np.float32(threshold) * n1
                out[b, i, j] = c1 if keep else ignore_index
    return out


def check_naive_hist(device, backend, case):
    labels, weights = build_hist(case)
    want = naive_hist(labels.long(), case["size"], case["num_classes"], case["threshold"], case["ignore_index"], weights)
    got = reference.hist_downsample(labels, case["size"], case["num_classes"], case["threshold"], case["ignore_index"], weights)
    assert torch.equal(got, want), f"labels differ at {(got != want).nonzero().tolist()}"


@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_reference_hist_downsample_matches_the_definition(kind):
    run_property("cpu", "reference", check_naive_hist, hist_cases, kind)


# ---- pseudo_label_downsample -----------------------------------------------------------------------


@st.composite
def pseudo_cases(draw, small, kind):
    H, W = draw(st.integers(1, 6 if small else 16)), draw(st.integers(1, 6 if small else 16))
    num_classes = draw(st.integers(1, 5 if small else 8))
    # Dyadic probabilities meet a dyadic confidence: window means can equal it exactly.
    quarters = st.sampled_from([0.5, 0.625, 0.75])
    return dict(
        shape=(draw(batch_sizes(small)), num_classes, H, W), size=(draw(st.integers(1, H)), draw(st.integers(1, W))),
        dtype=draw(st.sampled_from(FLOATS)), kind=kind, layout=draw(st.sampled_from(LAYOUTS)),
        ignore_index=draw(st.one_of(st.sampled_from([255, -1, num_classes]), st.integers(0, num_classes - 1))),
        threshold=draw(FRACTIONS), confidence=draw(quarters if kind == "dyadic" else FRACTIONS), seed=draw(SEEDS),
    )


def make_probs(shape, dtype, kind, g):
    """Softmax probabilities; "ties": integer logits, so argmax ties are common; "dyadic": a
    top probability of 0.5, 0.75 or 1 per pixel, the rest on another class (exact in every
    dtype, so window sums are exact in any order and a window mean can equal the confidence)."""
    B, C, H, W = shape
    if kind == "dyadic":
        pixels = B * H * W
        top = torch.tensor([0.5, 0.75, 1.0])[torch.randint(3, (pixels,), generator=g)] if C > 1 else torch.ones(pixels)
        first = torch.randint(C, (pixels,), generator=g)
        second = (first + torch.randint(1, max(C, 2), (pixels,), generator=g)) % C  # another class
        probs = torch.zeros(pixels, C)
        probs[torch.arange(pixels), second] = 1 - top
        probs[torch.arange(pixels), first] = top
        return probs.view(B, H, W, C).permute(0, 3, 1, 2).contiguous().to(dtype)
    if kind == "ties":
        logits = torch.randint(0, 2, shape, generator=g).float()
    elif kind == "blocks":  # confident 2x2 blocks
        coarse = torch.randn(B, C, (H + 1) // 2, (W + 1) // 2, generator=g) * 5
        logits = coarse.repeat_interleave(2, 2).repeat_interleave(2, 3)[:, :, :H, :W]
    else:
        logits = torch.randn(shape, generator=g) * (0.3 if kind == "flat" else 4.0)
    return torch.softmax(logits, 1).to(dtype)


def confidence_margin(probs, size, confidence):
    """|window-mean confidence - confidence| in float64, and a bound on the rounding of a float
    mean, within which the naive definition (a float64 mean) and the exact sum may differ."""
    max_prob = probs.max(dim=1).values.to(torch.float32).double()
    mean = F.adaptive_avg_pool2d(max_prob.unsqueeze(1), size).squeeze(1)
    y0, y1 = reference.window_bounds(probs.shape[2], size[0])
    x0, x1 = reference.window_bounds(probs.shape[3], size[1])
    window_size = (y1 - y0).unsqueeze(1) * (x1 - x0).unsqueeze(0)  # (h, w)
    return (mean - confidence).abs(), window_size * 2.0**-23


def decided_cells(probs, case):
    """Cells the naive definition decides as the reference: all of them for dyadic
    probabilities (exact sums), else those whose mean is further than rounding from the
    confidence."""
    margin, rounding = confidence_margin(probs, case["size"], case["confidence"])
    if case["kind"] == "dyadic":
        return torch.ones_like(margin, dtype=torch.bool)
    return margin > rounding


def check_pseudo_against(got, probs, case, want_labels):
    decided = decided_cells(probs, case)
    assert torch.equal(got[decided], want_labels[decided]), f"labels differ at {((got != want_labels) & decided).nonzero().tolist()}"
    # Within float rounding of the confidence: the histogram's label or void.
    histogram = reference.hist_downsample(probs.argmax(1), case["size"], case["shape"][1], case["threshold"], case["ignore_index"])
    edge = ~decided
    assert bool(((got[edge] == histogram[edge]) | (got[edge] == case["ignore_index"])).all())


def check_pseudo(device, backend, case):
    probs = make_probs(case["shape"], case["dtype"], case["kind"], torch.Generator().manual_seed(case["seed"]))
    want = reference.pseudo_label_downsample(probs, case["size"], case["threshold"], case["confidence"], case["ignore_index"])
    got = lsr_fast.pseudo_label_downsample(
        laid_out(probs.to(device), case["layout"]), case["size"], threshold=case["threshold"], confidence=case["confidence"],
        ignore_index=case["ignore_index"], backend=backend,
    )
    assert got.dtype == torch.int64 and got.shape == want.shape
    # Bit for bit, near the confidence too: every backend adds the maxima exactly.
    assert torch.equal(got.cpu(), want), f"labels differ at {(got.cpu() != want).nonzero().tolist()}"


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("kind", PROB_KINDS)
def test_pseudo_label_downsample(device, backend, kind):
    run_property(device, backend, check_pseudo, pseudo_cases, kind)


def check_naive_pseudo(device, backend, case):
    probs = make_probs(case["shape"], case["dtype"], case["kind"], torch.Generator().manual_seed(case["seed"]))
    B, C, H, W = probs.shape
    # Per pixel: the first class of highest probability, found by a loop.
    values = probs.float().permute(0, 2, 3, 1).reshape(-1, C).tolist()
    prediction = torch.tensor([max(range(C), key=lambda c: (row[c], -c)) for row in values]).view(B, H, W)
    labels = naive_hist(prediction, case["size"], C, case["threshold"], case["ignore_index"], None)
    max_prob = probs.max(dim=1).values.double()
    h, w = case["size"]
    for b in range(B):
        for i in range(h):
            y0, y1 = window(i, H, h)
            for j in range(w):
                x0, x1 = window(j, W, w)
                if max_prob[b, y0:y1, x0:x1].mean() <= case["confidence"]:
                    labels[b, i, j] = case["ignore_index"]
    got = reference.pseudo_label_downsample(probs, case["size"], case["threshold"], case["confidence"], case["ignore_index"])
    check_pseudo_against(got, probs, case, labels)


@pytest.mark.parametrize("kind", PROB_KINDS)
def test_reference_pseudo_label_downsample_matches_the_definition(kind):
    run_property("cpu", "reference", check_naive_pseudo, pseudo_cases, kind)


# ---- class_feature_stats ---------------------------------------------------------------------------


def check_stats(device, backend, case):
    g = torch.Generator().manual_seed(case["seed"])
    features, labels = build_features_and_labels(case, g)
    C, ignore = case["num_classes"], case["ignore_index"]
    ref_features = leaf(features, "cpu")
    want_sums, want_counts = reference.class_feature_stats(ref_features, labels, C, ignore)
    grad_sums = torch.randn(want_sums.shape, generator=g, dtype=want_sums.dtype)
    want_sums.backward(grad_sums)

    test_features = leaf(features, device)
    sums, counts = lsr_fast.class_feature_stats(laid_out(test_features, case["layout"]), laid_out(labels.to(device), case["layout"]), C, ignore_index=ignore, backend=backend)
    assert counts.dtype == torch.int64
    assert torch.equal(counts.cpu(), want_counts), f"counts {counts.tolist()}, expected {want_counts.tolist()}"
    magnitude, _ = reference.class_feature_stats(features.abs(), labels, C, ignore)
    assert_accumulated_close(sums, want_sums, case["dtype"], magnitude, "sums")
    sums.backward(grad_sums.to(device))
    assert test_features.grad.dtype == features.dtype
    assert_close(test_features.grad, ref_features.grad, case["dtype"], "gradient")


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_class_feature_stats(device, backend, kind):
    run_property(device, backend, check_stats, feature_cases, kind)


# ---- clustering_loss and feature_terms -------------------------------------------------------------


@st.composite
def prototype_cases(draw, small, kind, min_rows=0, mode=None):
    case = draw(feature_cases(small, kind, min_rows))
    C = case["num_classes"]
    case.update(
        prototype_dtype=draw(st.sampled_from(FLOATS)), near=draw(st.booleans()),
        valid=draw(st.none() | st.lists(st.booleans(), min_size=C, max_size=C)),
        reference=draw(st.one_of(st.floats(0.0, 8.0), st.tuples(st.floats(0.0, 8.0), st.sampled_from([torch.float32, torch.float64])))),
        mode=mode or draw(st.sampled_from(["source", "target"])),
    )
    return case


def norm_reference(case, device):
    """A float, or a 0-dim tensor of the drawn dtype."""
    if isinstance(case["reference"], tuple):
        value, dtype = case["reference"]
        return torch.tensor(value, dtype=dtype, device=device)
    return case["reference"]


def check_clustering(device, backend, case):
    g = torch.Generator().manual_seed(case["seed"])
    features, labels = build_features_and_labels(case, g)
    features, prototypes = build_prototypes(case, features, labels, case["near"], case["prototype_dtype"], g)
    valid = None if case["valid"] is None else torch.tensor(case["valid"])
    ref_features = leaf(features, "cpu")
    want = reference.clustering_loss(ref_features, labels, prototypes, valid, case["ignore_index"])
    want.backward()
    test_features = leaf(features, device)
    got = lsr_fast.clustering_loss(
        laid_out(test_features, case["layout"]), laid_out(labels.to(device), case["layout"]), prototypes.to(device), valid=None if valid is None else valid.to(device),
        ignore_index=case["ignore_index"], backend=backend,
    )
    assert got.shape == ()
    # A mean of squared distances (terms >= 0): compared to its own size, so a near-prototype
    # loss of 1e-6 that came back as 0 or negative fails.
    assert_accumulated_close(got, want, case["dtype"], what="loss")
    got.backward()
    assert_close(test_features.grad, ref_features.grad, case["dtype"], "gradient")


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_clustering_loss(device, backend, kind):
    run_property(device, backend, check_clustering, prototype_cases, kind)


TERM_NAMES = ("sums", "counts", "squared distances", "norm loss sum", "norm sum")


def weighted_terms(terms, weights):
    """A scalar touching every differentiable output of feature_terms, the batch-prototype
    (perpendicularity) path included, with fixed random weights."""
    sums, counts, sq, norm_loss, norm_sum = terms
    w_sums, w_sq, w_loss, w_norm = (w.to(device=sums.device, dtype=sums.dtype) for w in weights)
    batch_prototypes = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
    perp = reference.perpendicularity_loss(batch_prototypes, counts > 0)
    return (sums * w_sums).sum() + (sq * w_sq).sum() + w_loss * norm_loss + w_norm * norm_sum + perp


def check_feature_terms(device, backend, case):
    g = torch.Generator().manual_seed(case["seed"])
    features, labels = build_features_and_labels(case, g)
    features, prototypes = build_prototypes(case, features, labels, case["near"], case["prototype_dtype"], g)
    ref_features = leaf(features, "cpu")
    want = reference.feature_terms(ref_features, labels, prototypes, norm_reference(case, "cpu"), case["mode"], case["ignore_index"])
    weights = (torch.randn(want[0].shape, generator=g), torch.rand(want[2].shape, generator=g), torch.rand((), generator=g), torch.rand((), generator=g))
    weighted_terms(want, weights).backward()

    test_features = leaf(features, device)
    got = lsr_fast.feature_terms(
        laid_out(test_features, case["layout"]), laid_out(labels.to(device), case["layout"]), prototypes.to(device), norm_reference(case, device),
        mode=case["mode"], ignore_index=case["ignore_index"], backend=backend,
    )
    assert got[1].dtype == torch.int64 and torch.equal(got[1].cpu(), want[1]), f"counts {got[1].tolist()}, expected {want[1].tolist()}"
    magnitudes = feature_terms_magnitudes(features, labels, case["num_classes"], norm_reference(case, "cpu"), want, case["ignore_index"])
    for name, a, b, magnitude in zip(TERM_NAMES, got, want, magnitudes):
        if magnitude is not None:
            assert_accumulated_close(a, b, case["dtype"], magnitude, name)
    weighted_terms(got, weights).backward()
    assert_close(test_features.grad, ref_features.grad, case["dtype"], "gradient")


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_feature_terms(device, backend, kind):
    run_property(device, backend, check_feature_terms, prototype_cases, kind)


# ---- norm_alignment_loss ---------------------------------------------------------------------------


def check_norm(device, backend, case):
    g = torch.Generator().manual_seed(case["seed"])
    features, _ = build_features_and_labels(case, g)
    ref_features = leaf(features, "cpu")
    want = reference.norm_alignment_loss(ref_features, norm_reference(case, "cpu"), case["mode"])
    want.backward()
    test_features = leaf(features, device)
    got = lsr_fast.norm_alignment_loss(laid_out(test_features, case["layout"]), norm_reference(case, device), mode=case["mode"], backend=backend)
    assert got.shape == ()
    # Each term |r - ||f||| (or max(0, r - ||f||)) carries the rounding of r and ||f||.
    magnitude = abs(float(norm_reference(case, "cpu"))) + reference.norm_alignment_loss(features, 0.0, "source")
    assert_accumulated_close(got, want, case["dtype"], magnitude, "loss")
    got.backward()
    assert_close(test_features.grad, ref_features.grad, case["dtype"], "gradient")


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("mode", ["source", "target"])
def test_norm_alignment_loss(device, backend, mode):
    run_property(device, backend, check_norm, prototype_cases, "random", min_rows=1, mode=mode)


# ---- maxsquare_loss --------------------------------------------------------------------------------


@st.composite
def maxsquare_cases(draw, small, kind):
    side = 5 if small else 12
    shape = (draw(batch_sizes(small, 1)), draw(st.integers(1, 5 if small else 8)), draw(st.integers(1, side)), draw(st.integers(1, side)))
    return dict(shape=shape, dtype=draw(st.sampled_from(FLOATS)), kind=kind, layout=draw(st.sampled_from(LAYOUTS)),
                alpha=draw(FRACTIONS), seed=draw(SEEDS))


def check_maxsquare(device, backend, case):
    probs = make_probs(case["shape"], case["dtype"], case["kind"], torch.Generator().manual_seed(case["seed"]))
    a, b = leaf(probs, "cpu"), leaf(probs, device)
    want = reference.maxsquare_loss(a, case["alpha"])
    got = lsr_fast.maxsquare_loss(laid_out(b, case["layout"]), alpha=case["alpha"], backend=backend)
    assert got.shape == ()
    assert_accumulated_close(got, want, case["dtype"], what="loss")  # terms -w * sum_c p^2 share a sign
    want.backward()
    got.backward()
    assert_close(b.grad, a.grad, case["dtype"], "gradient")


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("kind", PROB_KINDS)
def test_maxsquare_loss(device, backend, kind):
    run_property(device, backend, check_maxsquare, maxsquare_cases, kind)


# ---- perpendicularity_loss (one implementation for all backends: against the definition) --------


@st.composite
def perpendicularity_cases(draw, small, dtype):
    C = draw(st.integers(1, 8))
    return dict(
        num_classes=C, width=draw(st.integers(1, 16)), dtype=dtype,
        present=draw(st.none() | st.lists(st.booleans(), min_size=C, max_size=C)),
        zero_rows=draw(st.lists(st.integers(0, C - 1), max_size=2)), scale=draw(st.sampled_from([1e-3, 1.0, 10.0])),
        seed=draw(SEEDS),
    )


def naive_perpendicularity(prototypes, present):
    """Eq. 6 pair by pair, in float64: mean over ordered pairs of distinct present rows of
    a.b / (|a| |b|), a pair with a row of norm below eps counting 0 (no gradient); 0 for fewer
    than two rows. Also the share of pairs that count: each cosine, a dot product of two unit
    vectors, carries rounding relative to 1, not to its own value."""
    rows = [i for i in range(prototypes.shape[0]) if present is None or present[i]]
    if len(rows) < 2:
        return prototypes.sum() * 0, 0.0
    norms = [torch.linalg.vector_norm(prototypes[i]) for i in range(prototypes.shape[0])]
    usable = [bool(norm >= reference.COSINE_EPS) for norm in norms]
    pairs = [(i, j) for i in rows for j in rows if i != j and usable[i] and usable[j]]
    total = prototypes.sum() * 0 + sum((prototypes[i] * prototypes[j]).sum() / (norms[i] * norms[j]) for i, j in pairs)
    return total / (len(rows) * (len(rows) - 1)), len(pairs) / (len(rows) * (len(rows) - 1))


def check_perpendicularity(device, backend, case):
    g = torch.Generator().manual_seed(case["seed"])
    prototypes = torch.randn(case["num_classes"], case["width"], generator=g) * case["scale"]
    prototypes[case["zero_rows"]] = 0.0
    prototypes = prototypes.to(case["dtype"])
    present = None if case["present"] is None else torch.tensor(case["present"])
    exact = leaf(prototypes.double(), "cpu")
    want, magnitude = naive_perpendicularity(exact, case["present"])
    want.backward()
    test = leaf(prototypes, device)
    got = lsr_fast.perpendicularity_loss(test, None if present is None else present.to(device))
    assert got.shape == ()
    # Accumulated in float32 (float64) from the same half/float32 values: float32-level tolerance.
    # The float64 definition rounded once to that dtype stands in for the reference.
    assert_accumulated_close(got, want.to(got.dtype), case["dtype"], magnitude, "loss")
    got.backward()
    # Row i's gradient sums terms of size up to 2 / (n max(|p_i|, eps)) (2e8 / n for a zero
    # row) that may cancel; compare it in units of that size, where float rounding is relative.
    n = case["num_classes"] if case["present"] is None else sum(case["present"])
    unit = 2 / (max(n, 2) * torch.linalg.vector_norm(exact.detach(), dim=1, keepdim=True).clamp(min=reference.COSINE_EPS))
    torch.testing.assert_close(test.grad.cpu().double() / unit, exact.grad.to(case["dtype"]).double() / unit,
                               **TOLERANCES[case["dtype"]], msg=lambda m: f"gradient: {m}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOATS, ids=lambda dtype: str(dtype).replace("torch.", ""))
def test_perpendicularity_loss(device, dtype):
    run_property(device, "reference", check_perpendicularity, perpendicularity_cases, dtype)


# ---- regressions found by the properties ------------------------------------------------------------


@pytest.mark.parametrize("device,backend", fast_params())
def test_labels_whose_flattening_is_a_strided_view(device, backend):
    """Found by the properties above (layout "strided"): labels that are a stride-2 view flatten
    to a stride-2 view (reshape(-1) copies nothing), which the Triton feature pass and its
    backward read as if contiguous (fixed)."""
    labels = (torch.arange(16) % 3).view(1, 2, 8)[..., ::2]  # values 0 2 1 0 / 2 1 0 2, strides (16, 8, 2)
    assert labels.reshape(-1).stride() == (2,)
    features = torch.randn(1, 4, 2, 4, generator=torch.Generator().manual_seed(0))
    prototypes = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    ref_features, test_features = leaf(features, "cpu"), leaf(features, device)
    want = reference.feature_terms(ref_features, labels, prototypes, 2.0, "source")
    got = lsr_fast.feature_terms(test_features, labels.to(device), prototypes.to(device), 2.0, backend=backend)
    assert torch.equal(got[1].cpu(), want[1]), f"counts {got[1].tolist()}, expected {want[1].tolist()}"
    weights = (torch.randn(3, 4), torch.rand(3), torch.rand(()), torch.rand(()))
    weighted_terms(want, weights).backward()
    weighted_terms(got, weights).backward()
    for name, a, b, magnitude in zip(TERM_NAMES, got, want, feature_terms_magnitudes(features, labels, 3, 2.0, want)):
        if magnitude is not None:
            assert_accumulated_close(a, b, torch.float32, magnitude, name)
    assert_close(test_features.grad, ref_features.grad, torch.float32, "gradient")


def test_reference_accepts_an_empty_batch_of_maps():
    # DESIGN.md: every op accepts any batch size (reshape(0, K, -1) used to fail in the reference).
    features, labels = torch.randn(0, 4, 2, 3), torch.zeros(0, 2, 3, dtype=torch.int64)
    sums, counts = reference.class_feature_stats(features, labels, 3)
    assert sums.shape == (3, 4) and counts.tolist() == [0, 0, 0]
