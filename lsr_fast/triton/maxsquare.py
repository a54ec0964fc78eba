"""maxsquare_loss: image-wise weighted MaxSquare (the L+ entropy term) and its backward.

Forward, two kernels. ``_maxsquare_pass_kernel``, grid (image, position split): per pixel the
argmax over the classes (first on ties) and sum_c p^2, accumulated per split into the pixel
count N_bc of each predicted class and the sum S_bc of sum_c p^2 over the pixels predicted c
(int32 / accumulation-dtype workspaces, no atomics). ``_maxsquare_finish_kernel`` (one program)
adds the splits, forms w_bc = 1 / max(N_bc^alpha * N^(1-alpha), 1) (returned: the backward
reuses it) and the loss -(1/(B*C)) sum_bc w_bc S_bc, which equals the reference's
-(1/(B*C)) sum_b sum_x w[b, argmax_x] sum_c p^2.

Backward, one kernel: d loss / d p = -2 p w[b, argmax] / (B*C) times the incoming gradient,
in the probabilities' dtype and memory format.

alpha reaches the kernels as two float32 halves (hi + lo) so float64 inputs get it to about
1e-15, with no tensor made from a host value.
"""

# No `from __future__ import annotations`: torch < 2.7's custom_op cannot read string annotations.
import struct
from typing import Tuple

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET, accumulate_dtype, autotuned, cdiv, launch_meta, map_layout, next_pow2, spatial_offsets, target_programs,
    tl_accumulate_dtype,
)

# Block sizes shape the workspace, so the forward autotunes warps only. For the paper's
# 720 x 1280 pixels and C = 19 (BLOCK_C = 32): BLOCK_P = 128, 7200 chunks per image shared by
# ~528 programs on an H100.
PASS_CONFIGS = [triton.Config({}, num_warps=nw) for nw in (2, 4, 8)]
BACKWARD_CONFIGS = [triton.Config({"BLOCK_P": bp}, num_warps=nw) for bp in (64, 128, 256) for nw in (4, 8)]
MAX_TILE = 4096
INTERPRETER_MAX_TILE = 1 << 16


def _pass_block_p(HW: int, block_c: int) -> int:
    limit = INTERPRETER_MAX_TILE if INTERPRET else MAX_TILE
    return max(1, min(next_pow2(HW), limit // block_c))


def _prune_backward(configs, named_args, **kwargs):
    block_c = kwargs.get("BLOCK_C", named_args.get("BLOCK_C"))
    kept = [c for c in configs if c.kwargs["BLOCK_P"] * block_c <= 2 * MAX_TILE]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_P"])]


@triton.jit
def _load_pixels(probs_ptr, b, s, HW, W, C, s_b, s_c, s_y, s_x, FLAT: tl.constexpr, S_UNIT: tl.constexpr,
                 ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """(BLOCK_P, BLOCK_C) probabilities of pixels s of image b in the accumulation dtype,
    -inf outside; their argmax (first on ties)."""
    cls = tl.arange(0, BLOCK_C)
    offsets = spatial_offsets(b, s, W, s_b, s_y, s_x, FLAT, S_UNIT)
    ok = (s < HW)[:, None] & (cls < C)[None, :]
    p = tl.load(probs_ptr + offsets[:, None] + cls[None, :].to(tl.int64) * s_c, mask=ok, other=float("-inf")).to(ACC)
    prediction = tl.argmax(p, axis=1, tie_break_left=True)
    return p, ok, prediction


@autotuned(PASS_CONFIGS, key=["C", "HW", "BLOCK_P", "BLOCK_C"])
@triton.jit
def _maxsquare_pass_kernel(
    probs_ptr, ws_hist_ptr, ws_sq_ptr,
    C, HW, W, s_b, s_c, s_y, s_x, chunks_per_split,
    FLAT: tl.constexpr, S_UNIT: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    cls = tl.arange(0, BLOCK_C)
    hist = tl.zeros([BLOCK_C], dtype=tl.int32)
    square_sums = tl.zeros([BLOCK_C], dtype=ACC)
    first = split * chunks_per_split
    last = tl.minimum(first + chunks_per_split, tl.cdiv(HW, BLOCK_P))
    for chunk in range(first, last):
        s = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
        p, ok, prediction = _load_pixels(probs_ptr, b, s, HW, W, C, s_b, s_c, s_y, s_x, FLAT, S_UNIT, ACC, BLOCK_C)
        squares = tl.sum(tl.where(ok, p * p, 0.0), axis=1)
        hit = (prediction[:, None] == cls[None, :]) & (s < HW)[:, None]
        hist += tl.sum(hit.to(tl.int32), axis=0)
        square_sums += tl.sum(tl.where(hit, squares[:, None], 0.0), axis=0)
    row = (b * splits + split) * C
    tl.store(ws_hist_ptr + row + cls, hist, mask=cls < C)
    tl.store(ws_sq_ptr + row + cls, square_sums, mask=cls < C)


@autotuned(PASS_CONFIGS, key=["B", "C", "splits"])
@triton.jit
def _maxsquare_finish_kernel(
    ws_hist_ptr, ws_sq_ptr, weight_ptr, loss_ptr,
    B, C, HW, splits, alpha_hi, alpha_lo,
    ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cls = tl.arange(0, BLOCK_C)
    c_ok = cls < C
    alpha = tl.cast(alpha_hi, ACC) + tl.cast(alpha_lo, ACC)
    # N^(1 - alpha), N >= 1 pixels per image.
    pixels = tl.exp((1.0 - alpha) * tl.log(tl.cast(HW, ACC)))
    total = tl.zeros([BLOCK_C], dtype=ACC)
    for b in range(0, B):
        hist = tl.zeros([BLOCK_C], dtype=tl.int32)
        square_sums = tl.zeros([BLOCK_C], dtype=ACC)
        for s0 in range(0, splits, BLOCK_S):
            rows = s0 + tl.arange(0, BLOCK_S)
            ok = (rows < splits)[:, None] & c_ok[None, :]
            at = (b * splits + rows)[:, None] * C + cls[None, :]
            hist += tl.sum(tl.load(ws_hist_ptr + at, mask=ok, other=0), axis=0)
            square_sums += tl.sum(tl.load(ws_sq_ptr + at, mask=ok, other=0.0), axis=0)
        n = hist.to(ACC)
        # N_bc^alpha with 0^0 = 1 (torch.pow) and 0^alpha = 0 otherwise.
        power = tl.where(hist > 0, tl.exp(alpha * tl.log(tl.where(hist > 0, n, 1.0))), tl.where(alpha == 0, 1.0, 0.0))
        weight = 1.0 / tl.maximum(power * pixels, 1.0)
        tl.store(weight_ptr + b * C + cls, weight, mask=c_ok)
        total += tl.where(c_ok, weight * square_sums, 0.0)
    tl.store(loss_ptr, -tl.sum(total, axis=0) / tl.cast(B * C, ACC))


@autotuned(BACKWARD_CONFIGS, key=["C", "HW", "BLOCK_C"], prune=_prune_backward)
@triton.jit
def _maxsquare_backward_kernel(
    grad_loss_ptr, probs_ptr, weight_ptr, out_ptr,
    B, C, HW, W, s_b, s_c, s_y, s_x, o_b, o_c, o_y, o_x,
    FLAT: tl.constexpr, S_UNIT: tl.constexpr, O_FLAT: tl.constexpr, O_S_UNIT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    s = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # pixel blocks on the unbounded grid axis
    b = tl.program_id(1)
    cls = tl.arange(0, BLOCK_C)
    p, ok, prediction = _load_pixels(probs_ptr, b, s, HW, W, C, s_b, s_c, s_y, s_x, FLAT, S_UNIT, ACC, BLOCK_C)
    weight = tl.load(weight_ptr + b * C + prediction, mask=s < HW, other=0.0)
    scale = tl.load(grad_loss_ptr).to(ACC) * -2.0 / tl.cast(B * C, ACC)
    grad = tl.where(ok, p, 0.0) * (weight * scale)[:, None]
    offsets = spatial_offsets(b, s, W, o_b, o_y, o_x, O_FLAT, O_S_UNIT)
    tl.store(out_ptr + offsets[:, None] + cls[None, :].to(tl.int64) * o_c, grad, mask=ok)


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _split_alpha(alpha: float) -> Tuple[float, float]:
    hi = _float32(alpha)
    return hi, _float32(alpha - hi)


@torch.library.custom_op("lsr_fast_triton::maxsquare_loss", mutates_args=())
def maxsquare_loss_op(probs: torch.Tensor, alpha: float) -> Tuple[torch.Tensor, torch.Tensor]:
    B, C, H, W = probs.shape
    HW = H * W
    acc = accumulate_dtype(probs.dtype)
    acc_tl = tl_accumulate_dtype(probs.dtype)
    loss = torch.empty((), dtype=acc, device=probs.device)
    weight = torch.empty((B, C), dtype=acc, device=probs.device)
    block_c = next_pow2(C)
    block_p = _pass_block_p(HW, block_c)
    chunks = cdiv(HW, block_p)
    splits = max(1, min(chunks, cdiv(target_programs(probs.device), B)))
    chunks_per_split = cdiv(chunks, splits)
    splits = cdiv(chunks, chunks_per_split)
    ws_hist = torch.empty((B, splits, C), dtype=torch.int32, device=probs.device)
    ws_sq = torch.empty((B, splits, C), dtype=acc, device=probs.device)
    layout = map_layout(probs)
    _maxsquare_pass_kernel[(B, splits)](
        probs, ws_hist, ws_sq,
        C, HW, layout.W, layout.s_b, layout.s_k, layout.s_y, layout.s_x, chunks_per_split,
        FLAT=layout.flat, S_UNIT=layout.s_unit, ACC=acc_tl, BLOCK_P=block_p, BLOCK_C=block_c,
    )
    alpha_hi, alpha_lo = _split_alpha(alpha)
    _maxsquare_finish_kernel[(1,)](
        ws_hist, ws_sq, weight, loss,
        B, C, HW, splits, alpha_hi, alpha_lo,
        ACC=acc_tl, BLOCK_S=min(next_pow2(splits), max(1, 4096 // block_c)), BLOCK_C=block_c,
    )
    return loss, weight


@maxsquare_loss_op.register_fake
def _(probs, alpha):
    acc = accumulate_dtype(probs.dtype)
    return probs.new_empty((), dtype=acc), probs.new_empty(probs.shape[:2], dtype=acc)


@torch.library.custom_op("lsr_fast_triton::maxsquare_loss_backward", mutates_args=())
def maxsquare_loss_backward_op(grad_loss: torch.Tensor, probs: torch.Tensor, class_weight: torch.Tensor) -> torch.Tensor:
    grad = torch.empty_like(probs)
    if grad.numel() == 0:
        return grad
    B, C, H, W = probs.shape
    block_c = next_pow2(C)
    layout, out = map_layout(probs), map_layout(grad)
    _maxsquare_backward_kernel[lambda meta: (cdiv(H * W, meta["BLOCK_P"]), B)](
        grad_loss, probs, class_weight, grad,
        B, C, H * W, layout.W, layout.s_b, layout.s_k, layout.s_y, layout.s_x, out.s_b, out.s_k, out.s_y, out.s_x,
        FLAT=layout.flat, S_UNIT=layout.s_unit, O_FLAT=out.flat, O_S_UNIT=out.s_unit,
        ACC=tl_accumulate_dtype(probs.dtype), BLOCK_C=block_c,
        **launch_meta({"BLOCK_P": _pass_block_p(H * W, block_c)}),
    )
    return grad


@maxsquare_loss_backward_op.register_fake
def _(grad_loss, probs, class_weight):
    return torch.empty_like(probs)


def _setup(ctx, inputs, output):
    probs, _ = inputs
    ctx.save_for_backward(probs, output[1])


def _backward(ctx, grad_loss, grad_class_weight):
    probs, class_weight = ctx.saved_tensors
    if grad_loss is None:
        return None, None
    return maxsquare_loss_backward_op(grad_loss, probs, class_weight), None


maxsquare_loss_op.register_autograd(_backward, setup_context=_setup)
