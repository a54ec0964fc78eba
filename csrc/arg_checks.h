// Checks of the raw ops' non-tensor arguments, shared by the CPU and CUDA kernels, so that
// torch.ops.lsr_fast.* called directly (from C++/LibTorch, or Python without lsr_fast.ops)
// rejects what the Python API rejects, with a RuntimeError naming the op and the argument.
// Host code only: nothing here reads tensor memory, so nothing synchronises with a device.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace lsr_fast {

// Labels' class count for the window (histogram) ops. Label maps have at most 16-bit class ids
// in practice (Cityscapes 19, ADE20K 150, COCO-stuff 182, LVIS 1203); the cap bounds the work of
// the CUDA kernels' histograms, whose per-cell cost grows with the class count.
constexpr int64_t kMaxHistClasses = int64_t(1) << 16;

// A fraction in [0, 1]; NaN fails the comparison and is rejected too.
inline void check_fraction(const char* op, const char* name, double value) {
  TORCH_CHECK(value >= 0.0 && value <= 1.0, op, ": ", name, " must be in [0, 1], got ", value);
}

// Output (out_h, out_w) of a window op over an (H, W) input: at least 1, at most the input.
inline void check_output_size(const char* op, int64_t out_h, int64_t out_w, int64_t H, int64_t W) {
  TORCH_CHECK(out_h >= 1 && out_h <= H, op, ": out_h must be in [1, H = ", H, "], got ", out_h);
  TORCH_CHECK(out_w >= 1 && out_w <= W, op, ": out_w must be in [1, W = ", W, "], got ", out_w);
}

inline void check_hist_classes(const char* op, int64_t num_classes) {
  TORCH_CHECK(num_classes >= 1 && num_classes <= kMaxHistClasses, op, ": num_classes must be in [1, ",
              kMaxHistClasses, "], got ", num_classes);
}

inline void check_norm_mode(const char* op, int64_t norm_mode) {
  TORCH_CHECK(norm_mode == 0 || norm_mode == 1, op, ": norm_mode must be 0 (source) or 1 (target), got ",
              norm_mode);
}

// feature_terms' distance: 0 = squared_l2, 1 = l1 (lsr_fast.ops._compiled.DISTANCES).
inline void check_distance(const char* op, int64_t distance) {
  TORCH_CHECK(distance == 0 || distance == 1, op, ": distance must be 0 (squared_l2) or 1 (l1), got ", distance);
}

}  // namespace lsr_fast
