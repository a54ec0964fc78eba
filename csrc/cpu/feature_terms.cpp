// CPU kernel of lsr_fast::feature_terms (the fused pass behind clustering, prototypes and norm
// alignment; the switches `distance` and `filtered` and the shared row sweeps are described in
// feature_terms.h). The backward is in feature_terms_backward.cpp.
//
// One pass over the features; every reduction has a fixed order that does not depend on the thread
// count, so the result does not either:
// - NCHW planes: parallel over fixed chunks of channels (the chunk size depends on K only). Per
//   block of 2048 positions and plane, the values are gathered in class order (see ClassOrder), so
//   each class's prototype entry is a constant and the per-vector partial squared norms and
//   distances, and the class sums, are contiguous vectorised loops. Each chunk leaves per-vector
//   partials; a cheap pass over them (not the features) finishes the norms and sums.
// - channels_last maps and (N, K) rows: fixed blocks of vectors; a vector's squared norm and
//   distance are dot products over its contiguous row (row_sweep, 8 interleaved lanes), and the
//   row goes to its class's partial row of the block (RowPartials).
// - filtered: the threshold m needs all K channels of a vector before its filtered norm, which no
//   channel chunk has. Rows: row_sweep also sums the row, then a second sweep over the row (in
//   L1) sums the kept squares (filtered_norm2). Planes: the pass is the rows pass over tiles of
//   positions; a tile (T positions x K channels, ~512 KiB, T depending on K only) is read from
//   memory once, plane segment by plane segment, transposed into rows in cache, and each row is
//   processed as in the rows layout. So the map is still read from memory once, and NCHW and
//   channels_last give the same values to the bit.
// Per-class and global sums are accumulated in float64 and rounded once.
#include <torch/library.h>

#include "feature_terms.h"

namespace lsr_fast {
namespace cpu {
namespace {

// Vectors per block of the position passes.
constexpr int64_t kPositionBlock = 4096;
// Positions per block of the class-order gathers over planes (a block of a plane stays in L1).
constexpr int64_t kGatherBlock = 2048;

template <typename acc>
inline acc norm_term(acc r, acc norm, int64_t mode) {
  const acc gap = r - norm;
  return mode == kNormSource ? std::abs(gap) : std::max(gap, acc(0));
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

template <typename scalar_t, int kDist, bool kFilt>
void terms_forward_kernel(const FeatureView& f, const int32_t* idx, int64_t C, const acc_t<scalar_t>* protos,
                          acc_t<scalar_t> r, int64_t mode, acc_t<scalar_t>* sums, acc_t<scalar_t>* sq_sums,
                          acc_t<scalar_t>* loss_sum, acc_t<scalar_t>* norm_sum) {
  using acc = acc_t<scalar_t>;
  const scalar_t* base = f.tensor.const_data_ptr<scalar_t>();
  const int64_t B = f.B, K = f.K, N = f.N, P = B * N;
  // Planes (unfiltered): chunks of channels in class order, each with its own per-vector partials.
  // Rows, and planes when filtered: one pass per vector.
  const bool class_chunks = f.planes && !kFilt;
  const int64_t KC = channel_chunk(K), chunks = class_chunks ? ceil_div(K, KC) : 1;
  const int64_t elem = static_cast<int64_t>(sizeof(scalar_t));
  // Prototype tables with a zero class C for void vectors (their distance is computed and dropped):
  // rows (C+1, K) for the rows pass, transposed (K, C+1) for the class-order chunks.
  std::vector<acc> table((C + 1) * K, acc(0));
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t k = 0; k < K; ++k) table[class_chunks ? k * (C + 1) + c : c * K + k] = protos[c * K + k];
  }
  // Per-vector partial squared norms / distances of each chunk (and filtered squared norms). The
  // class-order chunks keep them in class order (the order their gathers produce), the rows pass in
  // position order; `cls` is the class in that order.
  std::vector<acc> part_norm(chunks * P), part_dist(chunks * P), part_filt(kFilt ? P : 0);
  const int32_t* cls = idx;
  std::vector<int32_t> sorted_cls;
  if constexpr (!kFilt) {
    if (f.planes) {
      const ClassOrder order = class_order(idx, B, N, C, kGatherBlock);
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
                      pdb[i] = dist_term<kDist>(d);
                    }
                  } else {
                    for (int64_t i = s0; i < s1; ++i) {
                      const acc d = v[i] - pc;
                      pnb[i] += v[i] * v[i];
                      pdb[i] += dist_term<kDist>(d);
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
    }
  }
  if (!class_chunks) {
    // Fixed blocks of vectors; each vector's norm and distance are dot products over its
    // contiguous row (filtered: a second sweep over the row, in L1, after its sum and max), and
    // the row is added to its class's partial row of the block.
    const int64_t blocks = rows_blocks(P, C, K), per_block = ceil_div(P, blocks);
    RowPartials<acc> partials(blocks, C, K);
    // Planes (filtered only): tiles of positions are transposed into rows (ld apart, padded so the
    // rows do not share cache sets), each tile read from memory once.
    const int64_t T = f.planes ? tile_positions(K, static_cast<int64_t>(sizeof(acc))) : 0;
    const int64_t ld = ceil_div(K, 16) * 16 + 16;
    at::parallel_for(0, blocks, 1, [&](int64_t q0, int64_t q1) {
      std::vector<acc> buf(f.planes ? T * ld : K), seg(T);
      auto vector_terms = [&](int64_t t, const acc* v, int64_t q) {
        const int32_t c = idx[t];
        const RowSums<acc> s = row_sweep<kDist, true, kFilt>(v, table.data() + c * K, K);
        part_norm[t] = s.norm2;
        part_dist[t] = s.dist;
        if constexpr (kFilt) {
          acc m;
          part_filt[t] = filtered_norm2(v, K, s.sum, &m);
        }
        if (c < C) partials.add(q, c, v);
      };
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t t1 = std::min(P, (q + 1) * per_block);
        if (!f.planes) {
          for (int64_t t = q * per_block; t < t1; ++t) {
            vector_terms(t, load_row<acc>(base + (t / N) * f.sB + (t % N) * f.sN, K, buf.data()), q);
          }
          continue;
        }
        for (int64_t t = q * per_block; t < t1;) {
          const int64_t b = t / N, n = t % N, len = std::min({T, t1 - t, N - n});
          const scalar_t* p = base + b * f.sB + n;
          for (int64_t k = 0; k < K; ++k) {
            if (k + kTilePrefetch < K) Prefetcher(p + (k + kTilePrefetch) * f.sK, len * elem).advance(1.0);
            const acc* x = load_row<acc>(p + k * f.sK, len, seg.data());
            for (int64_t i = 0; i < len; ++i) buf[i * ld + k] = x[i];
          }
          for (int64_t i = 0; i < len; ++i) vector_terms(t + i, buf.data() + i * ld, q);
          t += len;
        }
      }
    });
    partials.combine(sums);
  }

  // Finish per vector, in fixed blocks of vectors; blocks combine in order.
  const int64_t blocks = ceil_div(P, kPositionBlock);
  const int64_t stride = C + 3;  // per block: distance sums (C+1), norm-loss sum, norm sum
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
        const acc term_norm = kFilt ? std::sqrt(part_filt[i]) : norm;
        loss += static_cast<double>(norm_term(r, term_norm, mode));
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> feature_terms_cpu(
    const at::Tensor& features, const at::Tensor& labels, const at::Tensor& prototypes, const at::Tensor& reference,
    int64_t norm_mode, int64_t ignore_index, int64_t distance, bool filtered) {
  constexpr const char* op = "feature_terms";
  check_cpu_terms(features, labels, prototypes, reference, op);
  check_feature_terms_args(op, features, labels, prototypes, reference, norm_mode, distance);
  const TermsInputs in =
      prepare_terms_inputs(features, labels, prototypes, reference, ignore_index, op);
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
    with_switches(distance, filtered, [&](auto dist, auto filt) {
      terms_forward_kernel<scalar_t, decltype(dist)::value, decltype(filt)::value>(
          in.f, ip, C, in.protos.const_data_ptr<acc>(), static_cast<acc>(in.r), norm_mode, sums.data_ptr<acc>(),
          sq_sums.data_ptr<acc>(), loss_sum.data_ptr<acc>(), norm_sum.data_ptr<acc>());
    });
  });
  return {sums, counts, sq_sums, loss_sum, norm_sum};
}

}  // namespace
}  // namespace cpu
}  // namespace lsr_fast

TORCH_LIBRARY_IMPL(lsr_fast, CPU, m) {
  m.impl("feature_terms", &lsr_fast::cpu::feature_terms_cpu);
}
