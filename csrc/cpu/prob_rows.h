// Per-pixel argmax over the classes of (B, C, H, W) probabilities, one image row at a time, shared
// by the CPU kernels of pseudo_label_downsample and maxsquare_loss.
#pragma once

#include <cstdint>

#include "half_convert.h"

namespace lsr_fast {
namespace cpu {

// For the W pixels of one image row (row points at element (b, 0, y, 0); sC and sX are the class
// and column strides in elements): best[x] = max_c p and arg[x] = its class, the first one on
// ties (strict >, as torch.max/argmax). With kSumSq, also sq[x] = sum_c p^2 in class order (as
// p.pow(2).sum(dim=1)) from the same read. cmp_t is float for half/bfloat16/float32 (their values
// convert exactly, so comparisons are the same) and double for float64. buf: W scratch values.
template <bool kSumSq, typename scalar_t, typename cmp_t>
inline void row_argmax_impl(const scalar_t* row, int64_t C, int64_t W, int64_t sC, int64_t sX, cmp_t* best,
                            int32_t* arg, cmp_t* sq, cmp_t* buf) {
  if (sX == 1) {
    // NCHW: stream through the C class rows (converted a row at a time); the inner loop over
    // pixels is branch-free and vectorises.
    const cmp_t* first = load_row<cmp_t>(row, W, buf);
    for (int64_t x = 0; x < W; ++x) {
      best[x] = first[x];
      arg[x] = 0;
      if constexpr (kSumSq) sq[x] = first[x] * first[x];
    }
    for (int64_t c = 1; c < C; ++c) {
      const cmp_t* p = load_row<cmp_t>(row + c * sC, W, buf);
      const int32_t ci = static_cast<int32_t>(c);
      for (int64_t x = 0; x < W; ++x) {
        const cmp_t v = p[x];
        // Mask arithmetic, not ?: on the index, so the compiler vectorises (no branch).
        const cmp_t m = best[x];
        const int32_t gt = -static_cast<int32_t>(v > m);
        best[x] = v > m ? v : m;
        arg[x] = (ci & gt) | (arg[x] & ~gt);
        if constexpr (kSumSq) sq[x] += v * v;
      }
    }
  } else {
    // Any other layout (channels_last: classes contiguous per pixel).
    for (int64_t x = 0; x < W; ++x) {
      const scalar_t* p = row + x * sX;
      cmp_t m = static_cast<cmp_t>(p[0]);
      cmp_t s = m * m;
      int32_t a = 0;
      for (int64_t c = 1; c < C; ++c) {
        const cmp_t v = static_cast<cmp_t>(p[c * sC]);
        if (v > m) {
          m = v;
          a = static_cast<int32_t>(c);
        }
        if constexpr (kSumSq) s += v * v;
      }
      best[x] = m;
      arg[x] = a;
      if constexpr (kSumSq) sq[x] = s;
    }
  }
}

template <typename scalar_t, typename cmp_t>
inline void row_argmax(const scalar_t* row, int64_t C, int64_t W, int64_t sC, int64_t sX, cmp_t* best,
                       int32_t* arg, cmp_t* buf) {
  row_argmax_impl<false>(row, C, W, sC, sX, best, arg, static_cast<cmp_t*>(nullptr), buf);
}

template <typename scalar_t, typename cmp_t>
inline void row_argmax_sumsq(const scalar_t* row, int64_t C, int64_t W, int64_t sC, int64_t sX, cmp_t* best,
                             int32_t* arg, cmp_t* sq, cmp_t* buf) {
  row_argmax_impl<true>(row, C, W, sC, sX, best, arg, sq, buf);
}

}  // namespace cpu
}  // namespace lsr_fast
