// Argument checks of the raw ops, shared by the CPU and CUDA kernels, so that torch.ops.lsr_fast.*
// called directly (from C++/LibTorch, or Python without lsr_fast.ops) rejects what the Python API
// (lsr_fast/ops/_checks.py) rejects, with a RuntimeError "<op>: <argument> must ..., got ..."
// naming the op and the argument as the schema in csrc/ops.cpp names them.
//
// Each op has ONE function here (check_<op>_args) holding every device-independent check: dtypes,
// ranks, shapes and matching sizes, scalar ranges, class-count bounds and the empty inputs that
// would divide by zero or launch an empty grid. Both devices' entry points call it first, after
// only their own device checks (check_cpu, or check_cuda and the same-device checks), and before
// any arithmetic on the sizes: parity between the devices holds by construction.
//
// Host code only: nothing here reads tensor memory, so nothing synchronises with a device.
// The rule for value checks (checks that read tensor memory): the CPU kernels may check values
// they read on the host anyway, at no extra cost (hist_downsample's class_weights: finite, >= 0);
// the CUDA kernels never read a value to check it (it would synchronise with the device), so they
// trust class_weights' values. Everything else that depends on values is trusted by both, with
// one defined outcome: a label outside [0, C) that is not ignore_index counts as void in every
// backend, and NaN/inf in features, probabilities or reference gives NaN or meaningless output,
// never a crash (README, "The raw ops' input contract").
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>

namespace lsr_fast {

// Labels' class count for the window (histogram) ops. Label maps have at most 16-bit class ids
// in practice (Cityscapes 19, ADE20K 150, COCO-stuff 182, LVIS 1203); the cap bounds the work of
// the CUDA kernels' histograms, whose per-cell cost grows with the class count.
constexpr int64_t kMaxHistClasses = int64_t(1) << 16;
// Largest class count of every other op (num_classes, prototypes' and grad_sums' rows, probs'
// class channels): the CUDA kernels use 32-bit (cell, class) and (class, channel) keys and
// bounded scratch; far above any segmentation label set (lsr_fast.ops._checks.MAX_CLASSES).
constexpr int64_t kMaxClasses = int64_t(1) << 24;

// ---- scalars ------------------------------------------------------------------------------

// A fraction in [0, 1]; NaN fails the comparison and is rejected too.
inline void check_fraction(const char* op, const char* name, double value) {
  TORCH_CHECK(value >= 0.0 && value <= 1.0, op, ": ", name, " must be in [0, 1], got ", value);
}

// Output (out_h, out_w) of a window op over an (H, W) input: at least 1, at most the input.
inline void check_output_size(const char* op, int64_t out_h, int64_t out_w, int64_t H, int64_t W) {
  TORCH_CHECK(out_h >= 1 && out_h <= H, op, ": out_h must be in [1, H = ", H, "], got ", out_h);
  TORCH_CHECK(out_w >= 1 && out_w <= W, op, ": out_w must be in [1, W = ", W, "], got ", out_w);
}

// A class count in [low, high]; `name` says where it comes from (num_classes, prototypes' rows...).
inline void check_class_count(const char* op, const char* name, int64_t count, int64_t low = 1,
                              int64_t high = kMaxClasses) {
  TORCH_CHECK(count >= low && count <= high, op, ": ", name, " must be in [", low, ", ", high, "], got ", count);
}

inline void check_hist_classes(const char* op, int64_t num_classes) {
  check_class_count(op, "num_classes", num_classes, 1, kMaxHistClasses);
}

inline void check_norm_mode(const char* op, int64_t norm_mode) {
  TORCH_CHECK(norm_mode == 0 || norm_mode == 1, op, ": norm_mode must be 0 (source) or 1 (target), got ",
              norm_mode);
}

// feature_terms' distance: 0 = squared_l2, 1 = l1 (lsr_fast.ops._compiled.DISTANCES).
inline void check_distance(const char* op, int64_t distance) {
  TORCH_CHECK(distance == 0 || distance == 1, op, ": distance must be 0 (squared_l2) or 1 (l1), got ", distance);
}

// ---- tensors: dtypes and ranks ------------------------------------------------------------

// What every kernel reads (not float8 or complex, which at::isFloatingType partly admits).
inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble, op, ": ", name,
              " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ", s);
}

// The label dtypes of the Python API (uint16/32/64 lack most torch ops on the CPU).
inline void check_labels_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kByte || s == at::kChar || s == at::kShort || s == at::kInt || s == at::kLong, op, ": ",
              name, " must be an integer tensor (uint8, int8, int16, int32 or int64), got ", s);
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", layout, ", got shape ", t.sizes());
}

// A 0-dim floating-point tensor (reference, the incoming gradient of a scalar output).
inline void check_scalar_tensor(const char* op, const char* name, const at::Tensor& t) {
  check_float(op, name, t);
  TORCH_CHECK(t.dim() == 0, op, ": ", name, " must be a 0-dim tensor, got shape ", t.sizes());
}

// A floating-point (rows, cols) tensor; rows < 0 means any.
inline void check_matrix(const char* op, const char* name, const at::Tensor& t, int64_t rows, int64_t cols,
                         const char* layout) {
  check_float(op, name, t);
  TORCH_CHECK(t.dim() == 2 && (rows < 0 || t.size(0) == rows) && t.size(1) == cols, op, ": ", name, " must be ",
              layout, " = (", rows < 0 ? "C" : std::to_string(rows), ", ", cols, "), got shape ", t.sizes());
}

inline void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t size, const char* layout) {
  check_float(op, name, t);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, op, ": ", name, " must be ", layout, " = (", size, ",), got shape ",
              t.sizes());
}

// Features ((B, K, h, w) or (N, K), float) with labels ((B, h, w) or (N,), integer).
inline void check_features_labels(const char* op, const at::Tensor& features, const at::Tensor& labels) {
  check_float(op, "features", features);
  check_labels_dtype(op, "labels", labels);
  TORCH_CHECK(features.dim() == 4 || features.dim() == 2, op,
              ": features must be (B, K, h, w) or (N, K), got shape ", features.sizes());
  if (features.dim() == 4) {
    TORCH_CHECK(labels.dim() == 3 && labels.size(0) == features.size(0) && labels.size(1) == features.size(2) &&
                    labels.size(2) == features.size(3),
                op, ": labels must be (B, h, w) = (", features.size(0), ", ", features.size(2), ", ",
                features.size(3), ") to match features ", features.sizes(), ", got shape ", labels.sizes());
  } else {
    TORCH_CHECK(labels.dim() == 1 && labels.size(0) == features.size(0), op, ": labels must be (N,) = (",
                features.size(0), ",) to match features ", features.sizes(), ", got shape ", labels.sizes());
  }
}

// (B, C, H, W) probabilities with 1 <= C <= kMaxClasses; `nonempty`: no zero dimension (a
// MaxSquare mean over an empty batch or image divides by zero).
inline void check_probs(const char* op, const at::Tensor& probs, bool nonempty) {
  check_float(op, "probs", probs);
  check_dim(op, "probs", probs, 4, "(B, C, H, W)");
  if (nonempty) TORCH_CHECK(probs.numel() > 0, op, ": probs must not be empty, got shape ", probs.sizes());
  TORCH_CHECK(probs.size(1) >= 1 && probs.size(1) <= kMaxClasses, op, ": probs must have between 1 and ",
              kMaxClasses, " class channels (dim 1), got shape ", probs.sizes());
}

// ---- every op's device-independent checks -------------------------------------------------

inline void check_hist_downsample_args(const at::Tensor& labels, int64_t out_h, int64_t out_w, int64_t num_classes,
                                       double threshold, const std::optional<at::Tensor>& class_weights) {
  constexpr const char* op = "hist_downsample";
  check_labels_dtype(op, "labels", labels);
  check_dim(op, "labels", labels, 3, "(B, H, W)");
  check_output_size(op, out_h, out_w, labels.size(1), labels.size(2));
  check_hist_classes(op, num_classes);
  check_fraction(op, "threshold", threshold);
  if (class_weights.has_value() && class_weights->defined()) {
    check_vector(op, "class_weights", *class_weights, num_classes, "(num_classes,)");
  }
}

inline void check_pseudo_label_downsample_args(const at::Tensor& probs, int64_t out_h, int64_t out_w,
                                               double threshold, double confidence) {
  constexpr const char* op = "pseudo_label_downsample";
  check_probs(op, probs, /*nonempty=*/false);  // an empty batch gives an empty map
  check_output_size(op, out_h, out_w, probs.size(2), probs.size(3));
  check_fraction(op, "threshold", threshold);
  check_fraction(op, "confidence", confidence);
}

inline void check_class_feature_stats_args(const at::Tensor& features, const at::Tensor& labels,
                                           int64_t num_classes) {
  constexpr const char* op = "class_feature_stats";
  check_features_labels(op, features, labels);
  check_class_count(op, "num_classes", num_classes);
}

inline void check_class_feature_stats_backward_args(const at::Tensor& grad_sums, const at::Tensor& features,
                                                    const at::Tensor& labels) {
  constexpr const char* op = "class_feature_stats_backward";
  check_features_labels(op, features, labels);
  check_matrix(op, "grad_sums", grad_sums, -1, features.size(1), "(C, K)");
  check_class_count(op, "grad_sums' rows (C)", grad_sums.size(0));
}

// feature_terms and feature_terms_backward (op names which). Zero prototypes are valid: the
// norm-alignment loss is feature_terms with (0, K) prototypes and all-void labels (ops/_derived.py).
inline void check_feature_terms_args(const char* op, const at::Tensor& features, const at::Tensor& labels,
                                     const at::Tensor& prototypes, const at::Tensor& reference, int64_t norm_mode,
                                     int64_t distance) {
  check_features_labels(op, features, labels);
  check_matrix(op, "prototypes", prototypes, -1, features.size(1), "(C, K)");
  check_class_count(op, "prototypes' rows (C)", prototypes.size(0), /*low=*/0);
  check_scalar_tensor(op, "reference", reference);
  check_norm_mode(op, norm_mode);
  check_distance(op, distance);
}

inline void check_feature_terms_backward_args(const at::Tensor& grad_sums, const at::Tensor& grad_sq_dist_sums,
                                              const at::Tensor& grad_norm_loss_sum, const at::Tensor& grad_norm_sum,
                                              const at::Tensor& features, const at::Tensor& labels,
                                              const at::Tensor& prototypes, const at::Tensor& reference,
                                              int64_t norm_mode, int64_t distance) {
  constexpr const char* op = "feature_terms_backward";
  check_feature_terms_args(op, features, labels, prototypes, reference, norm_mode, distance);
  const int64_t C = prototypes.size(0), K = features.size(1);
  check_matrix(op, "grad_sums", grad_sums, C, K, "(C, K)");
  check_vector(op, "grad_sq_dist_sums", grad_sq_dist_sums, C, "(C,)");
  check_scalar_tensor(op, "grad_norm_loss_sum", grad_norm_loss_sum);
  check_scalar_tensor(op, "grad_norm_sum", grad_norm_sum);
}

inline void check_maxsquare_loss_args(const at::Tensor& probs, double alpha) {
  constexpr const char* op = "maxsquare_loss";
  check_probs(op, probs, /*nonempty=*/true);
  check_fraction(op, "alpha", alpha);
}

inline void check_maxsquare_loss_backward_args(const at::Tensor& grad_loss, const at::Tensor& probs,
                                               const at::Tensor& class_weight) {
  constexpr const char* op = "maxsquare_loss_backward";
  check_scalar_tensor(op, "grad_loss", grad_loss);
  check_probs(op, probs, /*nonempty=*/true);  // as the forward: no loss exists for empty probs
  check_matrix(op, "class_weight", class_weight, probs.size(0), probs.size(1), "(B, C)");
}

}  // namespace lsr_fast
