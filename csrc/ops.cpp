// The one registration of the lsr_fast operator library: schemas only. Kernels register their
// implementations per dispatch key in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta) kernels and
// autograd are registered from Python in lsr_fast/ops/_compiled.py. Both devices' kernels check
// their arguments with the same functions (csrc/arg_checks.h), named as in these schemas.
//
// Conventions shared by every kernel (see DESIGN.md, "Semantics"):
// - labels are uint8/int32/int64; ignore_index marks void; windows are adaptive-pooling windows.
// - features are float16/bfloat16/float32/float64, (B, K, h, w) in any memory format or (N, K);
//   accumulation is float32 (float64 for float64 features); sums/losses come back in that type.
// - reference is a 0-dim tensor so that no value crosses to the host; norm_mode 0 = source
//   (|r - |f||), 1 = target (max(0, r - |f|)).
// - feature_terms: distance 0 = squared_l2 (sq_dist_sums = sum of ||f - p_c||^2), 1 = l1
//   (sum of sum_k |f_k - p_ck|); filtered: the norm term uses ||f~||, f~_k = f_k where f_k >= the
//   vector's mean channel value, else 0 (norm_sum stays the sum of the unfiltered norms).
#include <torch/library.h>

TORCH_LIBRARY(lsr_fast, m) {
  m.def("hist_downsample(Tensor labels, int out_h, int out_w, int num_classes, float threshold, "
        "int ignore_index, Tensor? class_weights) -> Tensor");
  m.def("pseudo_label_downsample(Tensor probs, int out_h, int out_w, float threshold, "
        "float confidence, int ignore_index) -> Tensor");
  m.def("class_feature_stats(Tensor features, Tensor labels, int num_classes, int ignore_index) "
        "-> (Tensor sums, Tensor counts)");
  m.def("class_feature_stats_backward(Tensor grad_sums, Tensor features, Tensor labels, "
        "int ignore_index) -> Tensor");
  m.def("feature_terms(Tensor features, Tensor labels, Tensor prototypes, Tensor reference, "
        "int norm_mode, int ignore_index, int distance=0, bool filtered=False) -> (Tensor sums, "
        "Tensor counts, Tensor sq_dist_sums, Tensor norm_loss_sum, Tensor norm_sum)");
  m.def("feature_terms_backward(Tensor grad_sums, Tensor grad_sq_dist_sums, Tensor grad_norm_loss_sum, "
        "Tensor grad_norm_sum, Tensor features, Tensor labels, Tensor prototypes, Tensor reference, "
        "int norm_mode, int ignore_index, int distance=0, bool filtered=False) -> Tensor");
  m.def("maxsquare_loss(Tensor probs, float alpha) -> (Tensor loss, Tensor class_weight)");
  m.def("maxsquare_loss_backward(Tensor grad_loss, Tensor probs, Tensor class_weight) -> Tensor");
}
