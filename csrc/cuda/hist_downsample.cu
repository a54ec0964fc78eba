// hist_downsample on CUDA: integer (B, H, W) labels -> int64 (B, h, w) (DESIGN.md, Sec. 3).
// The kernel (window_hist.cuh) counts each window's classes in shared memory and applies the
// peak-ratio decision; integer counts make it deterministic in every mode.
#include "window_hist.cuh"

namespace lsr_fast {
namespace cuda {
namespace {

at::Tensor hist_downsample_cuda(const at::Tensor& labels, int64_t out_h, int64_t out_w, int64_t num_classes,
                                double threshold, int64_t ignore_index,
                                const std::optional<at::Tensor>& class_weights) {
  constexpr const char* op = "hist_downsample";
  check_cuda(labels, op, "labels");
  const bool weighted = class_weights.has_value() && class_weights->defined();
  if (weighted) check_same_device(op, labels, *class_weights, "labels", "class_weights");
  check_hist_downsample_args(labels, out_h, out_w, num_classes, threshold, class_weights);
  const int64_t B = labels.size(0), H = labels.size(1), W = labels.size(2);
  check_window_pixels(op, "labels", H, W);
  c10::cuda::CUDAGuard guard(labels.device());

  at::Tensor weights;
  if (weighted) {
    // Their values (finite, >= 0) are trusted here: reading them would synchronise (arg_checks.h).
    weights = class_weights->to(at::kFloat).contiguous();
  }

  // Every cell is written (one warp per cell of every tile): no deterministic fill needed.
  at::Tensor out = empty_written({B, out_h, out_w}, labels.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  const Labels lab = prepare_labels(labels);
  const WindowPlan plan = plan_windows(B, H, W, out_h, out_w, num_classes, /*probs=*/false, sm_count(labels));
  // Label tensors are contiguous (B, H, W); the class-probability stride is unused.
  launch_window_kernel<float, false>(plan, labels, lab.tensor.const_data_ptr(), lab.kind, H * W, 0, W, 1, num_classes,
                                     weights.defined() ? weights.const_data_ptr<float>() : nullptr, threshold,
                                     /*confidence=*/0.0, ignore_index, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lsr_fast, CUDA, m) { m.impl("hist_downsample", &hist_downsample_cuda); }

}  // namespace cuda
}  // namespace lsr_fast
