// Pieces shared by the feature-map passes of class_feature_stats and feature_terms
// (feature_pass.cuh: forward; feature_finalize.cuh: feature_terms' per-position finish and the
// filtered-mean pre-pass; feature_backward.cuh: backward): the tile sizes, small device math,
// the per-position partial layout, the filter threshold and the arguments of the
// position-owning kernels (vector_mean_kernel, feature_backward_kernel). No kernels here.
//
// feature_terms' two switches (template parameters: the default instantiation <false, false> is
// today's code, unchanged):
//   - kL1 (distance = 1): the per-class distance is sum_k |f_k - p_ck| instead of ||f - p_c||^2;
//     the same partial slot, |d| instead of d*d; backward sign(d) instead of 2d.
//   - kFiltered: the norm-alignment term uses ||f~||, f~_k = f_k where f_k >= m, m the vector's
//     own mean channel value. The forward's K-split (feature_pass.cuh) cannot form sum_k f~_k^2
//     before m is known (m needs all K channels, which live in different blocks), so a light first pass
//     (vector_mean_kernel, one position-owning read of the map like the backward's first sweep,
//     fixed reduction order) writes m per position (4 bytes per position for float32), and the
//     pass then adds a third per-K-tile partial, sum over kept channels of f^2 (pos_partial grows
//     from 2 to 3 slots per K-tile; each block reads m once per position tile). Cost: one extra
//     read of the whole map, i.e. about 2x the default forward's DRAM traffic (float32,
//     K = 2048: +8 KB read per position, +4 B for m, +0.25 KB of pos_partial written and
//     read, on the default's ~9 KB per position). We chose this over restructuring the pass so
//     that a block holds all K channels of its positions on chip: that needs C x K class
//     accumulators per block (155 KB for C = 19, K = 2048) or per-tile atomics (not
//     deterministic), and it could not be tested on a GPU when it was written.
//     m = min(sum_k f_k / K, max_k f_k) in acc_t: the exact mean never exceeds the maximum, so the
//     clamp only undoes rounding, and a vector whose channels are all equal keeps all of them (a
//     NaN sum stays NaN: every channel is dropped, as the comparison f >= NaN is false).
// Why deterministic: nothing here reduces across threads; the kernels that use these pieces
// each document their fixed reduction orders.
#pragma once

#include "cuda_utils.cuh"

namespace lsr_fast {
namespace cuda {

constexpr int kKT = 32;                // channels per K-tile (one per lane)
constexpr int kNT = 128;               // positions per tile
constexpr int kTileStride = kNT + 1;   // padded rows: conflict-free column reads
constexpr int kTermScratch = 32 * 1024;  // shared memory for the per-warp class accumulators of the finalize kernel
static_assert(kThreads == 2 * kNT, "the terms phase runs two threads per position");
static_assert(kNT % (32 * kWarps / 8) == 0 && kNT / kWarps >= 1, "every warp gets whole positions");

template <typename T>
__device__ __forceinline__ T device_sqrt(T x) {
  if constexpr (std::is_same_v<T, double>) {
    return ::sqrt(x);
  } else {
    return ::sqrtf(x);
  }
}

template <typename T>
__device__ __forceinline__ T device_abs(T x) {
  if constexpr (std::is_same_v<T, double>) {
    return ::fabs(x);
  } else {
    return ::fabsf(x);
  }
}

// Per-position partials per K-tile: |f|^2 and the class distance, plus sum of kept f^2 when filtered.
constexpr int pos_partial_slots(bool filtered) { return filtered ? 3 : 2; }

// The filter threshold of a vector from its channel sum and maximum (see the header above).
template <typename acc_t>
__device__ __forceinline__ acc_t filter_threshold(acc_t total, acc_t mx, int K) {
  if (K <= 0) return acc_t(0);
  const acc_t m = total / static_cast<acc_t>(K);
  return m > mx ? mx : m;  // a NaN mean stays NaN
}

// max(a, b) ignoring a NaN b (a is never NaN here: it starts at -inf).
template <typename acc_t>
__device__ __forceinline__ acc_t max_keep(acc_t a, acc_t b) {
  return b > a ? b : a;
}

// Arguments of the position-owning kernels (vector_mean_kernel, feature_backward_kernel).
struct BackwardArgs {
  int64_t HW, N;
  int64_t sB, sK, sN;  // shared by the features and the gradient (same strides)
  int K, C;
  const void* labels;
  int label_kind;
  int64_t ignore_index;
  int norm_mode;
};

// Whether 16-byte accesses along the unit-stride dimension fit the layout (the pointers'
// alignment is checked by the callers).
template <typename scalar_t>
inline bool vec16_layout(const FeatureLayout& L) {
  constexpr int V = Vec16<scalar_t>::kSize;
  const bool batch_ok = L.B == 1 || L.sB % V == 0;
  return batch_ok &&
         (position_major(L) ? (L.HW % V == 0 && L.sK % V == 0) : (L.sK == 1 && L.K % V == 0 && L.sN % V == 0));
}

}  // namespace cuda
}  // namespace lsr_fast
