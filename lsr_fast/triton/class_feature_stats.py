"""class_feature_stats: per-class feature sums (C, K) and counts (C,), and its backward.

Forward: the shared feature pass (feature_pass.py) without the loss terms. Backward, one
kernel: grad_features[n, k] = grad_sums[label_n, k], 0 for void vectors, written in the
features' dtype and memory format (the gradient has the features' strides).
"""

# No `from __future__ import annotations`: torch < 2.7's custom_op cannot read string annotations.
from typing import Tuple

import torch
import triton
import triton.language as tl

from ._common import (
    MapLayout, accumulate_dtype, autotuned, cdiv, channel_offsets, launch_meta, map_layout, next_pow2, spatial_offsets,
)
from .feature_pass import feature_pass

# (BLOCK_N positions, BLOCK_K channels) per program of the backward kernels; for the paper's
# 91 x 161 x 2048 map, 64 x 64 tiles make 229 x 32 programs per image.
GATHER_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw)
    for bn, bk in ((32, 64), (64, 64), (128, 32), (64, 128))
    for nw in (4, 8)
]


def gather_interpreter_meta(layout: MapLayout) -> dict:
    return {"BLOCK_N": min(next_pow2(layout.S), 256), "BLOCK_K": min(next_pow2(layout.K), 128)}


def gather_grid(layout: MapLayout):
    """Grid of the (positions, channels) tile kernels: images x position blocks, channel blocks."""
    return lambda meta: (layout.B * cdiv(layout.S, meta["BLOCK_N"]), cdiv(layout.K, meta["BLOCK_K"]))


@triton.jit
def gather_tile(S, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Image b, positions s (BLOCK_N, never straddling two images), channels k of this program."""
    blocks_per_image = tl.cdiv(S, BLOCK_N)
    pid = tl.program_id(0)
    b = pid // blocks_per_image
    s = (pid - b * blocks_per_image) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    return b, s, k


@autotuned(GATHER_CONFIGS, key=["N", "K", "S"])
@triton.jit
def _class_feature_stats_backward_kernel(
    grad_sums_ptr, labels_ptr, out_ptr,
    N, K, C, S, W, s_b, s_k, s_y, s_x, ignore_index,
    FLAT: tl.constexpr, S_UNIT: tl.constexpr, K_UNIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b, s, k = gather_tile(S, BLOCK_N, BLOCK_K)
    s_ok = s < S
    k_ok = k < K
    label = tl.load(labels_ptr + b * S + s, mask=s_ok, other=0).to(tl.int64)
    labelled = s_ok & (label != ignore_index) & (label >= 0) & (label < C)
    grad = tl.load(grad_sums_ptr + label[:, None] * K + k[None, :], mask=labelled[:, None] & k_ok[None, :], other=0.0)
    offsets = spatial_offsets(b, s, W, s_b, s_y, s_x, FLAT, S_UNIT)
    tl.store(out_ptr + offsets[:, None] + channel_offsets(k, s_k, K_UNIT)[None, :], grad, mask=s_ok[:, None] & k_ok[None, :])


@torch.library.custom_op("lsr_fast_triton::class_feature_stats", mutates_args=())
def class_feature_stats_op(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    sums, counts = feature_pass(features, labels, num_classes, ignore_index)
    return sums, counts


@class_feature_stats_op.register_fake
def _(features, labels, num_classes, ignore_index):
    acc = accumulate_dtype(features.dtype)
    return (
        features.new_empty((num_classes, features.shape[1]), dtype=acc),
        features.new_empty((num_classes,), dtype=torch.int64),
    )


@torch.library.custom_op("lsr_fast_triton::class_feature_stats_backward", mutates_args=())
def class_feature_stats_backward_op(
    grad_sums: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    grad = torch.empty_like(features)
    if grad.numel() == 0:
        return grad
    layout = map_layout(grad)  # the features' strides when they are dense
    grad_sums = grad_sums.contiguous()
    _class_feature_stats_backward_kernel[gather_grid(layout)](
        grad_sums, labels.reshape(-1).contiguous(), grad,
        layout.N, layout.K, grad_sums.shape[0], *layout.args(), ignore_index, **layout.constants(),
        **launch_meta(gather_interpreter_meta(layout)),
    )
    return grad


@class_feature_stats_backward_op.register_fake
def _(grad_sums, features, labels, ignore_index):
    return torch.empty_like(features)


def _setup(ctx, inputs, output):
    features, labels, _, ignore_index = inputs
    ctx.save_for_backward(features, labels)
    ctx.ignore_index = ignore_index


def _backward(ctx, grad_sums, grad_counts):
    features, labels = ctx.saved_tensors
    if grad_sums is None:
        return None, None, None, None
    return class_feature_stats_backward_op(grad_sums, features, labels, ctx.ignore_index), None, None, None


class_feature_stats_op.register_autograd(_backward, setup_context=_setup)
