"""The forward pass over a feature map shared by class_feature_stats and feature_terms.

Features are (B, K, h, w) in any memory format (read in place through their strides, see
_common.MapLayout; position n = b * h * w + y * w + x) or (N, K) rows; labels are flattened to one
int per position.

Kernel 1, ``_feature_pass_kernel``, grid (K blocks, position splits, class blocks): each program
streams its contiguous share of the positions in BLOCK_N chunks, for its BLOCK_K channels and
BLOCK_C classes, and accumulates
- the per-class sums with one (BLOCK_C x BLOCK_N) one-hot times (BLOCK_N x BLOCK_K) features
  product per chunk (tl.dot, IEEE float32 or float64, exact 0/1 weights),
- the per-class counts (programs of K block 0),
- with the terms: the per-class sums of ||f - p_c||^2 over its channels, and each position's
  partial ||f||^2 over its channels (programs of class block 0), into a (K blocks, N) workspace.
Everything goes to per-split workspaces, no atomics: the result does not depend on scheduling.

Kernel 2, ``_feature_finish_kernel``, adds the splits' partial sums (one program per BLOCK_R
entries of the (C, K) sums), forms the norms ||f|| = sqrt(sum of the partials) per position
(kept for the backward pass) and the norm-alignment term against the reference r (read from a
0-dim tensor, never synchronised) with per-block sums of both (one program per BLOCK_N
positions), and in its last program the counts and the squared-distance sums. When there is
more than one block of positions, ``_norm_total_kernel`` adds the blocks' sums in order.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET, autotuned, cdiv, channel_offsets, dot_dtype, map_layout, next_pow2, spatial_offsets, sqrt_acc, target_programs,
    tl_accumulate_dtype,
)

# ---- launch configurations -----------------------------------------------------------------

# Block sizes shape the workspaces, so they are chosen per shape below; on a GPU only the warp
# count and pipelining depth are autotuned. For the paper's K = 2048, C = 19 (BLOCK_C = 32) and
# 91 x 161 positions per image: 32 K blocks x ~17 position splits on an H100 (132 SMs).
PASS_CONFIGS = [triton.Config({}, num_warps=nw, num_stages=ns) for nw in (4, 8) for ns in (2, 3)]
FINISH_CONFIGS = [triton.Config({}, num_warps=nw) for nw in (4, 8)]


def pass_blocks(N: int, K: int, C: int) -> dict:
    """BLOCK_N, BLOCK_K, BLOCK_C for a pass over N positions of K channels and C classes."""
    if INTERPRET:  # a handful of wide programs
        return dict(
            BLOCK_N=min(max(next_pow2(N), 16), 256),
            BLOCK_K=min(max(next_pow2(K), 16), 128),
            BLOCK_C=min(max(next_pow2(C), 16), 64),
        )
    return dict(BLOCK_N=64, BLOCK_K=min(max(next_pow2(K), 16), 64), BLOCK_C=min(max(next_pow2(C), 16), 32))


def _splits(device: torch.device, chunks: int, other_programs: int) -> int:
    return max(1, min(chunks, cdiv(target_programs(device), other_programs)))


# ---- kernels -----------------------------------------------------------------------------


@autotuned(PASS_CONFIGS, key=["K", "C", "S", "WITH_TERMS", "BLOCK_N", "BLOCK_K", "BLOCK_C"])
@triton.jit
def _feature_pass_kernel(
    f_ptr, labels_ptr, proto_ptr,
    ws_sums_ptr, ws_counts_ptr, ws_sq_ptr, ws_normsq_ptr,
    N, K, C, S, W, s_b, s_k, s_y, s_x, ignore_index, chunks_per_split,
    FLAT: tl.constexpr, S_UNIT: tl.constexpr, K_UNIT: tl.constexpr,
    WITH_TERMS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_c = tl.program_id(2)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    k_off = channel_offsets(k, s_k, K_UNIT)
    cls = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    sums = tl.zeros([BLOCK_C, BLOCK_K], dtype=ACC)
    counts = tl.zeros([BLOCK_C], dtype=tl.int32)
    sq = tl.zeros([BLOCK_C], dtype=ACC)
    # Chunks of BLOCK_N positions never straddle two images, so positions are contiguous in
    # NCHW memory and the loads coalesce.
    chunks_per_image = tl.cdiv(S, BLOCK_N)
    first = pid_s * chunks_per_split
    last = tl.minimum(first + chunks_per_split, chunks_per_image * (N // S))
    for chunk in range(first, last):
        b = chunk // chunks_per_image
        s = (chunk - b * chunks_per_image) * BLOCK_N + tl.arange(0, BLOCK_N)
        s_ok = s < S
        n = b * S + s
        label = tl.load(labels_ptr + n, mask=s_ok, other=0).to(tl.int64)
        labelled = s_ok & (label != ignore_index) & (label >= 0) & (label < C)
        offsets = spatial_offsets(b, s, W, s_b, s_y, s_x, FLAT, S_UNIT)
        f = tl.load(f_ptr + offsets[:, None] + k_off[None, :], mask=s_ok[:, None] & k_ok[None, :], other=0.0)
        one_hot = (cls[:, None] == label[None, :]) & labelled[None, :]  # (BLOCK_C, BLOCK_N)
        if DOT == tl.float32:  # IEEE float32 products, not TF32
            sums = tl.dot(one_hot.to(DOT), f.to(DOT), sums, input_precision="ieee", out_dtype=ACC)
        else:  # float64, or half precision with exact products and float32 accumulation
            sums = tl.dot(one_hot.to(DOT), f.to(DOT), sums, out_dtype=ACC)
        counts += tl.sum(one_hot.to(tl.int32), axis=1)
        if WITH_TERMS:
            fa = f.to(ACC)
            p = tl.load(proto_ptr + label[:, None] * K + k[None, :], mask=labelled[:, None] & k_ok[None, :], other=0.0)
            d = fa - p
            sq += tl.sum(tl.where(one_hot, tl.sum(d * d, axis=1)[None, :], 0.0), axis=1)
            # Vector compare: the interpreter rejects (bool scalar & bool vector) masks.
            tl.store(ws_normsq_ptr + pid_k.to(tl.int64) * N + n, tl.sum(fa * fa, axis=1), mask=s_ok & (s * 0 + pid_c == 0))
    is_class = cls < C
    tl.store(ws_sums_ptr + (pid_s * C + cls[:, None]).to(tl.int64) * K + k[None, :], sums, mask=is_class[:, None] & k_ok[None, :])
    tl.store(ws_counts_ptr + pid_s * C + cls, counts, mask=is_class & (cls * 0 + pid_k == 0))
    if WITH_TERMS:
        tl.store(ws_sq_ptr + (pid_s * tl.num_programs(0) + pid_k) * C + cls, sq, mask=is_class)


@autotuned(FINISH_CONFIGS, key=["C", "N", "WITH_TERMS", "REDUCE_SUMS", "ONE_NORM_BLOCK"])
@triton.jit
def _feature_finish_kernel(
    ws_sums_ptr, sums_ptr, ws_counts_ptr, counts_ptr, ws_sq_ptr, sq_ptr, ws_normsq_ptr, norms_ptr,
    ref_ptr, ws_norm_ptr, norm_loss_ptr, norm_sum_ptr,
    N, CK, C, num_splits, sq_rows, k_blocks, norm_mode, sum_programs, norm_programs,
    WITH_TERMS: tl.constexpr, REDUCE_SUMS: tl.constexpr, ONE_NORM_BLOCK: tl.constexpr,
    ACC: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_CC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Programs [0, sum_programs): reduce the sums over the splits. The next norm_programs:
    norms of BLOCK_N positions and their partial loss / norm sums. The last: counts and
    squared-distance sums."""
    pid = tl.program_id(0)
    if pid < sum_programs:
        if REDUCE_SUMS:
            e = pid * BLOCK_R + tl.arange(0, BLOCK_R)
            e_ok = e < CK
            total = tl.zeros([BLOCK_R], dtype=ACC)
            for s in range(0, num_splits):
                total += tl.load(ws_sums_ptr + s * CK + e, mask=e_ok, other=0.0)
            tl.store(sums_ptr + e, total, mask=e_ok)
    elif pid < sum_programs + norm_programs:
        if WITH_TERMS:
            block = pid - sum_programs
            n = block * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < N
            squared = tl.zeros([BLOCK_N], dtype=ACC)
            for kb in range(0, k_blocks):
                squared += tl.load(ws_normsq_ptr + kb * N + n, mask=n_ok, other=0.0)
            norm = sqrt_acc(squared, IS_FP64)
            tl.store(norms_ptr + n, norm, mask=n_ok)
            gap = tl.load(ref_ptr) - norm
            term = tl.where(norm_mode == 0, tl.abs(gap), tl.maximum(gap, 0.0))
            loss = tl.sum(tl.where(n_ok, term, 0.0), axis=0)
            norm_total = tl.sum(tl.where(n_ok, norm, 0.0), axis=0)
            if ONE_NORM_BLOCK:
                tl.store(norm_loss_ptr, loss)
                tl.store(norm_sum_ptr, norm_total)
            else:  # added in block order by _norm_total_kernel
                tl.store(ws_norm_ptr + block, loss)
                tl.store(ws_norm_ptr + norm_programs + block, norm_total)
    else:
        c = tl.arange(0, BLOCK_CC)
        c_ok = c < C
        counts = tl.zeros([BLOCK_CC], dtype=tl.int64)
        for s in range(0, num_splits):
            counts += tl.load(ws_counts_ptr + s * C + c, mask=c_ok, other=0).to(tl.int64)
        tl.store(counts_ptr + c, counts, mask=c_ok)
        if WITH_TERMS:
            sq = tl.zeros([BLOCK_CC], dtype=ACC)
            for row in range(0, sq_rows):
                sq += tl.load(ws_sq_ptr + row * C + c, mask=c_ok, other=0.0)
            tl.store(sq_ptr + c, sq, mask=c_ok)


@triton.jit
def _norm_total_kernel(ws_norm_ptr, norm_loss_ptr, norm_sum_ptr, blocks, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the norm-loss and norm sums of the finish kernel's blocks, in block order."""
    loss = tl.zeros([BLOCK], dtype=ACC)
    total = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, blocks, BLOCK):
        i = start + tl.arange(0, BLOCK)
        loss += tl.load(ws_norm_ptr + i, mask=i < blocks, other=0.0)
        total += tl.load(ws_norm_ptr + blocks + i, mask=i < blocks, other=0.0)
    tl.store(norm_loss_ptr, tl.sum(loss, axis=0))
    tl.store(norm_sum_ptr, tl.sum(total, axis=0))


# ---- host side ---------------------------------------------------------------------------


def feature_pass(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int,
    prototypes: Optional[torch.Tensor] = None,
    reference: Optional[torch.Tensor] = None,
    norm_mode: int = 0,
):
    """(sums, counts) without prototypes; with them (sums, counts, sq_dist_sums, norm_loss_sum,
    norm_sum, norms (N,)), all in the accumulation dtype but counts (int64)."""
    with_terms = prototypes is not None
    device = features.device
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    layout = map_layout(features)
    N, K, C = layout.N, layout.K, num_classes
    sums = torch.empty((C, K), dtype=acc, device=device)
    counts = torch.empty((C,), dtype=torch.int64, device=device)
    sq = torch.empty((C,), dtype=acc, device=device)
    norm_loss = torch.empty((), dtype=acc, device=device)
    norm_sum = torch.empty((), dtype=acc, device=device)
    norms = torch.empty((N if with_terms else 0,), dtype=acc, device=device)
    if N == 0:  # nothing to read; the sums are empty sums
        outputs = (sums.zero_(), counts.zero_(), sq.zero_(), norm_loss.zero_(), norm_sum.zero_(), norms)
        return outputs if with_terms else outputs[:2]

    blocks = pass_blocks(N, K, C)
    k_blocks = max(1, cdiv(K, blocks["BLOCK_K"]))
    c_blocks = max(1, cdiv(C, blocks["BLOCK_C"]))
    chunks = layout.B * cdiv(layout.S, blocks["BLOCK_N"])
    splits = _splits(device, chunks, k_blocks * c_blocks)
    chunks_per_split = cdiv(chunks, splits)
    splits = cdiv(chunks, chunks_per_split)

    # Empty tensors (K = 0, C = 0) are never read; give the kernel a real pointer anyway.
    dummy = torch.zeros((1,), dtype=acc, device=device)
    f = features if features.numel() > 0 else dummy
    flat_labels = labels.reshape(-1).contiguous()  # a strided view would be read as contiguous
    ws_sums = sums if splits == 1 else torch.empty((splits, C, K), dtype=acc, device=device)
    ws_counts = torch.empty((splits, C), dtype=torch.int32, device=device)
    if with_terms:
        protos = prototypes if prototypes.numel() > 0 else dummy
        ws_sq = torch.empty((splits * k_blocks, C), dtype=acc, device=device)
        ws_normsq = torch.empty((k_blocks, N), dtype=acc, device=device)
        ref = reference
    else:
        protos = ws_sq = ws_normsq = ref = dummy
    dummy_i = torch.zeros((1,), dtype=torch.int64, device=device)
    acc_tl = tl_accumulate_dtype(features.dtype)
    _feature_pass_kernel[(k_blocks, splits, c_blocks)](
        f, flat_labels, protos,
        ws_sums if ws_sums.numel() else dummy, ws_counts if ws_counts.numel() else dummy_i,
        ws_sq if ws_sq.numel() else dummy, ws_normsq,
        N, K, C, *layout.args(), ignore_index, chunks_per_split, **layout.constants(),
        WITH_TERMS=with_terms, ACC=acc_tl, DOT=dot_dtype(features.dtype), **blocks,
    )
    BLOCK_R = 1024
    reduce_sums = splits > 1 and C * K > 0
    sum_programs = cdiv(C * K, BLOCK_R) if reduce_sums else 0
    block_n = min(1024, max(16, next_pow2(N)))
    norm_programs = cdiv(N, block_n) if with_terms else 0
    ws_norm = torch.empty((2, norm_programs), dtype=acc, device=device) if norm_programs > 1 else dummy
    _feature_finish_kernel[(sum_programs + norm_programs + 1,)](
        ws_sums if ws_sums.numel() else dummy, sums if sums.numel() else dummy,
        ws_counts if ws_counts.numel() else dummy_i, counts if counts.numel() else dummy_i,
        ws_sq if ws_sq.numel() else dummy, sq if sq.numel() else dummy, ws_normsq, norms if with_terms else dummy,
        ref, ws_norm, norm_loss, norm_sum,
        N, C * K, C, splits, splits * k_blocks, k_blocks, norm_mode, sum_programs, norm_programs,
        WITH_TERMS=with_terms, REDUCE_SUMS=reduce_sums, ONE_NORM_BLOCK=norm_programs <= 1,
        ACC=acc_tl, IS_FP64=acc == torch.float64, BLOCK_R=BLOCK_R, BLOCK_CC=next_pow2(C), BLOCK_N=block_n,
    )
    if norm_programs > 1:
        _norm_total_kernel[(1,)](ws_norm, norm_loss, norm_sum, norm_programs, ACC=acc_tl, BLOCK=min(1024, next_pow2(norm_programs)))
    if with_terms:
        return sums, counts, sq, norm_loss, norm_sum, norms
    return sums, counts
