"""Fuzzing every public op and every raw ``torch.ops.lsr_fast.*`` entry point (hypothesis).

Malformed dtypes (float, bool, complex, uint16/uint32, int8/int16 labels; int, bool, complex,
half and double features), wrong ranks, empty dimensions, stride-0 (expanded) and overlapping
views, channels_last, strided and offset views, meta tensors alone and among CPU tensors,
NaN/inf, labels outside [0, C) (-1, C, the dtype's largest value) with the value checks on and
off, and out-of-range, NaN or wrongly typed scalars (threshold, confidence, alpha, class
weights, ignore_index up to 2**64, sizes larger than the input, num_classes up to 2**40), on
every backend usable here (reference, cpp, triton; the Triton interpreter on tiny inputs when
there is no GPU), plus the metrics and LSRRegularizer's forward. Each call must raise an error
naming the offending argument or return what lsr_fast.reference returns (labels bit for bit,
values and gradients within tolerance); the contract, case by case, is in tests/fuzz/__init__.py.

Each test runs one group of targets (reference, cpp and Triton backends of the public ops with
the metrics and the regulariser; CUDA, skipped without a GPU; the raw ops) in a child process watched by the parent (one CPU thread,
6 GiB address-space limit): a crash or a case running past fuzz.CASE_LIMIT_S fails the
test with the case it was running and the remaining units run in a new child. A failure prints
every falsifying case with its arguments and a command that replays it.

Profiles (LSR_FAST_HYPOTHESIS_PROFILE, as tests/test_properties.py): "ci" (default), a few
derandomized examples per unit (about 1,500 units, 3,000 cases; every kind of case runs every time);
"long", 100 times more from a random seed (LSR_FAST_FUZZ_SEED to choose it), with shrinking:

    LSR_FAST_HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py -s
    python tests/fuzz_cases.py --group raw          # one group without pytest
"""

import pytest

import fuzz


@pytest.mark.parametrize("group", fuzz.GROUPS)
def test_fuzz(group):
    passed, report, stats = fuzz.run_group(group)
    print(report)
    if passed and stats["units"] == 0 and stats["skipped"]:
        pytest.skip("; ".join(f"backend {name!r}: {why}" for name, why in stats["skipped"].items()))
    assert passed, report
