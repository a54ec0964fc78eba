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


# ----------------------------------------------------------------------------- bad input

def test_masr_refuses_a_percent_table_and_impossible_ious():
    percent = [96.5, 73.8, 88.4]  # the paper's first three IoUs as printed, not divided by 100
    with pytest.raises(ValueError, match=r"adapted_iou has a value 96\.5 > 1: IoUs are fractions in \[0, 1\], so a table in percent must be divided by 100"):
        metrics.masr(percent, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"supervised_iou has a value 96\.5 > 1: .*divided by 100"):
        metrics.masr([0.5, 0.5, 0.5], percent)
    with pytest.raises(ValueError, match=r"adapted_iou has a value 1\.0001 > 1"):
        metrics.masr(torch.full((19,), 1.0001))  # just above 1: not a rounding to let through
    with pytest.raises(ValueError, match=r"adapted_iou has a value -0\.1 < 0"):
        metrics.masr([0.2, -0.1, 0.3], [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="adapted_iou contains inf"):
        metrics.masr([0.2, math.inf, 0.3], [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="supervised_iou contains inf"):
        metrics.masr([0.2, 0.2, 0.3], [0.5, -math.inf, 0.5])
    with pytest.raises(ValueError, match="adapted_iou is empty"):
        metrics.masr([], [])
    with pytest.raises(ValueError, match="adapted_iou is empty"):
        metrics.masr(torch.zeros(0))
    with pytest.raises(TypeError, match="adapted_iou must hold real numbers.*complex"):
        metrics.masr(torch.full((19,), 0.5, dtype=torch.complex64))
    with pytest.raises(TypeError, match="adapted_iou must hold real numbers.*complex"):
        metrics.masr([0.5 + 0j, 0.5, 0.5], [0.5, 0.5, 0.5])
    with pytest.raises(TypeError, match="adapted_iou must hold real numbers.*bool"):
        metrics.masr(torch.ones(19, dtype=torch.bool))
    with pytest.raises(TypeError, match="adapted_iou must be per-class IoUs.*got str"):
        metrics.masr("0.5")
    with pytest.raises(ValueError, match=r"adapted_iou must be a 1-d vector of per-class IoUs, got shape \(1, 19\)"):
        metrics.masr(metrics.paper_target_only_iou(19).unsqueeze(0))
    with pytest.raises(ValueError, match="adapted_iou has 7 classes.*19, 16 or 13"):
        metrics.masr([0.5] * 7)


def test_masr_and_mean_iou_take_lists_and_tuples():
    table19 = metrics.paper_target_only_iou(19)
    assert metrics.masr(table19.tolist()) == 100.0  # float64 throughout: exact, no float32 detour
    assert metrics.masr(tuple(0.5 * v for v in table19.tolist())) == pytest.approx(50.0, rel=1e-12)
    assert metrics.masr([0.2, float("nan"), 0.3], (0.4, 0.5, 0.9)) == pytest.approx(100 * (0.5 + 1 / 3) / 2)
    assert metrics.mean_iou([0.5, 0.5]) == 50.0
    assert metrics.mean_iou((0.25, float("nan"), 0.75)) == 50.0
    assert math.isnan(metrics.mean_iou([float("nan")]))
    # A nested list is a confusion matrix: IoU_0 = 1 / (1 + 1 + 0) = 1/2, IoU_1 = 3 / (3 + 1 + 0) = 3/4.
    assert metrics.mean_iou([[1, 1], [0, 3]]) == pytest.approx(62.5)


def test_mean_iou_refuses_impossible_ious():
    with pytest.raises(ValueError, match=r"confusion_or_iou has a value 60 > 1: .*divided by 100"):
        metrics.mean_iou([50.0, 60.0])
    with pytest.raises(ValueError, match=r"confusion_or_iou has a value -0\.5 < 0"):
        metrics.mean_iou(torch.tensor([0.5, -0.5]))
    with pytest.raises(ValueError, match="confusion_or_iou contains inf"):
        metrics.mean_iou([0.5, math.inf])
    with pytest.raises(ValueError, match="confusion_or_iou is empty"):
        metrics.mean_iou([])
    with pytest.raises(TypeError, match="confusion_or_iou must hold real numbers.*complex"):
        metrics.mean_iou(torch.tensor([0.5, 0.5], dtype=torch.complex128))
    with pytest.raises(TypeError, match="confusion_or_iou must be a .*got float"):
        metrics.mean_iou(0.5)
    with pytest.raises(ValueError, match=r"confusion_or_iou must be a 1-d vector of per-class IoUs, got shape \(1, 1, 2\)"):
        metrics.mean_iou(torch.full((1, 1, 2), 0.5))


def test_confusion_counts_must_be_real_finite_and_non_negative():
    for call in (metrics.per_class_iou, metrics.mean_iou):
        name = "confusion" if call is metrics.per_class_iou else "confusion_or_iou"
        with pytest.raises(ValueError, match=rf"{name} has a negative count \(-1\)"):
            call(torch.tensor([[2, -1], [0, 3]]))
        with pytest.raises(ValueError, match=rf"{name} contains non-finite values"):
            call(torch.tensor([[2.0, float("nan")], [0.0, 3.0]]))
        with pytest.raises(ValueError, match=rf"{name} contains non-finite values"):
            call([[2.0, math.inf], [0.0, 3.0]])
        with pytest.raises(TypeError, match=rf"{name} must hold real numbers.*complex"):
            call(torch.eye(2, dtype=torch.complex64))
        with pytest.raises(ValueError, match=rf"{name} must be a non-empty square \(C, C\) matrix, got shape \(2, 3\)"):
            call(torch.ones(2, 3))
        with pytest.raises(ValueError, match=rf"{name} must be a non-empty square \(C, C\) matrix, got shape \(0, 0\)"):
            call(torch.zeros(0, 0))
    with pytest.raises(TypeError, match="confusion must be a .*got dict"):
        metrics.per_class_iou({"road": 1})


def test_float_counts_below_one_give_exact_ious():
    # Weighted (float) counts: IoU_0 = 0.2 / (0.3 + 0.3 - 0.2) = 0.5, IoU_1 = 0.3 / (0.4 + 0.4 - 0.3) = 0.6.
    # The unions (0.4, 0.5) are below 1, so no clamp to a count of 1 may touch them.
    iou = metrics.per_class_iou([[0.2, 0.1], [0.1, 0.3]])
    assert iou.dtype == torch.float64
    assert iou.tolist() == pytest.approx([0.5, 0.6], rel=1e-12)


def test_confusion_matrix_checks_target_even_with_value_checks_off():
    import lsr_fast

    with lsr_fast.value_checks(False):  # a bad target would otherwise be dropped without a word
        with pytest.raises(ValueError, match=r"target contains the value 3, outside \[0, 3\) and not ignore_index=255"):
            metrics.confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 3, 1]), 3)
        with pytest.raises(ValueError, match=r"target contains the value -1"):
            metrics.confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, -1, 1]), 3)


def test_confusion_matrix_arguments_and_narrow_label_dtypes():
    target = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"num_classes must be <= 16384 .* got 134217728"):
        metrics.confusion_matrix(target, target, 2**27)  # would try to allocate 2^54 counts
    with pytest.raises(TypeError, match="ignore_index must be an int, got float"):
        metrics.confusion_matrix(target, target, 3, ignore_index=1.5)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        metrics.confusion_matrix(target, target, 3, ignore_index=2**64)
    with pytest.raises(ValueError, match="prediction is a meta tensor"):
        metrics.confusion_matrix(target.to("meta"), target.to("meta"), 3)
    # int8 cannot hold 255: its -1 is a bad label, not void (an int8 comparison would wrap 255 to -1).
    with pytest.raises(ValueError, match=r"target contains the value -1, outside \[0, 3\)"):
        metrics.confusion_matrix(target, torch.tensor([0, -1, 2], dtype=torch.int8), 3)
    # ...while an int8 target with ignore_index=-1 is void there.
    cm = metrics.confusion_matrix(target, torch.tensor([0, -1, 2], dtype=torch.int8), 3, ignore_index=-1)
    assert torch.equal(cm, torch.tensor([[1, 0, 0], [0, 0, 0], [0, 0, 1]]))


def test_meta_tensors_are_refused_by_name():
    with pytest.raises(ValueError, match="supervised_iou is a meta tensor"):
        metrics.masr(torch.full((3,), 0.5), torch.full((3,), 0.5, device="meta"))
    with pytest.raises(ValueError, match="confusion is a meta tensor"):
        metrics.per_class_iou(torch.ones(2, 2, device="meta"))


# ----------------------------------------------------------------------------- mASR, class by class

# DESIGN.md's target-only IoUs (percent), typed in here rather than read from the code under test.
PAPER = {
    "road": 96.5, "sidewalk": 73.8, "building": 88.4, "wall": 42.2, "fence": 43.7, "pole": 40.7,
    "light": 46.1, "sign": 58.6, "vegetation": 88.5, "terrain": 54.9, "sky": 91.9, "person": 68.7,
    "rider": 46.2, "car": 90.7, "truck": 68.8, "bus": 69.9, "train": 48.8, "motorcycle": 47.6,
    "bicycle": 64.5,
}
NAMES_19 = list(PAPER)
NAMES_16 = [n for n in NAMES_19 if n not in ("terrain", "truck", "train")]
NAMES_13 = [n for n in NAMES_16 if n not in ("wall", "fence", "pole")]


@pytest.mark.parametrize("names", [NAMES_19, NAMES_16, NAMES_13], ids=["19", "16", "13"])
def test_masr_with_a_different_ratio_per_class(names):
    # Every class a different adapted IoU (so a different ratio): taking the wrong classes of the
    # paper's table, or the right ones in the wrong order, changes the mean.
    adapted = [0.30 + 0.02 * i for i in range(len(names))]
    adapted[names.index("bus")] = float("nan")  # absent from the adapted run's prediction and labels
    ratios = [a / (PAPER[n] / 100) for a, n in zip(adapted, names) if n != "bus"]
    assert len(ratios) == len(names) - 1
    assert metrics.masr(adapted) == pytest.approx(100 * sum(ratios) / len(ratios), rel=1e-12)
    assert metrics.masr(torch.tensor(adapted, dtype=torch.float64)) == pytest.approx(100 * sum(ratios) / len(ratios), rel=1e-12)


def test_masr_13_classes_worked_by_hand():
    # road 0.965 of supervised (= ratio 1), sidewalk half of 73.8 (ratio 0.5), light NaN (skipped),
    # every other class IoU 0 (ratio 0): mASR = 100 * (1 + 0.5) / 12 = 12.5.
    adapted = {n: 0.0 for n in NAMES_13}
    adapted.update(road=0.965, sidewalk=0.369, light=float("nan"))
    assert metrics.masr([adapted[n] for n in NAMES_13]) == pytest.approx(12.5, rel=1e-12)
