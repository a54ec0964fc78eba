// Helpers shared by the CPU and CUDA kernels of lsr_fast.
#pragma once

#include <c10/macros/Macros.h>
#include <cstdint>

namespace lsr_fast {

// Adaptive-pooling window of output cell i of out_size over in_size: [start, end) with
// start = floor(i * in / out) and end = ceil((i + 1) * in / out). Integer math only, so every
// backend (and lsr_fast.reference.window_bounds) gets the same windows.
C10_HOST_DEVICE inline int64_t window_start(int64_t i, int64_t in_size, int64_t out_size) {
  return (i * in_size) / out_size;
}

C10_HOST_DEVICE inline int64_t window_end(int64_t i, int64_t in_size, int64_t out_size) {
  return ((i + 1) * in_size + out_size - 1) / out_size;
}

// Norm-alignment modes of feature_terms (lsr_fast.ops._compiled.NORM_MODES).
enum NormMode : int64_t { kNormSource = 0, kNormTarget = 1 };

}  // namespace lsr_fast
