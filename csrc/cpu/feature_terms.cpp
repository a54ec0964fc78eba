// CPU kernels of lsr_fast::feature_terms (the fused pass behind clustering, prototypes and norm
// alignment) and its backward.
//
// Forward, one pass over the features; every reduction has a fixed order that does not depend on
// the thread count:
// - NCHW planes: parallel over fixed chunks of channels (the chunk size depends on K only). Per
//   block of 2048 positions and plane, the values are gathered in class order (see ClassOrder), so
//   each class's prototype entry is a constant and the per-vector partial squared norms and
//   distances, and the class sums, are contiguous vectorised loops. Each chunk leaves per-vector
//   partials; a cheap pass over them (not the features) finishes the norms and sums.
// - channels_last maps and (N, K) rows: fixed blocks of vectors; a vector's squared norm and
//   distance are dot products over its contiguous row, and the row goes to its class's partial
//   row of the block (RowPartials).
// Per-class and global sums are accumulated in float64 and rounded once.
//
// Backward: grad = grad_sums[c] + 2 grad_sq[c] (f - p_c)              (labelled vectors)
//                  + (grad_norm_loss * dloss/d|f| + grad_norm_sum) f / |f|   (every vector; 0 at |f| = 0).
// The difference f - p_c is taken explicitly (no cancellation when f is close to p_c). Rows: one
// pass, the norm of each row is taken while it is in cache. Planes: the norms need every channel
// before any output, so when the norm terms get a gradient they take one extra streaming read of
// the features (parallel over channel chunks), then one pass writes the gradient; with no norm
// gradient (e.g. clustering only) there is a single pass.
#include <torch/library.h>

#include <cmath>

#include "cpu_utils.h"

namespace lsr_fast {
namespace cpu {
namespace {

// Vectors per block of the position passes.
constexpr int64_t kPositionBlock = 4096;
// Positions per block of the class-order gathers over planes (a block of a plane stays in L1).
constexpr int64_t kGatherBlock = 2048;
// Planes and positions per task of the backward's write pass (long runs of each plane).
constexpr int64_t kWritePlanes = 256;
constexpr int64_t kWriteBlock = 16384;

template <typename acc>
inline acc norm_term(acc r, acc norm, int64_t mode) {
  const acc gap = r - norm;
  return mode == kNormSource ? std::abs(gap) : std::max(gap, acc(0));
}

// d term / d |f|. Source: -sign(r - |f|) (0 at 0, as abs' gradient). Target: -1 where
// r - |f| >= 0, else 0; at exactly 0 this follows autograd's clamp(min=0), whose gradient passes
// at the boundary, so the kernel matches lsr_fast.reference.
template <typename acc>
inline acc norm_term_grad(acc r, acc norm, int64_t mode) {
  const acc gap = r - norm;
  if (mode == kNormSource) return gap > acc(0) ? acc(-1) : (gap < acc(0) ? acc(1) : acc(0));
  return gap >= acc(0) ? acc(-1) : acc(0);
}


// sum of x[0..len) in float64 with four interleaved partial sums.
template <typename T>
inline double partial_sum(const T* x, int64_t len) {
  double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
  int64_t i = 0;
  for (; i + 4 <= len; i += 4) {
    a0 += static_cast<double>(x[i]);
    a1 += static_cast<double>(x[i + 1]);
    a2 += static_cast<double>(x[i + 2]);
    a3 += static_cast<double>(x[i + 3]);
  }
  for (; i < len; ++i) a0 += static_cast<double>(x[i]);
  return (a0 + a1) + (a2 + a3);
}

// vals[i] = p[order[i]] for i < len (a block of a plane in class order), prefetching the first half
// of `ahead` on the way.
template <typename scalar_t, typename acc>
inline void gather(const scalar_t* p, const int32_t* order, int64_t len, acc* vals, Prefetcher& ahead) {
  for (int64_t i0 = 0; i0 < len; i0 += 256) {
    const int64_t i1 = std::min(len, i0 + 256);
    for (int64_t i = i0; i < i1; ++i) vals[i] = static_cast<acc>(p[order[i]]);
    ahead.advance(0.5 * static_cast<double>(i1) / static_cast<double>(len));
  }
}

template <typename scalar_t>
void terms_forward_kernel(const FeatureView& f, const int32_t* idx, int64_t C, const acc_t<scalar_t>* protos,
                          acc_t<scalar_t> r, int64_t mode, acc_t<scalar_t>* sums, acc_t<scalar_t>* sq_sums,
                          acc_t<scalar_t>* loss_sum, acc_t<scalar_t>* norm_sum) {
  using acc = acc_t<scalar_t>;
  const scalar_t* base = f.tensor.const_data_ptr<scalar_t>();
  const int64_t B = f.B, K = f.K, N = f.N, P = B * N;
  // Planes: chunks of channels, each with its own per-vector partials. Rows: one pass per vector.
  const int64_t KC = channel_chunk(K), chunks = f.planes ? ceil_div(K, KC) : 1;
  const int64_t elem = static_cast<int64_t>(sizeof(scalar_t));
  // Prototype tables with a zero class C for void vectors (their distance is computed and dropped):
  // rows (C+1, K) for the rows layout, transposed (K, C+1) for planes.
  std::vector<acc> table((C + 1) * K, acc(0));
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t k = 0; k < K; ++k) table[f.planes ? k * (C + 1) + c : c * K + k] = protos[c * K + k];
  }
  // Per-vector partial squared norms / distances of each chunk. Planes keep them in class order
  // (the order their gathers produce), rows in position order; `cls` is the class in that order.
  std::vector<acc> part_norm(chunks * P), part_dist(chunks * P);
  ClassOrder order;
  std::vector<int32_t> sorted_cls;
  const int32_t* cls = idx;
  if (f.planes) {
    order = class_order(idx, B, N, C, kGatherBlock);
    sorted_cls.resize(P);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t q = 0; q < order.blocks; ++q) {
        for (int64_t c = 0; c <= C; ++c) {
          std::fill(sorted_cls.begin() + b * N + order.start(b, q, c),
                    sorted_cls.begin() + b * N + order.start(b, q, c + 1), static_cast<int32_t>(c));
        }
      }
    }
    cls = sorted_cls.data();
    at::parallel_for(0, chunks, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t k0 = j * KC, k1 = std::min(K, k0 + KC), L = k1 - k0;
        acc* pn = part_norm.data() + j * P;
        acc* pd = part_dist.data() + j * P;
        // Block by block (its partials stay in L1 across the chunk's planes), plane by plane:
        // gather the block's values in class order, then per class (prototype entry hoisted)
        // update the partials and the class sum with contiguous, vectorisable loops.
        std::vector<double> total(L * C, 0.0);
        std::vector<acc> vals(kGatherBlock);
        for (int64_t b = 0; b < B; ++b) {
          const int32_t* ob = order.order.data() + b * N;
          for (int64_t q = 0; q < order.blocks; ++q) {
            const int64_t n0 = q * kGatherBlock, len = std::min(kGatherBlock, N - n0);
            acc* pnb = pn + b * N;
            acc* pdb = pd + b * N;
            for (int64_t k = k0; k < k1; ++k) {
              // The block of plane k was prefetched while plane k-1 was processed; prefetch k+1's.
              const scalar_t* p = base + b * f.sB + k * f.sK;
              if (k == k0) touch(p + n0, len * elem);
              Prefetcher ahead(k + 1 < k1 ? p + f.sK + n0 : nullptr, len * elem);
              gather(p, ob + n0, len, vals.data(), ahead);
              const acc* pk = table.data() + k * (C + 1);
              for (int64_t c = 0; c <= C; ++c) {
                ahead.advance(0.5 + 0.5 * static_cast<double>(c + 1) / static_cast<double>(C + 1));
                const int64_t s0 = order.start(b, q, c), s1 = order.start(b, q, c + 1);
                const acc pc = pk[c];
                const acc* v = vals.data() - n0;
                if (k == k0) {
                  for (int64_t i = s0; i < s1; ++i) {
                    const acc d = v[i] - pc;
                    pnb[i] = v[i] * v[i];
                    pdb[i] = d * d;
                  }
                } else {
                  for (int64_t i = s0; i < s1; ++i) {
                    const acc d = v[i] - pc;
                    pnb[i] += v[i] * v[i];
                    pdb[i] += d * d;
                  }
                }
                if (c < C) total[(k - k0) * C + c] += partial_sum(v + s0, s1 - s0);
              }
            }
          }
        }
        for (int64_t k = k0; k < k1; ++k) {
          for (int64_t c = 0; c < C; ++c) sums[c * K + k] = static_cast<acc>(total[(k - k0) * C + c]);
        }
      }
    });
  } else {
    // Rows: fixed blocks of vectors; each vector's norm and distance are dot products over its
    // contiguous row, and the row is added to its class's partial row of the block.
    const int64_t blocks = rows_blocks(P, C, K), per_block = ceil_div(P, blocks);
    RowPartials<acc> partials(blocks, C, K);
    at::parallel_for(0, blocks, 1, [&](int64_t q0, int64_t q1) {
      std::vector<acc> buf(K);
      constexpr int64_t U = 8;  // independent partial sums, so the dot products vectorise
      for (int64_t q = q0; q < q1; ++q) {
        for (int64_t t = q * per_block; t < std::min(P, (q + 1) * per_block); ++t) {
          const int32_t c = idx[t];
          const acc* v = load_row<acc>(base + (t / N) * f.sB + (t % N) * f.sN, K, buf.data());
          const acc* proto = table.data() + c * K;
          acc nn[U] = {}, dd[U] = {};
          int64_t k = 0;
          for (; k + U <= K; k += U) {
            for (int64_t u = 0; u < U; ++u) {
              const acc d = v[k + u] - proto[k + u];
              nn[u] += v[k + u] * v[k + u];
              dd[u] += d * d;
            }
          }
          for (; k < K; ++k) {
            const acc d = v[k] - proto[k];
            nn[0] += v[k] * v[k];
            dd[0] += d * d;
          }
          part_norm[t] = ((nn[0] + nn[1]) + (nn[2] + nn[3])) + ((nn[4] + nn[5]) + (nn[6] + nn[7]));
          part_dist[t] = ((dd[0] + dd[1]) + (dd[2] + dd[3])) + ((dd[4] + dd[5]) + (dd[6] + dd[7]));
          if (c < C) partials.add(q, c, v);
        }
      }
    });
    partials.combine(sums);
  }

  // Finish per vector, in fixed blocks of vectors; blocks combine in order.
  const int64_t blocks = ceil_div(P, kPositionBlock);
  const int64_t stride = C + 3;  // per block: sq sums (C+1), norm-loss sum, norm sum
  std::vector<double> block_sums(blocks * stride, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      double* out = block_sums.data() + q * stride;
      double loss = 0.0, norms = 0.0;
      for (int64_t i = q * kPositionBlock; i < std::min(P, (q + 1) * kPositionBlock); ++i) {
        acc n2 = 0, d2 = 0;
        for (int64_t j = 0; j < chunks; ++j) {
          n2 += part_norm[j * P + i];
          d2 += part_dist[j * P + i];
        }
        const acc norm = std::sqrt(n2);
        loss += static_cast<double>(norm_term(r, norm, mode));
        norms += static_cast<double>(norm);
        out[cls[i]] += static_cast<double>(d2);
      }
      out[C + 1] = loss;
      out[C + 2] = norms;
    }
  });
  std::vector<double> total(stride, 0.0);
  for (int64_t q = 0; q < blocks; ++q) {
    for (int64_t s = 0; s < stride; ++s) total[s] += block_sums[q * stride + s];
  }
  for (int64_t c = 0; c < C; ++c) sq_sums[c] = static_cast<acc>(total[c]);
  *loss_sum = static_cast<acc>(total[C + 1]);
  *norm_sum = static_cast<acc>(total[C + 2]);
}

struct TermsInputs {
  FeatureView f;
  at::Tensor idx, protos;
  int64_t C;
  double r;
};

TermsInputs check_terms_inputs(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& prototypes,
                               const at::Tensor& reference, int64_t norm_mode, int64_t ignore_index, const char* op) {
  check_features_labels(features, labels, op);
  check_cpu(prototypes, op, "prototypes");
  check_float(prototypes, op, "prototypes");
  TORCH_CHECK(prototypes.dim() == 2 && prototypes.size(1) == features.size(1), op,
              ": prototypes must be (C, K) with K = ", features.size(1), ", got shape ", prototypes.sizes());
  check_norm_mode(op, norm_mode);
  TORCH_CHECK(reference.dim() == 0, op, ": reference must be a 0-dim tensor, got shape ", reference.sizes());
  TermsInputs in;
  in.f = view_features(features, op);
  in.C = prototypes.size(0);
  in.r = scalar_value(reference, op, "reference");
  in.idx = label_buckets(labels, in.f.B * in.f.N, in.C, ignore_index, op);
  in.protos = prototypes.to(acc_dtype(features.scalar_type())).contiguous();
  return in;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> feature_terms_cpu(
    const at::Tensor& features, const at::Tensor& labels, const at::Tensor& prototypes, const at::Tensor& reference,
    int64_t norm_mode, int64_t ignore_index) {
  constexpr const char* op = "feature_terms";
  const TermsInputs in = check_terms_inputs(features, labels, prototypes, reference, norm_mode, ignore_index, op);
  const int64_t C = in.C, K = in.f.K;
  const auto opts = features.options().dtype(acc_dtype(features.scalar_type()));
  at::Tensor sums = at::zeros({C, K}, opts);
  at::Tensor counts = at::zeros({C}, features.options().dtype(at::kLong));
  at::Tensor sq_sums = at::zeros({C}, opts);
  at::Tensor loss_sum = at::zeros({}, opts);
  at::Tensor norm_sum = at::zeros({}, opts);
  const int32_t* ip = in.idx.const_data_ptr<int32_t>();
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < in.idx.numel(); ++i) {
    if (ip[i] < C) ++cp[ip[i]];
  }
  if (in.f.B * in.f.N == 0) return {sums, counts, sq_sums, loss_sum, norm_sum};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "lsr_fast_feature_terms_cpu", [&] {
    using acc = acc_t<scalar_t>;
    terms_forward_kernel<scalar_t>(in.f, ip, C, in.protos.const_data_ptr<acc>(), static_cast<acc>(in.r), norm_mode,
                                   sums.data_ptr<acc>(), sq_sums.data_ptr<acc>(), loss_sum.data_ptr<acc>(),
                                   norm_sum.data_ptr<acc>());
  });
  return {sums, counts, sq_sums, loss_sum, norm_sum};
}

// out[n] = gk[c] + g2[n] (v[n] - pk[c]) + coef[n] v[n], c = cls[n]: the gradient along one plane.
// Restrict pointers so the compiler vectorises it (emulated gathers for the two table lookups).
template <typename acc>
inline void plane_grad(const acc* __restrict v, const int32_t* __restrict cls, const acc* __restrict gk,
                       const acc* __restrict pk, const acc* __restrict g2, const acc* __restrict coef,
                       acc* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const int32_t c = cls[i];
    out[i] = gk[c] + g2[i] * (v[i] - pk[c]) + coef[i] * v[i];
  }
}

template <typename scalar_t>
void terms_backward_kernel(const FeatureView& f, const FeatureView& o, const int32_t* idx, int64_t C,
                           const acc_t<scalar_t>* protos, const acc_t<scalar_t>* grad_sums,
                           const acc_t<scalar_t>* grad_sq, acc_t<scalar_t> grad_loss, acc_t<scalar_t> grad_norm,
                           acc_t<scalar_t> r, int64_t mode) {
  using acc = acc_t<scalar_t>;
  const scalar_t* base = f.tensor.const_data_ptr<scalar_t>();
  scalar_t* out = o.tensor.data_ptr<scalar_t>();
  const int64_t B = f.B, K = f.K, N = f.N;
  const bool need_norm = grad_loss != acc(0) || grad_norm != acc(0);
  // Tables with a zero class C (void): prototypes, grad_sums, and 2 * grad_sq.
  std::vector<acc> ptab((C + 1) * K, acc(0)), gtab((C + 1) * K, acc(0)), g2(C + 1, acc(0));
  for (int64_t c = 0; c < C; ++c) {
    g2[c] = acc(2) * grad_sq[c];
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
  if (f.planes) {
    const int64_t elem = static_cast<int64_t>(sizeof(scalar_t));
    // Per-vector coefficient of f in the norm terms. The squared norms take one streaming pass over
    // the planes, parallel over fixed chunks of channels (partial sums per chunk, combined in
    // chunk order: reproducible whatever the thread count).
    std::vector<acc> coef(B * N, acc(0));
    if (need_norm) {
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
    // (K, C+1) tables; 2 grad_sq[c] is looked up once per block.
    const int64_t kchunks = ceil_div(K, kWritePlanes), wblocks = ceil_div(N, kWriteBlock);
    at::parallel_for(0, B * wblocks * kchunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc> g2n(kWriteBlock), vbuf(256), rbuf(256);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / (wblocks * kchunks), q = (t / kchunks) % wblocks, kc = t % kchunks;
        const int64_t n0 = q * kWriteBlock, len = std::min(kWriteBlock, N - n0);
        const int32_t* lb = idx + b * N + n0;
        const acc* cf = coef.data() + b * N + n0;
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
            if constexpr (std::is_same<scalar_t, acc>::value) {
              plane_grad(v, lb + m0, gk, pk, g2n.data() + m0, cf + m0, qo + m0, m);
            } else {
              plane_grad(v, lb + m0, gk, pk, g2n.data() + m0, cf + m0, rbuf.data(), m);
              store_row(rbuf.data(), m, qo + m0);
            }
            ahead.advance(static_cast<double>(m0 + m) / static_cast<double>(len));
          }
        }
      }
    });
  } else {
    // Rows: one pass; each vector's norm is taken while its row is in cache.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, K));
    at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc> vbuf(K), rbuf(K);
      for (int64_t t = begin; t < end; ++t) {
        const int32_t c = idx[t];
        const acc* v = load_row<acc>(base + (t / N) * f.sB + (t % N) * f.sN, K, vbuf.data());
        acc coef = 0;
        if (need_norm) {
          constexpr int64_t U = 8;  // independent partial sums, so the dot product vectorises
          acc nn[U] = {};
          int64_t k = 0;
          for (; k + U <= K; k += U) {
            for (int64_t u = 0; u < U; ++u) nn[u] += v[k + u] * v[k + u];
          }
          for (; k < K; ++k) nn[0] += v[k] * v[k];
          coef = coefficient(((nn[0] + nn[1]) + (nn[2] + nn[3])) + ((nn[4] + nn[5]) + (nn[6] + nn[7])));
        }
        const acc* pc = ptab.data() + c * K;
        const acc* gc = gtab.data() + c * K;
        const acc gq = g2[c];
        scalar_t* q = out + (t / N) * o.sB + (t % N) * o.sN;
        acc* res = std::is_same<scalar_t, acc>::value ? reinterpret_cast<acc*>(q) : rbuf.data();
        for (int64_t k = 0; k < K; ++k) res[k] = gc[k] + gq * (v[k] - pc[k]) + coef * v[k];
        if constexpr (!std::is_same<scalar_t, acc>::value) store_row(rbuf.data(), K, q);
      }
    });
  }
}

at::Tensor feature_terms_backward_cpu(const at::Tensor& grad_sums, const at::Tensor& grad_sq_dist_sums,
                                      const at::Tensor& grad_norm_loss_sum, const at::Tensor& grad_norm_sum,
                                      const at::Tensor& features, const at::Tensor& labels,
                                      const at::Tensor& prototypes, const at::Tensor& reference, int64_t norm_mode,
                                      int64_t ignore_index) {
  constexpr const char* op = "feature_terms_backward";
  const TermsInputs in = check_terms_inputs(features, labels, prototypes, reference, norm_mode, ignore_index, op);
  const int64_t C = in.C, K = in.f.K;
  check_cpu(grad_sums, op, "grad_sums");
  check_cpu(grad_sq_dist_sums, op, "grad_sq_dist_sums");
  check_float(grad_sums, op, "grad_sums");
  check_float(grad_sq_dist_sums, op, "grad_sq_dist_sums");
  TORCH_CHECK(grad_sums.dim() == 2 && grad_sums.size(0) == C && grad_sums.size(1) == K, op,
              ": grad_sums must be (C, K) = (", C, ", ", K, "), got shape ", grad_sums.sizes());
  TORCH_CHECK(grad_sq_dist_sums.dim() == 1 && grad_sq_dist_sums.size(0) == C, op,
              ": grad_sq_dist_sums must be (C,) = (", C, ",), got shape ", grad_sq_dist_sums.sizes());
  const double g_loss = scalar_value(grad_norm_loss_sum, op, "grad_norm_loss_sum");
  const double g_norm = scalar_value(grad_norm_sum, op, "grad_norm_sum");
  at::Tensor grad = at::empty_like(features);
  if (grad.numel() == 0) return grad;
  const auto acc_type = acc_dtype(features.scalar_type());
  const at::Tensor gs = grad_sums.to(acc_type).contiguous();
  const at::Tensor gq = grad_sq_dist_sums.to(acc_type).contiguous();
  const FeatureView o = writable_like(in.f, grad);
  advise_huge_pages(o.tensor);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "lsr_fast_feature_terms_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    terms_backward_kernel<scalar_t>(in.f, o, in.idx.const_data_ptr<int32_t>(), C, in.protos.const_data_ptr<acc>(),
                                    gs.const_data_ptr<acc>(), gq.const_data_ptr<acc>(), static_cast<acc>(g_loss),
                                    static_cast<acc>(g_norm), static_cast<acc>(in.r), norm_mode);
  });
  if (!o.tensor.is_same(grad)) grad.copy_(o.tensor);
  return grad;
}

}  // namespace
}  // namespace cpu
}  // namespace lsr_fast

TORCH_LIBRARY_IMPL(lsr_fast, CPU, m) {
  m.impl("feature_terms", &lsr_fast::cpu::feature_terms_cpu);
  m.impl("feature_terms_backward", &lsr_fast::cpu::feature_terms_backward_cpu);
}
