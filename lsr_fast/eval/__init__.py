"""Evaluation: metrics (confusion matrix, IoU, mIoU, mASR)."""

from .metrics import confusion_matrix, masr, mean_iou, paper_target_only_iou, per_class_iou

__all__ = ["confusion_matrix", "per_class_iou", "mean_iou", "masr", "paper_target_only_iou"]
