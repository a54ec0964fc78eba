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
- with the terms: the per-class sums of ||f - p_c||^2 (``DISTANCE`` 0) or sum_k |f_k - p_ck|
  (``DISTANCE`` 1) over its channels, and each position's partial ||f||^2 over its channels
  (programs of class block 0), into a (K blocks, N) workspace (``NORM_STATS`` 0).
Everything goes to per-split workspaces, no atomics: the result does not depend on scheduling.

The filtered norm (``filtered``): the norm-alignment term uses ||f~||, f~_k = f_k where f_k >= m,
m = (sum_k f_k) / K the vector's own mean channel value (never above its largest channel, so a
vector whose channels are all equal keeps all of them even where the rounded mean is not one of
them). m needs the whole vector before any channel can be filtered, and kernel 1 splits the
channels over programs, so:
- when one K block covers K (K <= BLOCK_K: 64 channels on a GPU), kernel 1 has each vector in
  registers and writes m, ||f||^2 and ||f~||^2 from that one read (``NORM_STATS`` 1);
- otherwise (the paper's K = 2048) ``_vector_stats_kernel`` runs first: each program loads whole
  vectors (BLOCK_N positions x all K channels, one register tile for K <= 8192) and writes m,
  ||f||^2 and ||f~||^2, and kernel 1 then does the class terms only (``NORM_STATS`` 2). The
  features are then read twice (once per kernel): kernel 1's per-class sums need the one-hot
  product over K blocks of BLOCK_C x BLOCK_K accumulators, which cannot hold all K channels of a
  vector, and no per-K-block partial sum can decide which channels of a vector are kept before
  the whole vector's mean is known. (Each vector is read once per kernel: for K > 8192 the
  stats kernel reads its BLOCK_N vectors twice, the second time from cache.)
The means (N,) and filtered norms (N,) are kept for the backward pass, as the norms are.

Kernel 2, ``_feature_finish_kernel``, adds the splits' partial sums (one program per BLOCK_R
entries of the (C, K) sums), forms the norms ||f|| = sqrt(sum of the partials) per position
(kept for the backward pass; with ``filtered`` also ||f~||) and the norm-alignment term (of
||f~|| with ``filtered``) against the reference r (read from a 0-dim tensor, never synchronised)
with per-block sums of it and of ||f|| (one program per BLOCK_N positions), and in its last
program the counts and the distance sums. When there is more than one block of positions,
``_norm_total_kernel`` adds the blocks' sums in order.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET, MapLayout, autotuned, cdiv, channel_offsets, div_acc, dot_dtype, map_layout, next_pow2, spatial_offsets, sqrt_acc,
    target_programs, tl_accumulate_dtype,
)

# ---- launch configurations -----------------------------------------------------------------

# Block sizes shape the workspaces, so they are chosen per shape below; on a GPU only the warp
# count and pipelining depth are autotuned. For the paper's K = 2048, C = 19 (BLOCK_C = 32) and
# 91 x 161 positions per image: 32 K blocks x ~17 position splits on an H100 (132 SMs).
PASS_CONFIGS = [triton.Config({}, num_warps=nw, num_stages=ns) for nw in (4, 8) for ns in (2, 3)]
FINISH_CONFIGS = [triton.Config({}, num_warps=nw) for nw in (4, 8)]
STATS_CONFIGS = [triton.Config({}, num_warps=nw) for nw in (4, 8)]

# Distances of the per-class terms (the raw ops' ``distance``).
SQUARED_L2, L1 = 0, 1
# What kernel 1 writes for the norms: per-K-block partial ||f||^2 (unfiltered); m, ||f||^2 and
# ||f~||^2 of whole vectors (filtered, one K block); nothing (filtered, _vector_stats_kernel did).
PARTIAL_NORMS, VECTOR_STATS, NO_NORMS = 0, 1, 2


def pass_blocks(N: int, K: int, C: int) -> dict:
    """BLOCK_N, BLOCK_K, BLOCK_C for a pass over N positions of K channels and C classes."""
    if INTERPRET:  # a handful of wide programs
        return dict(
            BLOCK_N=min(max(next_pow2(N), 16), 256),
            BLOCK_K=min(max(next_pow2(K), 16), 128),
            BLOCK_C=min(max(next_pow2(C), 16), 64),
        )
    return dict(BLOCK_N=64, BLOCK_K=min(max(next_pow2(K), 16), 64), BLOCK_C=min(max(next_pow2(C), 16), 32))


def vector_stats_blocks(layout: MapLayout, acc: torch.dtype) -> dict:
    """BLOCK_N, BLOCK_K, ONE_TILE of _vector_stats_kernel: whole vectors in one register tile of
    at most 8192 elements (4096 in float64; 256 under the interpreter), else BLOCK_K-channel
    steps over BLOCK_N vectors, twice."""
    tile = 256 if INTERPRET else (4096 if acc == torch.float64 else 8192)
    width = next_pow2(layout.K)
    positions = next_pow2(layout.S)
    if width <= tile:
        return dict(BLOCK_N=max(1, min(positions, tile // width)), BLOCK_K=width, ONE_TILE=True)
    block_n = min(positions, 4 if INTERPRET else 16)
    return dict(BLOCK_N=block_n, BLOCK_K=tile // block_n, ONE_TILE=False)


def _splits(device: torch.device, chunks: int, other_programs: int) -> int:
    return max(1, min(chunks, cdiv(target_programs(device), other_programs)))


# ---- kernels -----------------------------------------------------------------------------


@triton.jit
def filtered_norm_stats(f, k_ok, K, IS_FP64: tl.constexpr):
    """(m, ||f||^2, ||f~||^2) of whole vectors f (BLOCK_N, BLOCK_K >= K) in the accumulation
    type, channels k >= K zero: m = min(sum_k f_k / K, max_k f_k), f~_k = f_k where f_k >= m."""
    mean = tl.minimum(div_acc(tl.sum(f, axis=1), K, IS_FP64), tl.max(tl.where(k_ok[None, :], f, float("-inf")), axis=1))
    kept = tl.where(f >= mean[:, None], f, 0.0)  # the padding channels are 0 either way
    return mean, tl.sum(f * f, axis=1), tl.sum(kept * kept, axis=1)


@autotuned(STATS_CONFIGS, key=["N", "K", "BLOCK_N", "BLOCK_K", "ONE_TILE"])
@triton.jit
def _vector_stats_kernel(
    f_ptr, ws_normsq_ptr, means_ptr,
    N, K, S, W, s_b, s_k, s_y, s_x,
    FLAT: tl.constexpr, S_UNIT: tl.constexpr, K_UNIT: tl.constexpr, ACC: tl.constexpr,
    ONE_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per position of BLOCK_N (never straddling two images): the mean channel value m, ||f||^2
    (row 0 of the (2, N) workspace) and ||f~||^2 (row 1), from one read of each vector when
    ONE_TILE (BLOCK_K >= K); else sums over BLOCK_K-channel steps, then a second sweep over
    the same BLOCK_N vectors (cache-resident) for ||f~||^2."""
    blocks_per_image = tl.cdiv(S, BLOCK_N)
    pid = tl.program_id(0)
    b = pid // blocks_per_image
    s = (pid - b * blocks_per_image) * BLOCK_N + tl.arange(0, BLOCK_N)
    s_ok = s < S
    n = b * S + s
    offsets = spatial_offsets(b, s, W, s_b, s_y, s_x, FLAT, S_UNIT)
    if ONE_TILE:
        k = tl.arange(0, BLOCK_K)
        k_ok = k < K
        f = tl.load(f_ptr + offsets[:, None] + channel_offsets(k, s_k, K_UNIT)[None, :],
                    mask=s_ok[:, None] & k_ok[None, :], other=0.0).to(ACC)
        mean, squared, kept_squared = filtered_norm_stats(f, k_ok, K, ACC == tl.float64)
    else:
        total = tl.zeros([BLOCK_N], dtype=ACC)
        squared = tl.zeros([BLOCK_N], dtype=ACC)
        top = tl.full([BLOCK_N], float("-inf"), dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            f = tl.load(f_ptr + offsets[:, None] + channel_offsets(k, s_k, K_UNIT)[None, :],
                        mask=s_ok[:, None] & k_ok[None, :], other=0.0).to(ACC)
            total += tl.sum(f, axis=1)
            squared += tl.sum(f * f, axis=1)
            top = tl.maximum(top, tl.max(tl.where(k_ok[None, :], f, float("-inf")), axis=1))
        mean = tl.minimum(div_acc(total, K, ACC == tl.float64), top)
        kept_squared = tl.zeros([BLOCK_N], dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            f = tl.load(f_ptr + offsets[:, None] + channel_offsets(k, s_k, K_UNIT)[None, :],
                        mask=s_ok[:, None] & (k < K)[None, :], other=0.0).to(ACC)
            kept = tl.where(f >= mean[:, None], f, 0.0)
            kept_squared += tl.sum(kept * kept, axis=1)
    tl.store(ws_normsq_ptr + n, squared, mask=s_ok)
    tl.store(ws_normsq_ptr + N + n, kept_squared, mask=s_ok)
    tl.store(means_ptr + n, mean, mask=s_ok)


@autotuned(PASS_CONFIGS, key=["K", "C", "S", "WITH_TERMS", "DISTANCE", "NORM_STATS", "BLOCK_N", "BLOCK_K", "BLOCK_C"])
@triton.jit
def _feature_pass_kernel(
    f_ptr, labels_ptr, proto_ptr,
    ws_sums_ptr, ws_counts_ptr, ws_sq_ptr, ws_normsq_ptr, means_ptr,
    N, K, C, S, W, s_b, s_k, s_y, s_x, ignore_index, chunks_per_split,
    FLAT: tl.constexpr, S_UNIT: tl.constexpr, K_UNIT: tl.constexpr,
    WITH_TERMS: tl.constexpr, DISTANCE: tl.constexpr, NORM_STATS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
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
            if DISTANCE == 0:
                dist = tl.sum(d * d, axis=1)
            else:
                dist = tl.sum(tl.abs(d), axis=1)
            sq += tl.sum(tl.where(one_hot, dist[None, :], 0.0), axis=1)
            # Vector compare: the interpreter rejects (bool scalar & bool vector) masks.
            first_class_block = s_ok & (s * 0 + pid_c == 0)
            if NORM_STATS == 0:
                tl.store(ws_normsq_ptr + pid_k.to(tl.int64) * N + n, tl.sum(fa * fa, axis=1), mask=first_class_block)
            elif NORM_STATS == 1:  # this program has the whole vectors (one K block)
                mean, squared, kept_squared = filtered_norm_stats(fa, k_ok, K, ACC == tl.float64)
                tl.store(ws_normsq_ptr + n, squared, mask=first_class_block)
                tl.store(ws_normsq_ptr + N + n, kept_squared, mask=first_class_block)
                tl.store(means_ptr + n, mean, mask=first_class_block)
    is_class = cls < C
    tl.store(ws_sums_ptr + (pid_s * C + cls[:, None]).to(tl.int64) * K + k[None, :], sums, mask=is_class[:, None] & k_ok[None, :])
    tl.store(ws_counts_ptr + pid_s * C + cls, counts, mask=is_class & (cls * 0 + pid_k == 0))
    if WITH_TERMS:
        tl.store(ws_sq_ptr + (pid_s * tl.num_programs(0) + pid_k) * C + cls, sq, mask=is_class)


@autotuned(FINISH_CONFIGS, key=["C", "N", "WITH_TERMS", "FILTERED", "REDUCE_SUMS", "ONE_NORM_BLOCK"])
@triton.jit
def _feature_finish_kernel(
    ws_sums_ptr, sums_ptr, ws_counts_ptr, counts_ptr, ws_sq_ptr, sq_ptr, ws_normsq_ptr, norms_ptr, filtered_norms_ptr,
    ref_ptr, ws_norm_ptr, norm_loss_ptr, norm_sum_ptr,
    N, CK, C, num_splits, sq_rows, k_blocks, norm_mode, sum_programs, norm_programs,
    WITH_TERMS: tl.constexpr, FILTERED: tl.constexpr, REDUCE_SUMS: tl.constexpr, ONE_NORM_BLOCK: tl.constexpr,
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
            if FILTERED:  # rows ||f||^2, ||f~||^2 of whole vectors
                norm = sqrt_acc(tl.load(ws_normsq_ptr + n, mask=n_ok, other=0.0), IS_FP64)
                term_norm = sqrt_acc(tl.load(ws_normsq_ptr + N + n, mask=n_ok, other=0.0), IS_FP64)
                tl.store(filtered_norms_ptr + n, term_norm, mask=n_ok)
            else:
                squared = tl.zeros([BLOCK_N], dtype=ACC)
                for kb in range(0, k_blocks):
                    squared += tl.load(ws_normsq_ptr + kb * N + n, mask=n_ok, other=0.0)
                norm = sqrt_acc(squared, IS_FP64)
                term_norm = norm
            tl.store(norms_ptr + n, norm, mask=n_ok)
            gap = tl.load(ref_ptr) - term_norm
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
    distance: int = SQUARED_L2,
    filtered: bool = False,
):
    """(sums, counts) without prototypes; with them (sums, counts, dist_sums, norm_loss_sum,
    norm_sum, norms (N,), filter_stats), all in the accumulation dtype but counts (int64).

    dist_sums are per-class sums of ||f - p_c||^2 (``distance`` 0) or sum_k |f_k - p_ck| (1).
    With ``filtered`` the norm loss uses the filtered norms and filter_stats (2, N) holds each
    vector's ||f~|| (row 0) and mean channel value m (row 1); (2, 0) otherwise. norm_sum and
    norms are of the unfiltered ||f|| either way."""
    with_terms = prototypes is not None
    filtered = bool(filtered) and with_terms
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
    filter_stats = torch.empty((2, N if filtered else 0), dtype=acc, device=device)
    if N == 0:  # nothing to read; the sums are empty sums
        outputs = (sums.zero_(), counts.zero_(), sq.zero_(), norm_loss.zero_(), norm_sum.zero_(), norms, filter_stats)
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
        # Unfiltered: per-K-block partial ||f||^2. Filtered: rows ||f||^2 and ||f~||^2.
        ws_normsq = torch.empty((2 if filtered else k_blocks, N), dtype=acc, device=device)
        ref = reference
    else:
        protos = ws_sq = ws_normsq = ref = dummy
    dummy_i = torch.zeros((1,), dtype=torch.int64, device=device)
    acc_tl = tl_accumulate_dtype(features.dtype)
    norm_stats = PARTIAL_NORMS
    means = filter_stats[1] if filtered else dummy
    if filtered:
        norm_stats = VECTOR_STATS if k_blocks == 1 else NO_NORMS
    if norm_stats == NO_NORMS:  # whole vectors first (see the module docstring)
        stats_blocks = vector_stats_blocks(layout, acc)
        _vector_stats_kernel[(layout.B * cdiv(layout.S, stats_blocks["BLOCK_N"]),)](
            f, ws_normsq, means, N, K, *layout.args(), **layout.constants(), ACC=acc_tl, **stats_blocks,
        )
    _feature_pass_kernel[(k_blocks, splits, c_blocks)](
        f, flat_labels, protos,
        ws_sums if ws_sums.numel() else dummy, ws_counts if ws_counts.numel() else dummy_i,
        ws_sq if ws_sq.numel() else dummy, ws_normsq, means,
        N, K, C, *layout.args(), ignore_index, chunks_per_split, **layout.constants(),
        WITH_TERMS=with_terms, DISTANCE=distance, NORM_STATS=norm_stats, ACC=acc_tl, DOT=dot_dtype(features.dtype),
        **blocks,
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
        filter_stats[0] if filtered else dummy, ref, ws_norm, norm_loss, norm_sum,
        N, C * K, C, splits, splits * k_blocks, k_blocks, norm_mode, sum_programs, norm_programs,
        WITH_TERMS=with_terms, FILTERED=filtered, REDUCE_SUMS=reduce_sums, ONE_NORM_BLOCK=norm_programs <= 1,
        ACC=acc_tl, IS_FP64=acc == torch.float64, BLOCK_R=BLOCK_R, BLOCK_CC=next_pow2(C), BLOCK_N=block_n,
    )
    if norm_programs > 1:
        _norm_total_kernel[(1,)](ws_norm, norm_loss, norm_sum, norm_programs, ACC=acc_tl, BLOCK=min(1024, next_pow2(norm_programs)))
    if with_terms:
        return sums, counts, sq, norm_loss, norm_sum, norms, filter_stats
    return sums, counts
