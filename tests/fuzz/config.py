"""Constants of the fuzzer: the groups, time and memory limits, examples per unit of each profile."""

from __future__ import annotations

import os


HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/
ROOT = os.path.dirname(HERE)
ENTRY = os.path.join(HERE, "fuzz_cases.py")  # the script a child process runs (and reports replay)

GROUPS = ("public-reference", "public-cpp", "public-triton", "public-cuda", "raw")
CASE_LIMIT_S = 6.0  # the parent kills a child whose current case has run this long
SLOW_CASE_S = 3.0  # a case that returns after this long fails (tiny inputs take milliseconds)
GPU_SLACK = 10.0  # both limits times this on a GPU, where the first call of a kernel compiles it
GROUP_LIMIT_S = {"ci": 600.0, "long": 24 * 3600.0}  # whole group, restarts included
MAX_RESTARTS = 12  # crashed or killed children restarted after the unit that failed
MEMORY_LIMIT = 6 << 30  # RLIMIT_AS of a child: a huge allocation fails fast instead of swapping the machine

EXAMPLES = {  # examples per unit in the "ci" profile (per group); "long" multiplies by LONG_FACTOR
    "public-reference": 2,
    "public-cpp": 2,
    "public-triton": 1,
    "public-cuda": 2,
    "raw": 2,
}
LONG_FACTOR = 100
BASELINE_FACTOR = 3  # the valid-input unit of each target gets this many times the examples
