"""How a case is timed: CPU clocks or CUDA events, its peak memory, and the copy bandwidth every
kernel is set against."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_l2_flush: Dict[str, torch.Tensor] = {}


def timed_calls(calls: Sequence[Callable], device: torch.device) -> List[float]:
    """Milliseconds of each call, made in order. CPU: time.perf_counter around each call. CUDA: a
    pair of CUDA events around each call on the current stream, with L2 (50 MB on an H100)
    flushed before it by zeroing a 256 MB buffer outside the events, so no input is served from
    cache; one synchronisation after the last call, before the events are read."""
    if device.type != "cuda":
        times = []
        for fn in calls:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    flush = _l2_flush.get(str(device))
    if flush is None:
        flush = _l2_flush[str(device)] = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    events = []
    for fn in calls:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush.zero_()
        begin.record()
        fn()
        end.record()
        events.append((begin, end))
    torch.cuda.synchronize(device)
    return [begin.elapsed_time(end) for begin, end in events]


def measure(fn: Callable, device: torch.device, *, warmup: int, rounds: int, min_time: float,
            max_rounds: int = 200) -> List[float]:
    """Milliseconds of each timed call of ``fn`` (see :func:`timed_calls`), after ``warmup``
    untimed calls and a synchronisation (the warm-up also runs Triton's autotuning).

    Rounds: at least ``rounds``, more (up to ``max_rounds``) until about ``min_time`` seconds are
    timed, estimated from the fastest of up to three synchronised calls after the warm-up (one
    slow call on a busy machine does not cut the rounds).
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    estimate = math.inf
    for _ in range(3):
        start = time.perf_counter()
        fn()
        synchronize(device)
        estimate = min(estimate, time.perf_counter() - start)
        if estimate * rounds >= min_time:
            break
    n = max(rounds, min(max_rounds, math.ceil(min_time / max(estimate, 1e-6))))
    return timed_calls([fn] * n, device)


def measure_interleaved(fns: Dict[str, Callable], device: torch.device, *, warmup: int, rounds: int) -> Dict[str, List[float]]:
    """Milliseconds per call of each of ``fns``, timed in interleaved rounds (a, b, c, a, b, c,
    ...) so that a slow phase of a shared machine, or clock drift, hits every one alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    names = list(fns)
    times = timed_calls([fns[name] for _ in range(rounds) for name in names], device)
    return {name: times[i::len(names)] for i, name in enumerate(names)}


def peak_memory(fn: Callable, device: torch.device) -> Tuple[Optional[int], str]:
    """(bytes, "") of the memory allocated during one call of ``fn`` above what was allocated
    before it, or (None, why not).

    CUDA: torch.cuda.max_memory_allocated. CPU: the running sum of torch's allocator events
    recorded by torch.profiler(profile_memory=True) -- every tensor, also those the C++ kernels
    allocate, but not the kernels' own std::vector scratch (per-thread tables of O(C*K) or a
    few window rows; the out-of-memory test in tests/test_bench_smoke.py bounds all of it).
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, ""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            stack.extend(node.children)
    except Exception as error:  # the event tree is a private profiler API; say so, don't fail
        return None, f"CPU allocation events unavailable: {type(error).__name__}: {error}"
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak, ""


def copy_bandwidth(device: torch.device, warmup: int = 3, rounds: int = 10) -> dict:
    """GB/s of a large same-device copy (bytes read + bytes written over the median time): the
    yardstick for the achieved bandwidth of every kernel. 1 GiB on a GPU (far above L2), 256 MiB
    on the CPU."""
    size = 2**30 if device.type == "cuda" else 2**28
    if device.type == "cuda":
        size = min(size, torch.cuda.mem_get_info(device)[0] // 4)
    src = torch.ones(size // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = measure(lambda: dst.copy_(src), device, warmup=warmup, rounds=rounds, min_time=0.0)
    median = statistics.median(times)
    return dict(bytes=2 * size, median_ms=median, gbps=2 * size / (median * 1e-3) / 1e9)
