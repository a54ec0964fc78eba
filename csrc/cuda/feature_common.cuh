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

// Whether the position-owning kernels take their 16-byte path (kVec) for tensors of layout L at
// p and q (q: nullptr, or a second tensor of the same strides accessed at the same positions, the
// features the backward reads beside the gradient p). NCHW: for any h*w and strides (LaneSlots
// below), given element-aligned pointers at the same address mod 16 (the slots p defines serve q).
// Channels-last / rows: when both pointers, K and the strides keep every vector aligned.
template <typename scalar_t>
inline bool vec16_path(const FeatureLayout& L, const scalar_t* p, const scalar_t* q) {
  constexpr int V = Vec16<scalar_t>::kSize;
  if (position_major(L)) {
    return aligned_elem(p) &&
           (q == nullptr || (reinterpret_cast<uintptr_t>(q) - reinterpret_cast<uintptr_t>(p)) % 16 == 0);
  }
  const bool batch_ok = L.B == 1 || L.sB % V == 0;
  return aligned16(p) && (q == nullptr || aligned16(q)) && batch_ok && L.sK == 1 && L.K % V == 0 && L.sN % V == 0;
}

// ---- NCHW position-owning kernels: the positions a lane holds --------------------------------
// vector_mean_kernel and feature_backward_kernel give a block kPos = 32*V consecutive positions
// [G, G + kPos) of one image, and warp w reads the channels w, w + 8, ... All planes of one warp
// share one alignment: its channels are 8*sK elements apart, a multiple of 16 bytes
// (8 * sizeof(scalar_t) >= 16). So each warp shifts its lanes by d, the elements from position G of
// its first plane to the next 16-byte boundary: lane j holds the group-local positions
// (d + j*V + u) mod kPos, u < V. Lanes 0..30 (and 31 when d == 0) hold V contiguous, aligned
// positions: one 16-byte access per channel while they are all inside the image. Lane 31 wraps
// around to [0, d), and slots past the image's end are read and written one by one (past the end:
// not at all). Chosen over a scalar head and tail per plane because a lane must hold the same
// positions in every channel (its norms are summed over channels), and the head size changes from
// plane to plane. A position's sums still run over its warp's channels in order and then over the
// warps in order, whichever lane holds it and however it is loaded: results do not depend on d,
// nor on the vector path (bit for bit those of kVec = false).
template <int V>
struct LaneSlots {
  static constexpr int kPos = 32 * V;
  int q0;     // group-local position of slot 0: d + lane * V
  int limit;  // positions of the group inside the image: min(kPos, HW - G)
  bool vec;   // the V slots are contiguous, 16-byte aligned and inside the image

  __device__ __forceinline__ int pos(int u) const {
    const int q = q0 + u;
    return q >= kPos ? q - kPos : q;
  }
  __device__ __forceinline__ bool valid(int u) const { return pos(u) < limit; }
  // Any slot inside the image: slot 0 (the first of unwrapped slots), or a slot that wrapped to
  // position 0 (limit >= 1).
  __device__ __forceinline__ bool any() const { return q0 < limit || q0 + V > kPos; }
};

// The slots of the calling lane. base + offset: this warp's first channel plane at position G
// (base element-aligned: only the address is used); remaining = HW - G > 0.
template <int V, typename scalar_t>
__device__ __forceinline__ LaneSlots<V> lane_slots(const scalar_t* base, int64_t offset, int64_t remaining) {
  static_assert(V == 1 || V == Vec16<scalar_t>::kSize, "V is 1 or the 16-byte vector width");
  static_assert(kWarps * sizeof(scalar_t) % 16 == 0, "a warp's planes must share their alignment");
  LaneSlots<V> s;
  const int d = V > 1 ? head_elems(base, offset) : 0;
  s.q0 = d + lane_id() * V;
  s.limit = static_cast<int>(remaining < LaneSlots<V>::kPos ? remaining : LaneSlots<V>::kPos);
  s.vec = V > 1 && s.q0 + V <= s.limit;  // excludes lane 31 when d > 0 (q0 + V > kPos >= limit)
  return s;
}

// x[u] = the feature at slot u of a channel plane (p: the plane at position G), 0 outside the image.
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_slots(const scalar_t* p, const LaneSlots<V>& s, acc_t (&x)[V]) {
  if constexpr (V > 1) {
    if (s.vec) {
      const Vec16<scalar_t> v = load_vec16(p + s.q0);
#pragma unroll
      for (int u = 0; u < V; ++u) x[u] = static_cast<acc_t>(v.v[u]);
      return;
    }
  }
  // One base address and constant offsets (u, or u - kPos once wrapped): few registers.
  const scalar_t* slot0 = p + s.q0;
#pragma unroll
  for (int u = 0; u < V; ++u) {
    const bool wrapped = s.q0 + u >= LaneSlots<V>::kPos;
    x[u] = s.valid(u) ? static_cast<acc_t>(wrapped ? slot0[u - LaneSlots<V>::kPos] : slot0[u]) : acc_t(0);
  }
}

// Writes g[u] to slot u of a channel plane (p: the plane at position G), inside the image only.
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_slots(scalar_t* p, const LaneSlots<V>& s, const acc_t (&g)[V]) {
  if constexpr (V > 1) {
    if (s.vec) {
      Vec16<scalar_t> o;
#pragma unroll
      for (int u = 0; u < V; ++u) o.v[u] = static_cast<scalar_t>(g[u]);
      store_vec16(p + s.q0, o);
      return;
    }
  }
  scalar_t* slot0 = p + s.q0;
#pragma unroll
  for (int u = 0; u < V; ++u) {
    if (s.valid(u)) (s.q0 + u >= LaneSlots<V>::kPos ? slot0[u - LaneSlots<V>::kPos] : slot0[u]) = static_cast<scalar_t>(g[u]);
  }
}

}  // namespace cuda
}  // namespace lsr_fast
