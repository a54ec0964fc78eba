"""Segmentation metrics: confusion matrix, per-class IoU, mIoU and the paper's mASR (Eq. 9).

IoUs are fractions in [0, 1]; mIoU and mASR are returned in percent, as papers report them.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch

from ..ops import _checks as check

# The largest confusion matrix confusion_matrix builds: 16384^2 int64 counts are 2 GiB.
MAX_CONFUSION_CLASSES = 2**14

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
    if num_classes > MAX_CONFUSION_CLASSES:
        raise ValueError(f"num_classes must be <= {MAX_CONFUSION_CLASSES} (the matrix has C * C counts), got {num_classes}")
    check.integer("ignore_index", ignore_index)  # an int that fits int64
    if prediction.shape != target.shape:
        raise ValueError(f"prediction has shape {tuple(prediction.shape)} but target has {tuple(target.shape)}")
    if prediction.device != target.device:
        raise ValueError(f"prediction is on {prediction.device} but target is on {target.device}")
    # (check.integer_labels has refused meta tensors.) In int64, so that ignore_index=255 is not wrapped to -1 by an int8 comparison.
    prediction, target = prediction.long(), target.long()
    valid = target != ignore_index
    # Checked here whatever lsr_fast.set_value_checks says: a bad value would land in a wrong
    # cell (or be dropped) without a word, and evaluation is not a captured training step.
    for name, values in (("prediction", prediction), ("target", target)):
        bad = valid & ((values < 0) | (values >= num_classes))
        if bool(bad.any()):
            raise ValueError(f"{name} contains the value {values[bad][0].item()}, outside [0, {num_classes})"
                             + (f" and not ignore_index={ignore_index}" if name == "target" else ""))
    # Ignored pixels go to an extra bin past C*C that is cut off.
    index = torch.where(valid, target * num_classes + prediction, torch.full_like(target, num_classes * num_classes))
    counts = torch.bincount(index.reshape(-1), minlength=num_classes * num_classes + 1)
    return counts[: num_classes * num_classes].reshape(num_classes, num_classes)


def _as_real_tensor(name: str, value, what: str) -> torch.Tensor:
    """A tensor, list, tuple or NumPy array of real numbers as a float64 CPU tensor."""
    if isinstance(value, torch.Tensor):
        data = value.detach()
    elif isinstance(value, (list, tuple)) or type(value).__module__ == "numpy":
        try:
            data = torch.as_tensor(value)
            if data.is_floating_point() and isinstance(value, (list, tuple)):
                data = torch.as_tensor(value, dtype=torch.float64)  # not via float32: keep every digit
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{name} must be {what} (a tensor, list or tuple of numbers), could not read it: {error}") from None
    else:
        raise TypeError(f"{name} must be {what} (a tensor, list or tuple of numbers), got {type(value).__name__}")
    if data.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor: {what} need values")
    if data.dtype.is_complex or data.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers ({what}), got dtype {data.dtype}")
    return data.to(device="cpu", dtype=torch.float64)


def as_iou(name: str, value) -> torch.Tensor:
    """Checks a vector of per-class IoUs and returns it as float64 on the CPU.

    IoUs are fractions in [0, 1], or NaN for a class absent from both prediction and ground
    truth; at least one class. Accepts a tensor, list, tuple or NumPy array.
    """
    iou = _as_real_tensor(name, value, "per-class IoUs in [0, 1]")
    if iou.dim() != 1:
        raise ValueError(f"{name} must be a 1-d vector of per-class IoUs, got shape {tuple(iou.shape)}")
    if iou.numel() == 0:
        raise ValueError(f"{name} is empty: expected one IoU per class")
    defined = iou[~torch.isnan(iou)]
    if bool(torch.isinf(defined).any()):
        raise ValueError(f"{name} contains inf: IoUs are fractions in [0, 1] (NaN for a class absent from "
                         "prediction and ground truth)")
    if bool((defined > 1).any()):
        raise ValueError(f"{name} has a value {defined.max().item():g} > 1: IoUs are fractions in [0, 1], "
                         "so a table in percent must be divided by 100")
    if bool((defined < 0).any()):
        raise ValueError(f"{name} has a value {defined.min().item():g} < 0: IoUs are fractions in [0, 1]")
    return iou


def _as_confusion(name: str, value) -> torch.Tensor:
    confusion = _as_real_tensor(name, value, "a (C, C) confusion matrix of counts")
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1] or confusion.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square (C, C) matrix, got shape {tuple(confusion.shape)}")
    if not bool(torch.isfinite(confusion).all()):
        raise ValueError(f"{name} contains non-finite values: a confusion matrix holds pixel counts")
    if bool((confusion < 0).any()):
        raise ValueError(f"{name} has a negative count ({confusion.min().item():g}): a confusion matrix holds pixel counts >= 0")
    return confusion


def per_class_iou(confusion: Union[torch.Tensor, Sequence[Sequence[float]]]) -> torch.Tensor:
    """IoU_c = TP / (TP + FP + FN) as float64 fractions on the CPU; NaN for a class absent from
    both prediction and ground truth. ``confusion``: (C, C) real, finite, non-negative counts (integer
    or float; a tensor, nested list or tuple), rows = ground truth."""
    return _iou_from_confusion(_as_confusion("confusion", confusion))


def _iou_from_confusion(confusion: torch.Tensor) -> torch.Tensor:
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    # Float counts may sum below 1, so no clamp: union 0 (then TP 0 too) is the undefined class.
    return torch.where(union > 0, true_positive / union, torch.full_like(union, float("nan")))


def mean_iou(confusion_or_iou: Union[torch.Tensor, Sequence]) -> float:
    """mIoU in percent over the classes whose IoU is defined (NaN ones skipped); NaN if none is.
    Takes a (C, C) confusion matrix or a vector of C IoUs (fractions in [0, 1] or NaN)."""
    data = _as_real_tensor("confusion_or_iou", confusion_or_iou, "a (C, C) confusion matrix or a vector of IoUs")
    if data.dim() == 2:
        iou = _iou_from_confusion(_as_confusion("confusion_or_iou", data))
    else:
        iou = as_iou("confusion_or_iou", data)
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
    (chosen by the length of ``adapted_iou``). Both are fractions in [0, 1] (divide a percent
    table by 100; a value above 1 is an error). Classes whose adapted IoU is NaN (absent from
    prediction and ground truth) are skipped, and NaN is returned if every one is; a supervised
    IoU of zero or NaN is an error, since the ratio is then undefined.
    """
    adapted = as_iou("adapted_iou", adapted_iou)
    if supervised_iou is None:
        if adapted.numel() not in (19, 16, 13):
            raise ValueError(f"adapted_iou has {adapted.numel()} classes; without supervised_iou mASR uses the "
                             "paper's target-only table, which has 19, 16 or 13 classes")
        supervised = paper_target_only_iou(adapted.numel())
    else:
        supervised = as_iou("supervised_iou", supervised_iou)
    if supervised.numel() != adapted.numel():
        raise ValueError(f"supervised_iou has {supervised.numel()} classes but adapted_iou has {adapted.numel()}")
    if bool((torch.isnan(supervised) | (supervised <= 0)).any()):
        raise ValueError("supervised_iou must be > 0 for every class (the ratio is undefined otherwise)")
    defined = ~torch.isnan(adapted)
    if not bool(defined.any()):
        return float("nan")
    return float((adapted[defined] / supervised[defined]).mean()) * 100.0


def iou_table(iou: Union[torch.Tensor, Sequence[float]], class_names: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """{class name: IoU in percent} for reports (NaN for an undefined class)."""
    iou = as_iou("iou", iou)
    names = class_names or (CLASS_NAMES_19 if iou.numel() == 19 else [str(i) for i in range(iou.numel())])
    return {name: float(value) * 100.0 for name, value in zip(names, iou.tolist())}
