"""Merging the reports of a run split into parts (a GPU lent for calls of at most a few minutes)."""

from __future__ import annotations

import argparse
import json
from typing import Dict, Sequence, Tuple

from .goals import _copy_gbps, evaluate_goals
from .report import write_report


CASE_KEY = ("op", "shape", "pass", "dtype", "backend")
SAME_IN_EVERY_PART = ("device", "device_type", "versions", "value_checks")


def merge_reports(parts: Sequence[Tuple[str, dict]]) -> dict:
    """One report from ``[(file name, report), ...]`` of runs on one device and commit.

    Cases and training steps are taken as measured (speed-ups stay within their own run, so split
    a run by shape or op, not by backend); each case keeps the copy bandwidth of its own run. A
    case one part did not run (its time budget was spent) is taken from the part that ran it. A
    case measured in two parts, steps in two parts, or parts of different devices, versions or
    commits are errors naming the files.
    """
    if len(parts) < 2:
        raise ValueError(f"--merge needs at least two reports, got {len(parts)}")
    first_name, first = parts[0]
    measured: Dict[tuple, Tuple[str, dict]] = {}  # case -> (part it came from, result)
    not_run: Dict[tuple, dict] = {}
    steps, skipped, step_notes, part_meta = [], {}, [], []
    steps_from = None
    for name, report in parts:
        for key in ("meta", "results", "steps", "step_note", "skipped"):
            if key not in report:
                raise ValueError(f"{name}: not an lsr-fast bench report (no {key!r})")
        meta = report["meta"]
        for key in SAME_IN_EVERY_PART:
            if meta.get(key) != first["meta"].get(key):
                raise ValueError(f"{name}: {key} {meta.get(key)!r} differs from {first_name}'s {first['meta'].get(key)!r}; "
                                 "only runs on one device with one build can be merged")
        for r in report["results"]:
            key = tuple(r[k] for k in CASE_KEY)
            if r["status"] == "not run":
                not_run.setdefault(key, r)
                continue
            if key in measured:
                raise ValueError(f"{name}: case {'-'.join(key)} was also measured in {measured[key][0]}; merge parts "
                                 "that split the cases (by --shapes or --ops)")
            measured[key] = (name, dict(r, copy_gbps=_copy_gbps(r, meta)))
        if report["steps"]:
            if steps_from is not None:
                raise ValueError(f"{name}: training steps were also measured in {steps_from}; keep them in one part")
            steps, steps_from = report["steps"], name
        if report["step_note"]:
            step_notes.append(report["step_note"])
        for what, why in report["skipped"].items():
            if skipped.get(what, why) != why:
                raise ValueError(f"{name}: {what} is left out for {why!r} but for {skipped[what]!r} in an earlier part")
            skipped[what] = why
        part_meta.append(dict(file=name, command=meta["command"], date=meta["date"], copy=meta["copy"], timing=meta["timing"]))
    meta = dict(first["meta"], date=max(p["date"] for p in part_meta), parts=part_meta,
                command="lsr-fast bench --merge " + " ".join(p["file"] for p in part_meta))
    results = [r for _, r in measured.values()] + [r for key, r in not_run.items() if key not in measured]
    merged = dict(meta=meta, results=results, steps=steps, step_note=" ".join(step_notes) if not steps else "", skipped=skipped)
    merged["goals"] = evaluate_goals(merged)
    return merged


# The options of `lsr-fast bench` that --merge refuses: it measures nothing.
MEASURING = ("quick", "device", "ops", "backends", "shapes", "passes", "dtypes", "step_size", "rounds", "warmup",
             "min_time", "step_rounds", "time_budget", "value_checks")


def _run_merge(args: argparse.Namespace) -> int:
    given = [name for name in MEASURING if getattr(args, name, None) not in (None, False, "auto")]
    if given:
        raise SystemExit("lsr-fast bench: --merge measures nothing, so it takes no "
                         + ", ".join("--" + name.replace("_", "-") for name in given))
    parts = []
    for path in args.merge:
        try:
            with open(path) as f:
                parts.append((path, json.load(f)))
        except (OSError, ValueError) as error:
            raise SystemExit(f"lsr-fast bench --merge: cannot read {path}: {error}") from None
    try:
        report = merge_reports(parts)
    except ValueError as error:
        raise SystemExit(f"lsr-fast bench --merge: {error}") from None
    for path in write_report(report, args.out).values():
        print(f"wrote {path}")
    return 0
