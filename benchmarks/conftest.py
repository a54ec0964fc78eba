"""pytest-benchmark suite over the cases of lsr_fast.bench, the same ones `lsr-fast bench` runs.

    python -m pytest benchmarks --benchmark-only -k "small and cpp"
    python -m pytest benchmarks --benchmark-only -k "gta5 and losses" --benchmark-json=out.json

Case ids are op-shape-pass-dtype-backend, e.g. losses-gta5-fwd_bwd-float32-cpp. Cases run on
CUDA when a GPU is visible, else on the CPU; value checks are off, as in `lsr-fast bench`. On a GPU
every timed call ends with torch.cuda.synchronize(). The full report (CUDA-event medians, bytes,
GB/s against the copy bandwidth, peak memory, goals) comes from `lsr-fast bench`; see README.md.
"""

import pytest
import torch

import lsr_fast
from lsr_fast import bench
from lsr_fast.ops._checks import value_checks_enabled

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STEP_SIZE = "paper" if DEVICE.type == "cuda" else "small"
WARMUP = 5 if DEVICE.type == "cuda" else 2  # untimed calls first (Triton autotunes in its first calls)


def case_id(case: bench.Case) -> str:
    return f"{case.op}-{case.shape}-{'fwd_bwd' if case.backward else 'fwd'}-{case.dtype}-{case.backend}"


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases, _ = bench.cases(DEVICE, shapes=bench.DEFAULT_SHAPES)
        metafunc.parametrize("case", cases, ids=[case_id(c) for c in cases])
    if "step_variant" in metafunc.fixturenames:
        variants = bench.step_variants(DEVICE, bench.BACKENDS)
        metafunc.parametrize("step_variant", variants, ids=[f"{STEP_SIZE}-{v}" for v in variants])


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.benchmark(min_rounds=5, warmup=False))  # warm-up: see time_call


@pytest.fixture(autouse=True, scope="session")
def value_checks_off():
    before = value_checks_enabled()
    lsr_fast.set_value_checks(False)
    yield
    lsr_fast.set_value_checks(before)


@pytest.fixture
def time_call(benchmark):
    """time_call(fn, **extra_info): warm up, then let pytest-benchmark time fn (synchronised on GPU)."""

    def run(fn, **extra_info):
        def timed():
            fn()
            bench.synchronize(DEVICE)

        for _ in range(WARMUP):
            timed()
        benchmark.extra_info.update(device=bench.device_name(DEVICE), **extra_info)
        benchmark(timed)

    return run
