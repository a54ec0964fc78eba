"""The numbers behind the analysis figures, and scalars a trainer can log while it trains.

Angles are in degrees. Cosines use max(|v|, 1e-8) in the denominator, as the LSR ops do, so a
zero vector is at 90 degrees from everything instead of NaN.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import ops
from ..ops import _checks as check
from ..reference import COSINE_EPS

__all__ = [
    "angle_matrix",
    "mean_angle_to_others",
    "mean_prototype_angle",
    "angles_to_prototype",
    "norm_interval",
    "nearest_downsample",
    "class_histogram",
    "row_normalise",
    "class_mean_norms",
    "latent_scalars",
    "log_latent_scalars",
]


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float64)
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=COSINE_EPS)


def _present_mask(name: str, present: Optional[torch.Tensor], num_classes: int) -> torch.Tensor:
    if present is None:
        return torch.ones(num_classes, dtype=torch.bool)
    return check.class_mask(name, present, num_classes, "cpu")


def _prototype_rows(prototypes) -> torch.Tensor:
    check.float_tensor("prototypes", prototypes)
    check.ndim("prototypes", prototypes, (2,), "(C, K)")
    return prototypes.detach().cpu()


def angle_matrix(prototypes: torch.Tensor) -> torch.Tensor:
    """(C, C) float64 angles in degrees between every pair of prototype rows."""
    unit = _unit_rows(_prototype_rows(prototypes))
    return torch.rad2deg(torch.acos((unit @ unit.t()).clamp(-1.0, 1.0)))


def mean_angle_to_others(prototypes: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(C,) float64: for each present class, the mean angle (degrees) between its prototype and
    the other present ones (the paper's Fig. 6). NaN for absent classes, and for every class
    when fewer than two are present."""
    prototypes = _prototype_rows(prototypes)
    num_classes = prototypes.shape[0]
    present = _present_mask("present", present, num_classes)
    angles = angle_matrix(prototypes)
    others = present.unsqueeze(0) & ~torch.eye(num_classes, dtype=torch.bool)
    n_others = others.sum(1)
    means = (angles * others).sum(1) / n_others.clamp(min=1)
    return torch.where(present & (n_others > 0), means, torch.full_like(means, float("nan")))


def mean_prototype_angle(prototypes: torch.Tensor, present: Optional[torch.Tensor] = None) -> float:
    """Mean angle (degrees) over pairs of distinct present prototypes; NaN when fewer than two.
    The same number as LSRRegularizer.mean_prototype_angle, for any (C, K) prototypes."""
    per_class = mean_angle_to_others(prototypes, present)
    defined = ~torch.isnan(per_class)
    # every present class has the same number of partners, so the mean of the per-class means
    # is the mean over ordered pairs
    return float(per_class[defined].mean()) if bool(defined.any()) else float("nan")


def angles_to_prototype(vectors: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
    """(N,) float64 angles in degrees between each row of (N, K) ``vectors`` and a (K,) prototype."""
    check.float_tensor("vectors", vectors)
    check.ndim("vectors", vectors, (2,), "(N, K)")
    check.float_tensor("prototype", prototype)
    if prototype.dim() != 1 or prototype.shape[0] != vectors.shape[1]:
        raise ValueError(f"prototype must have shape ({vectors.shape[1]},) to match vectors, got {tuple(prototype.shape)}")
    cos = _unit_rows(vectors.detach().cpu()) @ _unit_rows(prototype.detach().cpu())
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


def norm_interval(norms, coverage: float = 0.95) -> Dict[str, float]:
    """Median and the central ``coverage`` interval (the 2.5 and 97.5 percentiles for 95%) of a
    sample, with numpy's default linear interpolation. NaNs for an empty sample."""
    values = np.asarray(norms.detach().cpu() if isinstance(norms, torch.Tensor) else norms, dtype=np.float64).reshape(-1)
    coverage = check.fraction("coverage", coverage)
    if values.size == 0:
        return dict(n=0, median=float("nan"), low=float("nan"), high=float("nan"))
    tail = 100.0 * (1.0 - coverage) / 2.0
    low, median, high = np.percentile(values, [tail, 50.0, 100.0 - tail])
    return dict(n=int(values.size), median=float(median), low=float(low), high=float(high))


def nearest_downsample(labels: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour downsampling of (B, H, W) labels: output (i, j) takes input pixel
    (floor(i*H/h), floor(j*W/w)), computed in integers (torch's "nearest" up to float rounding)."""
    check.integer_labels("labels", labels)
    check.ndim("labels", labels, (3,), "(B, H, W)")
    h, w = check.output_size("size", size, tuple(labels.shape[1:]))
    H, W = labels.shape[1:]
    rows = torch.arange(h, device=labels.device) * H // h
    cols = torch.arange(w, device=labels.device) * W // w
    return labels[:, rows][:, :, cols].long()


def class_histogram(labels: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(C + 1,) int64: pixels of each class, then the void (``ignore_index``) pixels."""
    check.integer_labels("labels", labels)
    check.positive_int("num_classes", num_classes)
    check.label_values("labels", labels, num_classes, ignore_index)
    flat = labels.reshape(-1).long()
    flat = torch.where(flat == ignore_index, torch.full_like(flat, num_classes), flat)
    return torch.bincount(flat, minlength=num_classes + 1).cpu()


def row_normalise(confusion: torch.Tensor) -> torch.Tensor:
    """Row-normalised (C, C) confusion matrix, float64: row i is the distribution of predictions
    over the pixels whose ground truth is i. Rows with no pixels are NaN."""
    check.tensor("confusion", confusion)
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square (C, C) matrix, got shape {tuple(confusion.shape)}")
    confusion = confusion.detach().cpu().to(torch.float64)
    totals = confusion.sum(1, keepdim=True)
    return torch.where(totals > 0, confusion / totals.clamp(min=1), torch.full_like(confusion, float("nan")))


def class_mean_norms(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    ignore_index: int = 255,
    threshold: float = 0.5,
    backend: str = "auto",
) -> torch.Tensor:
    """(C,) float mean L2 norm of the feature vectors of each class; NaN for absent classes.

    ``features`` (B, K, h, w) with labels (B, h, w) at feature resolution, or full-resolution
    (B, H, W) labels, which are brought to (h, w) with hist_downsample(threshold); or (N, K) rows
    with (N,) labels. Only the (N,) norms go through class_feature_stats (as (N, 1) rows), never
    the (C, K) sums. No gradient.
    """
    check.float_tensor("features", features)
    check.ndim("features", features, (2, 4), "(B, K, h, w) or (N, K)")
    check.integer_labels("labels", labels)
    with torch.no_grad():
        if features.dim() == 4 and labels.dim() == 3 and tuple(labels.shape[1:]) != tuple(features.shape[2:]):
            labels = ops.hist_downsample(labels, tuple(features.shape[2:]), num_classes, threshold=threshold,
                                         ignore_index=ignore_index, backend=backend)
        norms = torch.linalg.vector_norm(features.detach().float(), dim=1)
        if norms.shape != labels.shape:
            raise ValueError(f"labels must have shape {tuple(norms.shape)} (or full resolution for (B, K, h, w) "
                             f"features), got {tuple(labels.shape)}")
        sums, counts = ops.class_feature_stats(norms.reshape(-1, 1), labels.reshape(-1), num_classes,
                                               ignore_index=ignore_index, backend=backend)
        sums = sums[:, 0]
        return torch.where(counts > 0, sums / counts.clamp(min=1).to(sums.dtype), torch.full_like(sums, float("nan")))


def latent_scalars(
    *,
    regularizer=None,
    features: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    num_classes: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
    prefix: str = "latent",
    backend: str = "auto",
) -> Dict[str, float]:
    """Scalars for TensorBoard: ``{prefix}/mean_prototype_angle`` from an LSRRegularizer's EMA
    prototypes (when given and at least two classes are seen), and ``{prefix}/norm/<class>`` and
    ``{prefix}/norm/mean`` from (features, labels) (classes absent from the labels are left
    out). Reads device values: call it at logging steps, not every step."""
    out: Dict[str, float] = {}
    if regularizer is not None:
        angle = float(regularizer.mean_prototype_angle())
        if angle == angle:  # not NaN
            out[f"{prefix}/mean_prototype_angle"] = angle
        if num_classes is None:
            num_classes = regularizer.num_classes
    if features is not None or labels is not None:
        if features is None or labels is None or num_classes is None:
            raise ValueError("latent_scalars needs features, labels and num_classes (or a regularizer) together")
        norms = class_mean_norms(features, labels, num_classes, backend=backend).cpu()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
        names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
        for name, value in zip(names, norms.tolist()):
            if value == value:
                out[f"{prefix}/norm/{name}"] = value
        defined = norms[~torch.isnan(norms)]
        if defined.numel():
            out[f"{prefix}/norm/mean"] = float(defined.mean())
    return out


def log_latent_scalars(writer, step: int, **kwargs) -> Dict[str, float]:
    """``latent_scalars(**kwargs)``, each written with ``writer.add_scalar(tag, value, step)``
    (a torch.utils.tensorboard SummaryWriter or anything with that method). Returns them."""
    scalars = latent_scalars(**kwargs)
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)
    return scalars
