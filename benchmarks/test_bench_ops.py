"""Every op x backend x shape x pass x dtype of lsr_fast.bench.cases, under pytest-benchmark."""

import pytest

from lsr_fast import bench
from conftest import DEVICE


def test_op(time_call, case):
    try:
        prepared = bench.prepare(case, DEVICE)
    except Exception as error:
        if case.backend == "compile":  # recorded, not a failure: torch.compile may not work here
            pytest.skip(f"torch.compile failed: {type(error).__name__}: {error}")
        raise
    time_call(prepared.fn, bytes=prepared.bytes, compile_s=prepared.compile_s)
