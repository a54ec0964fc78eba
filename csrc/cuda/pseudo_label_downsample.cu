// pseudo_label_downsample on CUDA: (B, C, H, W) probabilities -> int64 (B, h, w), fused in one
// pass over the probabilities (window_hist.cuh): per-pixel argmax (first on ties) and max,
// the window histogram of the argmax, the peak-ratio decision and the mean-confidence test.
// Deterministic in every mode: counts are integers and each window's confidence sum is added
// by one thread in a fixed (row-major) order.
#include "window_hist.cuh"

namespace lsr_fast {
namespace cuda {
namespace {

at::Tensor pseudo_label_downsample_cuda(const at::Tensor& probs, int64_t out_h, int64_t out_w, double threshold,
                                        double confidence, int64_t ignore_index) {
  constexpr const char* op = "pseudo_label_downsample";
  check_cuda(probs, op, "probs");
  check_pseudo_label_downsample_args(probs, out_h, out_w, threshold, confidence);
  const int64_t B = probs.size(0), C = probs.size(1), H = probs.size(2), W = probs.size(3);
  check_window_pixels(op, "probs", H, W);
  c10::cuda::CUDAGuard guard(probs.device());

  // Every cell is written (one warp per cell of every tile): no deterministic fill needed.
  at::Tensor out = empty_written({B, out_h, out_w}, probs.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  const WindowPlan plan = plan_windows(B, H, W, out_h, out_w, C, /*probs=*/true, sm_count(probs));
  // Any strides: NCHW reads are coalesced along W, channels_last ones along C.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "pseudo_label_downsample_cuda", [&] {
    launch_window_kernel<scalar_t, true>(plan, probs, probs.const_data_ptr(), 0, probs.stride(0), probs.stride(1),
                                         probs.stride(2), probs.stride(3), C, nullptr, threshold, confidence,
                                         ignore_index, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lsr_fast, CUDA, m) { m.impl("pseudo_label_downsample", &pseudo_label_downsample_cuda); }

}  // namespace cuda
}  // namespace lsr_fast
