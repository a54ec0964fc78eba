// CPU kernels of lsr_fast::class_feature_stats (per-class feature sums and counts) and its backward
// (a gather of grad_sums rows by label).
//
// Forward, one pass over the features, with no atomics and a reduction order that does not depend
// on the thread count:
// - NCHW planes: parallel over pairs of channels. The vectors are sorted by class once (a counting
//   sort within blocks of 2048 positions); each block of a plane, prefetched while the previous
//   one is summed, is then summed class by class by gathering in that order (no scatter, no store
//   dependency), four float32 partial sums per class and block, the running total in float64.
// - channels_last maps and (N, K) rows: fixed blocks of vectors (their number depends on the shape
//   only) add each vector's contiguous row to its class's partial row (vectorised); the blocks are
//   combined in block order in float64.
// Backward: one pass writing grad_sums[label] (0 for void) into a buffer laid out like features.
#include <torch/library.h>

#include "cpu_utils.h"

namespace lsr_fast {
namespace cpu {
namespace {

// Positions per block of the class-order gathers (a block of a plane stays in L1).
constexpr int64_t kGatherBlock = 2048;

// Sums over the positions order[0..len) of two planes p and q at once (the index loads are shared),
// with four interleaved partial sums each in the accumulation type; the class's running total
// is float64.
template <typename acc, typename scalar_t>
inline void gather_sum2(const scalar_t* p, const scalar_t* q, const int32_t* order, int64_t len, double& sp,
                        double& sq) {
  acc a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
  int64_t i = 0;
  for (; i + 4 <= len; i += 4) {
    const int32_t i0 = order[i], i1 = order[i + 1], i2 = order[i + 2], i3 = order[i + 3];
    a0 += static_cast<acc>(p[i0]);
    a1 += static_cast<acc>(p[i1]);
    a2 += static_cast<acc>(p[i2]);
    a3 += static_cast<acc>(p[i3]);
    b0 += static_cast<acc>(q[i0]);
    b1 += static_cast<acc>(q[i1]);
    b2 += static_cast<acc>(q[i2]);
    b3 += static_cast<acc>(q[i3]);
  }
  for (; i < len; ++i) {
    a0 += static_cast<acc>(p[order[i]]);
    b0 += static_cast<acc>(q[order[i]]);
  }
  sp += static_cast<double>((a0 + a1) + (a2 + a3));
  sq += static_cast<double>((b0 + b1) + (b2 + b3));
}

template <typename scalar_t>
void stats_forward_kernel(const FeatureView& f, const int32_t* idx, int64_t C, acc_t<scalar_t>* sums) {
  using acc = acc_t<scalar_t>;
  const scalar_t* base = f.tensor.const_data_ptr<scalar_t>();
  const int64_t B = f.B, K = f.K, N = f.N;
  if (f.planes) {
    const int64_t elem = static_cast<int64_t>(sizeof(scalar_t));
    // Per block of a plane (in L1), each class's values are gathered in class order (no scatter,
    // no store dependency), two planes at a time; the next block is prefetched meanwhile.
    const ClassOrder order = class_order(idx, B, N, C, kGatherBlock);
    const int64_t pairs = ceil_div(K, 2), units = B * order.blocks;
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, B * N));
    at::parallel_for(0, pairs, grain, [&](int64_t j0, int64_t j1) {
      std::vector<double> total(2 * C);
      // Unit u of pair j: image u / blocks, block u % blocks, planes 2j and 2j+1 (the second may
      // repeat the first for odd K; its sums are then dropped).
      auto block = [&](int64_t j, int64_t u, int64_t plane) {
        const int64_t k = std::min(K - 1, 2 * j + plane);
        return base + (u / order.blocks) * f.sB + k * f.sK + (u % order.blocks) * kGatherBlock;
      };
      auto block_bytes = [&](int64_t u) { return std::min(kGatherBlock, N - (u % order.blocks) * kGatherBlock) * elem; };
      touch(block(j0, 0, 0), block_bytes(0));
      touch(block(j0, 0, 1), block_bytes(0));
      for (int64_t j = j0; j < j1; ++j) {
        std::fill(total.begin(), total.end(), 0.0);
        for (int64_t u = 0; u < units; ++u) {
          const int64_t b = u / order.blocks, q = u % order.blocks;
          const bool last = u + 1 == units;
          const int64_t nj = last ? j + 1 : j, nu = last ? 0 : u + 1;
          Prefetcher ahead0(nj < j1 ? block(nj, nu, 0) : nullptr, block_bytes(nu));
          Prefetcher ahead1(nj < j1 ? block(nj, nu, 1) : nullptr, block_bytes(nu));
          const scalar_t* p0 = base + b * f.sB + std::min(K - 1, 2 * j) * f.sK;
          const scalar_t* p1 = base + b * f.sB + std::min(K - 1, 2 * j + 1) * f.sK;
          const int32_t* ob = order.order.data() + b * N;
          for (int64_t c = 0; c < C; ++c) {
            const int64_t s0 = order.start(b, q, c), s1 = order.start(b, q, c + 1);
            gather_sum2<acc>(p0, p1, ob + s0, s1 - s0, total[c], total[C + c]);
            const double done = static_cast<double>(c + 1) / static_cast<double>(C);
            ahead0.advance(done);
            ahead1.advance(done);
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          sums[c * K + 2 * j] = static_cast<acc>(total[c]);
          if (2 * j + 1 < K) sums[c * K + 2 * j + 1] = static_cast<acc>(total[C + c]);
        }
      }
    });
  } else {
    // Rows: fixed blocks of vectors, each vector's contiguous row added to its class's partial
    // row of the block (vectorised), blocks combined in order.
    const int64_t P = B * N;
    const int64_t blocks = rows_blocks(P, C, K), per_block = ceil_div(P, blocks);
    RowPartials<acc> partials(blocks, C, K);
    at::parallel_for(0, blocks, 1, [&](int64_t q0, int64_t q1) {
      std::vector<acc> buf(K);
      for (int64_t q = q0; q < q1; ++q) {
        for (int64_t t = q * per_block; t < std::min(P, (q + 1) * per_block); ++t) {
          const int32_t c = idx[t];
          if (c == C) continue;  // void
          const scalar_t* row = base + (t / N) * f.sB + (t % N) * f.sN;
          partials.add(q, c, load_row<acc>(row, K, buf.data()));
        }
      }
    });
    partials.combine(sums);
  }
}

std::tuple<at::Tensor, at::Tensor> class_feature_stats_cpu(const at::Tensor& features, const at::Tensor& labels,
                                                           int64_t num_classes, int64_t ignore_index) {
  constexpr const char* op = "class_feature_stats";
  check_cpu_features_labels(features, labels, op);
  check_class_feature_stats_args(features, labels, num_classes);
  const FeatureView f = view_features(features, op);
  const auto acc_type = acc_dtype(features.scalar_type());
  at::Tensor sums = at::zeros({num_classes, f.K}, features.options().dtype(acc_type));
  at::Tensor counts = at::zeros({num_classes}, features.options().dtype(at::kLong));
  const at::Tensor idx = label_buckets(labels, f.B * f.N, num_classes, ignore_index, op);
  const int32_t* ip = idx.const_data_ptr<int32_t>();
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) {
    if (ip[i] < num_classes) ++cp[ip[i]];
  }
  if (num_classes == 0 || f.K == 0 || f.B * f.N == 0) return {sums, counts};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "lsr_fast_class_feature_stats_cpu", [&] {
    stats_forward_kernel<scalar_t>(f, ip, num_classes, sums.data_ptr<acc_t<scalar_t>>());
  });
  return {sums, counts};
}

// grad[b, :, n] = grad_sums[label] (0 for void), in the features' dtype and layout.
template <typename scalar_t>
void stats_backward_kernel(const FeatureView& f, const FeatureView& o, const int32_t* idx, int64_t C,
                           const acc_t<scalar_t>* grad_sums) {
  const int64_t B = f.B, K = f.K, N = f.N;
  scalar_t* out = o.tensor.data_ptr<scalar_t>();
  if (f.planes) {
    // table[k][c] = grad_sums[c][k] rounded once to the features' dtype; column C (void) = 0.
    std::vector<scalar_t> table(K * (C + 1), scalar_t(0));
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t k = 0; k < K; ++k) table[k * (C + 1) + c] = static_cast<scalar_t>(grad_sums[c * K + k]);
    }
    // Two planes per task step, so each label is loaded once for both.
    const int64_t pairs = ceil_div(K, 2);
    at::parallel_for(0, B * pairs, std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, N)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t t = begin; t < end; ++t) {
                         const int64_t b = t / pairs, k = 2 * (t % pairs);
                         const int32_t* lb = idx + b * N;
                         const scalar_t* t0 = table.data() + k * (C + 1);
                         scalar_t* p0 = out + b * o.sB + k * o.sK;
                         if (k + 1 < K) {
                           const scalar_t* t1 = t0 + (C + 1);
                           scalar_t* p1 = p0 + o.sK;
                           for (int64_t n = 0; n < N; ++n) {
                             const int32_t c = lb[n];
                             p0[n] = t0[c];
                             p1[n] = t1[c];
                           }
                         } else {
                           for (int64_t n = 0; n < N; ++n) p0[n] = t0[lb[n]];
                         }
                       }
                     });
  } else {
    std::vector<scalar_t> table((C + 1) * K, scalar_t(0));  // row C (void) = 0
    for (int64_t i = 0; i < C * K; ++i) table[i] = static_cast<scalar_t>(grad_sums[i]);
    at::parallel_for(0, B * N, std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, K)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t t = begin; t < end; ++t) {
                         const int64_t b = t / N, n = t % N;
                         const scalar_t* src = table.data() + idx[t] * K;
                         scalar_t* row = out + b * o.sB + n * o.sN;
                         std::copy(src, src + K, row);
                       }
                     });
  }
}

at::Tensor class_feature_stats_backward_cpu(const at::Tensor& grad_sums, const at::Tensor& features,
                                            const at::Tensor& labels, int64_t ignore_index) {
  constexpr const char* op = "class_feature_stats_backward";
  check_cpu(grad_sums, op, "grad_sums");
  check_cpu_features_labels(features, labels, op);
  check_class_feature_stats_backward_args(grad_sums, features, labels);
  const int64_t C = grad_sums.size(0);
  const FeatureView f = view_features(features, op);
  at::Tensor grad = at::empty_like(features);
  if (grad.numel() == 0) return grad;
  const at::Tensor idx = label_buckets(labels, f.B * f.N, C, ignore_index, op);
  const FeatureView o = writable_like(f, grad);
  advise_huge_pages(o.tensor);
  const at::Tensor gs = grad_sums.to(acc_dtype(features.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "lsr_fast_class_feature_stats_backward_cpu", [&] {
    stats_backward_kernel<scalar_t>(f, o, idx.const_data_ptr<int32_t>(), C, gs.const_data_ptr<acc_t<scalar_t>>());
  });
  if (!o.tensor.is_same(grad)) grad.copy_(o.tensor);
  return grad;
}

}  // namespace
}  // namespace cpu
}  // namespace lsr_fast

TORCH_LIBRARY_IMPL(lsr_fast, CPU, m) {
  m.impl("class_feature_stats", &lsr_fast::cpu::class_feature_stats_cpu);
  m.impl("class_feature_stats_backward", &lsr_fast::cpu::class_feature_stats_backward_cpu);
}
