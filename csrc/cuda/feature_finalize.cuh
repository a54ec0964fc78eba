// feature_terms' per-position work outside the main pass (feature_pass.cuh):
//   - terms_finalize_kernel: a warp owns 32 consecutive positions (one per lane), blocks stride
//     over the positions; each position's pos_partial slots are added in K-tile order, giving
//     |f|, the norm-alignment term and the class distance; per-class distances are summed by a
//     warp segmented reduction into per-warp accumulators (added in warp order), counts by
//     integer atomics; each block writes its results, and terms_reduce_kernel (one block) adds
//     them in block order. Deterministic: fixed orders throughout, atomics only on integers.
//   - vector_mean_kernel (kFiltered only): the filtered-mean pre-pass, m per position. It runs
//     before the pass because the pass splits K over blocks, so no block sees all K channels of
//     a position. NCHW: a block owns 32*V positions (lane slots, feature_common.cuh) and its
//     warps split the channels; otherwise a warp owns a position, lanes split the channels (as
//     the backward's first sweep); fixed loop and reduction order, no atomics, so the backward
//     reproduces m bit for bit.
// See feature_common.cuh for the kFiltered switch and its cost.
#pragma once

#include "feature_common.cuh"

namespace lsr_fast {
namespace cuda {

// ---- feature_terms: per-position finalisation -------------------------------------------
// kFiltered: the norm-alignment term of ||f~|| (third slot), the norm sum of ||f|| (first slot).
template <typename acc_t, bool kFiltered = false>
__global__ void __launch_bounds__(kThreads)
    terms_finalize_kernel(const acc_t* __restrict__ pos_partial, int ktiles, int64_t N, const void* __restrict__ labels,
                          int label_kind, int64_t ignore_index, int C, const acc_t* __restrict__ reference,
                          int norm_mode, unsigned long long* __restrict__ counts, acc_t* __restrict__ acc_global,
                          acc_t* __restrict__ block_sq, acc_t* __restrict__ block_norm) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* red = reinterpret_cast<acc_t*>(smem);  // kWarps
  acc_t* scratch = red + kWarps;                // kWarps x 32
  acc_t* acc = acc_global != nullptr ? acc_global + static_cast<int64_t>(blockIdx.x) * kWarps * C
                                     : scratch + kWarps * 32;  // kWarps x C
  const int t = threadIdx.x;
  const int lane = lane_id();
  const int warp = warp_id();
  for (int64_t e = t; e < static_cast<int64_t>(kWarps) * C; e += kThreads) acc[e] = acc_t(0);
  __syncthreads();

  const acc_t r = *reference;
  acc_t loss_local = acc_t(0), norm_local = acc_t(0);
  acc_t* my_acc = acc + static_cast<int64_t>(warp) * C;
  acc_t* my_scratch = scratch + warp * 32;
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * 32; base < N;
       base += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t n = base + lane;
    int key = -1;
    acc_t sq = acc_t(0);
    if (n < N) {
      constexpr int kSlots = pos_partial_slots(kFiltered);
      acc_t s1 = acc_t(0), s2 = acc_t(0), s3 = acc_t(0);
#pragma unroll 4
      for (int kt = 0; kt < ktiles; ++kt) {  // K-tile order: deterministic
        s1 += pos_partial[(kSlots * static_cast<int64_t>(kt)) * N + n];
        s2 += pos_partial[(kSlots * static_cast<int64_t>(kt) + 1) * N + n];
        if constexpr (kFiltered) s3 += pos_partial[(kSlots * static_cast<int64_t>(kt) + 2) * N + n];
      }
      const acc_t norm = device_sqrt(s1);
      acc_t term_norm = norm;
      if constexpr (kFiltered) term_norm = device_sqrt(s3);
      const acc_t gap = r - term_norm;
      loss_local += norm_mode == kNormSource ? device_abs(gap) : (gap > acc_t(0) ? gap : acc_t(0));
      norm_local += norm;
      key = class_of(load_label(labels, label_kind, n), ignore_index, C);
      sq = s2;
    }
    warp_segmented_add(my_acc, my_scratch, key, sq);
    warp_count_global(counts, key);
  }
  __syncthreads();
  const acc_t loss_total = block_sum(loss_local, red);
  const acc_t norm_total = block_sum(norm_local, red);
  if (t == 0) {
    block_norm[2 * static_cast<int64_t>(blockIdx.x)] = loss_total;
    block_norm[2 * static_cast<int64_t>(blockIdx.x) + 1] = norm_total;
  }
  for (int c = t; c < C; c += kThreads) {
    acc_t s = acc_t(0);
    for (int w = 0; w < kWarps; ++w) s += acc[static_cast<int64_t>(w) * C + c];
    block_sq[static_cast<int64_t>(blockIdx.x) * C + c] = s;
  }
}

// Adds the per-block results of terms_finalize_kernel in block order (one block).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    terms_reduce_kernel(const acc_t* __restrict__ block_sq, const acc_t* __restrict__ block_norm, int nblocks, int C,
                        acc_t* __restrict__ sq_out, acc_t* __restrict__ loss_out, acc_t* __restrict__ norm_out) {
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t s = acc_t(0);
    for (int b = 0; b < nblocks; ++b) s += block_sq[static_cast<int64_t>(b) * C + c];
    sq_out[c] = s;
  }
  if (threadIdx.x == 0) {
    acc_t loss = acc_t(0), norm = acc_t(0);
    for (int b = 0; b < nblocks; ++b) {
      loss += block_norm[2 * b];
      norm += block_norm[2 * b + 1];
    }
    *loss_out = loss;
    *norm_out = norm;
  }
}

// ---- filtered norms: each vector's threshold m (forward) ------------------------------------
// mean[b * HW + n] = filter_threshold(sum_k f, max_k f, K). The loops and the reduction order are
// those of the first sweep of feature_backward_kernel<..., kFiltered = true> (keep them in step):
// NCHW, a block owns 32*V positions, warp w sums channels w, w + 8, ... in order and the warps
// are combined in warp order; channels-last / rows, a warp owns a position, lane l sums its
// channels in order, then a shuffle tree.
template <typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kThreads)
    vector_mean_kernel(const scalar_t* __restrict__ feat, BackwardArgs a, bool pos_major,
                       at::opmath_type<scalar_t>* __restrict__ mean) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = kVec ? Vec16<scalar_t>::kSize : 1;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  __shared__ acc_t red[2 * kWarps * 32 * V];  // channel sums, then maxima
  const int lane = lane_id();
  const int warp = warp_id();
  const int K = a.K;
  if (pos_major) {
    constexpr int kPos = 32 * V;
    const int64_t groups_per_image = (a.HW + kPos - 1) / kPos;
    const int64_t groups = (a.N / a.HW) * groups_per_image;
    for (int64_t grp = blockIdx.x; grp < groups; grp += gridDim.x) {
      const int64_t b = grp / groups_per_image;
      const int64_t G = (grp % groups_per_image) * kPos;
      const int64_t plane0 = b * a.sB + G;  // position G of channel 0
      const LaneSlots<V> sl = lane_slots<V>(feat, plane0 + warp * a.sK, a.HW - G);
      const scalar_t* fb = feat + plane0;
      acc_t tot[V], mx[V];
#pragma unroll
      for (int u = 0; u < V; ++u) {
        tot[u] = acc_t(0);
        mx[u] = kNegInf;
      }
      if (sl.any()) {
        for (int k = warp; k < K; k += kWarps) {
          acc_t x[V];
          load_slots(fb + k * a.sK, sl, x);
#pragma unroll
          for (int u = 0; u < V; ++u) {
            tot[u] += x[u];
            mx[u] = max_keep(mx[u], x[u]);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < V; ++u) {
        red[warp * kPos + sl.pos(u)] = tot[u];
        red[(kWarps + warp) * kPos + sl.pos(u)] = mx[u];
      }
      __syncthreads();
      if (warp == 0) {  // warp 0's slots cover the group once, as every warp's do
#pragma unroll
        for (int u = 0; u < V; ++u) {
          if (sl.valid(u)) {
            const int q = sl.pos(u);
            acc_t t = acc_t(0), m = kNegInf;
            for (int w = 0; w < kWarps; ++w) {  // warp order
              t += red[w * kPos + q];
              m = max_keep(m, red[(kWarps + w) * kPos + q]);
            }
            mean[b * a.HW + G + q] = filter_threshold(t, m, K);
          }
        }
      }
      __syncthreads();  // red is reused by the next group
    }
  } else {
    constexpr int kStep = 32 * V;
    const int64_t warps_total = static_cast<int64_t>(gridDim.x) * kWarps;
    for (int64_t gpos = static_cast<int64_t>(blockIdx.x) * kWarps + warp; gpos < a.N; gpos += warps_total) {
      const int64_t b = gpos / a.HW;
      const int64_t n = gpos % a.HW;
      const scalar_t* fp = feat + b * a.sB + n * a.sN;
      acc_t tot = acc_t(0), mx = kNegInf;
      for (int k = lane * V; k < K; k += kStep) {
        if constexpr (kVec) {
          const Vec16<scalar_t> v = load_vec16(fp + k);
#pragma unroll
          for (int u = 0; u < V; ++u) {
            const acc_t x = static_cast<acc_t>(v.v[u]);
            tot += x;
            mx = max_keep(mx, x);
          }
        } else {
          const acc_t x = static_cast<acc_t>(fp[k * a.sK]);
          tot += x;
          mx = max_keep(mx, x);
        }
      }
      for (int offset = 16; offset > 0; offset >>= 1) {
        tot += __shfl_down_sync(kFullMask, tot, offset);
        mx = max_keep(mx, __shfl_down_sync(kFullMask, mx, offset));
      }
      if (lane == 0) mean[gpos] = filter_threshold(tot, mx, K);
    }
  }
}

// Writes mean (B * HW,) for the features f in layout L.
template <typename scalar_t>
inline void run_vector_mean(const at::Tensor& f, const FeatureLayout& L, at::opmath_type<scalar_t>* mean, int sms) {
  constexpr int V = Vec16<scalar_t>::kSize;
  TORCH_CHECK(L.K < (int64_t(1) << 31), "lsr_fast: the feature width K must be < 2^31, got ", L.K);
  BackwardArgs a{L.HW, L.B * L.HW, L.sB, L.sK, L.sN, static_cast<int>(L.K), 0, nullptr, 0, 0, 0};
  const bool pos_major = position_major(L);
  // As run_feature_backward decides (its gradient tensor is freshly allocated, hence aligned):
  // channels-last sums depend on kVec; NCHW ones do not.
  const bool vec = vec16_path<scalar_t>(L, f.const_data_ptr<scalar_t>(), nullptr);
  const int64_t work = pos_major ? L.B * ceil_div(L.HW, int64_t(32) * (vec ? V : 1)) : ceil_div(L.B * L.HW, kWarps);
  const unsigned grid = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(work, int64_t(sms) * 16)));
  const scalar_t* fp = f.const_data_ptr<scalar_t>();
  if (vec) {
    vector_mean_kernel<scalar_t, true><<<grid, kThreads, 0, stream()>>>(fp, a, pos_major, mean);
  } else {
    vector_mean_kernel<scalar_t, false><<<grid, kThreads, 0, stream()>>>(fp, a, pos_major, mean);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace lsr_fast
