// CPU kernel of lsr_fast::hist_downsample: histogram-aware label downsampling (DESIGN.md, Sec. 3).
//
// Each output cell counts the classes of its adaptive-pooling window directly into a small
// per-thread histogram (windows are ~8x8 at the paper's 720x1280 -> 91x161, so the whole map is
// read about once, overlaps included), then applies the float32 peak-ratio decision of
// lsr_fast.reference. Parallel over (image, output row); every cell is computed independently,
// so the result does not depend on the thread count.
#include <torch/library.h>

#include "cpu_utils.h"

namespace lsr_fast {
namespace cpu {
namespace {

template <typename label_t>
void hist_downsample_kernel(const label_t* labels, int64_t B, int64_t H, int64_t W, int64_t h, int64_t w,
                            int64_t C, const float* weights, float threshold, int64_t ignore_index,
                            int64_t* out) {
  std::vector<int64_t> x0(w), x1(w);
  for (int64_t j = 0; j < w; ++j) {
    x0[j] = window_start(j, W, w);
    x1[j] = window_end(j, W, w);
  }
  // About 64K pixels per task, so small maps do not pay for threads.
  const int64_t rows_per_cell = ceil_div(H, h) + 1;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, rows_per_cell * W));
  at::parallel_for(0, B * h, grain, [&](int64_t begin, int64_t end) {
    // Buckets: classes [0, C), C = ignore_index (no vote), C + 1 = invalid value.
    std::vector<int32_t> hist(C + 2);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / h, i = r % h;
      const int64_t y0 = window_start(i, H, h), y1 = window_end(i, H, h);
      const label_t* image = labels + b * H * W;
      for (int64_t j = 0; j < w; ++j) {
        std::fill(hist.begin(), hist.end(), 0);
        for (int64_t y = y0; y < y1; ++y) {
          const label_t* row = image + y * W;
          for (int64_t x = x0[j]; x < x1[j]; ++x) {
            ++hist[label_bucket(static_cast<int64_t>(row[x]), C, ignore_index)];
          }
        }
        if (hist[C + 1] != 0) {  // find the offending value for the message
          for (int64_t y = y0; y < y1; ++y) {
            for (int64_t x = x0[j]; x < x1[j]; ++x) {
              const int64_t v = static_cast<int64_t>(image[y * W + x]);
              if (label_bucket(v, C, ignore_index) > C) bad_label("hist_downsample", v, C, ignore_index);
            }
          }
        }
        out[r * w + j] = peak_ratio_decision(hist.data(), C, weights, threshold, ignore_index);
      }
    }
  });
}

at::Tensor hist_downsample_cpu(const at::Tensor& labels, int64_t out_h, int64_t out_w, int64_t num_classes,
                               double threshold, int64_t ignore_index,
                               const std::optional<at::Tensor>& class_weights) {
  constexpr const char* op = "hist_downsample";
  check_cpu(labels, op, "labels");
  check_labels_dtype(labels, op, "labels");
  TORCH_CHECK(labels.dim() == 3, op, ": labels must be (B, H, W), got shape ", labels.sizes());
  TORCH_CHECK(out_h >= 1 && out_w >= 1, op, ": the output size must be positive, got (", out_h, ", ", out_w, ")");
  TORCH_CHECK(num_classes >= 1, op, ": num_classes must be >= 1, got ", num_classes);
  TORCH_CHECK(num_classes < std::numeric_limits<int32_t>::max() - 1, op, ": too many classes (", num_classes, ")");
  const int64_t B = labels.size(0), H = labels.size(1), W = labels.size(2);
  at::Tensor out = at::empty({B, out_h, out_w}, labels.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  TORCH_CHECK(H >= 1 && W >= 1, op, ": labels must have a non-empty spatial size, got shape ", labels.sizes());

  at::Tensor weights;
  if (class_weights.has_value() && class_weights->defined()) {
    check_cpu(*class_weights, op, "class_weights");
    TORCH_CHECK(class_weights->dim() == 1 && class_weights->size(0) == num_classes, op,
                ": class_weights must have shape (", num_classes, ",), got ", class_weights->sizes());
    weights = class_weights->to(at::kFloat).contiguous();
  }
  const float* weight_ptr = weights.defined() ? weights.data_ptr<float>() : nullptr;
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
