// class_feature_stats and its backward on CUDA (kernels in feature_pass.cuh, feature_backward.cuh).
// Forward: one pass over the features; per-class sums (C, K) in float32 (float64 for float64
// features) and counts (C,) int64; void vectors are skipped. Backward: a gather,
// grad[f of class c] = grad_sums[c], 0 for void, in the features' dtype and memory format.
#include "feature_backward.cuh"
#include "feature_pass.cuh"

namespace lsr_fast {
namespace cuda {
namespace {

// The CUDA placement of features and labels (their dtypes and shapes: arg_checks.h).
void check_cuda_features(const char* op, const at::Tensor& features, const at::Tensor& labels) {
  check_cuda(features, op, "features");
  check_same_device(op, features, labels, "features", "labels");
}

std::tuple<at::Tensor, at::Tensor> class_feature_stats_cuda(const at::Tensor& features, const at::Tensor& labels,
                                                            int64_t num_classes, int64_t ignore_index) {
  check_cuda_features("class_feature_stats", features, labels);
  check_class_feature_stats_args(features, labels, num_classes);
  c10::cuda::CUDAGuard guard(features.device());
  const int64_t K = features.size(1);
  const auto acc = accumulate_type(features.scalar_type());
  const bool det = deterministic();
  // The deterministic path writes every element of sums (no NaN fill needed); the atomic one
  // adds into zeros.
  at::Tensor sums = det ? empty_written({num_classes, K}, features.options().dtype(acc))
                        : at::zeros({num_classes, K}, features.options().dtype(acc));
  at::Tensor counts = at::zeros({num_classes}, features.options().dtype(at::kLong));
  const int64_t positions =
      features.dim() == 2 ? features.size(0) : features.size(0) * features.size(2) * features.size(3);
  // K == 0 with positions still runs the kernel: the counts need the labels.
  if (positions == 0 || num_classes == 0) {
    if (det) sums.zero_();
    return {sums, counts};
  }
  const auto [f, layout] = flat_features(features);
  const Labels lab = prepare_labels(labels);
  const int sms = sm_count(features);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "class_feature_stats_cuda", [&] {
    const FeaturePassPlan plan = plan_feature_pass<scalar_t, false>(f, layout, lab, num_classes, ignore_index, sms);
    run_feature_pass<scalar_t, false>(plan, f, sums, reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()),
                                      nullptr, nullptr, sms);
  });
  return {sums, counts};
}

at::Tensor class_feature_stats_backward_cuda(const at::Tensor& grad_sums, const at::Tensor& features,
                                             const at::Tensor& labels, int64_t ignore_index) {
  constexpr const char* op = "class_feature_stats_backward";
  check_cuda_features(op, features, labels);
  check_same_device(op, features, grad_sums, "features", "grad_sums");
  check_class_feature_stats_backward_args(grad_sums, features, labels);
  c10::cuda::CUDAGuard guard(features.device());
  const int64_t C = grad_sums.size(0);
  BackwardTensors bt = backward_tensors(features);
  if (bt.out.numel() == 0) return bt.out;
  const auto acc = accumulate_type(features.scalar_type());
  const at::Tensor gs = grad_sums.to(acc).contiguous();
  const Labels lab = prepare_labels(labels);
  const int sms = sm_count(features);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "class_feature_stats_backward_cuda",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    run_feature_backward<scalar_t, false>(
                                        bt.f, bt.work, bt.layout, lab, C, ignore_index, kNormSource,
                                        gs.const_data_ptr<acc_t>(), nullptr, nullptr, nullptr, nullptr, nullptr, sms);
                                  });
  finish_backward(bt);
  return bt.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lsr_fast, CUDA, m) {
  m.impl("class_feature_stats", &class_feature_stats_cuda);
  m.impl("class_feature_stats_backward", &class_feature_stats_backward_cuda);
}

}  // namespace cuda
}  // namespace lsr_fast
