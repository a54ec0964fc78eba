"""Parent side: run one group in watched child processes and collect a readable report."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Tuple

from .config import CASE_LIMIT_S, ENTRY, GPU_SLACK, GROUPS, GROUP_LIMIT_S, HERE, MAX_RESTARTS, ROOT


# =============================================================================================
# Parent side: run one group in watched child processes, collect a readable report.
# =============================================================================================


def profile_name() -> str:
    name = os.environ.get("LSR_FAST_HYPOTHESIS_PROFILE", "ci")
    if name not in ("ci", "long"):
        raise ValueError(f"LSR_FAST_HYPOTHESIS_PROFILE must be 'ci' or 'long', got {name!r}")
    return name


def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def run_group(group: str, only_unit: Optional[str] = None, seed: Optional[int] = None, blob: Optional[str] = None) -> Tuple[bool, str, dict]:
    """Run ``group`` in child processes; returns (passed, report text, stats).

    A child that dies (signal, abort) or whose case runs past CASE_LIMIT_S is reported with the
    case it was running, and a new child continues with the next unit.
    """
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    profile = profile_name()
    if seed is None and profile == "long":
        seed = int(os.environ.get("LSR_FAST_FUZZ_SEED", random.randrange(2**32)))
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONFAULTHANDLER="1", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if group == "public-cuda" and not _cuda_visible():  # no child needed to find that out
        return True, "fuzz group public-cuda: skipped (no CUDA device)", dict(
            group=group, profile=profile, seed=seed, seconds=0.0, units=0, cases=0, failures=0, restarts=0,
            slowest=[], skipped={"cuda": "no CUDA device is visible to torch"})
    case_limit = CASE_LIMIT_S * (GPU_SLACK if group in ("public-cuda", "public-triton") and _cuda_visible() else 1)
    failures: List[str] = []
    slowest, skipped = [], {}
    start, restarts, units_run, cases_run = 0, 0, 0, 0
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lsr-fuzz-") as tmp:
        while True:
            progress, report = os.path.join(tmp, f"progress{restarts}"), os.path.join(tmp, f"report{restarts}")
            output = os.path.join(tmp, f"output{restarts}")
            command = [sys.executable, ENTRY, "--child", "--group", group, "--start", str(start),
                       "--progress", progress, "--report", report]
            if only_unit:
                command += ["--unit", only_unit] + (["--blob", blob] if blob else [])
            if seed is not None:
                command += ["--seed", str(seed)]
            with open(output, "w") as out:
                child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
                last, changed, why = None, time.monotonic(), ""
                while child.poll() is None:
                    time.sleep(0.05)
                    now, state = time.monotonic(), _read(progress)
                    if state != last:
                        last, changed = state, now
                    elif now - changed > case_limit and state:
                        why = f"the case ran for more than {case_limit:.0f} s (killed)"
                    if now - began > GROUP_LIMIT_S[profile]:
                        why = f"the group ran for more than {GROUP_LIMIT_S[profile]:.0f} s (killed)"
                    if why:  # SIGABRT first: faulthandler (PYTHONFAULTHANDLER=1) prints where it was stuck
                        child.send_signal(signal.SIGABRT)
                        try:
                            child.wait(timeout=3)
                        except subprocess.TimeoutExpired:
                            child.kill()
                            child.wait()
                        break
            last_stats = None
            for line in _read(report).splitlines():
                entry = json.loads(line)
                if entry.get("kind") == "failure":
                    failures.append(entry["text"])
                elif entry.get("kind") == "stats":
                    last_stats = entry  # cumulative within a child
            if last_stats:
                units_run += last_stats["units"]
                cases_run += last_stats["cases"]
                slowest = sorted(slowest + [tuple(x) for x in last_stats.get("slowest", [])], reverse=True)[:5]
                skipped.update(last_stats.get("skipped", {}))
            state = _read(progress)
            finished = state.startswith("DONE")
            if child.returncode in (0, 1) and finished:
                break
            # Died or killed in the middle of a unit: report it with the case it was running.
            try:
                current = json.loads(state) if state and not finished else {}
            except json.JSONDecodeError:
                current = {}
            code = child.returncode
            if code is not None and code < 0:
                how = f"killed by signal {signal.Signals(-code).name}"
            else:
                how = f"exited with status {code}"
            tail = _stack_or_tail(_read(output))
            failures.append(
                f"UNIT {current.get('unit', '?')}\n  the child process {why or how} while running:\n"
                f"  {current.get('case', '(no case recorded)')}\n"
                f"  reproduce: python tests/fuzz_cases.py --group {group} --unit '{current.get('unit', '')}'"
                + (f" --seed {seed}" if seed is not None else "")
                + f"\n  last output of the child:\n{_indent(tail, 4)}"
            )
            if "index" not in current or restarts >= MAX_RESTARTS or why.startswith("the group"):
                failures.append(f"(stopped: {restarts} restarts; units after {current.get('unit', '?')} did not run)")
                break
            start = current["index"] + 1
            restarts += 1
    elapsed = time.monotonic() - began
    stats = dict(group=group, profile=profile, seed=seed, seconds=round(elapsed, 1), units=units_run, cases=cases_run,
                 failures=len(failures), restarts=restarts)
    header = (f"fuzz group {group}: {len(failures)} failing unit(s); {units_run} units, {cases_run} cases in "
              f"{elapsed:.1f} s (profile {profile}" + (f", seed {seed}" if seed is not None else "") + f", {restarts} restarts)")
    header += "\n  slowest units: " + "; ".join(f"{n} {t:.2f} s" for t, n in slowest)
    if skipped:
        header += "\n  skipped backends: " + "; ".join(f"{b}: {why}" for b, why in skipped.items())
    stats.update(slowest=slowest, skipped=skipped)
    return not failures, "\n\n".join([header] + failures), stats


def _cuda_visible() -> bool:
    try:
        import torch as _torch

        return _torch.cuda.is_available()
    except ImportError:
        return False


def _stack_or_tail(output: str) -> str:
    """The innermost frames of a faulthandler dump in a child's output, else its last lines."""
    at = output.rfind("(most recent call first)")
    if at >= 0:
        head = output.rfind("\n", 0, output.rfind("\n", 0, at) + 1)
        lines = output[head + 1:].splitlines()
        frames = [line for line in lines[1:] if line.strip().startswith("File ")]
        return "\n".join(lines[:1] + frames[:14] + ([f"  ... {len(frames) - 14} more frames"] if len(frames) > 14 else []))
    return output[-2500:]


def _indent(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line for line in text.splitlines())
