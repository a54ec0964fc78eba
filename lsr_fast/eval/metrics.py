"""Segmentation metrics: confusion matrix, per-class IoU, mIoU and the paper's mASR (Eq. 9).

IoUs are fractions in [0, 1]; mIoU and mASR are returned in percent, as papers report them.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch

from ..ops import _checks as check

# trainId order of the 19 Cityscapes classes.
CLASS_NAMES_19 = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "light", "sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
# SYNTHIA's 16 classes (no terrain, truck, train) and the 13-class subset (also no wall, fence, pole).
SUBSET_16 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SUBSET_13 = (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)

# The paper's target-only (supervised on Cityscapes) IoUs, percent, trainId order (DESIGN.md).
PAPER_TARGET_ONLY_IOU_19 = (
    96.5, 73.8, 88.4, 42.2, 43.7, 40.7, 46.1, 58.6, 88.5, 54.9,
    91.9, 68.7, 46.2, 90.7, 68.8, 69.9, 48.8, 47.6, 64.5,
)


def class_names(num_classes: int) -> list:
    """Cityscapes names for the 19-class and SYNTHIA 16-class evaluations, else class indices."""
    if num_classes == 19:
        return list(CLASS_NAMES_19)
    if num_classes == 16:
        return [CLASS_NAMES_19[i] for i in SUBSET_16]
    return [str(i) for i in range(num_classes)]


def paper_target_only_iou(num_classes: int = 19) -> torch.Tensor:
    """The paper's target-only IoUs as fractions, for the 19-, 16- or 13-class evaluation."""
    table = torch.tensor(PAPER_TARGET_ONLY_IOU_19, dtype=torch.float64) / 100.0
    if num_classes == 19:
        return table
    if num_classes == 16:
        return table[list(SUBSET_16)]
    if num_classes == 13:
        return table[list(SUBSET_13)]
    raise ValueError(f"num_classes must be 19, 16 or 13 for the paper's table, got {num_classes}")


def confusion_matrix(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int, *, ignore_index: int = 255
) -> torch.Tensor:
    """(C, C) int64 counts, rows = ground truth, columns = prediction, on the tensors' device.

    Pixels whose target is ``ignore_index`` are skipped. Any other value outside [0, C), in the
    prediction or the target, is an error.
    """
    check.integer_labels("prediction", prediction)
    check.integer_labels("target", target)
    check.positive_int("num_classes", num_classes)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction has shape {tuple(prediction.shape)} but target has {tuple(target.shape)}")
    if prediction.device != target.device:
        raise ValueError(f"prediction is on {prediction.device} but target is on {target.device}")
    valid = target != ignore_index
    bad = valid & ((prediction < 0) | (prediction >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"prediction contains the value {prediction[bad][0].item()}, outside [0, {num_classes})")
    check.label_values("target", target, num_classes, ignore_index)
    # Ignored pixels go to an extra bin past C*C that is cut off.
    index = torch.where(valid, target.long() * num_classes + prediction.long(), torch.full_like(target, num_classes * num_classes, dtype=torch.long))
    counts = torch.bincount(index.reshape(-1), minlength=num_classes * num_classes + 1)
    return counts[: num_classes * num_classes].reshape(num_classes, num_classes)


def per_class_iou(confusion: torch.Tensor) -> torch.Tensor:
    """IoU_c = TP / (TP + FP + FN) as float64 fractions; NaN for a class absent from both
    prediction and ground truth."""
    check.tensor("confusion", confusion)
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square (C, C) matrix, got shape {tuple(confusion.shape)}")
    confusion = confusion.to(torch.float64)
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    return torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))


def mean_iou(confusion_or_iou: torch.Tensor) -> float:
    """mIoU in percent over the classes whose IoU is defined (NaN ones skipped)."""
    iou = per_class_iou(confusion_or_iou) if confusion_or_iou.dim() == 2 else confusion_or_iou.to(torch.float64)
    defined = ~torch.isnan(iou)
    if not bool(defined.any()):
        return float("nan")
    return float(iou[defined].mean()) * 100.0


def masr(
    adapted_iou: Union[torch.Tensor, Sequence[float]],
    supervised_iou: Optional[Union[torch.Tensor, Sequence[float]]] = None,
) -> float:
    """mASR (Eq. 9) in percent: mean over classes of IoU_adapted / IoU_supervised.

    ``supervised_iou`` defaults to the paper's target-only table for 19, 16 or 13 classes
    (chosen by the length of ``adapted_iou``). Both are fractions in [0, 1]. Classes whose
    adapted IoU is NaN (absent from prediction and ground truth) are skipped; a supervised IoU
    of zero or NaN is an error, since the ratio is then undefined.
    """
    adapted = torch.as_tensor(adapted_iou, dtype=torch.float64).reshape(-1).cpu()
    if supervised_iou is None:
        supervised = paper_target_only_iou(adapted.numel())
    else:
        supervised = torch.as_tensor(supervised_iou, dtype=torch.float64).reshape(-1).cpu()
    if supervised.numel() != adapted.numel():
        raise ValueError(f"supervised_iou has {supervised.numel()} classes but adapted_iou has {adapted.numel()}")
    if bool((torch.isnan(supervised) | (supervised <= 0)).any()):
        raise ValueError("supervised_iou must be > 0 for every class (the ratio is undefined otherwise)")
    defined = ~torch.isnan(adapted)
    if not bool(defined.any()):
        return float("nan")
    return float((adapted[defined] / supervised[defined]).mean()) * 100.0


def iou_table(iou: torch.Tensor, class_names: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """{class name: IoU in percent} for reports."""
    names = class_names or (CLASS_NAMES_19 if iou.numel() == 19 else [str(i) for i in range(iou.numel())])
    return {name: float(value) * 100.0 for name, value in zip(names, iou.tolist())}
