"""The public LSR ops: argument checks shared by every backend, then the chosen backend.

Every op takes ``backend=``: "auto" (the fastest usable backend for the tensors' device),
"reference" (pure torch), "cpp" (compiled, CPU tensors), "cuda" (compiled, CUDA tensors) or
"triton". See :func:`available_backends` for what is usable here.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from . import _checks as check
from ._backends import BACKENDS, available_backends, resolve
from ._checks import DISTANCES, set_value_checks, value_checks
from ._deferred import DeferredChecks, ValueCheckError
from ._derived import weighted_class_feature_stats
from ..reference import PROTOTYPE_METRICS

__all__ = [
    "BACKENDS",
    "available_backends",
    "set_value_checks",
    "value_checks",
    "DeferredChecks",
    "ValueCheckError",
    "hist_downsample",
    "pseudo_label_downsample",
    "class_feature_stats",
    "clustering_loss",
    "perpendicularity_loss",
    "norm_alignment_loss",
    "maxsquare_loss",
    "feature_terms",
    "prototype_distances",
]

Size = Union[int, Sequence[int]]


def hist_downsample(
    labels: torch.Tensor,
    size: Size,
    num_classes: int,
    *,
    threshold: float = 0.5,
    ignore_index: int = 255,
    class_weights: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Histogram-aware downsampling of integer (B, H, W) labels to int64 (B, h, w).

    Per window (adaptive-pooling windows) the most frequent class c1 (lowest index on ties) is
    kept when the runner-up count n2 < threshold * n1; otherwise, or for an all-void window, the
    cell is ``ignore_index``. ``class_weights`` (C,) multiply the counts first.
    """
    check.integer_labels("labels", labels)
    check.ndim("labels", labels, (3,), "(B, H, W)")
    check.positive_int("num_classes", num_classes, check.MAX_HIST_CLASSES)
    check.integer("ignore_index", ignore_index)
    size = check.output_size("size", size, tuple(labels.shape[1:]))
    threshold = check.fraction("threshold", threshold)
    class_weights = check.class_weights(class_weights, num_classes)
    check.label_values("labels", labels, num_classes, ignore_index)
    impl = resolve("hist_downsample", backend, labels.device)
    return impl(labels, size, num_classes, threshold, ignore_index, class_weights)


def pseudo_label_downsample(
    probs: torch.Tensor,
    size: Size,
    *,
    threshold: float = 0.5,
    confidence: float = 0.5,
    ignore_index: int = 255,
    backend: str = "auto",
) -> torch.Tensor:
    """Pseudo-labels at feature resolution from (B, C, H, W) softmax probabilities -> int64 (B, h, w).

    hist_downsample of the per-pixel argmax; cells whose mean max-probability over the window
    is <= ``confidence`` become ``ignore_index``.
    """
    check.float_tensor("probs", probs)
    check.ndim("probs", probs, (4,), "(B, C, H, W)")
    check.class_count("probs", probs, 1, "class channels (dim 1)")
    check.integer("ignore_index", ignore_index)
    size = check.output_size("size", size, tuple(probs.shape[2:]))
    threshold = check.fraction("threshold", threshold)
    confidence = check.fraction("confidence", confidence)
    check.finite("probs", probs)
    impl = resolve("pseudo_label_downsample", backend, probs.device)
    return impl(probs, size, threshold, confidence, ignore_index)


def class_feature_stats(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    weights: Optional[torch.Tensor] = None,
    ignore_index: int = 255,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-class feature sums (C, K), differentiable w.r.t. ``features``, and counts (C,) int64.

    ``features`` (B, K, h, w) with ``labels`` (B, h, w), or rows (N, K) with labels (N,).
    Vectors labelled ``ignore_index`` are skipped. Sums are float32 for half-precision and
    float32 features, float64 for float64 features. ``weights`` (the shape of ``labels``, float,
    finite, >= 0; constants, no gradient): the sums are of w * f and the counts become the
    per-class sums of w, in the sums' dtype (masked average pooling, confidence-weighted
    prototypes: sums / counts).
    """
    check.features_and_labels(features, labels)
    check.positive_int("num_classes", num_classes, check.MAX_CLASSES)
    check.integer("ignore_index", ignore_index)
    weights = check.vector_weights(weights, labels)
    check.label_values("labels", labels, num_classes, ignore_index)
    impl = resolve("class_feature_stats", backend, features.device)
    if weights is None:
        return impl(features, labels, num_classes, ignore_index)
    # Every backend, the reference too, weights through its unweighted kernel (ops/_derived.py);
    # lsr_fast.reference.class_feature_stats(..., weights=) is the independent oracle.
    return weighted_class_feature_stats(impl, features, labels, num_classes, ignore_index, weights)


def clustering_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    valid: Optional[torch.Tensor] = None,
    ignore_index: int = 255,
    distance: str = "squared_l2",
    backend: str = "auto",
) -> torch.Tensor:
    """Clustering of (B, K, h, w) or (N, K) features around the (constant) prototypes (C, K),
    over the classes present in ``labels`` (and ``valid``); 0 when no class qualifies.

    ``distance="squared_l2"`` (Eq. 5): mean over those classes of the mean ||f - p_c||^2 of
    their vectors. ``"l1_mean"`` (the released code's form, which its published weights were
    tuned on): (1/C) * sum over those classes of the mean |f - p_c| over their vectors and
    channels, C = every class; gradient sign(f - p_c).
    """
    check.features_and_labels(features, labels)
    check.float_tensor("prototypes", prototypes)
    check.ndim("prototypes", prototypes, (2,), "(C, K)")
    num_classes, width = check.class_count("prototypes", prototypes, 0, "class rows (dim 0)"), prototypes.shape[1]
    if width != features.shape[1]:
        raise ValueError(f"prototypes must have width K={features.shape[1]} (features' dim 1), got {width}")
    check.finite("prototypes", prototypes)
    valid = check.class_mask("valid", valid, num_classes, features.device)
    check.integer("ignore_index", ignore_index)
    check.choice("distance", distance, check.DISTANCES)
    check.label_values("labels", labels, num_classes, ignore_index)
    impl = resolve("clustering_loss", backend, features.device)
    return impl(features, labels, prototypes.to(features.device), valid, ignore_index, distance)


def perpendicularity_loss(prototypes: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 6: mean cosine over ordered pairs of distinct present prototypes (C, K); 0 when fewer
    than two are present. A (C, K) Gram matrix: no kernel of its own, the fused backward of the
    compiled backends carries its gradient into the features."""
    check.float_tensor("prototypes", prototypes)
    check.ndim("prototypes", prototypes, (2,), "(C, K)")
    present = check.class_mask("present", present, prototypes.shape[0], prototypes.device)
    check.finite("prototypes", prototypes)
    from .. import reference

    return reference.perpendicularity_loss(prototypes, present)


def norm_alignment_loss(
    features: torch.Tensor,
    reference: Union[float, torch.Tensor],
    *,
    mode: str = "source",
    relative_to: Optional[Union[float, torch.Tensor]] = None,
    filtered: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Eqs. 7-8 over every vector of (B, K, h, w) or (N, K) features: source mean |r - |f||,
    target mean max(0, r - |f|), with r = ``reference`` (a constant).

    The released code's form: ``relative_to=n`` divides the mean by n (a positive constant,
    there the source batch's mean norm); ``filtered=True`` takes the norm of f~, the vector with
    its channels below its own mean channel value zeroed (no gradient through the mean or to the
    zeroed channels).
    """
    check.float_tensor("features", features)
    check.ndim("features", features, (2, 4), "(B, K, h, w) or (N, K)")
    if features.numel() == 0:
        raise ValueError(f"features must hold at least one vector, got shape {tuple(features.shape)}")
    if mode not in ("source", "target"):
        raise ValueError(f"mode must be 'source' or 'target', got {mode!r}")
    reference = check.reference_value(reference)
    relative_to = check.relative_to(relative_to)
    check.boolean("filtered", filtered)
    check.finite("features", features)
    impl = resolve("norm_alignment_loss", backend, features.device)
    return impl(features, reference, mode, relative_to, filtered)


def maxsquare_loss(probs: torch.Tensor, *, alpha: float = 0.2, backend: str = "auto") -> torch.Tensor:
    """Image-wise weighted MaxSquare of (B, C, H, W) probabilities (the L+ entropy term)."""
    check.float_tensor("probs", probs)
    check.ndim("probs", probs, (4,), "(B, C, H, W)")
    if probs.numel() == 0:
        raise ValueError(f"probs must not be empty, got shape {tuple(probs.shape)}")
    check.class_count("probs", probs, 1, "class channels (dim 1)")
    alpha = check.fraction("alpha", alpha)
    check.finite("probs", probs)
    impl = resolve("maxsquare_loss", backend, probs.device)
    return impl(probs, alpha)


def feature_terms(
    features: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    reference: Union[float, torch.Tensor],
    *,
    mode: str = "source",
    ignore_index: int = 255,
    distance: str = "squared_l2",
    relative_to: Optional[Union[float, torch.Tensor]] = None,
    filtered: bool = False,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything LSR needs from one feature map, in one pass on the compiled backends.

    Returns (sums (C, K), counts (C,), per-class distance sums (C,), sum of the norm-alignment
    term over every vector, sum of ||f|| over every vector); all but counts are differentiable
    w.r.t. ``features``. The distance is ||f - p^_c||^2, or sum_k |f_k - p^_ck| with
    ``distance="l1_mean"``; ``filtered`` and ``relative_to`` shape the norm term as in
    :func:`norm_alignment_loss` (the norm sum stays unfiltered). Combine with
    ``reference.clustering_from_sums(..., distance=, width=K)`` and divide the two norm sums by
    the number of vectors; the batch prototypes are sums / counts.
    """
    check.features_and_labels(features, labels)
    check.float_tensor("prototypes", prototypes)
    check.ndim("prototypes", prototypes, (2,), "(C, K)")
    # Zero rows are valid here (only the norm terms count), as in the raw op.
    check.class_count("prototypes", prototypes, 0, "class rows (dim 0)", low=0)
    if prototypes.shape[1] != features.shape[1]:
        raise ValueError(f"prototypes must have width K={features.shape[1]} (features' dim 1), got {prototypes.shape[1]}")
    check.finite("prototypes", prototypes)
    if mode not in ("source", "target"):
        raise ValueError(f"mode must be 'source' or 'target', got {mode!r}")
    reference = check.reference_value(reference)
    check.integer("ignore_index", ignore_index)
    check.choice("distance", distance, check.DISTANCES)
    relative_to = check.relative_to(relative_to)
    check.boolean("filtered", filtered)
    check.label_values("labels", labels, prototypes.shape[0], ignore_index)
    impl = resolve("feature_terms", backend, features.device)
    sums, counts, dist_sums, norm_loss_sum, norm_sum = impl(
        features, labels, prototypes.to(features.device), reference, mode, ignore_index, distance, filtered)
    if relative_to is not None:
        norm_loss_sum = norm_loss_sum / relative_to
    return sums, counts, dist_sums, norm_loss_sum, norm_sum


def prototype_distances(features: torch.Tensor, prototypes: torch.Tensor, *, metric: str = "l2") -> torch.Tensor:
    """Euclidean distance (``metric="l2"``) or cosine similarity (``"cosine"``) of every feature
    vector to every prototype: (B, K, h, w) -> (B, C, h, w), or (N, K) rows -> (N, C), with
    ``prototypes`` (C, K) on the features' device; any memory format, differentiable w.r.t.
    both. One GEMM plus the vectors' norms (no kernel of its own), in float32 (float64 if either
    input is float64), returned in that dtype; no host synchronisation beyond the value checks.
    A zero distance has gradient 0, and a vector with norm below 1e-8 has cosine 0 with every
    other and gets no gradient from it (see lsr_fast.reference.prototype_distances).
    """
    check.float_tensor("features", features)
    check.ndim("features", features, (2, 4), "(B, K, h, w) or (N, K)")
    check.float_tensor("prototypes", prototypes)
    check.ndim("prototypes", prototypes, (2,), "(C, K)")
    if prototypes.shape[1] != features.shape[1]:
        raise ValueError(
            f"prototypes must have width K={features.shape[1]} (features' dim 1), got shape {tuple(prototypes.shape)}")
    if prototypes.device != features.device:
        raise ValueError(f"prototypes is on {prototypes.device} but features is on {features.device}")
    check.choice("metric", metric, PROTOTYPE_METRICS)
    check.finite("features", features)
    check.finite("prototypes", prototypes)
    from .. import reference

    return reference.prototype_distances(features, prototypes, metric)
