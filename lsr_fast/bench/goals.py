"""The issue's goals, judged on a report: CPU speed-ups; GPU bandwidth, torch.compile and
training-step overhead."""

from __future__ import annotations

from typing import Callable, List, Tuple

from .workload import OPS, PAPER_SHAPES, TOOLKIT_OPS


CPU_GOALS = (  # (op, pass, the cpp backend's minimum speed-up over the reference)
    ("hist_downsample", "fwd", 10.0),
    ("pseudo_label_downsample", "fwd", 5.0),
    ("class_feature_stats", "fwd+bwd", 2.0),
    ("losses", "fwd+bwd", 3.0),
)
GPU_BANDWIDTH_GOAL = 0.70  # fraction of the measured copy bandwidth, every GPU kernel
GPU_COMPILE_GOAL = 1.5  # fused losses vs torch.compile(reference)
GPU_STEP_GOAL_PCT = 2.0  # LSR overhead, percent of a source-only step


def _copy_gbps(r: dict, meta: dict) -> float:
    """The copy bandwidth measured in the run that timed ``r`` (merged reports hold several)."""
    return r.get("copy_gbps") or meta["copy"]["gbps"]


def _where(r: dict) -> str:
    return f"{r['shape']} {r['pass']} {r['dtype']}"


def _goal(goal: str, target: str, values: List[Tuple[float, str]], met: Callable[[float], bool],
          show: Callable[[float], str], miss: Callable[[float], str], lower_is_better: bool = False) -> dict:
    """One goal row from its measured (value, where) pairs; the worst value decides."""
    if not values:
        return dict(goal=goal, target=target, measured="not measured in this run", met=None, shortfall="")
    worst, where = max(values) if lower_is_better else min(values)
    if len(values) <= 3:
        measured = ", ".join(f"{show(v)} ({w})" for v, w in values)
    else:
        measured = f"worst {show(worst)} ({where}) of {len(values)} cases"
    return dict(goal=goal, target=target, measured=measured, met=met(worst),
                shortfall="" if met(worst) else f"{miss(worst)} ({where})")


def evaluate_goals(report: dict) -> List[dict]:
    """The issue's goals for this run's device, each judged on its worst case over the paper
    shapes (all three), dtypes and passes, with by how much it is missed."""
    ok = [r for r in report["results"] if r["status"] == "ok" and r["shape"] in PAPER_SHAPES]
    if report["meta"]["device_type"] == "cpu":
        goals = []
        for op, pass_name, target in CPU_GOALS:
            values = [(r["speedup"], r["shape"]) for r in ok
                      if r["op"] == op and r["pass"] == pass_name and r["backend"] == "cpp" and r["speedup"]]
            goals.append(_goal(
                f"cpp vs reference, {op} {pass_name}", f">= {target:g}x", values,
                met=lambda v, t=target: v >= t, show=lambda v: f"{v:.1f}x",
                miss=lambda v, t=target: f"{v:.1f}x is {100 * (1 - v / t):.0f}% short of {t:g}x"))
        return goals

    goals = []
    meta = report["meta"]
    copy = "measured per part" if meta.get("parts") else f"{meta['copy']['gbps']:.0f} GB/s"
    for backend in ("cuda", "triton"):
        for op in (op for op in OPS if op not in TOOLKIT_OPS):  # the toolkit ops are GEMMs and torch ops, no kernel of ours
            values = [(r["gbps"] / _copy_gbps(r, meta), _where(r)) for r in ok if r["op"] == op and r["backend"] == backend]
            goals.append(_goal(
                f"{backend} {op}: share of copy bandwidth ({copy})", f">= {100 * GPU_BANDWIDTH_GOAL:.0f}%",
                values, met=lambda v: v >= GPU_BANDWIDTH_GOAL, show=lambda v: f"{100 * v:.0f}%",
                miss=lambda v: f"{100 * (GPU_BANDWIDTH_GOAL - v):.0f} points short"))
    compiled = {(r["shape"], r["pass"], r["dtype"]): r["median_ms"]
                for r in ok if r["op"] == "losses" and r["backend"] == "compile"}
    for backend in ("cuda", "triton"):
        values = [(compiled[(r["shape"], r["pass"], r["dtype"])] / r["median_ms"], _where(r)) for r in ok
                  if r["op"] == "losses" and r["backend"] == backend and (r["shape"], r["pass"], r["dtype"]) in compiled]
        goals.append(_goal(
            f"{backend} losses vs torch.compile(reference)", f">= {GPU_COMPILE_GOAL:g}x", values,
            met=lambda v: v >= GPU_COMPILE_GOAL, show=lambda v: f"{v:.2f}x",
            miss=lambda v: f"{v:.2f}x is {100 * (1 - v / GPU_COMPILE_GOAL):.0f}% short of {GPU_COMPILE_GOAL:g}x"))
    for backend in ("cuda", "triton"):
        values = [(s["lsr_overhead_pct"], f"{s['size']} step") for s in report["steps"]
                  if s["variant"] == f"lsr-{backend}" and s.get("lsr_overhead_pct") is not None]
        goals.append(_goal(
            f"LSR overhead in a training step ({backend})", f"<= {GPU_STEP_GOAL_PCT:g}% of source_only", values,
            met=lambda v: v <= GPU_STEP_GOAL_PCT, show=lambda v: f"{v:.1f}%",
            miss=lambda v: f"{v - GPU_STEP_GOAL_PCT:.1f} points over", lower_is_better=True))
    return goals
