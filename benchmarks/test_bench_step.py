"""A DeepLabV2 training step, source-only vs LSR (lsr_fast.bench.prepare_step), under
pytest-benchmark: the paper's size on a GPU (ResNet-101, 1280x720 + 1024x512), a small one
(ResNet-18 width 16, 512x256) on the CPU."""

import pytest

from lsr_fast import bench
from conftest import DEVICE, STEP_SIZE


def test_train_step(time_call, step_variant):
    pytest.importorskip("lsr_fast.models")
    time_call(bench.prepare_step(step_variant, STEP_SIZE, DEVICE), size=STEP_SIZE)
