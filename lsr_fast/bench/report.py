"""The report of a run: Markdown, a PNG chart, and the three files, never over an earlier one."""

from __future__ import annotations

import io
import json
import os
from typing import Dict, Optional

from lsr_fast._atomic import atomic_write_bytes

from .goals import _copy_gbps
from .toolkit import DESCRIPTIONS
from .workload import BACKENDS, OPS, baseline


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _num(value: Optional[float]) -> str:
    """4 significant digits, no exponent: 0.07726, 12.06, 2736."""
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}" if abs(value) >= 0.001 else f"{value:.6f}"


def render_markdown(report: dict) -> str:
    meta = report["meta"]
    v = meta["versions"]
    gpu = meta["device_type"] == "cuda"
    out = [
        f"# lsr_fast benchmarks: {meta['device']}, {meta['date']}",
        "",
        f"- Command: `{meta['command']}`",
        f"- Device: {meta['device_description']}",
        f"- Versions: Python {v['python']}, torch {v['torch']}, triton {v['triton']}, lsr_fast {v['lsr_fast']} (commit {v['commit']})",
        (f"- Copy bandwidth: {meta['copy']['gbps']:.1f} GB/s (a {meta['copy']['bytes'] // 2**21} MiB same-device copy: "
         "bytes read + written over the median time)"
         + (", measured in each part; every case is set against its own part's" if meta.get("parts") else "")),
        (f"- Timing: median of at least {meta['timing']['rounds']} timed calls (more until ~{meta['timing']['min_time']} s) after "
         f"{meta['timing']['warmup']} warm-up call(s), one run; ")
        + ("CUDA events around each call, L2 flushed before it. " if gpu else "time.perf_counter around each call. ")
        + ("Value checks on (read at once by the ops, deferred by LSRRegularizer). " if meta["value_checks"]
           else "Value checks off. ") + "Batch 1.",
        "- Peak memory: " + ("torch.cuda.max_memory_allocated above what was allocated before the call."
                             if gpu else "torch allocations live during one call (torch.profiler memory events; "
                             "kernels' std::vector scratch not included)."),
    ]
    if meta.get("parts"):
        out += [f"- Merged from {len(meta['parts'])} runs on this device and commit; speed-ups compare cases of one run:"]
        out += [f"  - `{part['file']}`: `{part['command']}` ({part['date']}, copy {part['copy']['gbps']:.1f} GB/s)"
                for part in meta["parts"]]
    out += [
        "",
        "## Goals",
        "",
        "| goal | target | measured | met |",
        "|---|---|---|---|",
    ]
    for g in report["goals"]:
        met = {True: "yes", False: f"**no**: {g['shortfall']}", None: "not measured"}[g["met"]]
        out.append(f"| {g['goal']} | {g['target']} | {g['measured']} | {met} |")
    out += ["", "## Ops", "",
            "Speed-up = reference median / this median (same op, shape, pass, dtype); for the toolkit_* ops "
            "(one step of each method of examples/, lsr_fast ops on a backend vs the same method in plain torch), "
            "plain median / this median. MB moved = a hand model of "
            "the fewest bytes the case must read and write"
            + ("; GB/s = that over the median; % copy = that over the copy bandwidth." if gpu else
               " (GB/s against the copy bandwidth is reported for GPU runs; it is in the JSON here too).")]
    for op in OPS:
        rows = [r for r in report["results"] if r["op"] == op]
        if not rows:
            continue
        columns = ["shape", "pass", "dtype", "backend", "median ms", "speed-up", "MB moved"]
        columns += ["GB/s", "% copy"] if gpu else []
        columns += ["peak MB", "note"]
        out += ["", f"### {op}", ""] + ([DESCRIPTIONS[op], ""] if op in DESCRIPTIONS else [])
        out += ["| " + " | ".join(columns) + " |",
                "|---|---|---|---|" + "---:|" * (len(columns) - 5) + "---|"]
        for r in rows:
            cells = [r["shape"], r["pass"], r["dtype"], r["backend"]]
            if r["status"] != "ok":
                out.append("| " + " | ".join(cells + [r["status"]] + [""] * (len(columns) - 6) + [r["reason"]]) + " |")
                continue
            cells += [_num(r["median_ms"]), _fmt(r["speedup"], ".2f") + ("x" if r["speedup"] else ""), _num(r["bytes"] / 1e6)]
            if gpu:
                cells += [_num(r["gbps"]), f"{100 * r['gbps'] / _copy_gbps(r, meta):.0f}%"]
            cells.append(_num(None if r["peak_bytes"] is None else r["peak_bytes"] / 1e6))
            cells.append(f"compiled in {r['compile_s']:.1f} s" if r.get("compile_s") is not None else r.get("peak_note", ""))
            out.append("| " + " | ".join(cells) + " |")
    if report["steps"] or report["step_note"]:
        out += ["", "## Training step", ""]
        if report["steps"]:
            s0 = report["steps"][0]
            out += [(f"DeepLabV2-{s0['backbone']} (width {s0['width']}, frozen BN, fp32, batch 1), source "
                     f"{s0['source'][1]}x{s0['source'][0]}, target {s0['target'][1]}x{s0['target'][0]}, SGD. "
                     f"The variants are timed in {s0['rounds']} interleaved rounds. LSR overhead = the median over the "
                     "rounds of (LSR step - two_domain step in the same round) / the source_only median: the "
                     "regulariser's cost (with the target upsampling and softmax it needs) as a share of a "
                     "source-only step."), "",
                    "| variant | median ms | vs source_only | LSR overhead | peak MB |", "|---|---:|---:|---:|---:|"]
            for s in report["steps"]:
                if s["status"] != "ok":
                    out.append(f"| {s['variant']} | {s['status']}: {s['reason']} | | | |")
                    continue
                overhead = _fmt(s["lsr_overhead_pct"], ".1f")
                out.append(f"| {s['variant']} | {_num(s['median_ms'])} | {_fmt(s['vs_source_only'], '.2f')}x | "
                           f"{overhead}{'%' if s['lsr_overhead_pct'] is not None else ''} | "
                           f"{_num(None if s['peak_bytes'] is None else s['peak_bytes'] / 1e6)} |")
        if report["step_note"]:
            out += ["", report["step_note"]]
    if report["skipped"]:
        out += ["", "## Not measured", ""] + [f"- {what}: {why}" for what, why in report["skipped"].items()]
    return "\n".join(out) + "\n"


def render_chart(report: dict) -> bytes:
    """PNG: per op, the speed-up of every backend over the reference (plain torch for the toolkit
    ops), log scale, per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    measured = [r for r in report["results"] if r.get("speedup") and r["backend"] != baseline(r["op"])]
    ops = [op for op in OPS if any(r["op"] == op for r in measured)]
    backends = [b for b in BACKENDS if any(r["backend"] == b for r in measured)]
    fig, axes = plt.subplots(max(len(ops), 1), 1, figsize=(11, 2.6 * max(len(ops), 1) + 0.6), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        rows = [r for r in measured if r["op"] == op]
        groups = list(dict.fromkeys((r["shape"], r["pass"], r["dtype"]) for r in rows))
        width = 0.8 / max(len(backends), 1)
        for i, backend in enumerate(backends):
            values = {(r["shape"], r["pass"], r["dtype"]): r["speedup"] for r in rows if r["backend"] == backend}
            xs = [g for g, key in enumerate(groups) if key in values]
            bars = ax.bar([x + (i - (len(backends) - 1) / 2) * width for x in xs], [values[groups[x]] for x in xs],
                          width=width, label=backend)
            ax.bar_label(bars, fmt="%.3g", fontsize=6)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.margins(y=0.15)  # room for the bar labels
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(["\n".join(g) for g in groups], fontsize=7)
        ax.set_ylabel(f"speed-up vs {'plain torch' if baseline(op) != 'reference' else 'reference'}")
        ax.set_title(op, fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    if not ops:
        axes[0, 0].text(0.5, 0.5, "no speed-up measured (needs the reference and another backend)", ha="center", va="center")
        axes[0, 0].set_axis_off()
    meta = report["meta"]
    fig.suptitle(f"lsr_fast: speed-up over the reference (toolkit ops: over plain torch), {meta['device']} {meta['date']} (torch {meta['versions']['torch']})",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def free_stem(out_dir: str, stem: str) -> str:
    """``stem``, or stem-2, stem-3, ... so no earlier report is overwritten."""
    candidate, n = stem, 1
    while any(os.path.exists(os.path.join(out_dir, candidate + ext)) for ext in (".json", ".md", ".png")):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def write_report(report: dict, out_dir: str) -> Dict[str, str]:
    """Write <device>-<date>.json, .md and .png into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    stem = free_stem(out_dir, f"{report['meta']['device']}-{report['meta']['date']}")
    paths = {ext: os.path.join(out_dir, stem + "." + ext) for ext in ("json", "md", "png")}
    atomic_write_bytes(paths["json"], (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(paths["md"], render_markdown(report).encode())
    atomic_write_bytes(paths["png"], render_chart(report))
    return paths
