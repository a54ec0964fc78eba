// CPU kernel of lsr_fast::feature_terms_backward (the forward and the switches are described in
// feature_terms.cpp and feature_terms.h):
//
//   grad = grad_sums[c] + grad_dist[c] D(f - p_c)         (labelled vectors;
//          D(x) = 2x for squared_l2, sign(x) for l1 with sign(0) = 0)
//          + (grad_norm_loss * dloss/d|f| + grad_norm_sum) f / |f|   (every vector; 0 at |f| = 0).
// filtered: the norm-loss part is grad_norm_loss * dloss/d|f~| f~ / |f~| instead (0 at |f~| = 0; no
// gradient through m, none to dropped channels), the norm-sum part grad_norm_sum f / |f| as above.
// The difference f - p_c is taken explicitly (no cancellation when f is close to p_c).
//
// Rows: one pass, parallel over fixed ranges of vectors; the norm of each row is taken while it is
// in cache. Planes: the norms need every channel before any output, so when the norm terms get a
// gradient they take one extra streaming read of the features (parallel over channel chunks,
// combined in chunk order; filtered: over tiles of positions, each tile swept twice while it is in
// cache, in the forward's lane order so |f|, |f~| and m are the forward's to the bit), then one
// pass, parallel over (image, block of positions, group of planes), writes the gradient; with no
// norm gradient (e.g. clustering only) there is a single pass. Every output element is written by
// one task from per-vector values whose reduction order is fixed, so the gradient does not depend
// on the thread count.
#include <torch/library.h>

#include "feature_terms.h"

namespace lsr_fast {
namespace cpu {
namespace {

// Planes and positions per task of the backward's write pass (long runs of each plane).
constexpr int64_t kWritePlanes = 256;
constexpr int64_t kWriteBlock = 16384;

// d term / d |f|. Source: -sign(r - |f|) (0 at 0, as abs' gradient). Target: -1 where
// r - |f| >= 0, else 0; at exactly 0 this follows autograd's clamp(min=0), whose gradient passes
// at the boundary, so the kernel matches lsr_fast.reference.
template <typename acc>
inline acc norm_term_grad(acc r, acc norm, int64_t mode) {
  const acc gap = r - norm;
  if (mode == kNormSource) return gap > acc(0) ? acc(-1) : (gap < acc(0) ? acc(1) : acc(0));
  return gap >= acc(0) ? acc(-1) : acc(0);
}

// The derivative of dist_term (feature_terms.h) up to the constant that the per-class factor
// carries (2 grad_dist[c] for squared_l2): d for squared_l2, sign(d) for l1 (0 at 0, as abs'
// gradient; 0 for NaN). Written without branches so the loops vectorise (a ?: in them does not).
template <int kDist, typename acc>
inline acc dist_dir(acc d) {
  if constexpr (kDist == kL1) {
    return static_cast<acc>(d > acc(0)) - static_cast<acc>(d < acc(0));
  } else {
    return d;
  }
}

// out[n] = gk[c] + g2[n] D(v[n] - pk[c]) + coef[n] v[n] (+ coef_f[n] v[n] where v[n] >= thr[n], with
// kFilter), c = cls[n]: the gradient along one plane. Restrict pointers so the compiler vectorises
// it (emulated gathers for the two table lookups).
template <int kDist, bool kFilter, typename acc>
inline void plane_grad(const acc* __restrict v, const int32_t* __restrict cls, const acc* __restrict gk,
                       const acc* __restrict pk, const acc* __restrict g2, const acc* __restrict coef,
                       const acc* __restrict coef_f, const acc* __restrict thr, acc* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const int32_t c = cls[i];
    if constexpr (kFilter) {
      out[i] = gk[c] + g2[i] * dist_dir<kDist>(v[i] - pk[c]) + coef[i] * v[i] + keep_if(coef_f[i] * v[i], v[i] >= thr[i]);
    } else {
      out[i] = gk[c] + g2[i] * dist_dir<kDist>(v[i] - pk[c]) + coef[i] * v[i];
    }
  }
}

// kFilter: the norm-loss term has a gradient and uses the filtered norm (filtered = true and
// grad_norm_loss != 0; otherwise the filter changes nothing in the gradient).
template <typename scalar_t, int kDist, bool kFilter>
void terms_backward_kernel(const FeatureView& f, const FeatureView& o, const int32_t* idx, int64_t C,
                           const acc_t<scalar_t>* protos, const acc_t<scalar_t>* grad_sums,
                           const acc_t<scalar_t>* grad_sq, acc_t<scalar_t> grad_loss, acc_t<scalar_t> grad_norm,
                           acc_t<scalar_t> r, int64_t mode) {
  using acc = acc_t<scalar_t>;
  const scalar_t* base = f.tensor.const_data_ptr<scalar_t>();
  scalar_t* out = o.tensor.data_ptr<scalar_t>();
  const int64_t B = f.B, K = f.K, N = f.N;
  const bool need_norm = grad_loss != acc(0) || grad_norm != acc(0);
  // Tables with a zero class C (void): prototypes, grad_sums, and the distance's factor:
  // 2 * grad_sq (squared_l2) or grad_sq (l1).
  std::vector<acc> ptab((C + 1) * K, acc(0)), gtab((C + 1) * K, acc(0)), g2(C + 1, acc(0));
  for (int64_t c = 0; c < C; ++c) {
    g2[c] = kDist == kL1 ? grad_sq[c] : acc(2) * grad_sq[c];
    for (int64_t k = 0; k < K; ++k) {
      const int64_t t = f.planes ? k * (C + 1) + c : c * K + k;
      ptab[t] = protos[c * K + k];
      gtab[t] = grad_sums[c * K + k];
    }
  }
  auto coefficient = [&](acc n2) {
    const acc norm = std::sqrt(n2);
    return norm > acc(0) ? (grad_loss * norm_term_grad(r, norm, mode) + grad_norm) / norm : acc(0);
  };
  // With the filter: the coefficient of f (norm sum) and of f~ (norm loss), and the threshold.
  auto norm_coefficient = [&](acc n2) {
    const acc norm = std::sqrt(n2);
    return norm > acc(0) ? grad_norm / norm : acc(0);
  };
  auto filtered_coefficient = [&](acc f2) {
    const acc norm = std::sqrt(f2);
    return norm > acc(0) ? grad_loss * norm_term_grad(r, norm, mode) / norm : acc(0);
  };
  if (f.planes) {
    const int64_t elem = static_cast<int64_t>(sizeof(scalar_t));
    // Per-vector coefficient of f in the norm terms. The squared norms take one streaming pass over
    // the planes, parallel over fixed chunks of channels (partial sums per chunk, combined in
    // chunk order: reproducible whatever the thread count).
    std::vector<acc> coef(B * N, acc(0)), coef_f(kFilter ? B * N : 0), thr(kFilter ? B * N : 0);
    if constexpr (kFilter) {
      // Tiles of positions, each swept twice over its K planes (the second time from cache): sum,
      // max and squared norm in row_sweep's lane order, then the filtered squared norm.
      const int64_t T = tile_positions(K, elem), tiles = ceil_div(N, T), K8 = K - K % kLanes;
      at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc> seg(T), nn(kLanes * T), ss(kLanes * T), ff(kLanes * T), mx(T), m(T);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / tiles, n0 = (task % tiles) * T, len = std::min(T, N - n0);
          const scalar_t* p = base + b * f.sB + n0;
          std::fill(nn.begin(), nn.end(), acc(0));
          std::fill(ss.begin(), ss.end(), acc(0));
          std::fill(ff.begin(), ff.end(), acc(0));
          std::fill(mx.begin(), mx.end(), -std::numeric_limits<acc>::infinity());
          for (int64_t k = 0; k < K; ++k) {
            if (k + kTilePrefetch < K) Prefetcher(p + (k + kTilePrefetch) * f.sK, len * elem).advance(1.0);
            const acc* x = load_row<acc>(p + k * f.sK, len, seg.data());
            const int64_t u = k < K8 ? k % kLanes : 0;
            acc* __restrict a = nn.data() + u * T;
            acc* __restrict s = ss.data() + u * T;
            acc* __restrict h = mx.data();
            for (int64_t i = 0; i < len; ++i) {
              a[i] += x[i] * x[i];
              s[i] += x[i];
              h[i] = std::max(h[i], x[i]);
            }
          }
          for (int64_t i = 0; i < len; ++i) {
            acc lanes[kLanes];
            for (int64_t u = 0; u < kLanes; ++u) lanes[u] = ss[u * T + i];
            m[i] = filter_threshold(lanes_sum(lanes), mx[i], K);
          }
          for (int64_t k = 0; k < K; ++k) {
            const acc* x = load_row<acc>(p + k * f.sK, len, seg.data());
            const int64_t u = k < K8 ? k % kLanes : 0;
            acc* __restrict a = ff.data() + u * T;
            const acc* __restrict h = m.data();
            for (int64_t i = 0; i < len; ++i) {
              const acc y = keep_if(x[i], x[i] >= h[i]);
              a[i] += y * y;
            }
          }
          for (int64_t i = 0; i < len; ++i) {
            acc ln[kLanes], lf[kLanes];
            for (int64_t u = 0; u < kLanes; ++u) {
              ln[u] = nn[u * T + i];
              lf[u] = ff[u * T + i];
            }
            const int64_t t = b * N + n0 + i;
            coef[t] = norm_coefficient(lanes_sum(ln));
            coef_f[t] = filtered_coefficient(lanes_sum(lf));
            thr[t] = m[i];
          }
        }
      });
    } else if (need_norm) {
      const int64_t KC = channel_chunk(K), chunks = ceil_div(K, KC);
      std::vector<acc> part(chunks * B * N);
      at::parallel_for(0, chunks * B, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc> buf(1024);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t j = t / B, b = t % B;
          acc* n2 = part.data() + j * B * N + b * N;
          std::fill(n2, n2 + N, acc(0));
          for (int64_t k = j * KC; k < std::min(K, (j + 1) * KC); ++k) {
            const scalar_t* p = base + b * f.sB + k * f.sK;
            for (int64_t n0 = 0; n0 < N; n0 += 1024) {
              const int64_t m = std::min<int64_t>(1024, N - n0);
              const acc* v = load_row<acc>(p + n0, m, buf.data());
              acc* out = n2 + n0;
              for (int64_t n = 0; n < m; ++n) out[n] += v[n] * v[n];
            }
          }
        }
      });
      at::parallel_for(0, B * N, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          acc n2 = 0;
          for (int64_t j = 0; j < chunks; ++j) n2 += part[j * B * N + t];
          coef[t] = coefficient(n2);
        }
      });
    }
    // Write pass, per block of positions and group of planes: the class's entries come from small
    // (K, C+1) tables; the distance's factor g2[c] is looked up once per block.
    const int64_t kchunks = ceil_div(K, kWritePlanes), wblocks = ceil_div(N, kWriteBlock);
    at::parallel_for(0, B * wblocks * kchunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc> g2n(kWriteBlock), vbuf(256), rbuf(256);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / (wblocks * kchunks), q = (t / kchunks) % wblocks, kc = t % kchunks;
        const int64_t n0 = q * kWriteBlock, len = std::min(kWriteBlock, N - n0);
        const int32_t* lb = idx + b * N + n0;
        const acc* cf = coef.data() + b * N + n0;
        const acc* cff = kFilter ? coef_f.data() + b * N + n0 : nullptr;
        const acc* th = kFilter ? thr.data() + b * N + n0 : nullptr;
        for (int64_t n = 0; n < len; ++n) g2n[n] = g2[lb[n]];
        const int64_t k_begin = kc * kWritePlanes, k_end = std::min(K, (kc + 1) * kWritePlanes);
        for (int64_t k = k_begin; k < k_end; ++k) {
          // This plane's block was prefetched during the previous plane; prefetch the next one's.
          const scalar_t* p = base + b * f.sB + k * f.sK + n0;
          scalar_t* qo = out + b * o.sB + k * o.sK + n0;
          if (k == k_begin) touch(p, len * elem);
          Prefetcher ahead(k + 1 < k_end ? p + f.sK : nullptr, len * elem);
          const acc* pk = ptab.data() + k * (C + 1);
          const acc* gk = gtab.data() + k * (C + 1);
          for (int64_t m0 = 0; m0 < len; m0 += 256) {
            const int64_t m = std::min<int64_t>(256, len - m0);
            const acc* v = load_row<acc>(p + m0, m, vbuf.data());
            const acc* cff_m = kFilter ? cff + m0 : nullptr;
            const acc* th_m = kFilter ? th + m0 : nullptr;
            if constexpr (std::is_same<scalar_t, acc>::value) {
              plane_grad<kDist, kFilter>(v, lb + m0, gk, pk, g2n.data() + m0, cf + m0, cff_m, th_m, qo + m0, m);
            } else {
              plane_grad<kDist, kFilter>(v, lb + m0, gk, pk, g2n.data() + m0, cf + m0, cff_m, th_m, rbuf.data(), m);
              store_row(rbuf.data(), m, qo + m0);
            }
            ahead.advance(static_cast<double>(m0 + m) / static_cast<double>(len));
          }
        }
      }
    });
  } else {
    // Rows: one pass; each vector's norm (filtered: and its filtered norm, a second sweep) is taken
    // while its row is in cache.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, K));
    at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc> vbuf(K), rbuf(K);
      for (int64_t t = begin; t < end; ++t) {
        const int32_t c = idx[t];
        const acc* v = load_row<acc>(base + (t / N) * f.sB + (t % N) * f.sN, K, vbuf.data());
        acc coef = 0, coef_f = 0, m = 0;
        if constexpr (kFilter) {
          const RowSums<acc> s = row_sweep<kDist, false, true>(v, static_cast<const acc*>(nullptr), K);
          coef = norm_coefficient(s.norm2);
          coef_f = filtered_coefficient(filtered_norm2(v, K, s.sum, &m));
        } else if (need_norm) {
          coef = coefficient(row_sweep<kDist, false, false>(v, static_cast<const acc*>(nullptr), K).norm2);
        }
        const acc* pc = ptab.data() + c * K;
        const acc* gc = gtab.data() + c * K;
        const acc gq = g2[c];
        scalar_t* q = out + (t / N) * o.sB + (t % N) * o.sN;
        acc* res = std::is_same<scalar_t, acc>::value ? reinterpret_cast<acc*>(q) : rbuf.data();
        if constexpr (kFilter) {
          for (int64_t k = 0; k < K; ++k) {
            res[k] = gc[k] + gq * dist_dir<kDist>(v[k] - pc[k]) + coef * v[k] + keep_if(coef_f * v[k], v[k] >= m);
          }
        } else {
          for (int64_t k = 0; k < K; ++k) res[k] = gc[k] + gq * dist_dir<kDist>(v[k] - pc[k]) + coef * v[k];
        }
        if constexpr (!std::is_same<scalar_t, acc>::value) store_row(rbuf.data(), K, q);
      }
    });
  }
}

at::Tensor feature_terms_backward_cpu(const at::Tensor& grad_sums, const at::Tensor& grad_sq_dist_sums,
                                      const at::Tensor& grad_norm_loss_sum, const at::Tensor& grad_norm_sum,
                                      const at::Tensor& features, const at::Tensor& labels,
                                      const at::Tensor& prototypes, const at::Tensor& reference, int64_t norm_mode,
                                      int64_t ignore_index, int64_t distance, bool filtered) {
  constexpr const char* op = "feature_terms_backward";
  check_cpu(grad_sums, op, "grad_sums");
  check_cpu(grad_sq_dist_sums, op, "grad_sq_dist_sums");
  check_cpu(grad_norm_loss_sum, op, "grad_norm_loss_sum");
  check_cpu(grad_norm_sum, op, "grad_norm_sum");
  check_cpu_terms(features, labels, prototypes, reference, op);
  check_feature_terms_backward_args(grad_sums, grad_sq_dist_sums, grad_norm_loss_sum, grad_norm_sum, features, labels,
                                    prototypes, reference, norm_mode, distance);
  const TermsInputs in =
      prepare_terms_inputs(features, labels, prototypes, reference, ignore_index, op);
  const int64_t C = in.C;
  const double g_loss = scalar_value(grad_norm_loss_sum);
  const double g_norm = scalar_value(grad_norm_sum);
  at::Tensor grad = at::empty_like(features);
  if (grad.numel() == 0) return grad;
  const auto acc_type = acc_dtype(features.scalar_type());
  const at::Tensor gs = grad_sums.to(acc_type).contiguous();
  const at::Tensor gq = grad_sq_dist_sums.to(acc_type).contiguous();
  const FeatureView o = writable_like(in.f, grad);
  advise_huge_pages(o.tensor);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "lsr_fast_feature_terms_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    // The filter only matters where the norm-loss term has a gradient.
    const bool filter = filtered && static_cast<acc>(g_loss) != acc(0);
    with_switches(distance, filter, [&](auto dist, auto filt) {
      terms_backward_kernel<scalar_t, decltype(dist)::value, decltype(filt)::value>(
          in.f, o, in.idx.const_data_ptr<int32_t>(), C, in.protos.const_data_ptr<acc>(), gs.const_data_ptr<acc>(),
          gq.const_data_ptr<acc>(), static_cast<acc>(g_loss), static_cast<acc>(g_norm), static_cast<acc>(in.r),
          norm_mode);
    });
  });
  if (!o.tensor.is_same(grad)) grad.copy_(o.tensor);
  return grad;
}

}  // namespace
}  // namespace cpu
}  // namespace lsr_fast

TORCH_LIBRARY_IMPL(lsr_fast, CPU, m) {
  m.impl("feature_terms_backward", &lsr_fast::cpu::feature_terms_backward_cpu);
}
