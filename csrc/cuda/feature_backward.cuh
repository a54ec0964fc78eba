// The backward kernels over feature maps shared by class_feature_stats and feature_terms
// (forward in feature_pass.cuh, shared pieces in feature_common.cuh).
//
// Backward (feature_backward_kernel): a gather (class_feature_stats) or the fused gradient of
// feature_terms. NCHW: a block owns 32*V consecutive positions (V per lane: the lane slots of
// feature_common.cuh, 16-byte accesses for any h*w) and its 8 warps split the channels; the
// per-position norm is reduced over the warps
// in a fixed order, then the block re-reads its positions (an L1/L2 hit: the block's slab was
// read moments before) and writes the gradient. Channels-last / rows: a warp owns a position,
// lanes split the channels, the norm is a shuffle-tree reduction. All fixed-order:
// deterministic in every mode. kFiltered adds the channel sum and maximum to the first sweep
// (m by exactly the loops and order of vector_mean_kernel, so the forward's m is reproduced
// bit for bit when both see the same layout: NCHW at any alignment, channels-last when both
// take the same kVec) and one more sweep over the same
// positions for ||f~|| (another cache re-read) before the gradient sweep; no extra buffer.
#pragma once

#include "feature_common.cuh"

namespace lsr_fast {
namespace cuda {

// ---- backward ---------------------------------------------------------------------------
// The class-distance term of one channel: d^2 (squared_l2) or |d| (l1), and its derivative's
// factor: grad_dist * 2d, written as (2 grad_dist) * d, or grad_dist * sign(d) (sign(0) = 0).
template <bool kL1, typename acc_t>
__device__ __forceinline__ acc_t dist_scale(acc_t grad_dist) {
  if constexpr (kL1) {
    return grad_dist;
  } else {
    return acc_t(2) * grad_dist;
  }
}

template <bool kL1, typename acc_t>
__device__ __forceinline__ acc_t dist_grad(acc_t d) {
  if constexpr (kL1) {
    return d > acc_t(0) ? acc_t(1) : (d < acc_t(0) ? acc_t(-1) : acc_t(0));
  } else {
    return d;
  }
}

// d(loss)/d|f| * grad_norm_loss + grad_norm_sum, divided by |f| (0 when |f| == 0).
template <typename acc_t>
__device__ __forceinline__ acc_t norm_coefficient(acc_t sq_norm, acc_t r, acc_t g_loss, acc_t g_norm, int mode) {
  const acc_t norm = device_sqrt(sq_norm);
  if (!(norm > acc_t(0))) return acc_t(0);
  const acc_t gap = r - norm;
  acc_t dl;
  if (mode == kNormSource) {
    dl = gap > acc_t(0) ? acc_t(-1) : (gap < acc_t(0) ? acc_t(1) : acc_t(0));  // -sign(gap)
  } else {
    dl = gap >= acc_t(0) ? acc_t(-1) : acc_t(0);  // as autograd of clamp(min=0): gradient at gap == 0
  }
  return (g_loss * dl + g_norm) / norm;
}

// kTerms = false: class_feature_stats backward, grad = grad_sums[label] (features not read).
// kTerms = true: feature_terms backward. kVec: 16-byte accesses along the unit-stride dim.
// kL1 / kFiltered: feature_terms' switches (see feature_common.cuh).
template <typename scalar_t, bool kTerms, bool kVec, bool kL1 = false, bool kFiltered = false>
__global__ void __launch_bounds__(kThreads)
    feature_backward_kernel(const scalar_t* __restrict__ feat, scalar_t* __restrict__ out, BackwardArgs a,
                            bool pos_major, const at::opmath_type<scalar_t>* __restrict__ grad_sums,
                            const at::opmath_type<scalar_t>* __restrict__ grad_sq,
                            const at::opmath_type<scalar_t>* __restrict__ grad_norm_loss,
                            const at::opmath_type<scalar_t>* __restrict__ grad_norm_sum,
                            const at::opmath_type<scalar_t>* __restrict__ protos,
                            const at::opmath_type<scalar_t>* __restrict__ reference) {
  static_assert(kTerms || (!kL1 && !kFiltered), "the switches belong to feature_terms");
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = kVec ? Vec16<scalar_t>::kSize : 1;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  // Per-position reductions of the first sweep: |f|^2, plus channel sum and maximum if filtered.
  constexpr int kRed = kFiltered ? 3 : 1;
  __shared__ acc_t red[kTerms ? kRed * kWarps * 32 * V : 1];
  const int lane = lane_id();
  const int warp = warp_id();
  const int K = a.K;
  acc_t r = acc_t(0), g_loss = acc_t(0), g_norm = acc_t(0);
  if constexpr (kTerms) {
    r = *reference;
    g_loss = *grad_norm_loss;
    g_norm = *grad_norm_sum;
  }

  if (pos_major) {
    // A block owns 32*V consecutive positions of one image; warp w takes channels w, w+8, ...
    // Lane slots (feature_common.cuh): whole 16-byte accesses for any h*w when kVec.
    constexpr int kPos = 32 * V;
    const int64_t groups_per_image = (a.HW + kPos - 1) / kPos;
    const int64_t groups = (a.N / a.HW) * groups_per_image;
    for (int64_t grp = blockIdx.x; grp < groups; grp += gridDim.x) {
      const int64_t b = grp / groups_per_image;
      const int64_t G = (grp % groups_per_image) * kPos;
      const int64_t plane0 = b * a.sB + G;  // position G of channel 0
      // The gradient's addresses define the slots; the host checked that the features' agree mod 16.
      const LaneSlots<V> sl = lane_slots<V>(out, plane0 + warp * a.sK, a.HW - G);
      const scalar_t* fb = feat + plane0;
      scalar_t* ob = out + plane0;
      int cls[V];
      acc_t coef[V], two_gq[V];
      acc_t coef_f[V], thr[V];  // kFiltered: the coefficient of f~ and the threshold m
      const bool any_valid = sl.any();
#pragma unroll
      for (int u = 0; u < V; ++u) {
        const int64_t n = G + sl.pos(u);
        cls[u] = sl.valid(u) ? class_of(load_label(a.labels, a.label_kind, b * a.HW + n), a.ignore_index, a.C) : -1;
        coef[u] = acc_t(0);
        coef_f[u] = acc_t(0);
        thr[u] = acc_t(0);
        two_gq[u] = (kTerms && cls[u] >= 0) ? dist_scale<kL1>(grad_sq[cls[u]]) : acc_t(0);
      }
      if constexpr (kTerms) {
        acc_t s[V], tot[V], mx[V];
#pragma unroll
        for (int u = 0; u < V; ++u) {
          s[u] = acc_t(0);
          tot[u] = acc_t(0);
          mx[u] = kNegInf;
        }
        if (any_valid) {
          for (int k = warp; k < K; k += kWarps) {
            acc_t x[V];
            load_slots(fb + k * a.sK, sl, x);
#pragma unroll
            for (int u = 0; u < V; ++u) {
              s[u] += x[u] * x[u];
              if constexpr (kFiltered) {
                tot[u] += x[u];
                mx[u] = max_keep(mx[u], x[u]);
              }
            }
          }
        }
#pragma unroll
        for (int u = 0; u < V; ++u) {
          red[warp * kPos + sl.pos(u)] = s[u];
          if constexpr (kFiltered) {
            red[(kWarps + warp) * kPos + sl.pos(u)] = tot[u];
            red[(2 * kWarps + warp) * kPos + sl.pos(u)] = mx[u];
          }
        }
        __syncthreads();
#pragma unroll
        for (int u = 0; u < V; ++u) {
          const int q = sl.pos(u);
          acc_t sq = acc_t(0);
          for (int w = 0; w < kWarps; ++w) sq += red[w * kPos + q];  // warp order
          if constexpr (kFiltered) {
            acc_t t = acc_t(0), m = kNegInf;
            for (int w = 0; w < kWarps; ++w) {  // as vector_mean_kernel
              t += red[(kWarps + w) * kPos + q];
              m = max_keep(m, red[(2 * kWarps + w) * kPos + q]);
            }
            thr[u] = filter_threshold(t, m, K);
            coef[u] = norm_coefficient(sq, r, acc_t(0), g_norm, a.norm_mode);  // norm_sum: unfiltered
          } else {
            coef[u] = norm_coefficient(sq, r, g_loss, g_norm, a.norm_mode);
          }
        }
        __syncthreads();  // red is reused by the next sweep / group
        if constexpr (kFiltered) {
          // ||f~||^2: the block's positions again (cache hits), kept channels only.
#pragma unroll
          for (int u = 0; u < V; ++u) s[u] = acc_t(0);
          if (any_valid) {
            for (int k = warp; k < K; k += kWarps) {
              acc_t x[V];
              load_slots(fb + k * a.sK, sl, x);
#pragma unroll
              for (int u = 0; u < V; ++u) {
                if (x[u] >= thr[u]) s[u] += x[u] * x[u];
              }
            }
          }
#pragma unroll
          for (int u = 0; u < V; ++u) red[warp * kPos + sl.pos(u)] = s[u];
          __syncthreads();
#pragma unroll
          for (int u = 0; u < V; ++u) {
            acc_t sq = acc_t(0);
            for (int w = 0; w < kWarps; ++w) sq += red[w * kPos + sl.pos(u)];  // warp order
            coef_f[u] = norm_coefficient(sq, r, g_loss, acc_t(0), a.norm_mode);  // norm_loss_sum: filtered
          }
          __syncthreads();
        }
      }
      if (!any_valid) continue;
      for (int k = warp; k < K; k += kWarps) {
        acc_t x[V];
        if constexpr (kTerms) load_slots(fb + k * a.sK, sl, x);
        acc_t gv[V];
#pragma unroll
        for (int u = 0; u < V; ++u) {
          acc_t g = acc_t(0);
          if (cls[u] >= 0) {
            const int64_t ck = static_cast<int64_t>(cls[u]) * K + k;
            g = grad_sums[ck];
            if constexpr (kTerms) g += two_gq[u] * dist_grad<kL1>(x[u] - protos[ck]);
          }
          if constexpr (kTerms) {
            g += coef[u] * x[u];
            if constexpr (kFiltered) {
              if (x[u] >= thr[u]) g += coef_f[u] * x[u];
            }
          }
          gv[u] = g;
        }
        store_slots(ob + k * a.sK, sl, gv);
      }
    }
  } else {
    // A warp owns one position; lanes take V consecutive channels at a time.
    constexpr int kStep = 32 * V;
    const int64_t warps_total = static_cast<int64_t>(gridDim.x) * kWarps;
    for (int64_t gpos = static_cast<int64_t>(blockIdx.x) * kWarps + warp; gpos < a.N; gpos += warps_total) {
      const int64_t b = gpos / a.HW;
      const int64_t n = gpos % a.HW;
      const int64_t off = b * a.sB + n * a.sN;
      const scalar_t* fp = feat + off;
      scalar_t* op = out + off;
      const int c = class_of(load_label(a.labels, a.label_kind, gpos), a.ignore_index, a.C);
      acc_t coef = acc_t(0), two_gq = acc_t(0);
      acc_t coef_f = acc_t(0), thr = acc_t(0);  // kFiltered: the coefficient of f~ and the threshold m
      if constexpr (kTerms) {
        acc_t s = acc_t(0), tot = acc_t(0), mx = kNegInf;
        for (int k = lane * V; k < K; k += kStep) {
          if constexpr (kVec) {
            const Vec16<scalar_t> v = load_vec16(fp + k);
#pragma unroll
            for (int u = 0; u < V; ++u) {
              const acc_t x = static_cast<acc_t>(v.v[u]);
              s += x * x;
              if constexpr (kFiltered) {
                tot += x;
                mx = max_keep(mx, x);
              }
            }
          } else {
            const acc_t x = static_cast<acc_t>(fp[k * a.sK]);
            s += x * x;
            if constexpr (kFiltered) {
              tot += x;
              mx = max_keep(mx, x);
            }
          }
        }
        for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_down_sync(kFullMask, s, offset);
        s = __shfl_sync(kFullMask, s, 0);  // lane 0's tree sum, identical on every lane
        if constexpr (kFiltered) {
          for (int offset = 16; offset > 0; offset >>= 1) {  // as vector_mean_kernel
            tot += __shfl_down_sync(kFullMask, tot, offset);
            mx = max_keep(mx, __shfl_down_sync(kFullMask, mx, offset));
          }
          thr = filter_threshold(__shfl_sync(kFullMask, tot, 0), __shfl_sync(kFullMask, mx, 0), K);
          coef = norm_coefficient(s, r, acc_t(0), g_norm, a.norm_mode);  // norm_sum: unfiltered
          // ||f~||^2: the position's channels again (cache hits), kept ones only.
          acc_t sf = acc_t(0);
          for (int k = lane * V; k < K; k += kStep) {
            if constexpr (kVec) {
              const Vec16<scalar_t> v = load_vec16(fp + k);
#pragma unroll
              for (int u = 0; u < V; ++u) {
                const acc_t x = static_cast<acc_t>(v.v[u]);
                if (x >= thr) sf += x * x;
              }
            } else {
              const acc_t x = static_cast<acc_t>(fp[k * a.sK]);
              if (x >= thr) sf += x * x;
            }
          }
          for (int offset = 16; offset > 0; offset >>= 1) sf += __shfl_down_sync(kFullMask, sf, offset);
          sf = __shfl_sync(kFullMask, sf, 0);
          coef_f = norm_coefficient(sf, r, g_loss, acc_t(0), a.norm_mode);  // norm_loss_sum: filtered
        } else {
          coef = norm_coefficient(s, r, g_loss, g_norm, a.norm_mode);
        }
        if (c >= 0) two_gq = dist_scale<kL1>(grad_sq[c]);
      }
      for (int k = lane * V; k < K; k += kStep) {
        acc_t x[V];
        if constexpr (kTerms) {
          if constexpr (kVec) {
            const Vec16<scalar_t> v = load_vec16(fp + k);
#pragma unroll
            for (int u = 0; u < V; ++u) x[u] = static_cast<acc_t>(v.v[u]);
          } else {
            x[0] = static_cast<acc_t>(fp[k * a.sK]);
          }
        }
        acc_t gv[V];
#pragma unroll
        for (int u = 0; u < V; ++u) {
          acc_t g = acc_t(0);
          if (c >= 0) {
            const int64_t ck = static_cast<int64_t>(c) * K + k + u;
            g = grad_sums[ck];
            if constexpr (kTerms) g += two_gq * dist_grad<kL1>(x[u] - protos[ck]);
          }
          if constexpr (kTerms) {
            g += coef * x[u];
            if constexpr (kFiltered) {
              if (x[u] >= thr) g += coef_f * x[u];
            }
          }
          gv[u] = g;
        }
        if constexpr (kVec) {
          Vec16<scalar_t> o;
#pragma unroll
          for (int u = 0; u < V; ++u) o.v[u] = static_cast<scalar_t>(gv[u]);
          store_vec16(op + k, o);
        } else {
          op[k * a.sK] = static_cast<scalar_t>(gv[0]);
        }
      }
    }
  }
}

// Launches the backward kernel: grad (same shape, dtype and strides as features).
// grad_sq, grad_norm_loss, grad_norm_sum, protos and reference are only used with kTerms.
template <typename scalar_t, bool kTerms, bool kL1 = false, bool kFiltered = false>
inline void run_feature_backward(const at::Tensor& f, at::Tensor& out, const FeatureLayout& L, const Labels& lab,
                                 int64_t C, int64_t ignore_index, int norm_mode,
                                 const at::opmath_type<scalar_t>* grad_sums,
                                 const at::opmath_type<scalar_t>* grad_sq,
                                 const at::opmath_type<scalar_t>* grad_norm_loss,
                                 const at::opmath_type<scalar_t>* grad_norm_sum,
                                 const at::opmath_type<scalar_t>* protos, const at::opmath_type<scalar_t>* reference,
                                 int sms) {
  constexpr int V = Vec16<scalar_t>::kSize;
  TORCH_CHECK(L.K < (int64_t(1) << 31), "lsr_fast: the feature width K must be < 2^31, got ", L.K);
  TORCH_CHECK(C <= kMaxClasses, "lsr_fast: num_classes must be <= ", kMaxClasses, " for the CUDA kernels, got ", C);
  BackwardArgs a{L.HW, L.B * L.HW, L.sB, L.sK, L.sN, static_cast<int>(L.K), static_cast<int>(C),
                 lab.tensor.const_data_ptr(), lab.kind, ignore_index, norm_mode};
  const bool pos_major = position_major(L);
  const bool vec = vec16_path<scalar_t>(L, out.const_data_ptr<scalar_t>(), kTerms ? f.const_data_ptr<scalar_t>() : nullptr);
  int64_t work;  // blocks of work
  if (pos_major) {
    work = L.B * ceil_div(L.HW, int64_t(32) * (vec ? V : 1));
  } else {
    work = ceil_div(L.B * L.HW, kWarps);
  }
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(work, int64_t(sms) * 16));
  const scalar_t* fp = f.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  if (vec) {
    feature_backward_kernel<scalar_t, kTerms, true, kL1, kFiltered><<<grid, kThreads, 0, stream()>>>(
        fp, op, a, pos_major, grad_sums, grad_sq, grad_norm_loss, grad_norm_sum, protos, reference);
  } else {
    feature_backward_kernel<scalar_t, kTerms, false, kL1, kFiltered><<<grid, kThreads, 0, stream()>>>(
        fp, op, a, pos_major, grad_sums, grad_sq, grad_norm_loss, grad_norm_sum, protos, reference);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace lsr_fast
