"""feature_terms: everything LSR needs from one feature map in one pass, and its backward.

Forward (feature_pass.py): sums (C, K), counts (C,), per-class sums of ||f - p_c||^2 (C,), the
sum over every vector of |r - ||f||| (source) or max(0, r - ||f||) (target), the sum of ||f||;
the op also returns the per-vector norms ||f|| (N,), which the backward pass reuses instead of
reducing over K again (the public function drops them; they are differentiable too).

Backward, one kernel over (position, channel) tiles: a vector f labelled c gets
grad_sums[c] + 2 grad_sq[c] (f - p_c); every vector gets
(grad_norm_loss * dterm/d||f|| + grad_norm_sum + grad_norms[n]) * f / ||f|| with g = r - ||f||:
source dterm/d||f|| = -sign(g); target -1 where g >= 0 (autograd's clamp(min=0) passes the
gradient at 0, as the C++ kernels do) else 0; f / ||f|| = 0 at ||f|| = 0.
"""

# No `from __future__ import annotations`: torch < 2.7's custom_op cannot read string annotations.
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import accumulate_dtype, autotuned, channel_offsets, launch_meta, map_layout, spatial_offsets
from .class_feature_stats import GATHER_CONFIGS, gather_grid, gather_interpreter_meta, gather_tile
from .feature_pass import feature_pass

NORM_MODES = {"source": 0, "target": 1}


@autotuned(GATHER_CONFIGS, key=["N", "K", "S"])
@triton.jit
def _feature_terms_backward_kernel(
    grad_sums_ptr, grad_sq_ptr, grad_norm_loss_ptr, grad_norm_sum_ptr,
    f_ptr, labels_ptr, proto_ptr, ref_ptr, norms_ptr, grad_norms_ptr, out_ptr,
    N, K, C, S, W, s_b, s_k, s_y, s_x, o_b, o_k, o_y, o_x, norm_mode, ignore_index,
    FLAT: tl.constexpr, S_UNIT: tl.constexpr, K_UNIT: tl.constexpr,
    O_FLAT: tl.constexpr, O_S_UNIT: tl.constexpr, O_K_UNIT: tl.constexpr,
    HAS_GRAD_NORMS: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b, s, k = gather_tile(S, BLOCK_N, BLOCK_K)
    n_ok = s < S
    n = b * S + s
    k_ok = k < K
    tile_ok = n_ok[:, None] & k_ok[None, :]
    label = tl.load(labels_ptr + n, mask=n_ok, other=0).to(tl.int64)
    labelled = n_ok & (label != ignore_index) & (label >= 0) & (label < C)
    class_ok = labelled[:, None] & k_ok[None, :]
    f = tl.load(f_ptr + spatial_offsets(b, s, W, s_b, s_y, s_x, FLAT, S_UNIT)[:, None] + channel_offsets(k, s_k, K_UNIT)[None, :],
                mask=tile_ok, other=0.0).to(ACC)
    p = tl.load(proto_ptr + label[:, None] * K + k[None, :], mask=class_ok, other=0.0)
    g_sums = tl.load(grad_sums_ptr + label[:, None] * K + k[None, :], mask=class_ok, other=0.0)
    g_sq = tl.load(grad_sq_ptr + label, mask=labelled, other=0.0)
    grad = tl.where(class_ok, g_sums + 2.0 * g_sq[:, None] * (f - p), 0.0)

    norm = tl.load(norms_ptr + n, mask=n_ok, other=0.0)
    gap = tl.load(ref_ptr) - norm
    source = tl.where(gap > 0, -1.0, tl.where(gap < 0, 1.0, 0.0))
    target = tl.where(gap >= 0, -1.0, 0.0)
    d_term = tl.where(norm_mode == 0, source, target).to(ACC)
    coef = tl.load(grad_norm_loss_ptr) * d_term + tl.load(grad_norm_sum_ptr)
    if HAS_GRAD_NORMS:  # the per-vector norms output, when something used it
        coef += tl.load(grad_norms_ptr + n, mask=n_ok, other=0.0)
    scale = tl.where(norm > 0, coef / tl.where(norm > 0, norm, 1.0), 0.0)
    grad += scale[:, None] * f
    out = out_ptr + spatial_offsets(b, s, W, o_b, o_y, o_x, O_FLAT, O_S_UNIT)[:, None] + channel_offsets(k, o_k, O_K_UNIT)[None, :]
    tl.store(out, grad, mask=tile_ok)


@torch.library.custom_op("lsr_fast_triton::feature_terms", mutates_args=())
def feature_terms_op(
    features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, reference: torch.Tensor,
    norm_mode: int, ignore_index: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return feature_pass(features, labels, prototypes.shape[0], ignore_index, prototypes, reference, norm_mode)


@feature_terms_op.register_fake
def _(features, labels, prototypes, reference, norm_mode, ignore_index):
    acc = accumulate_dtype(features.dtype)
    C, K = prototypes.shape[0], features.shape[1]
    N = features.shape[0] if features.dim() == 2 else features.shape[0] * features.shape[2] * features.shape[3]
    return (
        features.new_empty((C, K), dtype=acc),
        features.new_empty((C,), dtype=torch.int64),
        features.new_empty((C,), dtype=acc),
        features.new_empty((), dtype=acc),
        features.new_empty((), dtype=acc),
        features.new_empty((N,), dtype=acc),
    )


@torch.library.custom_op("lsr_fast_triton::feature_terms_backward", mutates_args=())
def feature_terms_backward_op(
    grad_sums: torch.Tensor, grad_sq: torch.Tensor, grad_norm_loss: torch.Tensor, grad_norm_sum: torch.Tensor,
    features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, reference: torch.Tensor,
    norms: torch.Tensor, grad_norms: Optional[torch.Tensor], norm_mode: int, ignore_index: int,
) -> torch.Tensor:
    grad = torch.empty_like(features)
    if grad.numel() == 0:
        return grad
    layout = map_layout(features)
    out = map_layout(grad)  # the features' strides when they are dense
    acc = accumulate_dtype(features.dtype)
    C = prototypes.shape[0]
    dummy = torch.zeros((1,), dtype=acc, device=features.device)
    protos, g_sums, g_sq = (t.contiguous() if t.numel() else dummy for t in (prototypes, grad_sums, grad_sq))
    _feature_terms_backward_kernel[gather_grid(layout)](
        g_sums, g_sq, grad_norm_loss, grad_norm_sum,
        features, labels.reshape(-1).contiguous(), protos, reference, norms,
        grad_norms.contiguous() if grad_norms is not None else norms, grad,
        layout.N, layout.K, C, *layout.args(), out.s_b, out.s_k, out.s_y, out.s_x, norm_mode, ignore_index,
        **layout.constants(), **out.constants("O_"), HAS_GRAD_NORMS=grad_norms is not None,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        **launch_meta(gather_interpreter_meta(layout)),
    )
    return grad


@feature_terms_backward_op.register_fake
def _(grad_sums, grad_sq, grad_norm_loss, grad_norm_sum, features, labels, prototypes, reference, norms, grad_norms,
      norm_mode, ignore_index):
    return torch.empty_like(features)


def _setup(ctx, inputs, output):
    features, labels, prototypes, reference, norm_mode, ignore_index = inputs
    ctx.save_for_backward(features, labels, prototypes, reference, output[5])
    ctx.norm_mode, ctx.ignore_index = norm_mode, ignore_index


def _backward(ctx, grad_sums, grad_counts, grad_sq, grad_norm_loss, grad_norm_sum, grad_norms):
    features, labels, prototypes, reference, norms = ctx.saved_tensors
    acc = accumulate_dtype(features.dtype)
    C, K = prototypes.shape[0], features.shape[1]
    # Outputs that did not reach the loss get no gradient; the kernel wants zeros instead.
    if grad_sums is None:
        grad_sums = features.new_zeros((C, K), dtype=acc)
    if grad_sq is None:
        grad_sq = features.new_zeros((C,), dtype=acc)
    if grad_norm_loss is None:
        grad_norm_loss = features.new_zeros((), dtype=acc)
    if grad_norm_sum is None:
        grad_norm_sum = features.new_zeros((), dtype=acc)
    grad = feature_terms_backward_op(
        grad_sums, grad_sq, grad_norm_loss, grad_norm_sum, features, labels, prototypes, reference, norms,
        grad_norms, ctx.norm_mode, ctx.ignore_index,
    )
    return grad, None, None, None, None, None


feature_terms_op.register_autograd(_backward, setup_context=_setup)
