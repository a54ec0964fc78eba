// Helpers shared by the CPU kernels of lsr_fast::feature_terms (feature_terms.cpp, the forward)
// and feature_terms_backward (feature_terms_backward.cpp): the fused pass behind clustering,
// prototypes and norm alignment, with its two switches: `distance` (0 = squared_l2: ||f - p_c||^2,
// 1 = l1: sum_k |f_k - p_ck|) and `filtered` (the norm-alignment term uses ||f~||, f~_k = f_k where
// f_k >= m, m = the vector's mean channel value, else 0; norm_sum stays the unfiltered ||f||).
//
// Here: the per-channel distance term, the compile-time switch dispatch (with_switches), the
// inputs both ops prepare (prepare_terms_inputs), and the row sweeps both directions use so
// that the backward sees the forward's norms and threshold to the bit:
// - row_sweep / filtered_sweep: fixed interleaved lanes over a contiguous row (kLanes, combined by
//   lanes_sum), an order that does not depend on the thread count or the layout;
// - the filter's threshold m = (sum_k f_k) / K in the accumulation type, the sum in row_sweep's
//   lane order, capped at the largest channel: the cap never binds in exact arithmetic, but a
//   rounded mean of equal channels can exceed them all, and the filter must keep at least the
//   largest channel (a vector whose channels are all equal keeps them all). A channel equal to m
//   is kept. A NaN mean keeps none.
// - tile_positions: the tiles of positions the filtered plane passes transpose into rows.
#pragma once

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu_utils.h"

namespace lsr_fast {
namespace cpu {
// Internal linkage, as when these lived in one file with the kernels: each kernel file gets its own
// copies, inlined as before.
namespace {

// The raw op's `distance`.
constexpr int kSquaredL2 = 0;
constexpr int kL1 = 1;

// A vector's distance term per channel, of d = f_k - p_ck.
template <int kDist, typename acc>
inline acc dist_term(acc d) {
  if constexpr (kDist == kL1) {
    return std::abs(d);
  } else {
    return d * d;
  }
}

// x where keep, else +0, by a bit mask: vectorises inside sums where a ?: does not.
template <typename acc>
inline acc keep_if(acc x, bool keep) {
  using bits_t = typename std::conditional<sizeof(acc) == 4, uint32_t, uint64_t>::type;
  bits_t b;
  std::memcpy(&b, &x, sizeof(b));
  b &= bits_t(0) - static_cast<bits_t>(keep);
  std::memcpy(&x, &b, sizeof(x));
  return x;
}

// The filter's threshold: the mean channel value sum / K, capped at the largest channel (see the
// top of this file). A NaN mean stays NaN: every channel then fails f_k >= m and is dropped (as in
// the reference); the unfiltered norm sum carries the NaN.
template <typename acc>
inline acc filter_threshold(acc sum, acc max, int64_t K) {
  const acc m = sum / static_cast<acc>(K);
  return max < m ? max : m;
}

// Row sweeps use kLanes interleaved partial sums (channel k in lane k % kLanes, the tail after the
// last full group of lanes in lane 0), combined as lanes_sum does. With GCC/Clang the lanes are
// vectors (LaneVectors): the loop vectoriser would otherwise turn the lanes into in-order scalar
// reductions fed by shuffles. Both forms do the same operations in the same order per lane, so the
// results are identical. The planes' filtered pre-pass of the backward reproduces this order per
// position.
constexpr int64_t kLanes = 8;

template <typename acc>
inline acc lanes_sum(const acc* a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

#if defined(__GNUC__) || defined(__clang__)
#define LSR_FAST_LANE_VECTORS 1
// kLanes lanes as G vectors of W values (16 bytes: SSE2 / NEON, the build's baseline).
template <typename acc>
struct LaneVectors {
  typedef acc V __attribute__((vector_size(16)));
  typedef typename std::conditional<sizeof(acc) == 4, int32_t, int64_t>::type bits_t;
  typedef bits_t M __attribute__((vector_size(16)));
  static constexpr int64_t W = 16 / static_cast<int64_t>(sizeof(acc)), G = kLanes / W;
  static V load(const acc* p) {
    V x;
    std::memcpy(&x, p, sizeof(x));
    return x;
  }
  template <int kDist>
  static V dist_term(V d) {
    if constexpr (kDist == kL1) {
      return (V)((M)d & std::numeric_limits<bits_t>::max());  // clears the sign bit, as std::abs
    } else {
      return d * d;
    }
  }
  static V keep_if(V x, M keep) { return (V)((M)x & keep); }
};
#endif

template <typename acc>
struct RowSums {
  acc norm2 = 0, dist = 0, sum = 0;
};

// One sweep over a contiguous row of K values: its squared norm, with kWithDist its distance to
// `proto`, with kFilt its sum (for the filter's threshold).
template <int kDist, bool kWithDist, bool kFilt, typename acc>
inline RowSums<acc> row_sweep(const acc* v, const acc* proto, int64_t K) {
  acc nn[kLanes] = {}, dd[kLanes] = {}, ss[kLanes] = {};
  int64_t k = 0;
#ifdef LSR_FAST_LANE_VECTORS
  {
    using L = LaneVectors<acc>;
    typename L::V vn[L::G] = {}, vd[L::G] = {}, vs[L::G] = {};
    for (; k + kLanes <= K; k += kLanes) {
      for (int64_t g = 0; g < L::G; ++g) {
        const typename L::V x = L::load(v + k + g * L::W);
        vn[g] += x * x;
        if constexpr (kWithDist) vd[g] += L::template dist_term<kDist>(x - L::load(proto + k + g * L::W));
        if constexpr (kFilt) vs[g] += x;
      }
    }
    std::memcpy(nn, vn, sizeof(nn));
    std::memcpy(dd, vd, sizeof(dd));
    std::memcpy(ss, vs, sizeof(ss));
  }
#endif
  for (; k + kLanes <= K; k += kLanes) {
    for (int64_t u = 0; u < kLanes; ++u) {
      const acc x = v[k + u];
      nn[u] += x * x;
      if constexpr (kWithDist) dd[u] += dist_term<kDist>(x - proto[k + u]);
      if constexpr (kFilt) ss[u] += x;
    }
  }
  for (; k < K; ++k) {
    const acc x = v[k];
    nn[0] += x * x;
    if constexpr (kWithDist) dd[0] += dist_term<kDist>(x - proto[k]);
    if constexpr (kFilt) ss[0] += x;
  }
  RowSums<acc> s;
  s.norm2 = lanes_sum(nn);
  if constexpr (kWithDist) s.dist = lanes_sum(dd);
  if constexpr (kFilt) s.sum = lanes_sum(ss);
  return s;
}

// Sum of f_k^2 over the channels with f_k >= m (same lanes).
template <typename acc>
inline acc filtered_sweep(const acc* v, int64_t K, acc m) {
  acc ff[kLanes] = {};
  int64_t k = 0;
#ifdef LSR_FAST_LANE_VECTORS
  {
    using L = LaneVectors<acc>;
    typename L::V vf[L::G] = {};
    for (; k + kLanes <= K; k += kLanes) {
      for (int64_t g = 0; g < L::G; ++g) {
        const typename L::V x = L::load(v + k + g * L::W);
        const typename L::V y = L::keep_if(x, x >= m);
        vf[g] += y * y;
      }
    }
    std::memcpy(ff, vf, sizeof(ff));
  }
#endif
  for (; k + kLanes <= K; k += kLanes) {
    for (int64_t u = 0; u < kLanes; ++u) {
      const acc y = keep_if(v[k + u], v[k + u] >= m);
      ff[u] += y * y;
    }
  }
  for (; k < K; ++k) {
    const acc y = keep_if(v[k], v[k] >= m);
    ff[0] += y * y;
  }
  return lanes_sum(ff);
}

// The filtered squared norm of a row whose channel sum is `sum`, and its threshold m (stored in
// *threshold): filter_threshold(sum, max, K). The cap at the max only binds when no channel
// reaches the mean (a rounded mean of equal channels), which leaves a zero filtered norm: only
// then is the max computed.
template <typename acc>
inline acc filtered_norm2(const acc* v, int64_t K, acc sum, acc* threshold) {
  acc m = sum / static_cast<acc>(K);
  acc f2 = filtered_sweep(v, K, m);
  if (f2 == acc(0) && K > 0 && m == m) {
    acc max = v[0];
    for (int64_t k = 1; k < K; ++k) max = std::max(max, v[k]);
    if (max < m) {
      m = max;
      f2 = filtered_sweep(v, K, m);
    }
  }
  *threshold = m;
  return f2;
}

// Positions per tile of the filtered plane passes: a tile's K channels (`bytes_per_value` each)
// stay within ~512 KiB, so a tile read once from memory is swept again from cache.
inline int64_t tile_positions(int64_t K, int64_t bytes_per_value) {
  const int64_t t = (int64_t{1} << 19) / std::max<int64_t>(1, K * bytes_per_value);
  return std::min<int64_t>(256, std::max<int64_t>(8, t / 8 * 8));
}

// Prefetch distance, in planes, of the tile passes (a tile's segment of a plane is a few lines).
constexpr int64_t kTilePrefetch = 8;

// Calls fn(std::integral_constant<int, distance>, std::bool_constant<filtered>) (the kernels'
// compile-time switches).
template <typename F>
inline void with_switches(int64_t distance, bool filtered, F&& fn) {
  using L2 = std::integral_constant<int, kSquaredL2>;
  using L1 = std::integral_constant<int, kL1>;
  if (distance == kL1) {
    filtered ? fn(L1{}, std::true_type{}) : fn(L1{}, std::false_type{});
  } else {
    filtered ? fn(L2{}, std::true_type{}) : fn(L2{}, std::false_type{});
  }
}

struct TermsInputs {
  FeatureView f;
  at::Tensor idx, protos;
  int64_t C;
  double r;
};

// The CPU placement of feature_terms' tensors (their dtypes and shapes: arg_checks.h).
inline void check_cpu_terms(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& prototypes,
                            const at::Tensor& reference, const char* op) {
  check_cpu_features_labels(features, labels, op);
  check_cpu(prototypes, op, "prototypes");
  check_cpu(reference, op, "reference");
}

// What both directions read, once check_feature_terms_args (or its backward's superset) passed.
inline TermsInputs prepare_terms_inputs(const at::Tensor& features, const at::Tensor& labels,
                                        const at::Tensor& prototypes, const at::Tensor& reference,
                                        int64_t ignore_index, const char* op) {
  TermsInputs in;
  in.f = view_features(features, op);
  in.C = prototypes.size(0);
  in.r = scalar_value(reference);
  in.idx = label_buckets(labels, in.f.B * in.f.N, in.C, ignore_index, op);
  in.protos = prototypes.to(acc_dtype(features.scalar_type())).contiguous();
  return in;
}

}  // namespace
}  // namespace cpu
}  // namespace lsr_fast
