"""The command line: options, ``run`` (what ``lsr-fast bench`` calls) and ``main`` (what
``python -m lsr_fast.bench`` calls)."""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch

import lsr_fast
from lsr_fast.ops._checks import value_checks_enabled

from .goals import evaluate_goals
from .merge import _run_merge
from .report import write_report
from .running import _device_description, _error_text, _versions, add_speedups, add_step_overheads, device_name, run_case
from .step import STEP_SIZES, prepare_step, step_variants
from .timing import copy_bandwidth, measure_interleaved, peak_memory
from .workload import BACKENDS, DEFAULT_SHAPES, DTYPES, OP_GROUPS, OPS, PASSES, SHAPES, STEP, _inputs_cache, cases


def _list_of(name: str, allowed: Sequence[str]) -> Callable[[str], List[str]]:
    def parse(text: str) -> List[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"{name}: unknown {', '.join(map(repr, unknown)) or 'empty list'}; choose from {', '.join(allowed)}")
        return items

    parse.__name__ = name  # argparse names the type in its messages
    return parse


def _positive(kind: type, name: str, minimum) -> Callable[[str], object]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a {kind.__name__}, got {text!r}") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {text}")
        return value

    return parse


QUICK = dict(shapes=["small"], rounds=5, warmup=1, min_time=0.25, step_size="tiny", step_rounds=2)
DEFAULTS = dict(shapes=list(DEFAULT_SHAPES), rounds=10, warmup=3, min_time=1.0, step_rounds=10)
LISTS = dict(ops=list(OPS) + [STEP], backends=list(BACKENDS), passes=list(PASSES), dtypes=list(DTYPES))


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``lsr-fast bench`` to ``parser``."""
    parser.add_argument("--quick", action="store_true",
                        help="small shapes, a tiny training step and few rounds (a smoke run); explicit options win")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run (default: cuda when visible, else cpu)")
    parser.add_argument("--ops", type=_list_of("--ops", tuple(OPS) + (STEP,) + tuple(OP_GROUPS)), default=None,
                        help=f"comma-separated ops (default all): {', '.join(OPS)}, {STEP}; "
                        + "; ".join(f"{name} = {', '.join(ops)}" for name, ops in OP_GROUPS.items())
                        + " (one step of each toolkit method of examples/, also timed in plain torch)")
    parser.add_argument("--backends", type=_list_of("--backends", BACKENDS), default=None,
                        help="comma-separated backends (default all usable here): " + ", ".join(BACKENDS)
                        + "; compile = torch.compile(reference), not for the toolkit ops, whose plain-torch "
                        "version always runs")
    parser.add_argument("--shapes", type=_list_of("--shapes", tuple(SHAPES)), default=None,
                        help=f"comma-separated shapes (default {','.join(DEFAULT_SHAPES)}; --quick: small): "
                        + ", ".join(f"{k} {s.H}x{s.W}->{s.h}x{s.w} K={s.K} C={s.C}" for k, s in SHAPES.items()))
    parser.add_argument("--passes", type=_list_of("--passes", PASSES), default=None,
                        help="comma-separated: fwd, fwd+bwd (default both)")
    parser.add_argument("--dtypes", type=_list_of("--dtypes", DTYPES), default=None,
                        help="comma-separated: float32, bfloat16 (default both; bfloat16 on GPU only)")
    parser.add_argument("--step-size", choices=tuple(STEP_SIZES), default=None,
                        help="training-step size (default paper on GPU, small on CPU, tiny with --quick): "
                        + "; ".join(f"{k} {s.backbone} width {s.width}, {s.source[1]}x{s.source[0]} + "
                                    f"{s.target[1]}x{s.target[0]}" for k, s in STEP_SIZES.items()))
    parser.add_argument("--rounds", type=_positive(int, "--rounds", 1), default=None,
                        help=f"minimum timed calls per case (default {DEFAULTS['rounds']}; --quick {QUICK['rounds']})")
    parser.add_argument("--warmup", type=_positive(int, "--warmup", 0), default=None,
                        help=f"untimed calls before timing (default {DEFAULTS['warmup']}; --quick {QUICK['warmup']})")
    parser.add_argument("--min-time", type=_positive(float, "--min-time", 0.0), default=None,
                        help=f"seconds to time per case at least (default {DEFAULTS['min_time']}; --quick {QUICK['min_time']})")
    parser.add_argument("--step-rounds", type=_positive(int, "--step-rounds", 1), default=None,
                        help=f"interleaved rounds of timed training steps (default {DEFAULTS['step_rounds']}; --quick {QUICK['step_rounds']})")
    parser.add_argument("--time-budget", type=_positive(float, "--time-budget", 0.0), default=None, metavar="MINUTES",
                        help="start no case after this many minutes; the cases not started are reported as 'not run' "
                        "(default: no limit)")
    parser.add_argument("--value-checks", action="store_true",
                        help="keep the ops' value checks (label range, finiteness) on while timing (default off)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"),
                        help="folder for <device>-<date>.json/.md/.png (default benchmarks/results; never overwrites)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help="measure nothing: write one report from the JSON reports of several runs on one device "
                        "and commit (a run split by --shapes or --ops); only --out may be given with it")
    return parser


def _resolve(args: argparse.Namespace) -> dict:
    """Options with --quick and the defaults filled in."""
    preset = dict(LISTS, **(QUICK if args.quick else DEFAULTS))
    return {name: getattr(args, name) if getattr(args, name) is not None else preset.get(name)
            for name in ("ops", "backends", "passes", "dtypes", "shapes", "rounds", "warmup", "min_time",
                         "step_size", "step_rounds")}


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` and write the report. 0 when every case ran (a
    torch.compile failure is recorded, not counted), 1 otherwise (a failure, or cases left for
    the time budget)."""
    if getattr(args, "merge", None):
        return _run_merge(args)
    # On the CPU, peak_memory runs torch.profiler, whose kineto writes "USDT: ... profiler_start" and
    # "... profiler_stop" to stderr around every case, among the lines printed here. Kineto logs those
    # above its ERROR level, so only level 6 hides them (its errors with them). An env var, not a
    # filter on stderr: kineto reads it once, at the first profiler use in this process. A level the
    # user set is kept (KINETO_LOG_LEVEL=4 shows kineto's errors again).
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("lsr-fast bench: --device cuda, but torch sees no CUDA device")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    opts = _resolve(args)
    step_size = opts["step_size"] or ("paper" if device.type == "cuda" else "small")
    timing = dict(warmup=opts["warmup"] + (2 if device.type == "cuda" else 0), rounds=opts["rounds"], min_time=opts["min_time"])
    command = getattr(args, "command_line", None) or " ".join(["lsr-fast"] + sys.argv[1:])  # argv[1] is "bench"

    todo, skipped = cases(device, opts["ops"], opts["backends"], opts["shapes"], opts["passes"], opts["dtypes"])
    with_step = STEP in opts["ops"]
    print(f"lsr-fast bench on {device_name(device)}: {len(todo)} op cases" + (f" + training step ({step_size})" if with_step else ""))
    started = time.monotonic()
    budget_s = None if args.time_budget is None else 60.0 * args.time_budget

    def out_of_time() -> bool:
        return budget_s is not None and time.monotonic() - started >= budget_s

    for what, why in skipped.items():
        print(f"  not measured: {what}: {why}")
    checks_before = value_checks_enabled()
    lsr_fast.set_value_checks(args.value_checks)
    try:
        copy = copy_bandwidth(device)
        print(f"copy bandwidth: {copy['gbps']:.1f} GB/s")
        results = []
        for i, case in enumerate(todo, 1):
            if out_of_time():
                results.append(dict(op=case.op, shape=case.shape, dtype=case.dtype, backend=case.backend, status="not run",
                                    reason=f"time budget of {args.time_budget:g} min spent", **{"pass": case.pass_name}))
                continue
            result = run_case(case, device, timing)
            result["copy_gbps"] = copy["gbps"]
            results.append(result)
            add_speedups(results)
            if result["status"] == "ok":
                speedup = f" ({result['speedup']:.2f}x)" if result["speedup"] else ""
                print(f"[{i}/{len(todo)}] {case.name}: {result['median_ms']:.3f} ms{speedup}", flush=True)
            else:
                print(f"[{i}/{len(todo)}] {case.name}: {result['reason']}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            gc.collect()
        _inputs_cache.clear()
        steps, step_note, step_not_run = [], "", False
        if with_step and out_of_time():
            step_not_run = True
            step_note = f"Training step not run: the time budget of {args.time_budget:g} min was spent."
            print(step_note)
        elif with_step:
            steps, step_note = _run_steps(device, opts["backends"], step_size, opts)
    finally:
        lsr_fast.set_value_checks(checks_before)

    report = dict(
        meta=dict(
            device=device_name(device), device_type=device.type, device_description=_device_description(device),
            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), command=command,
            versions=_versions(), copy=copy, timing=timing, value_checks=args.value_checks,
        ),
        results=results, steps=steps, step_note=step_note, skipped=skipped,
    )
    report["goals"] = evaluate_goals(report)
    paths = write_report(report, args.out)
    for path in paths.values():
        print(f"wrote {path}")
    not_run = sum(r["status"] == "not run" for r in results) + step_not_run
    if not_run:
        print(f"time budget spent: {not_run} case(s) not run")
    hard_failures = [r for r in results + steps if r["status"] == "failed" and r.get("backend") != "compile"]
    return 1 if hard_failures or not_run else 0


def _run_steps(device: torch.device, backends: Sequence[str], size: str, opts: dict) -> Tuple[List[dict], str]:
    """Every step variant, prepared and run once each, then timed in interleaved rounds."""
    try:
        import lsr_fast.models  # noqa: F401
    except ImportError as error:
        note = f"Training step not measured: lsr_fast.models is not importable ({error})."
        print(note)
        return [], note
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed sizes: let cuDNN pick its algorithms in the warm-up
    steps, fns = {}, {}
    for variant in step_variants(device, backends):
        steps[variant] = dict(variant=variant, size=size, **vars(STEP_SIZES[size]))
        try:
            fns[variant] = prepare_step(variant, size, device)
            fns[variant]()
        except Exception as error:  # recorded; the other variants still run
            fns.pop(variant, None)
            steps[variant].update(status="failed", reason=_error_text(error))
            print(f"[step {size}] {variant}: {steps[variant]['reason']}", flush=True)
    try:
        times = measure_interleaved(fns, device, warmup=opts["warmup"] + (2 if device.type == "cuda" else 0),
                                    rounds=opts["step_rounds"])
        for variant, fn in fns.items():
            peak, _ = peak_memory(fn, device)
            steps[variant].update(status="ok", median_ms=statistics.median(times[variant]), min_ms=min(times[variant]),
                                  rounds=len(times[variant]), times_ms=times[variant], peak_bytes=peak)
            print(f"[step {size}] {variant}: {steps[variant]['median_ms']:.1f} ms", flush=True)
    except Exception as error:
        for variant in fns:
            steps[variant].update(status="failed", reason=_error_text(error))
        print(f"[step {size}] failed: {_error_text(error)}", flush=True)
    fns.clear()
    gc.collect()
    steps = list(steps.values())
    add_step_overheads(steps)
    return steps, ""


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m lsr_fast.bench [options]`` (the same as ``lsr-fast bench``)."""
    from lsr_fast import bench as package  # its docstring is the description; loaded before main runs

    parser = configure_parser(argparse.ArgumentParser(prog="lsr-fast bench", description=package.__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    args.command_line = "python -m lsr_fast.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    return run(args)
