"""feature_terms: everything LSR needs from one feature map in one pass, and its backward.

Forward (feature_pass.py): sums (C, K), counts (C,), per-class distance sums (C,): of
||f - p_c||^2 (``distance`` 0) or sum_k |f_k - p_ck| (``distance`` 1), the sum over every vector
of |r - ||f||| (source) or max(0, r - ||f||) (target), the sum of ||f||; the op also returns the
per-vector norms ||f|| (N,), which the backward pass reuses instead of reducing over K again
(the public function drops them; they are differentiable too). With ``filtered`` the norm term
uses ||f~||, f~_k = f_k where f_k >= m (the vector's mean channel value, see feature_pass.py),
and a 7th output, filter_stats (2, N) = (||f~||, m) per vector, carries them to the backward
pass (not differentiable; (2, 0) unfiltered). norm_sum and norms stay unfiltered.

Backward, one kernel over (position, channel) tiles: a vector f labelled c gets
grad_sums[c] + grad_dist[c] * D(f - p_c), D(x) = 2x (squared_l2) or sign(x) (l1, sign(0) = 0);
every vector gets (grad_norm_loss * dterm/d||f|| + grad_norm_sum + grad_norms[n]) * f / ||f||
with g = r - ||f||: source dterm/d||f|| = -sign(g); target -1 where g >= 0 (autograd's
clamp(min=0) passes the gradient at 0, as the C++ kernels do) else 0; f / ||f|| = 0 at
||f|| = 0. Filtered: grad_norm_loss * dterm/d||f~|| * f~ / ||f~|| (g = r - ||f~||; nothing through
m, nothing to the dropped channels, 0 at ||f~|| = 0) plus (grad_norm_sum + grad_norms[n]) * f / ||f||.
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
    f_ptr, labels_ptr, proto_ptr, ref_ptr, norms_ptr, grad_norms_ptr, filter_stats_ptr, out_ptr,
    N, K, C, S, W, s_b, s_k, s_y, s_x, o_b, o_k, o_y, o_x, norm_mode, ignore_index,
    FLAT: tl.constexpr, S_UNIT: tl.constexpr, K_UNIT: tl.constexpr,
    O_FLAT: tl.constexpr, O_S_UNIT: tl.constexpr, O_K_UNIT: tl.constexpr,
    HAS_GRAD_NORMS: tl.constexpr, DISTANCE: tl.constexpr, FILTERED: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
    if DISTANCE == 0:
        grad = tl.where(class_ok, g_sums + 2.0 * g_sq[:, None] * (f - p), 0.0)
    else:  # sign(f - p), 0 at equality
        d = f - p
        sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)).to(ACC)
        grad = tl.where(class_ok, g_sums + g_sq[:, None] * sign, 0.0)

    norm = tl.load(norms_ptr + n, mask=n_ok, other=0.0)
    if FILTERED:  # the loss term is of ||f~||; the norm sum (and norms output) of ||f||
        term_norm = tl.load(filter_stats_ptr + n, mask=n_ok, other=0.0)
        mean = tl.load(filter_stats_ptr + N + n, mask=n_ok, other=0.0)
    else:
        term_norm = norm
    gap = tl.load(ref_ptr) - term_norm
    source = tl.where(gap > 0, -1.0, tl.where(gap < 0, 1.0, 0.0))
    target = tl.where(gap >= 0, -1.0, 0.0)
    d_term = tl.where(norm_mode == 0, source, target).to(ACC)
    if FILTERED:
        term_coef = tl.load(grad_norm_loss_ptr) * d_term
        term_scale = tl.where(term_norm > 0, term_coef / tl.where(term_norm > 0, term_norm, 1.0), 0.0)
        grad += tl.where(f >= mean[:, None], term_scale[:, None] * f, 0.0)
        coef = tl.load(grad_norm_sum_ptr) + tl.zeros([BLOCK_N], dtype=ACC)
    else:
        coef = tl.load(grad_norm_loss_ptr) * d_term + tl.load(grad_norm_sum_ptr)
    if HAS_GRAD_NORMS:  # the per-vector norms output, when something used it
        coef += tl.load(grad_norms_ptr + n, mask=n_ok, other=0.0)
    scale = tl.where(norm > 0, coef / tl.where(norm > 0, norm, 1.0), 0.0)
    grad += scale[:, None] * f
    out = out_ptr + spatial_offsets(b, s, W, o_b, o_y, o_x, O_FLAT, O_S_UNIT)[:, None] + channel_offsets(k, o_k, O_K_UNIT)[None, :]
    tl.store(out, grad, mask=tile_ok)


def _check_distance(op: str, distance: int) -> None:
    if distance not in (0, 1):
        raise RuntimeError(f"{op}: distance must be 0 (squared_l2) or 1 (l1), got {distance}")


@torch.library.custom_op("lsr_fast_triton::feature_terms", mutates_args=())
def feature_terms_op(
    features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, reference: torch.Tensor,
    norm_mode: int, ignore_index: int, distance: int = 0, filtered: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_distance("feature_terms", distance)
    return feature_pass(features, labels, prototypes.shape[0], ignore_index, prototypes, reference, norm_mode,
                        distance, filtered)


@feature_terms_op.register_fake
def _(features, labels, prototypes, reference, norm_mode, ignore_index, distance=0, filtered=False):
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
        features.new_empty((2, N if filtered else 0), dtype=acc),
    )


@torch.library.custom_op("lsr_fast_triton::feature_terms_backward", mutates_args=())
def feature_terms_backward_op(
    grad_sums: torch.Tensor, grad_sq: torch.Tensor, grad_norm_loss: torch.Tensor, grad_norm_sum: torch.Tensor,
    features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, reference: torch.Tensor,
    norms: torch.Tensor, grad_norms: Optional[torch.Tensor], norm_mode: int, ignore_index: int,
    distance: int = 0, filtered: bool = False, filter_stats: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    _check_distance("feature_terms_backward", distance)
    grad = torch.empty_like(features)
    if grad.numel() == 0:
        return grad
    layout = map_layout(features)
    out = map_layout(grad)  # the features' strides when they are dense
    acc = accumulate_dtype(features.dtype)
    C = prototypes.shape[0]
    dummy = torch.zeros((1,), dtype=acc, device=features.device)
    if filtered and (filter_stats is None or filter_stats.shape != (2, layout.N)):
        raise RuntimeError("feature_terms_backward: filtered needs the forward's filter_stats (2, N)")
    protos, g_sums, g_sq = (t.contiguous() if t.numel() else dummy for t in (prototypes, grad_sums, grad_sq))
    _feature_terms_backward_kernel[gather_grid(layout)](
        g_sums, g_sq, grad_norm_loss, grad_norm_sum,
        features, labels.reshape(-1).contiguous(), protos, reference, norms,
        grad_norms.contiguous() if grad_norms is not None else norms,
        filter_stats.contiguous() if filtered else norms, grad,
        layout.N, layout.K, C, *layout.args(), out.s_b, out.s_k, out.s_y, out.s_x, norm_mode, ignore_index,
        **layout.constants(), **out.constants("O_"), HAS_GRAD_NORMS=grad_norms is not None,
        DISTANCE=distance, FILTERED=bool(filtered),
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        **launch_meta(gather_interpreter_meta(layout)),
    )
    return grad


@feature_terms_backward_op.register_fake
def _(grad_sums, grad_sq, grad_norm_loss, grad_norm_sum, features, labels, prototypes, reference, norms, grad_norms,
      norm_mode, ignore_index, distance=0, filtered=False, filter_stats=None):
    return torch.empty_like(features)


def _setup(ctx, inputs, output):
    features, labels, prototypes, reference, norm_mode, ignore_index, distance, filtered = inputs  # defaults filled in
    ctx.save_for_backward(features, labels, prototypes, reference, output[5], output[6])
    ctx.norm_mode, ctx.ignore_index, ctx.distance, ctx.filtered = norm_mode, ignore_index, distance, filtered
    ctx.mark_non_differentiable(output[6])  # what the backward needs, not a result


def _backward(ctx, grad_sums, grad_counts, grad_sq, grad_norm_loss, grad_norm_sum, grad_norms, grad_filter_stats):
    features, labels, prototypes, reference, norms, filter_stats = ctx.saved_tensors
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
        grad_norms, ctx.norm_mode, ctx.ignore_index, ctx.distance, ctx.filtered, filter_stats if ctx.filtered else None,
    )
    return grad, None, None, None, None, None, None, None


feature_terms_op.register_autograd(_backward, setup_context=_setup)
