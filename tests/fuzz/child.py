"""Child side: units (target x kind), the hypothesis loop run in a child process, and the CLI (main)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass
from typing import List

from .config import EXAMPLES, GROUPS, LONG_FACTOR, MEMORY_LIMIT
from .runner import _indent, profile_name, run_group
from .values import CaseFailure, Kind, _Strategies, _st
from .spec_base import Spec
from .public_specs import (ClusteringSpec, DistancesSpec, HistSpec, MaxSquareSpec, NormSpec, PerpSpec, PseudoSpec, StatsSpec,
                           TermsSpec, WeightedStatsSpec)
from .metric_specs import ConfusionSpec, IouSpec, MasrSpec, MeanIouSpec, RegularizerSpec
from .raw_specs import RawHist, RawMaxSquare, RawMaxSquareBackward, RawPseudo, RawStats, RawStatsBackward, RawTerms, RawTermsBackward
from .kinds import kinds
from .checking import check_case
from . import __doc__ as FUZZ_DOC  # the package docstring (the contract), as the CLI's description


# =============================================================================================
# Child side. Everything here runs in the child (torch and hypothesis imported lazily so the
# parent stays light); _child_setup hands them to every module of the package that uses them.
# =============================================================================================

torch = None  # set by _child_setup
lsr_fast = None
reference = None
st = None


def _child_setup():
    global torch, lsr_fast, reference, st
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = MEMORY_LIMIT if hard == resource.RLIM_INFINITY else min(MEMORY_LIMIT, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    _torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    import lsr_fast as _lsr_fast
    from hypothesis import strategies as _st
    from lsr_fast import reference as _reference

    torch, lsr_fast, reference = _torch, _lsr_fast, _reference
    st = _Strategies()
    from . import checking, kinds as kinds_module, metric_specs, public_specs, raw_specs, spec_base, values

    for module in (values, spec_base, public_specs, metric_specs, raw_specs, kinds_module, checking):
        for name, value in (("torch", torch), ("lsr_fast", lsr_fast), ("reference", reference), ("st", st)):
            if hasattr(module, name):
                setattr(module, name, value)


# =============================================================================================
# Units (target x kind), hypothesis, the child's main loop.
# =============================================================================================


class Case:
    def __init__(self, spec, kind, backend, p, device="cpu"):
        self.spec, self.kind, self.backend, self.p, self.device = spec, kind, backend, p, device

    def __repr__(self):
        p = {k: (str(v).replace("torch.", "") if not isinstance(v, (int, float, str, list, type(None))) else v) for k, v in self.p.items()}
        where = "" if self.device == "cpu" else f" | on {self.device}"
        return f"{self.spec.target(self.backend)} | {self.kind.name}" + ("" if self.kind.checks else " [checks off]") + where + f" | params={p}"


@dataclass
class Unit:
    name: str
    spec: Spec
    kind: Kind
    backend: str
    small: bool
    device: str = "cpu"


def public_specs():
    return [HistSpec(), PseudoSpec(), StatsSpec(), WeightedStatsSpec(), ClusteringSpec(), NormSpec(), MaxSquareSpec(), TermsSpec()]


def units_for(group: str) -> List[Unit]:
    if group == "raw":
        pairs = [(s, "cpp") for s in (RawHist(), RawPseudo(), RawStats(), RawStatsBackward(), RawTerms(), RawTermsBackward(),
                                       RawMaxSquare(), RawMaxSquareBackward())]
    elif group == "public-reference":
        pairs = [(s, "reference") for s in public_specs() + [PerpSpec(), DistancesSpec(), ConfusionSpec(), IouSpec(), MeanIouSpec(),
                                                             MasrSpec(), RegularizerSpec()]]
    elif group == "public-cpp":
        pairs = [(s, "cpp") for s in public_specs() + [RegularizerSpec()]]
    elif group == "public-cuda":
        pairs = [(s, "cuda") for s in public_specs() + [RegularizerSpec()]]
    else:
        pairs = [(s, "triton") for s in public_specs() + [RegularizerSpec()]]
    # Triton takes CUDA tensors when there is a GPU (CPU tensors only in its interpreter).
    device = "cuda" if group == "public-cuda" or (group == "public-triton" and torch.cuda.is_available()) else "cpu"
    small = group == "public-triton" and device == "cpu"
    units = []
    for spec, backend in pairs:
        for kind in kinds(spec, "public-triton" if small else ("public-cuda" if group == "public-triton" else group)):
            units.append(Unit(f"{spec.target(backend)} | {kind.name}" + ("" if kind.checks else " [checks off]"), spec, kind, backend,
                              small, device))
    return units


def _draw_case(draw, unit):
    return Case(unit.spec, unit.kind, unit.backend, unit.spec.params(draw, dict(unit.kind.overrides), unit.small), unit.device)


def unit_strategy(unit: Unit):
    global _CASES
    if _CASES is None:
        _CASES = _st().composite(_draw_case)
    return _CASES(unit)


_CASES = None


def usable(backend) -> str:
    state = lsr_fast.available_backends().get(backend, "unknown backend")
    return "" if state == "available" else state


def child_main(args):
    _child_setup()
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    profile = profile_name()
    per_unit = EXAMPLES[args.group] * (LONG_FACTOR if profile == "long" else 1)
    health = list(HealthCheck)
    base = dict(deadline=None, database=None, print_blob=True, suppress_health_check=health)
    if profile == "ci":
        base.update(derandomize=True, phases=(Phase.explicit, Phase.generate))
    else:
        base.update(phases=(Phase.explicit, Phase.generate, Phase.shrink))
    progress = open(args.progress, "w") if args.progress else None
    report = open(args.report, "a") if args.report else None
    counter = [0]

    def note_progress(index, unit, case):
        counter[0] += 1
        if progress is not None:
            progress.seek(0)
            progress.write(json.dumps(dict(index=index, unit=unit.name, case=repr(case), n=counter[0])))
            progress.truncate()
            progress.flush()

    def record(entry):
        if report is not None:
            report.write(json.dumps(entry) + "\n")
            report.flush()
        else:
            print(entry.get("text", entry), flush=True)

    units = units_for(args.group)
    failures, ran = 0, 0
    skipped = {}
    warmed = set()
    slowest = []
    for index, unit in enumerate(units):
        if index < args.start or (args.unit and unit.name != args.unit):
            continue
        reason = usable(unit.backend) if unit.backend in ("cpp", "triton", "cuda") else ""
        if not reason and unit.spec.api == "raw":
            reason = usable("cpp")
        if reason:
            skipped[unit.backend] = reason
            continue
        if unit.backend == "triton" and "triton" not in warmed:  # the interpreter's first call costs seconds
            warmed.add("triton")
            note_progress(index, unit, "(warming up the Triton interpreter)")
            lsr_fast.hist_downsample(torch.zeros(1, 2, 2, dtype=torch.int64, device=unit.device), 1, 2, backend="triton")
        ran += 1
        examples = max(1, per_unit * unit.kind.factor)

        def make_prop(index, unit):
            def prop(case):
                note_progress(index, unit, case)
                check_case(case)

            return prop

        prop = make_prop(index, unit)
        unit_began = time.perf_counter()
        test = settings(max_examples=examples, **base)(given(case=unit_strategy(unit))(prop))
        if args.seed is not None:
            test = hypothesis_seed(args.seed)(test)
        if args.blob and args.unit:
            from hypothesis import __version__ as hypothesis_version
            from hypothesis import reproduce_failure

            test = reproduce_failure(hypothesis_version, args.blob.encode())(test)
        try:
            test()
        except BaseException as error:  # noqa: BLE001 (hypothesis may raise an ExceptionGroup)
            if isinstance(error, KeyboardInterrupt):
                raise
            failures += 1
            text = "".join(traceback.format_exception_only(type(error), error)).strip()
            if not isinstance(error, CaseFailure) and not any(isinstance(e, CaseFailure) for e in getattr(error, "exceptions", ())):
                # Not a broken contract but an exception escaping the checks: show where.
                text = "ERROR IN THE FUZZER OR AN UNCAUGHT EXCEPTION:\n" + "".join(
                    traceback.format_exception(type(error), error, error.__traceback__))[-4000:]
            blob = re.search(r"@reproduce_failure\('[^']+', b'([^']+)'\)", text)
            reproduce = f"python tests/fuzz_cases.py --group {args.group} --unit '{unit.name}'" + (
                f" --seed {args.seed}" if args.seed is not None else "") + (f" --blob {blob.group(1)}" if blob else "")
            text = re.sub(r"\n *You can reproduce this test case by temporarily adding @reproduce_failure.*", "", text)
            record(dict(kind="failure", unit=unit.name, text=f"UNIT {unit.name}\n  {_indent(text, 2).strip()}\n  reproduce: {reproduce}"))
        slowest.append((time.perf_counter() - unit_began, unit.name))
        slowest.sort(reverse=True)
        del slowest[5:]
        if ran % 10 == 0:  # the parent keeps the last one of a child that dies later
            record(dict(kind="stats", units=ran, cases=counter[0], skipped=skipped, slowest=[(round(t, 2), n) for t, n in slowest]))
    record(dict(kind="stats", units=ran, cases=counter[0], skipped=skipped, slowest=[(round(t, 2), n) for t, n in slowest]))
    if progress is not None:
        progress.seek(0)
        progress.write("DONE")
        progress.truncate()
        progress.flush()
    return 1 if failures else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=FUZZ_DOC.split("\n\n")[0])
    parser.add_argument("--group", required=True, choices=GROUPS)
    parser.add_argument("--unit", default=None, help="run only the unit of this name (as a report prints it)")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (long profile)")
    parser.add_argument("--blob", default=None, help="with --unit: replay the example of a report's @reproduce_failure blob")
    parser.add_argument("--list", action="store_true", help="list the units of the group and exit")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--progress", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--report", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.list:
        _child_setup()
        for unit in units_for(args.group):
            print(unit.name)
        return 0
    if args.child:
        return child_main(args)
    passed, text, stats = run_group(args.group, only_unit=args.unit, seed=args.seed, blob=args.blob)
    print(text)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
