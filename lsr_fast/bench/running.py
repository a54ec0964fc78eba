"""Running one case and describing the machine it ran on; speed-ups and step overheads."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
from typing import List

import torch

import lsr_fast

from .timing import measure, peak_memory
from .workload import Case, baseline, prepare


def device_name(device: torch.device) -> str:
    """"cpu-2core" (cores this process may use) or the GPU's name as "nvidia-h100"."""
    if device.type == "cuda":
        words = re.split(r"[\s_-]+", torch.cuda.get_device_name(device).lower())
        words = [w for w in words if w and not re.fullmatch(r"\d+gb|hbm\d*e?|pcie|sxm\d*|nvl", w)]
        return "-".join(words)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return f"cpu-{cores}core"


def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}, "
                f"CUDA {torch.version.cuda}")
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {device_name(device)[4:-4]} cores usable, torch threads {torch.get_num_threads()}"


def _versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return dict(python=platform.python_version(), torch=torch.__version__, triton=triton_version,
                lsr_fast=lsr_fast.__version__, commit=commit)


def _error_text(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def run_case(case: Case, device: torch.device, timing: dict) -> dict:
    """Time one case; a failure is recorded in the result, not raised."""
    result = {"op": case.op, "shape": case.shape, "pass": case.pass_name, "dtype": case.dtype, "backend": case.backend}
    try:
        prepared = prepare(case, device)
    except Exception as error:
        what = "torch.compile failed" if case.backend == "compile" else "setup failed"
        return dict(result, status="failed", reason=f"{what}: {_error_text(error)}")
    try:
        times = measure(prepared.fn, device, **timing)
        peak, peak_note = peak_memory(prepared.fn, device)
    except Exception as error:  # e.g. out of memory: recorded, the run goes on
        return dict(result, status="failed", reason=_error_text(error))
    median = statistics.median(times)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [median] * 3
    result.update(
        status="ok", median_ms=median, min_ms=min(times), rounds=len(times), iqr_ms=quartiles[2] - quartiles[0],
        bytes=prepared.bytes, gbps=prepared.bytes / (median * 1e-3) / 1e9,
        peak_bytes=peak, compile_s=prepared.compile_s,
    )
    if peak_note:
        result["peak_note"] = peak_note
    return result


def add_speedups(results: List[dict]) -> None:
    """speedup = baseline median / this median, for the same op, shape, pass and dtype; the
    baseline is the reference backend, or plain torch for the toolkit ops."""
    ref = {(r["op"], r["shape"], r["pass"], r["dtype"]): r["median_ms"]
           for r in results if r["backend"] == baseline(r["op"]) and r["status"] == "ok"}
    for r in results:
        base = ref.get((r["op"], r["shape"], r["pass"], r["dtype"]))
        r["speedup"] = base / r["median_ms"] if r["status"] == "ok" and base else None


def add_step_overheads(steps: List[dict]) -> None:
    """vs_source_only = median / source_only's median; LSR overhead of an lsr-* step, in percent:
    the median over the interleaved rounds of (its time - two_domain's time in the same round),
    over source_only's median."""
    ok = {s["variant"]: s for s in steps if s["status"] == "ok"}
    for s in steps:
        s["vs_source_only"] = s["lsr_overhead_pct"] = None
        if s["status"] != "ok" or "source_only" not in ok:
            continue
        base = ok["source_only"]["median_ms"]
        s["vs_source_only"] = s["median_ms"] / base
        if s["variant"].startswith("lsr-") and "two_domain" in ok:
            extra = [a - b for a, b in zip(s["times_ms"], ok["two_domain"]["times_ms"])]
            s["lsr_overhead_pct"] = 100.0 * statistics.median(extra) / base
