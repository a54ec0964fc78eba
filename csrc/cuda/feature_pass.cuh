// The forward pass over feature maps shared by class_feature_stats and feature_terms: the
// class/feature pass (feature_pass_kernel), its host-side planning and its launch. Shared pieces
// are in feature_common.cuh; feature_terms' per-position finish is in feature_finalize.cuh, the
// backward in feature_backward.cuh.
//
// Forward (feature_pass_kernel): a block owns one K-tile of kKT = 32 channels and a contiguous
// range of position tiles (kNT = 128 positions of one image). For each position tile it stages
// the [32 x 128] slab in shared memory, loaded coalesced along the unit-stride dimension
// (positions for NCHW, channels for channels_last and (N, K) rows) with 16-byte vector loads
// (NCHW: for any h*w, from each row's first 16-byte boundary; channels-last: when K and the
// strides allow), and the 128 labels. Then
//   - class sums: warp w takes 128/S consecutive positions, lane = channel; runs of equal labels
//     are summed in a register and added to the warp's private (C x 32) accumulator, so no
//     atomics and a fixed summation order inside the block (S copies in shared memory, as many
//     as smem_budget() holds, up to 8; global memory when not even one fits);
//   - (feature_terms) per-position partial |f|^2 and |f - p_c|^2 over the 32 channels, two
//     threads per position, written to pos_partial[ktile][2][N] (no atomics).
// At the end the warp accumulators are summed in warp order and the block's (C x 32) slice is
// added to sums with float atomics (default), or written to partial[position-range][C][K]
// and reduced in a fixed order by a second kernel (deterministic mode: costs one launch and
// P*C*K*4 bytes written and read, P = resident blocks / (K/32): ~1 MB for C = 19, K = 2048).
//
// feature_terms then reduces pos_partial per position in K-tile order (feature_finalize.cuh:
// norms, the norm-alignment term, per-class squared distances by a deterministic warp
// segmented reduction, counts by integer atomics) and a one-block kernel adds the per-block
// results in block order. pos_partial costs 8 bytes per position per 32 channels written and
// read back (~6% + 6% of the feature bytes for float32): the price of splitting K over blocks,
// which keeps every block's working set small and the whole GPU busy for any (N, K).
// Determinism: every in-block sum has a fixed order; the cross-block class sums use float
// atomics by default and a fixed-order partial reduction in deterministic() mode.
#pragma once

#include "feature_common.cuh"

namespace lsr_fast {
namespace cuda {

struct FeaturePassArgs {
  int64_t HW;  // positions per image
  int64_t N;   // all positions (B * HW)
  int64_t sB, sK, sN;
  int K, C;
  bool pos_major;  // positions have unit stride
  bool vec;        // 16-byte loads along the unit-stride dimension are aligned
  const void* labels;
  int label_kind;
  int64_t ignore_index;
  int ktiles;
  int P;  // position ranges per K-tile
  int64_t tiles_per_image;
  int64_t total_tiles;
  int acc_copies;  // S in {1, 2, 4, 8}: per-warp accumulators in shared memory; 0: kWarps in global scratch
};

// x[i] <- x[(i + r) mod V] for a run-time r: a barrel rotator (log2(V) steps of V selects) with
// compile-time register indices, so x stays in registers (x[r] would spill it to local memory).
template <typename T, int V>
__device__ __forceinline__ void rotate_left(T (&x)[V], int r) {
  static_assert((V & (V - 1)) == 0, "V is a power of two");
#pragma unroll
  for (int step = 1; step < V; step <<= 1) {
    T y[V];
#pragma unroll
    for (int i = 0; i < V; ++i) y[i] = (r & step) ? x[(i + step) % V] : x[i];
#pragma unroll
    for (int i = 0; i < V; ++i) x[i] = y[i];
  }
}

template <typename scalar_t, bool kTerms, bool kL1 = false, bool kFiltered = false>
__global__ void __launch_bounds__(kThreads)
    feature_pass_kernel(const scalar_t* __restrict__ feat, FeaturePassArgs a,
                        at::opmath_type<scalar_t>* __restrict__ acc_global, at::opmath_type<scalar_t>* __restrict__ sums,
                        at::opmath_type<scalar_t>* __restrict__ sums_partial, unsigned long long* __restrict__ counts,
                        const at::opmath_type<scalar_t>* __restrict__ protos,
                        at::opmath_type<scalar_t>* __restrict__ pos_partial,
                        const at::opmath_type<scalar_t>* __restrict__ mean) {
  static_assert(kTerms || (!kL1 && !kFiltered), "the switches belong to feature_terms");
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kSlots = pos_partial_slots(kFiltered);
  constexpr int V = Vec16<scalar_t>::kSize;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* tile = reinterpret_cast<acc_t*>(smem);              // kKT x kTileStride
  int* lab = reinterpret_cast<int*>(tile + kKT * kTileStride);  // kNT
  acc_t* acc;
  int S;
  if (a.acc_copies > 0) {
    acc = reinterpret_cast<acc_t*>(lab + kNT);
    S = a.acc_copies;
  } else {
    acc = acc_global + static_cast<int64_t>(blockIdx.x) * kWarps * a.C * kKT;
    S = kWarps;
  }
  const int t = threadIdx.x;
  const int lane = lane_id();
  const int warp = warp_id();
  const int kt = blockIdx.x % a.ktiles;
  const int pc = blockIdx.x / a.ktiles;
  const int k0 = kt * kKT;
  const int C = a.C;
  const int K = a.K;

  const int64_t acc_n = static_cast<int64_t>(S) * C * kKT;
  for (int64_t e = t; e < acc_n; e += kThreads) acc[e] = acc_t(0);
  __syncthreads();

  const int64_t t_begin = pc * a.total_tiles / a.P;
  const int64_t t_end = (pc + 1) * a.total_tiles / a.P;
  const int pos_per_warp = kNT / S;
  for (int64_t ti = t_begin; ti < t_end; ++ti) {
    const int64_t b = ti / a.tiles_per_image;
    const int64_t n0 = (ti % a.tiles_per_image) * kNT;
    const scalar_t* fb = feat + b * a.sB;

    if (t < kNT) {
      const int64_t n = n0 + t;
      lab[t] = n < a.HW ? class_of(load_label(a.labels, a.label_kind, b * a.HW + n), a.ignore_index, C) : -1;
    }
    // Stage the [kKT x kNT] slab; out-of-range channels/positions read as 0. Each thread keeps
    // its position (or channel) fixed and strides over the other dimension in a fully unrolled
    // loop, so all of its loads are in flight at once.
    if (a.pos_major) {
      if (a.vec) {
        // 16-byte loads for any h*w: a channel row (kNT positions from n0) starts h elements
        // before a 16-byte boundary, h from the row's own address (planes of an odd h*w start at
        // every alignment). Thread j of the row takes positions (h + j*V + u) mod kNT, u < V:
        // one aligned vector when they are contiguous and inside the image, else V scalar loads
        // (the last thread, wrapping around to [0, h), and the image's last tile). Each position
        // is loaded once either way and the slab holds the same values: the sums below do not
        // depend on the path.
        // Bank conflicts of the staging store: thread j writes V consecutive floats at
        // k*kTileStride + h + j*V; storing element u on every thread at once hits each bank
        // V times over a group of 128 / (V * sizeof(acc_t)) threads (4-way for float32). Each
        // thread stores its elements in a rotated order instead, so that in every store
        // instruction the element's index mod V is (i + thread's group) mod V: the groups of a
        // warp hit disjoint banks and the threads of a group consecutive ones (no conflict, also
        // for bfloat16, where a warp spans two rows of different h, and float64's half-warps).
        constexpr int per_row = kNT / V;  // threads per channel row
        constexpr int rows_per_pass = kThreads / per_row;
        constexpr int kGroup = 128 / (V * int(sizeof(acc_t)));  // threads whose stores span the 32 banks once
        static_assert(kThreads % per_row == 0 && kKT % rows_per_pass == 0, "whole passes");
        static_assert(kGroup * V * sizeof(acc_t) == 128 && per_row % kGroup == 0, "a group lies in one row");
        static_assert(kNT % (32 * 4 / sizeof(acc_t)) == 0, "wrapping keeps the banks");
        // A thread's rows are rows_per_pass = 2V apart: 32 bytes times sK in memory and 2V
        // times kTileStride in the slab, multiples of 16 bytes and of V, so h and the rotation
        // below are the same for all of them.
        static_assert(rows_per_pass * sizeof(scalar_t) % 16 == 0 && rows_per_pass % V == 0, "one h per thread");
        const int j = t % per_row;
        const int kr = t / per_row;
        const int cnt = static_cast<int>(std::min<int64_t>(kNT, a.HW - n0));  // positions inside the image
        const scalar_t* row0 = fb + static_cast<int64_t>(k0 + kr) * a.sK + n0;  // the thread's first row
        const int h = head_elems(row0, 0);
        const int q0 = h + j * V;
        const bool whole = q0 + V <= cnt;  // cnt <= kNT: never the wrapping thread
        // At step i every thread stores an element whose smem index mod V is (i + lane / kGroup) mod V.
        const int rot = (lane / kGroup - (kr * kTileStride + h)) & (V - 1);
#pragma unroll
        for (int it = 0; it < kKT / rows_per_pass; ++it) {
          const int k = kr + it * rows_per_pass;
          const bool k_ok = k0 + k < K;
          const scalar_t* src = row0 + static_cast<int64_t>(it * rows_per_pass) * a.sK + q0;  // slot 0
          acc_t x[V];
          if (k_ok && whole) {
            const Vec16<scalar_t> v = load_vec16(src);
#pragma unroll
            for (int u = 0; u < V; ++u) x[u] = static_cast<acc_t>(v.v[u]);
          } else {
#pragma unroll
            for (int u = 0; u < V; ++u) {
              const bool wrapped = q0 + u >= kNT;
              const int q = wrapped ? q0 + u - kNT : q0 + u;
              x[u] = (k_ok && q < cnt) ? static_cast<acc_t>(wrapped ? src[u - kNT] : src[u]) : acc_t(0);
            }
          }
          rotate_left(x, rot);  // x[i] now holds element (i + rot) mod V
          acc_t* dst = tile + k * kTileStride;
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const int u = (i + rot) & (V - 1);
            dst[q0 + u < kNT ? q0 + u : q0 + u - kNT] = x[i];
          }
        }
      } else {
        constexpr int rows_per_pass = kThreads / kNT;
        static_assert(kThreads % kNT == 0 && kKT % rows_per_pass == 0, "whole passes");
        const int nl = t % kNT;
        const int kr = t / kNT;
        const int64_t n = n0 + nl;
        const bool n_ok = n < a.HW;
#pragma unroll
        for (int it = 0; it < kKT / rows_per_pass; ++it) {
          const int k = kr + it * rows_per_pass;
          const int kg = k0 + k;
          tile[k * kTileStride + nl] = (n_ok && kg < K) ? static_cast<acc_t>(fb[kg * a.sK + n]) : acc_t(0);
        }
      }
    } else {
      if (a.vec) {  // V consecutive channels per load; K % V == 0
        constexpr int per_pos = kKT / V;                  // vectors per position
        constexpr int pos_per_pass = kThreads / per_pos;
        static_assert(kThreads % per_pos == 0 && kNT % pos_per_pass == 0, "whole passes");
        const int kl = (t % per_pos) * V;
        const int pr = t / per_pos;
        const int kg = k0 + kl;
        const bool k_ok = kg < K;
#pragma unroll
        for (int it = 0; it < kNT / pos_per_pass; ++it) {
          const int nl = pr + it * pos_per_pass;
          const int64_t n = n0 + nl;
          if (k_ok && n < a.HW) {
            const Vec16<scalar_t> v = load_vec16(fb + n * a.sN + kg);
#pragma unroll
            for (int u = 0; u < V; ++u) tile[(kl + u) * kTileStride + nl] = static_cast<acc_t>(v.v[u]);
          } else {
#pragma unroll
            for (int u = 0; u < V; ++u) tile[(kl + u) * kTileStride + nl] = acc_t(0);
          }
        }
      } else {
        constexpr int pos_per_pass = kThreads / kKT;
        static_assert(kThreads % kKT == 0 && kNT % pos_per_pass == 0, "whole passes");
        const int k = t % kKT;
        const int pr = t / kKT;
        const int kg = k0 + k;
        const bool k_ok = kg < K;
        const scalar_t* fk = fb + kg * a.sK;
#pragma unroll
        for (int it = 0; it < kNT / pos_per_pass; ++it) {
          const int nl = pr + it * pos_per_pass;
          const int64_t n = n0 + nl;
          tile[k * kTileStride + nl] = (k_ok && n < a.HW) ? static_cast<acc_t>(fk[n * a.sN]) : acc_t(0);
        }
      }
    }
    __syncthreads();

    // Class sums: lane = channel, runs of equal labels summed in a register.
    if (warp < S) {
      acc_t* A = acc + static_cast<int64_t>(warp) * C * kKT;
      const int nb = warp * pos_per_warp;
      const int ne = nb + pos_per_warp;
      int cur = -1;
      acc_t run = acc_t(0);
      for (int n = nb; n < ne; ++n) {
        const int c = lab[n];
        const acc_t v = tile[lane * kTileStride + n];
        if (c != cur) {
          if (cur >= 0) A[cur * kKT + lane] += run;
          cur = c;
          run = acc_t(0);
        }
        run += v;
      }
      if (cur >= 0) A[cur * kKT + lane] += run;
    }

    if constexpr (kTerms) {
      // Two threads per position, 16 channels each.
      const int pos = t >> 1;
      const int half = t & 1;
      const int c = lab[pos];
      const int64_t n = n0 + pos;
      // kFiltered: the position's threshold m (padding channels are 0 and add 0 either way).
      acc_t thr = acc_t(0);
      if constexpr (kFiltered) thr = n < a.HW ? mean[b * a.HW + n] : acc_t(0);
      acc_t s1 = acc_t(0), s2 = acc_t(0), s3 = acc_t(0);
#pragma unroll 4
      for (int kk = 0; kk < kKT / 2; ++kk) {
        const int k = half * (kKT / 2) + kk;
        const acc_t v = tile[k * kTileStride + pos];
        s1 += v * v;
        if constexpr (kFiltered) {
          if (v >= thr) s3 += v * v;
        }
        if (c >= 0) {
          const int kg = k0 + k;
          const acc_t d = v - (kg < K ? protos[static_cast<int64_t>(c) * K + kg] : acc_t(0));
          if constexpr (kL1) {
            s2 += device_abs(d);
          } else {
            s2 += d * d;
          }
        }
      }
      s1 += __shfl_xor_sync(kFullMask, s1, 1);
      s2 += __shfl_xor_sync(kFullMask, s2, 1);
      if constexpr (kFiltered) s3 += __shfl_xor_sync(kFullMask, s3, 1);
      if (half == 0 && n < a.HW) {
        const int64_t gpos = b * a.HW + n;
        pos_partial[(kSlots * static_cast<int64_t>(kt)) * a.N + gpos] = s1;
        pos_partial[(kSlots * static_cast<int64_t>(kt) + 1) * a.N + gpos] = s2;
        if constexpr (kFiltered) pos_partial[(kSlots * static_cast<int64_t>(kt) + 2) * a.N + gpos] = s3;
      }
    }

    if (counts != nullptr && kt == 0 && warp < kNT / 32) warp_count_global(counts, lab[t]);
    __syncthreads();  // the slab and labels are overwritten by the next tile
  }

  // Flush: warp accumulators in warp order, then one atomic (or one partial write) per element.
  for (int e = t; e < C * kKT; e += kThreads) {
    const int c = e / kKT;
    const int k = e % kKT;
    const int kg = k0 + k;
    if (kg >= K) continue;
    acc_t s = acc_t(0);
    for (int w = 0; w < S; ++w) s += acc[(static_cast<int64_t>(w) * C + c) * kKT + k];
    if (sums_partial != nullptr) {
      sums_partial[(static_cast<int64_t>(pc) * C + c) * K + kg] = s;
    } else if (s != acc_t(0)) {
      atomicAdd(sums + static_cast<int64_t>(c) * K + kg, s);
    }
  }
}

// Everything the host decides for one forward pass.
struct FeaturePassPlan {
  FeaturePassArgs args;
  int64_t grid;
  size_t smem;
};

template <typename scalar_t, bool kTerms, bool kL1 = false, bool kFiltered = false>
inline FeaturePassPlan plan_feature_pass(const at::Tensor& f, const FeatureLayout& L, const Labels& lab, int64_t C,
                                         int64_t ignore_index, int sms) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec16<scalar_t>::kSize;
  TORCH_CHECK(L.K < (int64_t(1) << 31), "lsr_fast: the feature width K must be < 2^31, got ", L.K);
  TORCH_CHECK(C <= kMaxClasses, "lsr_fast: num_classes must be <= ", kMaxClasses, " for the CUDA kernels, got ", C);
  FeaturePassPlan plan{};
  FeaturePassArgs& a = plan.args;
  a.HW = L.HW;
  a.N = L.B * L.HW;
  a.sB = L.sB;
  a.sK = L.sK;
  a.sN = L.sN;
  a.K = static_cast<int>(L.K);
  a.C = static_cast<int>(C);
  a.pos_major = position_major(L);
  // NCHW: rows of any h*w and alignment (see the staging); channels-last: aligned channel vectors.
  const bool batch_ok = L.B == 1 || L.sB % V == 0;
  a.vec = a.pos_major ? aligned_elem(f.const_data_ptr<scalar_t>())
                      : (aligned16(f.const_data_ptr()) && batch_ok && L.sK == 1 && L.K % V == 0 && L.sN % V == 0);
  a.labels = lab.tensor.const_data_ptr();
  a.label_kind = lab.kind;
  a.ignore_index = ignore_index;
  // At least one K-tile even for K == 0 so that the counts are still taken.
  a.ktiles = static_cast<int>(std::max<int64_t>(1, ceil_div(L.K, kKT)));
  a.tiles_per_image = ceil_div(L.HW, kNT);
  a.total_tiles = L.B * a.tiles_per_image;
  const int64_t fixed = int64_t(kKT) * kTileStride * int64_t(sizeof(acc_t)) + kNT * int64_t(sizeof(int));
  const int64_t per_copy = C * kKT * int64_t(sizeof(acc_t));
  // As many per-warp accumulator copies as the budget holds: beyond 48 KB (float64, or C >= 32)
  // with the opt-in attribute, so that the class-sum phase keeps all 8 warps busy where it fits
  // (float64 C = 19: 71 KB; float32 C = 40: 57 KB; float32 C = 300: 2 copies in 92 KB on sm_90,
  // 1 in 54 KB on sm_80, instead of the global-memory accumulators).
  static SmemOptIn opt_in;  // one per instantiation of the kernel
  const int64_t budget = opt_in.enable(feature_pass_kernel<scalar_t, kTerms, kL1, kFiltered>);
  int S = kWarps;
  while (S > 0 && fixed + S * per_copy > budget) S /= 2;
  a.acc_copies = S;
  plan.smem = static_cast<size_t>(fixed + S * per_copy);
  // Blocks take equal static shares of the position tiles, so the grid should be one wave:
  // as many blocks as fit on the GPU at once (P position ranges per K-tile).
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, feature_pass_kernel<scalar_t, kTerms, kL1, kFiltered>,
                                                               kThreads, plan.smem));
  const int64_t resident = int64_t(sms) * std::max(per_sm, 1);
  int64_t P = std::clamp<int64_t>(resident / a.ktiles, 1, a.total_tiles);
  if (S == 0) {
    // Large C: per-block accumulators in global memory (L2-resident); bound the scratch.
    P = std::clamp<int64_t>(kScratchBytes / (a.ktiles * kWarps * per_copy), 1, P);
  }
  a.P = static_cast<int>(P);
  plan.grid = a.ktiles * P;
  return plan;
}

// Runs the forward pass. sums (C, K) must be zeroed unless deterministic() (then it is fully
// written); counts (C,) zeroed or nullptr; protos/pos_partial only for kTerms (pos_partial holds
// pos_partial_slots(kFiltered) * ktiles * N elements); mean (N,) only for kFiltered.
template <typename scalar_t, bool kTerms, bool kL1 = false, bool kFiltered = false>
inline void run_feature_pass(const FeaturePassPlan& plan, const at::Tensor& f, at::Tensor& sums,
                             unsigned long long* counts, const at::opmath_type<scalar_t>* protos,
                             at::opmath_type<scalar_t>* pos_partial, int sms,
                             const at::opmath_type<scalar_t>* mean = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const FeaturePassArgs& a = plan.args;
  const auto acc_options = f.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor scratch, partial;
  acc_t* acc_global = nullptr;
  // Written in full before any read (no deterministic NaN fill): each block zeroes its slice of
  // scratch first; block (pc, kt) writes partial[pc][c][kg] for every c and each kg of its K-tile.
  if (a.acc_copies == 0) {
    scratch = empty_written({plan.grid * kWarps * a.C * kKT}, acc_options);
    acc_global = scratch.data_ptr<acc_t>();
  }
  const bool det = deterministic();
  if (det) partial = empty_written({int64_t(a.P) * a.C * a.K}, acc_options);
  feature_pass_kernel<scalar_t, kTerms, kL1, kFiltered>
      <<<static_cast<unsigned>(plan.grid), kThreads, plan.smem, stream()>>>(
          f.const_data_ptr<scalar_t>(), a, acc_global, det ? nullptr : sums.data_ptr<acc_t>(),
          det ? partial.data_ptr<acc_t>() : nullptr, counts, protos, pos_partial, mean);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (det) reduce_partials<acc_t>(partial, a.P, int64_t(a.C) * a.K, sums.data_ptr<acc_t>(), sms);
}

}  // namespace cuda
}  // namespace lsr_fast
