"""GPU tests at the paper's shape (issue 17, item 6).

Every public op and the LSRRegularizer step on the ``cuda`` backend (and ``triton`` when it is
usable on the GPU), forward and backward, against ``lsr_fast.reference`` computed on the CPU in
float64 and compared with the conftest tolerance helpers (``assert_accumulated_close`` for what
the kernels accumulate, ``assert_rounded_close`` for gradients rounded to the input's dtype):

- B = 2, K = 2048, 91x161 features (GTA5's 720x1280 labels) and 65x129 (Cityscapes' 512x1024
  probabilities), C = 19 and 16, float32 and bfloat16, NCHW and channels_last,
  ``torch.use_deterministic_algorithms`` on and off (restored after each case): every
  combination of dtype, layout and determinism, C alternating between 19 and 16 so that every
  pair of settings occurs (PAPER_VARIANTS; the cheap label ops take the full product);
- hist_downsample, pseudo_label_downsample, class_feature_stats, clustering_loss (both
  distances), perpendicularity_loss, norm_alignment_loss (the paper's and the released form),
  maxsquare_loss and feature_terms, on street-like labels with a void border and on adversarial
  maps (all void, one class only, argmax ties);
- the large-C and global-accumulator paths: features with C = 40, 300 and 1100, MaxSquare with
  C = 33 and 1100 (smaller spatial sizes);
- float64 features (C = 19 at 91x161, C = 40 at 33x61): two-element vectors, and per-warp
  accumulators beyond 48 KB of shared memory (docs/cuda.md says which case takes which path);
- the LSRRegularizer step (two steps, forward + backward, default settings and the
  gta5_released preset) against the same regulariser on the reference backend;
- tensors on ``cuda:1`` while ``cuda:0`` is current (skipped with fewer than two devices);
- a whole LSR training step of a small DeepLabV2 captured in a CUDA graph and replayed, equal to
  the eager step, whose eager run after warm-up is under ``torch.cuda.set_sync_debug_mode("error")``.

Selection: every test is marked ``gpu_paper_shape`` (``pytest -m gpu_paper_shape``).
``scripts/gpu_session.sh test`` runs this file and test_gpu_paper_shape_step.py first, serially (the CPU references are cached
per input and shared by the cases that need them), then the rest of the suite;
``scripts/gpu_session.sh sanitize`` includes it (its ``-k cuda-cuda`` selects the CUDA backend's
cases: the ids name ``{device}-{backend}`` as conftest's do). Without CUDA every test is
skipped, with the reason.

Dry run without a GPU: ``LSR_FAST_GPU_TEST_DEVICE=cpu`` runs the same bodies on CPU tensors with
the ``cpp`` backend (Triton's interpreter is far too slow at this shape), to debug the tests
themselves on a CPU-only machine (11 minutes on 2 cores, 10 GB of memory). What only CUDA can
do (the second device, the graph capture, sync debug mode) skips there, after the eager half of
the graph test has run. Nothing sets the variable by default.

Inputs are built so that every discontinuous decision in the ops sits far from its threshold
compared with float32 rounding, so a float32 kernel and a float64 reference must take the same
decision everywhere (else the gradients differ in whole elements, whatever the tolerance):
feature vectors hold exactly K/2 "low" channels in [-0.5, 0.5) and K/2 "high" ones in [3, 4),
times a per-vector scale of 0.5 or 1.5, so every vector's mean channel value (the released
form's filter threshold) lies in a wide gap between its channels, and the norms cluster around
0.5 and 1.5 times the middle, where ``r`` is (the norm terms' kink |f| = r); prototypes are not
on the features' values (the L1 sign). Pseudo-label confidences take two values whose window
means cannot be within 5e-4 of the threshold 0.5 (checked when the inputs are built). The
regulariser's inputs are also on a 1/32 grid, so its class sums (and so the EMA prototypes
whose L1 signs the second step takes) are exact in float32 in any order, and they are exact in
bfloat16 too.

Cost on the GPU machine: the CPU side dominates (float64 references at this shape, seconds
each, cached and shared; comparing a 60M-element gradient, under a second). ``-k cuda-cuda``
or ``-k det-off`` halves the file.
"""

import contextlib
import copy
import functools
import itertools
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import lsr_fast
from lsr_fast import reference
from lsr_fast.cli import street_labels
from lsr_fast.models import DeepLabV2
from conftest import (accumulate_dtype, assert_accumulated_close, assert_rounded_close, feature_terms_magnitudes,
                      unusable_reason)

from gpu_paper_shape_inputs import *  # noqa: F401,F403  (constants, parametrisation, inputs)

pytestmark = [
    pytest.mark.gpu_paper_shape,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                       reason=f"paper-shape GPU tests: no CUDA device is visible to torch "
                              f"({DEVICE_ENV}=cpu runs them on the CPU with the cpp backend, as a dry run)"),
]


# ---- hist_downsample ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def hist_reference(num_classes, case):
    labels = source_label_maps(1).clone()
    weights = None
    if case == "all_void":
        labels.fill_(V)
    elif case == "one_class":
        labels = torch.where(labels == V, V, num_classes - 1)
    elif case == "weighted":
        weights = torch.rand(num_classes, generator=torch.Generator().manual_seed(num_classes)) * 2
        weights[2] = 0.0  # buildings do not vote
    return labels, weights, reference.hist_downsample(labels, SOURCE_FEAT, num_classes, class_weights=weights)


@pytest.mark.parametrize("num_classes,case,dtype,det,backend", matrix(
    [19, 16], ["street", "weighted", "all_void", "one_class"], [torch.uint8, torch.int64], DETERMINISTIC, backend_params()))
def test_hist_downsample(num_classes, case, dtype, det, backend):
    """720x1280 labels -> 91x161: integer counts, so every backend equals the reference exactly."""
    labels, weights, want = hist_reference(num_classes, case)
    with deterministic(det):
        got = lsr_fast.hist_downsample(labels.to(dtype).to(DEVICE), SOURCE_FEAT, num_classes,
                                       class_weights=None if weights is None else weights.to(DEVICE), backend=backend)
    assert got.dtype == torch.int64 and on_device(got, DEVICE)
    mismatch = got.cpu() != want
    assert not mismatch.any(), f"{int(mismatch.sum())} of {want.numel()} cells differ from the reference"
    if case == "street":
        assert (want != V).float().mean() > 0.5  # the test data decides most cells


# ---- pseudo_label_downsample ------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def pseudo_reference(num_classes, dtype, size, case):
    probs = probability_case(num_classes, dtype, size, case)
    out_size = SOURCE_FEAT if size == SOURCE_HW else TARGET_FEAT
    confidence = 0.0 if case == "ties" else 0.5
    if case in ("street", "one_class"):
        check_confidence_margin(probs, out_size)
    want = reference.pseudo_label_downsample(as_reference(probs), out_size, confidence=confidence)
    near = (window_confidence(probs.max(1).values, out_size) - confidence).abs() < 1e-4
    return probs, out_size, confidence, want, near


PSEUDO = [(19, SOURCE_HW), (16, TARGET_HW)]  # GTA5-size and Cityscapes-size probabilities


@pytest.mark.parametrize("num_classes,size,case,dtype,layout,det,backend", matrix(
    [pytest.param(c, id=f"C{c[0]}-{c[1][0]}x{c[1][1]}") for c in PSEUDO], ["street", "softmax"],
    DTYPES, LAYOUTS, DETERMINISTIC, backend_params()))
def test_pseudo_label_downsample(num_classes, size, case, dtype, layout, det, backend):
    check_pseudo_labels(num_classes, size, case, dtype, layout, det, backend)


@pytest.mark.parametrize("case,backend", matrix(["ties", "one_class"], backend_params()))
def test_pseudo_label_downsample_adversarial(case, backend):
    check_pseudo_labels(19, TARGET_HW, case, torch.float32, "nchw", False, backend)


def check_pseudo_labels(num_classes, size, case, dtype, layout, det, backend, device=DEVICE):
    probs, out_size, confidence, want, near = pseudo_reference(num_classes, dtype, size, case)
    with deterministic(det):
        got = lsr_fast.pseudo_label_downsample(place(probs, layout, device), out_size, confidence=confidence, backend=backend)
    assert got.dtype == torch.int64 and on_device(got, device)
    # Cells whose float64 window mean is within 1e-4 of the threshold may be decided either way
    # (README: "a mean within float rounding of confidence"); none in the street/one_class data.
    assert near.float().mean() < 0.01, f"test data: {int(near.sum())} cells near the confidence threshold"
    mismatch = (got.cpu() != want) & ~near
    assert not mismatch.any(), f"{int(mismatch.sum())} of {want.numel()} cells differ from the reference"
    if case == "one_class":
        assert (want == num_classes - 1).all()
    elif case == "ties":
        assert (want == 0).all()


# ---- class_feature_stats --------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def stats_reference(num_classes, dtype, labels_case="street"):
    case = feature_case(num_classes, dtype, labels_case)
    features = as_reference(case.features).requires_grad_()
    sums, counts = reference.class_feature_stats(features, case.labels, num_classes)
    grad_sums = torch.randn(sums.shape, generator=torch.Generator().manual_seed(num_classes))  # float32
    sums.backward(grad_sums.double())
    magnitude, _ = reference.class_feature_stats(features.detach().abs(), case.labels, num_classes)
    return SimpleNamespace(sums=sums.detach().to(accumulate_dtype(dtype)), counts=counts, grad_sums=grad_sums, magnitude=magnitude,
                           grad=features.grad.to(dtype))


def check_class_feature_stats(num_classes, dtype, layout, det, backend, labels_case="street", device=DEVICE):
    case, want = feature_case(num_classes, dtype, labels_case), stats_reference(num_classes, dtype, labels_case)
    features = place(case.features, layout, device).requires_grad_()
    with deterministic(det):
        sums, counts = lsr_fast.class_feature_stats(features, case.labels.to(device), num_classes, backend=backend)
        sums.backward(want.grad_sums.to(device))
    assert counts.dtype == torch.int64 and torch.equal(counts.cpu(), want.counts)
    assert on_device(sums, device) and on_device(features.grad, device)
    assert_accumulated_close(sums, want.sums, dtype, want.magnitude, "sums")
    assert features.grad.dtype == dtype and features.grad.shape == features.shape
    assert_rounded_close(features.grad, want.grad, dtype, "class_feature_stats gradient")


@pytest.mark.parametrize("num_classes,dtype,layout,det,backend", matrix(PAPER_VARIANTS, backend_params()))
def test_class_feature_stats(num_classes, dtype, layout, det, backend):
    check_class_feature_stats(num_classes, dtype, layout, det, backend)


# ---- clustering_loss ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def clustering_reference(num_classes, dtype, distance):
    case = feature_case(num_classes, dtype)
    features = as_reference(case.features).requires_grad_()
    loss = reference.clustering_loss(features, case.labels, case.prototypes, case.valid, V, distance)
    loss.backward()
    return loss.detach().float(), features.grad.to(dtype)


def check_clustering(num_classes, dtype, layout, det, backend, distance, device=DEVICE):
    case = feature_case(num_classes, dtype)
    want, want_grad = clustering_reference(num_classes, dtype, distance)
    features = place(case.features, layout, device).requires_grad_()
    with deterministic(det):
        loss = lsr_fast.clustering_loss(features, case.labels.to(device), case.prototypes.to(device),
                                        valid=case.valid.to(device), distance=distance, backend=backend)
        loss.backward()
    # A mean of class means of distances: terms of one sign, |loss| is their size.
    assert_accumulated_close(loss, want, dtype, what=f"clustering ({distance})")
    assert_rounded_close(features.grad, want_grad, dtype, f"clustering ({distance}) gradient")


@pytest.mark.parametrize("distance,num_classes,dtype,layout,det,backend", matrix(
    ["squared_l2", "l1_mean"], PAPER_VARIANTS, backend_params()))
def test_clustering_loss(distance, num_classes, dtype, layout, det, backend):
    check_clustering(num_classes, dtype, layout, det, backend, distance)


# ---- perpendicularity_loss ------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes,dtype,det", matrix([19, 16, 40, 300, 1100], DTYPES, DETERMINISTIC))
def test_perpendicularity_loss(num_classes, dtype, det):
    """No kernel of its own (a Gram matrix on the device): the batch prototypes of a case, one of
    them zero, one class absent."""
    g = torch.Generator().manual_seed(num_classes)
    prototypes = (1.75 + 0.6 * torch.randn(num_classes, K, generator=g)).to(dtype)
    prototypes[1] = 0.0
    present = torch.ones(num_classes, dtype=torch.bool)
    present[num_classes // 2] = False
    ref = as_reference(prototypes).requires_grad_()
    want = reference.perpendicularity_loss(ref, present)
    want.backward()
    got_prototypes = prototypes.to(DEVICE).requires_grad_()
    with deterministic(det):
        got = lsr_fast.perpendicularity_loss(got_prototypes, present.to(DEVICE))
        got.backward()
    # A mean of cosines: sum |terms| / pairs <= 1.
    assert_accumulated_close(got, want.detach().float(), dtype, torch.tensor(1.0), "perpendicularity")
    assert_rounded_close(got_prototypes.grad, ref.grad.to(dtype), dtype, "perpendicularity gradient")


# ---- norm_alignment_loss --------------------------------------------------------------------------

NORM_FORMS = {  # name: (mode, filtered, relative_to n?)
    "paper-source": ("source", False, False),
    "paper-target": ("target", False, False),
    "released": ("source", True, True),
}


@functools.lru_cache(maxsize=2)
def norm_reference(dtype, form):
    case = feature_case(19, dtype)
    mode, filtered, relative = NORM_FORMS[form]
    n = case.n if relative else None
    features = as_reference(case.features).requires_grad_()
    loss = reference.norm_alignment_loss(features, case.r, mode, n, filtered)
    loss.backward()
    mean_norm = reference.norm_alignment_loss(features.detach(), 0.0, "source")
    # Each term |r - ||f||| carries the rounding of r and ||f||: sum |terms| ~ mean (r + ||f||).
    magnitude = (case.r + mean_norm) / (n or 1.0)
    return loss.detach().float(), features.grad.to(dtype), magnitude


def check_norm_alignment(dtype, layout, det, backend, form, device=DEVICE):
    case = feature_case(19, dtype)
    mode, filtered, relative = NORM_FORMS[form]
    want, want_grad, magnitude = norm_reference(dtype, form)
    features = place(case.features, layout, device).requires_grad_()
    with deterministic(det):
        loss = lsr_fast.norm_alignment_loss(features, case.r, mode=mode, relative_to=case.n if relative else None,
                                            filtered=filtered, backend=backend)
        loss.backward()
    assert_accumulated_close(loss, want, dtype, magnitude, f"norm alignment ({form})")
    assert_rounded_close(features.grad, want_grad, dtype, f"norm alignment ({form}) gradient")


@pytest.mark.parametrize("form,dtype,layout,det,backend", matrix(list(NORM_FORMS), HALF_VARIANTS, backend_params()))
def test_norm_alignment_loss(form, dtype, layout, det, backend):
    check_norm_alignment(dtype, layout, det, backend, form)


# ---- feature_terms (the fused pass) ---------------------------------------------------------------

TERM_NAMES = ("sums", "counts", "distance sums", "norm loss sum", "norm sum")
FUSED_FORMS = {  # name: (mode, distance, filtered, relative_to n?)
    "paper-source": ("source", "squared_l2", False, False),
    "paper-target": ("target", "squared_l2", False, False),
    "released": ("source", "l1_mean", True, True),
}


def fused_objective(terms, weights, norm_weight):
    """A scalar reaching every differentiable output, each part weighted so that its gradient is
    of order 1 per element (a wrong norm gradient must not hide under the distances' one)."""
    sums, _, dist, norm_loss, norm_sum = terms
    w = weights.to(sums.device, sums.dtype)
    return (sums * w[:, 1:]).sum() + 0.1 * (dist * w[:, 0]).sum() + norm_weight * norm_loss + 20.0 * norm_sum


@functools.lru_cache(maxsize=2)
def fused_reference(num_classes, dtype, form, labels_case="street"):
    case = feature_case(num_classes, dtype, labels_case)
    mode, distance, filtered, relative = FUSED_FORMS[form]
    features = as_reference(case.features).requires_grad_()
    terms = list(reference.feature_terms(features, case.labels, case.prototypes, case.r, mode, V, distance, filtered))
    magnitudes = list(feature_terms_magnitudes(features.detach(), case.labels, num_classes, case.r, terms))
    if relative:  # the public op divides the norm-loss sum by n
        terms[3], magnitudes[3] = terms[3] / case.n, magnitudes[3] / case.n
    weights = torch.rand(num_classes, K + 1, generator=torch.Generator().manual_seed(7))
    norm_weight = 30.0 * (case.n if relative else 1.0)  # ||f|| / |f_k| is about 30 here
    fused_objective(terms, weights, norm_weight).backward()
    want = [t.detach() if t.dtype == torch.int64 else t.detach().to(accumulate_dtype(dtype)) for t in terms]
    return SimpleNamespace(terms=want, magnitudes=magnitudes, weights=weights, norm_weight=norm_weight,
                           grad=features.grad.to(dtype))


def check_feature_terms(num_classes, dtype, layout, det, backend, form, labels_case="street", device=DEVICE):
    case = feature_case(num_classes, dtype, labels_case)
    mode, distance, filtered, relative = FUSED_FORMS[form]
    want = fused_reference(num_classes, dtype, form, labels_case)
    features = place(case.features, layout, device).requires_grad_()
    with deterministic(det):
        terms = lsr_fast.feature_terms(features, case.labels.to(device), case.prototypes.to(device), case.r, mode=mode,
                                       distance=distance, filtered=filtered, relative_to=case.n if relative else None,
                                       backend=backend)
        fused_objective(terms, want.weights, want.norm_weight).backward()
    assert terms[1].dtype == torch.int64 and torch.equal(terms[1].cpu(), want.terms[1])
    assert all(on_device(t, device) for t in terms) and on_device(features.grad, device)
    for name, got, expected, magnitude in zip(TERM_NAMES, terms, want.terms, want.magnitudes):
        if magnitude is not None:
            assert_accumulated_close(got, expected, dtype, magnitude, f"{form} {name}")
    assert features.grad.dtype == dtype
    assert_rounded_close(features.grad, want.grad, dtype, f"{form} gradient")


@pytest.mark.parametrize("form,num_classes,dtype,layout,det,backend", matrix(
    ["paper-target", "released"], PAPER_VARIANTS, backend_params()))
def test_feature_terms(form, num_classes, dtype, layout, det, backend):
    """The fused pass in the target domain's paper form (squared distances, hinge) and in the
    released form (L1 distances, filtered relative norms); the source domain's paper form runs
    in the adversarial-label and regulariser tests."""
    check_feature_terms(num_classes, dtype, layout, det, backend, form)


@pytest.mark.parametrize("labels_case,form,layout,det,backend", matrix(
    ["all_void", "one_class"], ["paper-source", "released"], [("nchw", False), ("channels_last", True)], backend_params()))
def test_feature_terms_adversarial_labels(labels_case, form, layout, det, backend):
    """No class at all (sums and distances exactly 0, the norm terms over every vector), or
    every labelled vector in the last class."""
    check_feature_terms(19, torch.float32, layout, det, backend, form, labels_case)
    if labels_case == "all_void":
        want = fused_reference(19, torch.float32, form, labels_case)
        assert not want.terms[1].any() and not want.terms[0].any() and not want.terms[2].any()


@pytest.mark.parametrize("labels_case,layout,backend", matrix(["all_void", "one_class"], LAYOUTS, backend_params()))
def test_class_feature_stats_adversarial_labels(labels_case, layout, backend):
    check_class_feature_stats(19, torch.float32, layout, False, backend, labels_case)


# ---- large class counts: shared-memory and global accumulators -------------------------------------

LARGE_OPS = ["class_feature_stats", "paper-target", "released"]


@pytest.mark.parametrize("num_classes,op,dtype,layout,det,backend", matrix(
    [40, 300, 1100], LARGE_OPS, HALF_VARIANTS, backend_params()))
def test_large_class_counts(num_classes, op, dtype, layout, det, backend):
    """C = 40 (beyond one warp's 32 classes; 8 per-warp accumulators in 57 KB of shared memory,
    the opt-in path), 300 (2 copies in 92 KB on sm_90, 1 in 54 KB on sm_80) and 1100 (beyond the
    shared-memory budget: accumulators in global memory): features (2, 2048, 33, 61)."""
    if op == "class_feature_stats":
        check_class_feature_stats(num_classes, dtype, layout, det, backend)
    else:
        check_feature_terms(num_classes, dtype, layout, det, backend, op)


# ---- float64: two-element vectors, accumulators beyond 48 KB of shared memory -----------------------


@pytest.mark.parametrize("num_classes,op,layout,det,backend", matrix(
    [19, 40], LARGE_OPS, [("nchw", True), ("channels_last", False)], backend_params()))
def test_float64(num_classes, op, layout, det, backend):
    """float64 features at 91x161 (C = 19) and 33x61 (C = 40), both odd h*w: the CUDA forward's
    per-warp accumulators take 71 KB (C = 19) and 113 KB on sm_90 / 73 KB on sm_80 (C = 40) of
    shared memory, beyond the default 48 KB (the opt-in attribute); NCHW planes start at either
    8-byte offset of a 16-byte vector (head, wrap and tail slots of every kernel)."""
    if op == "class_feature_stats":
        check_class_feature_stats(num_classes, torch.float64, layout, det, backend)
    else:
        check_feature_terms(num_classes, torch.float64, layout, det, backend, op)


# ---- maxsquare_loss -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def maxsquare_reference(num_classes, dtype, case, size):
    if case == "softmax_large":
        g = torch.Generator().manual_seed(num_classes)
        probs = torch.softmax(3.0 * torch.randn(B, num_classes, *size, generator=g), 1).to(dtype)
    else:
        probs = probability_case(num_classes, dtype, size, case)
    alpha = 0.2 if num_classes == 19 else 0.0  # GTA5's and SYNTHIA's alpha
    ref = as_reference(probs).requires_grad_()
    loss = reference.maxsquare_loss(ref, alpha)
    loss.backward()
    return probs, alpha, loss.detach().float(), ref.grad.to(dtype)


def check_maxsquare(num_classes, dtype, layout, det, backend, case="softmax", size=TARGET_HW, device=DEVICE):
    probs, alpha, want, want_grad = maxsquare_reference(num_classes, dtype, case, size)
    x = place(probs, layout, device).requires_grad_()
    with deterministic(det):
        loss = lsr_fast.maxsquare_loss(x, alpha=alpha, backend=backend)
        loss.backward()
    # Terms -w * sum_c p^2 share one sign: |loss| is their size.
    assert_accumulated_close(loss, want, dtype, what="maxsquare")
    assert x.grad.dtype == dtype
    assert_rounded_close(x.grad, want_grad, dtype, "maxsquare gradient")


@pytest.mark.parametrize("num_classes,dtype,layout,det,backend", matrix(PAPER_VARIANTS, backend_params()))
def test_maxsquare_loss(num_classes, dtype, layout, det, backend):
    """(2, C, 512, 1024) softmax probabilities (bfloat16 rounding makes argmax ties: first wins)."""
    check_maxsquare(num_classes, dtype, layout, det, backend)


@pytest.mark.parametrize("case,layout,det,backend", matrix(
    ["ties", "one_class"], [("nchw", False), ("channels_last", True)], backend_params()))
def test_maxsquare_loss_adversarial(case, layout, det, backend):
    """Every pixel tied (argmax 0, one class holds all N pixels) or one class everywhere."""
    check_maxsquare(19, torch.float32, layout, det, backend, case)


@pytest.mark.parametrize("num_classes,size,dtype,layout,det,backend", matrix(
    [pytest.param((33, (91, 161)), id="C33-91x161"), pytest.param((1100, (48, 80)), id="C1100-48x80")],
    HALF_VARIANTS, backend_params()))
def test_maxsquare_loss_large_class_counts(num_classes, size, dtype, layout, det, backend):
    """C = 33 (beyond the 32 classes the backward keeps in registers) and 1100 (the per-warp
    accumulators in global scratch beyond 1024 classes)."""
    check_maxsquare(num_classes, dtype, layout, det, backend, "softmax_large", size)
