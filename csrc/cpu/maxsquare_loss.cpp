// CPU kernels of lsr_fast::maxsquare_loss and its backward: image-wise weighted MaxSquare.
//
// Forward, one pass over the probabilities: per image row, the per-pixel argmax (first on ties)
// and sum of squares, folded at once into per-row, per-class pixel counts and sums of squares.
// The class weights need the whole image's histogram, but the loss is linear in them:
//   loss = -1/(B*C) * sum_b sum_c w[b,c] * S[b,c],  S[b,c] = sum of sum_k p^2 over pixels of class c,
// so no per-pixel buffer and no second pass are needed. Per-row partials are combined in row
// order (double precision), so the result does not depend on the thread count.
// Backward, one pass: recompute each row's argmax, then write -2 p w[b, argmax] g / (B*C).
#include <torch/library.h>

#include <cmath>

#include "cpu_utils.h"
#include "prob_rows.h"

namespace lsr_fast {
namespace cpu {
namespace {

template <typename scalar_t>
void maxsquare_forward_kernel(const at::Tensor& probs, double alpha, at::Tensor& loss, at::Tensor& class_weight) {
  using acc = acc_t<scalar_t>;
  const int64_t B = probs.size(0), C = probs.size(1), H = probs.size(2), W = probs.size(3);
  const int64_t sB = probs.stride(0), sC = probs.stride(1), sY = probs.stride(2), sX = probs.stride(3);
  const scalar_t* data = probs.const_data_ptr<scalar_t>();
  const int64_t rows = B * H;
  std::vector<int64_t> row_counts(rows * C, 0);  // pixels of each class, per image row
  std::vector<double> row_sq(rows * C, 0.0);     // their sum of squares, per image row
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, W * C));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc> best(W), sq(W), buf(W);
    std::vector<int32_t> arg(W);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, y = r % H;
      row_argmax_sumsq(data + b * sB + y * sY, C, W, sC, sX, best.data(), arg.data(), sq.data(), buf.data());
      int64_t* counts = &row_counts[r * C];
      double* sums = &row_sq[r * C];
      for (int64_t x = 0; x < W; ++x) {
        ++counts[arg[x]];
        sums[arg[x]] += static_cast<double>(sq[x]);
      }
    }
  });
  // Per image: class weights from the histogram, then the weighted sum (row order: reproducible).
  const double num_pixels = static_cast<double>(H * W);
  acc* weight = class_weight.data_ptr<acc>();
  double total = 0.0;
  std::vector<int64_t> counts(C);
  std::vector<double> sums(C);
  for (int64_t b = 0; b < B; ++b) {
    std::fill(counts.begin(), counts.end(), 0);
    std::fill(sums.begin(), sums.end(), 0.0);
    for (int64_t y = 0; y < H; ++y) {
      const int64_t r = b * H + y;
      for (int64_t c = 0; c < C; ++c) {
        counts[c] += row_counts[r * C + c];
        sums[c] += row_sq[r * C + c];
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const double denom = std::pow(static_cast<double>(counts[c]), alpha) * std::pow(num_pixels, 1.0 - alpha);
      const acc wc = static_cast<acc>(1.0 / std::max(denom, 1.0));
      weight[b * C + c] = wc;
      total += static_cast<double>(wc) * sums[c];
    }
  }
  loss.data_ptr<acc>()[0] = static_cast<acc>(-total / static_cast<double>(B * C));
}

std::tuple<at::Tensor, at::Tensor> maxsquare_loss_cpu(const at::Tensor& probs, double alpha) {
  constexpr const char* op = "maxsquare_loss";
  check_cpu(probs, op, "probs");
  check_maxsquare_loss_args(probs, alpha);
  const auto acc_type = acc_dtype(probs.scalar_type());
  at::Tensor loss = at::empty({}, probs.options().dtype(acc_type));
  at::Tensor class_weight = at::empty({probs.size(0), probs.size(1)}, probs.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "lsr_fast_maxsquare_cpu", [&] {
    maxsquare_forward_kernel<scalar_t>(probs, alpha, loss, class_weight);
  });
  return {loss, class_weight};
}

template <typename scalar_t>
void maxsquare_backward_kernel(double grad_loss, const at::Tensor& probs, const at::Tensor& class_weight,
                               at::Tensor& grad) {
  using acc = acc_t<scalar_t>;
  const int64_t B = probs.size(0), C = probs.size(1), H = probs.size(2), W = probs.size(3);
  const int64_t sB = probs.stride(0), sC = probs.stride(1), sY = probs.stride(2), sX = probs.stride(3);
  const int64_t oB = grad.stride(0), oC = grad.stride(1), oY = grad.stride(2), oX = grad.stride(3);
  const scalar_t* data = probs.const_data_ptr<scalar_t>();
  scalar_t* out = grad.data_ptr<scalar_t>();
  const acc* weight = class_weight.const_data_ptr<acc>();
  // d loss / d p = -(g / (B*C)) * w[b, argmax] * 2p, in the accumulation type (as autograd does).
  const acc scale = -static_cast<acc>(grad_loss / static_cast<double>(B * C));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, W * C));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc> best(W), factor(W), buf(W), res(W);
    std::vector<int32_t> arg(W);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, y = r % H;
      const scalar_t* in_row = data + b * sB + y * sY;
      scalar_t* out_row = out + b * oB + y * oY;
      row_argmax(in_row, C, W, sC, sX, best.data(), arg.data(), buf.data());
      const acc* wb = weight + b * C;
      for (int64_t x = 0; x < W; ++x) factor[x] = scale * wb[arg[x]];
      if (sX == 1 && oX == 1) {
        for (int64_t c = 0; c < C; ++c) {
          const acc* p = load_row<acc>(in_row + c * sC, W, buf.data());
          for (int64_t x = 0; x < W; ++x) res[x] = factor[x] * (acc(2) * p[x]);
          store_row(res.data(), W, out_row + c * oC);
        }
      } else {
        for (int64_t x = 0; x < W; ++x) {
          for (int64_t c = 0; c < C; ++c) {
            const acc v = static_cast<acc>(in_row[x * sX + c * sC]);
            out_row[x * oX + c * oC] = static_cast<scalar_t>(factor[x] * (acc(2) * v));
          }
        }
      }
    }
  });
}

at::Tensor maxsquare_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& probs,
                                       const at::Tensor& class_weight) {
  constexpr const char* op = "maxsquare_loss_backward";
  check_cpu(grad_loss, op, "grad_loss");
  check_cpu(probs, op, "probs");
  check_cpu(class_weight, op, "class_weight");
  check_maxsquare_loss_backward_args(grad_loss, probs, class_weight);
  const double g = scalar_value(grad_loss);
  at::Tensor grad = at::empty_like(probs);
  advise_huge_pages(grad);
  const at::Tensor weight = class_weight.to(acc_dtype(probs.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "lsr_fast_maxsquare_backward_cpu", [&] {
    maxsquare_backward_kernel<scalar_t>(g, probs, weight, grad);
  });
  return grad;
}

}  // namespace
}  // namespace cpu
}  // namespace lsr_fast

TORCH_LIBRARY_IMPL(lsr_fast, CPU, m) {
  m.impl("maxsquare_loss", &lsr_fast::cpu::maxsquare_loss_cpu);
  m.impl("maxsquare_loss_backward", &lsr_fast::cpu::maxsquare_loss_backward_cpu);
}
