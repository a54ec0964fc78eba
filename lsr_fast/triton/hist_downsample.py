"""Triton kernels of hist_downsample and pseudo_label_downsample (DESIGN.md, "Semantics").

One program per BLOCK_W consecutive cells of the flattened (B, h, w) output. The program walks
its windows offset by offset (window rows up to the tallest window, then BLOCK_DX columns at a
time up to the widest), each step gathering those pixels of each of its BLOCK_W windows, and
keeps a (BLOCK_W, BLOCK_C) histogram of int32 counts (a one-hot sum; BLOCK_C = next power of
two >= C covers every class, and BLOCK_W shrinks as C grows). Windows are the adaptive-pooling
windows [floor(i*H/h), ceil((i+1)*H/h)), computed in the kernel with integer arithmetic, so
overlapping (non-dividing) windows need no special case. Labels and probabilities are read
through their strides (any memory format).

The decision is DESIGN.md's, in float32 as the reference: scores = counts (x class_weights),
n1 = max score with c1 its lowest index, n2 = max of the others (0 when C == 1); keep c1 if
n1 > 0 and n2 < float32(threshold) * n1.

pseudo_label_downsample fuses the per-pixel argmax (first on ties, compared in the input's
precision for float64) and max over the classes; the confidence test is the reference's: the
float64 window sum of the float32 maxima (exact for probabilities, so the order does not matter)
against confidence * pixel count in float64. ``confidence`` reaches the kernel as the bits of
the double, because Triton passes a Python float as float32.
"""

# No `from __future__ import annotations`: torch < 2.7's custom_op cannot read string annotations.
import struct
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import autotuned, cdiv, launch_meta, next_pow2, window_extent

# ---- launch configurations -----------------------------------------------------------------

# Candidates on a GPU: BLOCK_W output cells per program (the paper's 91 x 161 cells make
# 115-459 programs), one window column per step (BLOCK_DX = 1). Tiles above MAX_TILE
# (BLOCK_W x BLOCK_DX x BLOCK_C) are pruned, so many classes get fewer cells per program.
HIST_CONFIGS = [
    triton.Config({"BLOCK_W": bw, "BLOCK_DX": 1}, num_warps=nw) for bw in (32, 64, 128) for nw in (2, 4, 8)
]
MAX_TILE = 8192
# Under the interpreter a program costs about a millisecond whatever its width: few, wide
# programs, and a whole window row per step for hist_downsample. pseudo_label_downsample keeps
# one column per step (BLOCK_DX = 1): its kernel gathers one pixel of each window at a time.
INTERPRETER_MAX_TILE = 1 << 19


def _prune(configs, named_args, **kwargs):
    block_c = kwargs.get("BLOCK_C", named_args.get("BLOCK_C"))
    kept = [c for c in configs if c.kwargs["BLOCK_W"] * c.kwargs["BLOCK_DX"] * block_c <= MAX_TILE]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_W"])]


def _interpreter_meta(cells: int, block_c: int, max_kw: int, vector_dx: bool):
    block_dx = min(next_pow2(max_kw), 32) if vector_dx else 1
    block_w = max(1, min(next_pow2(cells), 4096, INTERPRETER_MAX_TILE // (block_c * block_dx)))
    return {"BLOCK_W": block_w, "BLOCK_DX": block_dx}


# ---- kernels -----------------------------------------------------------------------------


@triton.jit
def _cell_windows(h, w, H, W, BLOCK_W: tl.constexpr):
    """Cells [pid * BLOCK_W, ...) of the flattened (B, h, w) output and their windows."""
    cell = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    b = cell // (h * w)
    rest = cell - b * (h * w)
    i = rest // w
    j = rest - i * w
    y0 = (i * H) // h
    y1 = ((i + 1) * H + h - 1) // h
    x0 = (j * W) // w
    x1 = ((j + 1) * W + w - 1) // w
    return cell, b, y0, y1, x0, x1


@triton.jit
def _peak_ratio_decision(counts, cls, weights_ptr, C, threshold, ignore_index, HAS_WEIGHTS: tl.constexpr):
    """(BLOCK_W, BLOCK_C) int32 counts -> int64 labels (BLOCK_W,)."""
    scores = counts.to(tl.float32)
    if HAS_WEIGHTS:
        weights = tl.load(weights_ptr + cls, mask=cls < C, other=0.0)
        scores = scores * weights[None, :]
    scores = tl.where(cls[None, :] < C, scores, float("-inf"))
    n1 = tl.max(scores, axis=1)
    c1 = tl.argmax(scores, axis=1, tie_break_left=True)
    others = tl.where(cls[None, :] == c1[:, None], float("-inf"), scores)
    n2 = tl.maximum(tl.max(others, axis=1), 0.0)  # only -inf when C == 1: n2 = 0 then
    keep = (n1 > 0) & (n2 < threshold * n1)
    return tl.where(keep, c1.to(tl.int64), ignore_index + tl.zeros_like(c1).to(tl.int64))


@autotuned(HIST_CONFIGS, key=["C", "max_kh", "max_kw", "BLOCK_C"], prune=_prune)
@triton.jit
def _hist_downsample_kernel(
    labels_ptr, weights_ptr, out_ptr,
    cells, H, W, h, w, C, max_kh, max_kw,
    s_lb, s_ly, s_lx,
    threshold, ignore_index,
    HAS_WEIGHTS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_DX: tl.constexpr,
):
    cell, b, y0, y1, x0, x1 = _cell_windows(h, w, H, W, BLOCK_W)
    is_cell = cell < cells
    cls = tl.arange(0, BLOCK_C)
    offsets = tl.arange(0, BLOCK_DX)
    ignore = ignore_index + tl.zeros([BLOCK_W, BLOCK_DX], dtype=tl.int64)
    counts = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.int32)
    base = labels_ptr + b.to(tl.int64) * s_lb  # offsets inside one image fit int32
    for dy in range(0, max_kh):
        y = y0 + dy
        row_ok = is_cell & (y < y1)
        for dx in range(0, max_kw, BLOCK_DX):
            x = x0[:, None] + dx + offsets[None, :]
            inside = row_ok[:, None] & (x < x1[:, None])
            label = tl.load(base[:, None] + y[:, None] * s_ly + x * s_lx, mask=inside, other=0).to(tl.int64)
            votes = inside & (label != ignore)
            hits = (label[:, :, None] == cls[None, None, :]) & votes[:, :, None]
            counts += tl.sum(hits.to(tl.int32), axis=1)
    out = _peak_ratio_decision(counts, cls, weights_ptr, C, threshold, ignore_index, HAS_WEIGHTS)
    tl.store(out_ptr + cell, out, mask=is_cell)


@autotuned(HIST_CONFIGS, key=["C", "max_kh", "max_kw", "BLOCK_C"], prune=_prune)
@triton.jit
def _pseudo_label_kernel(
    probs_ptr, out_ptr,
    cells, H, W, h, w, C, max_kh, max_kw,
    s_pb, s_pc, s_py, s_px,
    threshold, confidence_bits, ignore_index,
    IS_FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_DX: tl.constexpr,
):
    cell, b, y0, y1, x0, x1 = _cell_windows(h, w, H, W, BLOCK_W)
    is_cell = cell < cells
    cls = tl.arange(0, BLOCK_C)
    is_class = cls < C
    counts = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.int32)
    confidence_sum = tl.zeros([BLOCK_W], dtype=tl.float64)
    base = probs_ptr + b.to(tl.int64)[:, None] * s_pb + cls[None, :] * s_pc
    for dy in range(0, max_kh):
        y = y0 + dy
        row_ok = is_cell & (y < y1)
        for dx in range(0, max_kw):  # one column per step (BLOCK_DX is 1 here)
            x = x0 + dx
            inside = row_ok & (x < x1)
            p = tl.load(base + (y * s_py + x * s_px)[:, None], mask=inside[:, None] & is_class[None, :],
                        other=float("-inf"))
            if not IS_FP64:
                p = p.to(tl.float32)  # exact for float16 / bfloat16: the same argmax
            best = tl.max(p, axis=1)
            prediction = tl.argmax(p, axis=1, tie_break_left=True)
            # A prediction equal to ignore_index (when it lies in [0, C)) does not vote.
            votes = inside & (prediction != ignore_index)
            counts += ((prediction[:, None] == cls[None, :]) & votes[:, None]).to(tl.int32)
            # float32 maxima added in float64 (exact: see reference.pseudo_label_downsample).
            confidence_sum += tl.where(inside, best.to(tl.float32).to(tl.float64), 0.0)
    out = _peak_ratio_decision(counts, cls, probs_ptr, C, threshold, ignore_index, False)
    # The same float64 expression in every backend. Adding the bits to a tensor also covers
    # Triton passing an int equal to 1 as a constant.
    confidence = (tl.zeros([BLOCK_W], dtype=tl.int64) + confidence_bits).to(tl.float64, bitcast=True)
    count = ((y1 - y0) * (x1 - x0)).to(tl.float64)
    out = tl.where(confidence_sum > confidence * count, out, ignore_index + tl.zeros([BLOCK_W], dtype=tl.int64))
    tl.store(out_ptr + cell, out, mask=is_cell)


# ---- custom ops --------------------------------------------------------------------------


@torch.library.custom_op("lsr_fast_triton::hist_downsample", mutates_args=())
def hist_downsample_op(
    labels: torch.Tensor, out_h: int, out_w: int, num_classes: int, threshold: float, ignore_index: int,
    class_weights: Optional[torch.Tensor],
) -> torch.Tensor:
    B, H, W = labels.shape
    out = torch.empty((B, out_h, out_w), dtype=torch.int64, device=labels.device)
    if out.numel() == 0:
        return out
    block_c = next_pow2(num_classes)
    has_weights = class_weights is not None
    weights = class_weights.to(device=labels.device, dtype=torch.float32).contiguous() if has_weights else out
    cells = out.numel()
    max_kw = window_extent(W, out_w)
    _hist_downsample_kernel[lambda meta: (cdiv(cells, meta["BLOCK_W"]),)](
        labels, weights, out,
        cells, H, W, out_h, out_w, num_classes, window_extent(H, out_h), max_kw,
        labels.stride(0), labels.stride(1), labels.stride(2),
        float(threshold), ignore_index,
        HAS_WEIGHTS=has_weights, BLOCK_C=block_c,
        **launch_meta(_interpreter_meta(cells, block_c, max_kw, vector_dx=True)),
    )
    return out


@hist_downsample_op.register_fake
def _(labels, out_h, out_w, num_classes, threshold, ignore_index, class_weights):
    return labels.new_empty((labels.shape[0], out_h, out_w), dtype=torch.int64)


@torch.library.custom_op("lsr_fast_triton::pseudo_label_downsample", mutates_args=())
def pseudo_label_downsample_op(
    probs: torch.Tensor, out_h: int, out_w: int, threshold: float, confidence: float, ignore_index: int
) -> torch.Tensor:
    B, C, H, W = probs.shape
    out = torch.empty((B, out_h, out_w), dtype=torch.int64, device=probs.device)
    if out.numel() == 0:
        return out
    block_c = next_pow2(C)
    cells = out.numel()
    max_kw = window_extent(W, out_w)
    _pseudo_label_kernel[lambda meta: (cdiv(cells, meta["BLOCK_W"]),)](
        probs, out,
        cells, H, W, out_h, out_w, C, window_extent(H, out_h), max_kw,
        probs.stride(0), probs.stride(1), probs.stride(2), probs.stride(3),
        float(threshold), _double_bits(confidence), ignore_index,
        IS_FP64=probs.dtype == torch.float64, BLOCK_C=block_c,
        **launch_meta(_interpreter_meta(cells, block_c, max_kw, vector_dx=False)),
    )
    return out


def _double_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@pseudo_label_downsample_op.register_fake
def _(probs, out_h, out_w, threshold, confidence, ignore_index):
    return probs.new_empty((probs.shape[0], out_h, out_w), dtype=torch.int64)
