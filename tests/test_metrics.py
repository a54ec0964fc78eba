"""Metrics against hand-computed confusion matrices, IoUs, mIoU and mASR."""

import math

import pytest
import torch

from lsr_fast.eval import metrics

V = 255


def test_confusion_matrix_hand_worked():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, V, 1]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    # rows = ground truth: class 0 -> (0, 1); class 1 -> 1,1,1; class 2 -> 2, 0; V skipped.
    expected = torch.tensor([[1, 1, 0], [0, 3, 0], [1, 0, 1]])
    cm = metrics.confusion_matrix(prediction, target, 3)
    assert cm.dtype == torch.int64 and torch.equal(cm, expected)


def test_iou_and_miou_hand_worked():
    cm = torch.tensor([[1, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    iou = metrics.per_class_iou(cm)
    # class 0: 1 / (2 + 2 - 1) = 1/3; class 1: 3 / (3 + 4 - 3) = 3/4; class 2: 1 / (2 + 1 - 1) = 1/2
    assert iou[:3].tolist() == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert math.isnan(iou[3].item())  # absent from both: NaN, skipped by the mean
    assert metrics.mean_iou(cm) == pytest.approx(100 * (1 / 3 + 3 / 4 + 1 / 2) / 3)


def test_confusion_matrix_errors():
    target = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="prediction contains the value 5"):
        metrics.confusion_matrix(torch.tensor([0, 5, 1]), target, 3)
    with pytest.raises(ValueError, match="target contains the value 3"):
        metrics.confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 3, 1]), 3)
    with pytest.raises(ValueError, match="prediction has shape"):
        metrics.confusion_matrix(torch.tensor([0, 1]), target, 3)
    with pytest.raises(TypeError, match="prediction must be an integer tensor"):
        metrics.confusion_matrix(torch.tensor([0.0, 1.0, 1.0]), target, 3)


def test_masr_paper_tables():
    table19 = metrics.paper_target_only_iou(19)
    assert table19[0].item() == pytest.approx(0.965) and table19[18].item() == pytest.approx(0.645)
    assert table19.mean().item() * 100 == pytest.approx(64.8, abs=0.05)  # the paper's mIoU
    # A model exactly as good as target-only: mASR 100 for 19, 16 and 13 classes.
    assert metrics.masr(table19) == pytest.approx(100.0)
    table16 = metrics.paper_target_only_iou(16)
    assert table16.numel() == 16 and table16[9].item() == pytest.approx(0.919)  # sky after road..vegetation
    assert metrics.masr(table16) == pytest.approx(100.0)
    table13 = metrics.paper_target_only_iou(13)
    assert table13[3].item() == pytest.approx(0.461)  # light follows building when wall/fence/pole go
    # Half the supervised IoU everywhere: 50.
    assert metrics.masr(table13 / 2) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="19, 16 or 13"):
        metrics.masr(torch.rand(7))


def test_masr_user_table_and_nan_classes():
    adapted = torch.tensor([0.2, float("nan"), 0.3])
    supervised = torch.tensor([0.4, 0.5, 0.9])
    assert metrics.masr(adapted, supervised) == pytest.approx(100 * (0.5 + 1 / 3) / 2)
    with pytest.raises(ValueError, match="supervised_iou must be > 0"):
        metrics.masr(adapted, torch.tensor([0.4, 0.0, 0.9]))
    with pytest.raises(ValueError, match="supervised_iou has 2 classes"):
        metrics.masr(adapted, torch.tensor([0.4, 0.5]))
