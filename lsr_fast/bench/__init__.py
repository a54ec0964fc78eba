"""`lsr-fast bench`: time every LSR op on every backend, and a DeepLabV2 training step with LSR.

One source of truth for what is measured: the cases (op x backend x shape x pass x dtype), their
inputs, the bytes each must move and the way it is timed live here. ``lsr-fast bench`` runs them
and writes ``<out>/<device>-<date>.json``, ``.md`` and ``.png``; ``benchmarks/`` runs the same
cases under pytest-benchmark. See benchmarks/README.md for what every number means.

    lsr-fast bench --quick                       # small shapes, few rounds
    lsr-fast bench --shapes gta5 --backends reference,cpp --ops losses,train_step
    lsr-fast bench --shapes gta5 --backends cpp --ops toolkit   # the examples' methods vs plain torch
    lsr-fast bench --shapes gta5 --time-budget 8   # stop starting cases after 8 minutes
    lsr-fast bench --merge part1.json part2.json   # one report from runs split by shape or op

Modules: ``workload`` (shapes, ops, cases, inputs, the timed callables, bytes moved), ``toolkit``
(one step of each toolkit method of examples/, on the lsr_fast ops and in plain torch), ``timing``
(timers, peak memory, copy bandwidth), ``step`` (the training step), ``running`` (one case, the
machine's description), ``goals``, ``report`` (Markdown, chart, files), ``merge`` (one report
from parts) and ``command`` (options, ``run``, ``main``). Every public name is importable from
``lsr_fast.bench`` itself.
"""

from .command import DEFAULTS, LISTS, QUICK, configure_parser, main, run
from .goals import CPU_GOALS, GPU_BANDWIDTH_GOAL, GPU_COMPILE_GOAL, GPU_STEP_GOAL_PCT, evaluate_goals
from .merge import CASE_KEY, MEASURING, SAME_IN_EVERY_PART, merge_reports
from .report import free_stem, render_chart, render_markdown, write_report
from .running import add_speedups, add_step_overheads, device_name, run_case
from .step import STEP_CLASSES, STEP_SIZES, StepSize, prepare_step, step_variants
from .timing import copy_bandwidth, measure, measure_interleaved, peak_memory, synchronize, timed_calls
from .toolkit import PLAIN, TOOLKIT_OPS
from .workload import (BACKENDS, DEFAULT_SHAPES, DTYPES, FAST_BACKENDS, OP_GROUPS, OPS, PAPER_SHAPES, PASSES, SHAPES, STEP,
                       Case, Prepared, Shape, backend_skip_reason, baseline, bytes_moved, cases, expand_ops, make_inputs,
                       prepare)

__all__ = [
    "BACKENDS", "CASE_KEY", "CPU_GOALS", "Case", "DEFAULTS", "DEFAULT_SHAPES", "DTYPES", "FAST_BACKENDS",
    "GPU_BANDWIDTH_GOAL", "GPU_COMPILE_GOAL", "GPU_STEP_GOAL_PCT", "LISTS", "MEASURING", "OPS", "OP_GROUPS",
    "PAPER_SHAPES", "PASSES", "PLAIN", "Prepared", "QUICK", "SAME_IN_EVERY_PART", "SHAPES", "STEP", "STEP_CLASSES",
    "STEP_SIZES", "Shape", "StepSize", "TOOLKIT_OPS", "add_speedups", "add_step_overheads", "backend_skip_reason",
    "baseline", "bytes_moved", "cases", "configure_parser", "copy_bandwidth", "device_name", "evaluate_goals",
    "expand_ops", "free_stem", "main", "make_inputs", "measure", "measure_interleaved", "merge_reports", "peak_memory",
    "prepare", "prepare_step", "render_chart", "render_markdown", "run", "run_case", "step_variants", "synchronize",
    "timed_calls", "write_report",
]
