// CPU kernel of lsr_fast::hist_downsample: histogram-aware label downsampling (DESIGN.md, Sec. 3).
//
// Each output cell counts the classes of its adaptive-pooling window directly into a per-thread
// histogram (windows are ~8x8 at the paper's 720x1280 -> 91x161, so the whole map is read about
// once, overlaps included), then applies the float32 peak-ratio decision of lsr_fast.reference.
// The histogram is sparse in use: only the classes a window touches are reset and compared, so a
// cell costs its window's pixels whatever num_classes is. Parallel over (image, output row);
// every cell is computed independently, so the result does not depend on the thread count.
#include <torch/library.h>

#include <cmath>

#include "cpu_utils.h"

namespace lsr_fast {
namespace cpu {
namespace {

// DESIGN.md's decision from the classes a window touched (every other class scores 0): the top
// score n1 (lowest class on ties), the best other score n2 (0 if none, as the untouched classes
// score 0 and scores are >= 0); keep c1 if n1 > 0 and n2 < threshold * n1. In float32, as
// reference._peak_ratio_decision.
inline int64_t sparse_decision(const int32_t* hist, const std::vector<int32_t>& touched, const float* weights,
                               float threshold, int64_t ignore_index) {
  float n1 = 0.0f;
  int64_t c1 = -1;
  for (const int32_t c : touched) {
    const float s = weights ? static_cast<float>(hist[c]) * weights[c] : static_cast<float>(hist[c]);
    if (c1 < 0 || s > n1 || (s == n1 && c < c1)) {
      n1 = s;
      c1 = c;
    }
  }
  float n2 = 0.0f;
  for (const int32_t c : touched) {
    if (c == c1) continue;
    n2 = std::max(n2, weights ? static_cast<float>(hist[c]) * weights[c] : static_cast<float>(hist[c]));
  }
  return (c1 >= 0 && n1 > 0.0f && n2 < threshold * n1) ? c1 : ignore_index;
}

template <typename label_t>
void hist_downsample_kernel(const label_t* labels, int64_t B, int64_t H, int64_t W, int64_t h, int64_t w,
                            int64_t C, const float* weights, float threshold, int64_t ignore_index,
                            int64_t* out) {
  std::vector<int64_t> x0(w), x1(w);
  for (int64_t j = 0; j < w; ++j) {
    x0[j] = window_start(j, W, w);
    x1[j] = window_end(j, W, w);
  }
  const bool ignore_is_class = ignore_index >= 0 && ignore_index < C;
  // About 64K pixels per task, so small maps do not pay for threads.
  const int64_t rows_per_cell = ceil_div(H, h) + 1;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, rows_per_cell * W));
  at::parallel_for(0, B * h, grain, [&](int64_t begin, int64_t end) {
    // Bucket C collects void (ignore_index and values outside [0, C)); it never votes.
    std::vector<int32_t> hist(C + 1, 0);
    std::vector<int32_t> touched;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / h, i = r % h;
      const int64_t y0 = window_start(i, H, h), y1 = window_end(i, H, h);
      const label_t* image = labels + b * H * W;
      for (int64_t j = 0; j < w; ++j) {
        touched.clear();
        for (int64_t y = y0; y < y1; ++y) {
          const label_t* row = image + y * W;
          for (int64_t x = x0[j]; x < x1[j]; ++x) {
            const int64_t v = static_cast<int64_t>(row[x]);
            const int64_t c = ignore_is_class && v == ignore_index ? C : label_bucket(v, C);
            if (hist[c]++ == 0 && c != C) touched.push_back(static_cast<int32_t>(c));
          }
        }
        out[r * w + j] = sparse_decision(hist.data(), touched, weights, threshold, ignore_index);
        for (const int32_t c : touched) hist[c] = 0;
        hist[C] = 0;
      }
    }
  });
}

at::Tensor hist_downsample_cpu(const at::Tensor& labels, int64_t out_h, int64_t out_w, int64_t num_classes,
                               double threshold, int64_t ignore_index,
                               const std::optional<at::Tensor>& class_weights) {
  constexpr const char* op = "hist_downsample";
  check_cpu(labels, op, "labels");
  const bool weighted = class_weights.has_value() && class_weights->defined();
  if (weighted) check_cpu(*class_weights, op, "class_weights");
  check_hist_downsample_args(labels, out_h, out_w, num_classes, threshold, class_weights);
  const int64_t B = labels.size(0), H = labels.size(1), W = labels.size(2);
  at::Tensor weights;
  if (weighted) {
    // A value check (arg_checks.h's rule): the CPU kernel holds the weights on the host anyway.
    weights = class_weights->to(at::kFloat).contiguous();
    const float* wp = weights.const_data_ptr<float>();
    for (int64_t c = 0; c < num_classes; ++c) {
      TORCH_CHECK(std::isfinite(wp[c]) && wp[c] >= 0.0f, op, ": class_weights must be finite and >= 0, got ",
                  wp[c], " for class ", c);
    }
  }
  at::Tensor out = at::empty({B, out_h, out_w}, labels.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  const float* weight_ptr = weights.defined() ? weights.const_data_ptr<float>() : nullptr;
  at::Tensor src = labels.contiguous();
  AT_DISPATCH_INTEGRAL_TYPES(src.scalar_type(), "lsr_fast_hist_downsample_cpu", [&] {
    hist_downsample_kernel<scalar_t>(src.data_ptr<scalar_t>(), B, H, W, out_h, out_w, num_classes, weight_ptr,
                                     static_cast<float>(threshold), ignore_index, out.data_ptr<int64_t>());
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace lsr_fast

TORCH_LIBRARY_IMPL(lsr_fast, CPU, m) { m.impl("hist_downsample", &lsr_fast::cpu::hist_downsample_cpu); }
