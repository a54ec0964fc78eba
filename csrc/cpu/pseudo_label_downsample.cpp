// CPU kernel of lsr_fast::pseudo_label_downsample: fused per-pixel argmax + window histogram +
// window mean confidence, in one pass over the probabilities.
//
// Parallel over (image, output row). For each output row the task computes the argmax and max of
// the rows of its window band into a small per-thread buffer (no full-resolution argmax map),
// reusing the row it shares with the previous window when sizes do not divide. The confidence
// test is the reference's: the window sum of the float32 max probabilities, added in float64
// (exact for probabilities, so the order does not matter), against confidence * pixel count.
#include <torch/library.h>

#include <cstring>

#include "cpu_utils.h"
#include "prob_rows.h"

namespace lsr_fast {
namespace cpu {
namespace {

template <typename scalar_t>
void pseudo_label_kernel(const scalar_t* probs, int64_t B, int64_t C, int64_t H, int64_t W, int64_t sB,
                         int64_t sC, int64_t sY, int64_t sX, int64_t h, int64_t w, float threshold,
                         double confidence, int64_t ignore_index, int64_t* out) {
  using cmp_t = acc_t<scalar_t>;
  std::vector<int64_t> x0(w), x1(w);
  for (int64_t j = 0; j < w; ++j) {
    x0[j] = window_start(j, W, w);
    x1[j] = window_end(j, W, w);
  }
  int64_t band = 1;
  for (int64_t i = 0; i < h; ++i) band = std::max(band, window_end(i, H, h) - window_start(i, H, h));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, band * W * C));
  at::parallel_for(0, B * h, grain, [&](int64_t begin, int64_t end) {
    std::vector<cmp_t> best(W), buf(W);
    std::vector<float> conf(band * W);    // per-pixel max probability of the band, float32
    std::vector<int32_t> pred(band * W);  // per-pixel argmax of the band
    std::vector<int32_t> hist(C);
    int64_t prev_b = -1, prev_y0 = 0, prev_y1 = 0;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / h, i = r % h;
      const int64_t y0 = window_start(i, H, h), y1 = window_end(i, H, h);
      int64_t first_new = y0;
      if (b == prev_b && y0 >= prev_y0) {
        // Rows shared with the previous window (its last rows) move to the front of the band.
        for (int64_t y = y0; y < std::min(y1, prev_y1); ++y) {
          if (y - prev_y0 != y - y0) {
            std::memmove(&conf[(y - y0) * W], &conf[(y - prev_y0) * W], sizeof(float) * W);
            std::memmove(&pred[(y - y0) * W], &pred[(y - prev_y0) * W], sizeof(int32_t) * W);
          }
          first_new = y + 1;
        }
      }
      for (int64_t y = first_new; y < y1; ++y) {
        int32_t* p = &pred[(y - y0) * W];
        float* m = &conf[(y - y0) * W];
        row_argmax(probs + b * sB + y * sY, C, W, sC, sX, best.data(), p, buf.data());
        for (int64_t x = 0; x < W; ++x) m[x] = static_cast<float>(best[x]);
      }
      prev_b = b;
      prev_y0 = y0;
      prev_y1 = y1;
      const int64_t kh = y1 - y0;
      for (int64_t j = 0; j < w; ++j) {
        std::fill(hist.begin(), hist.end(), 0);
        double sum = 0.0;
        for (int64_t y = 0; y < kh; ++y) {
          const int32_t* p = &pred[y * W];
          const float* m = &conf[y * W];
          for (int64_t x = x0[j]; x < x1[j]; ++x) {
            // A prediction equal to ignore_index (possible when it lies in [0, C)) does not vote,
            // as in hist_downsample of the argmax.
            if (p[x] != ignore_index) ++hist[p[x]];
            sum += m[x];
          }
        }
        const int64_t label = peak_ratio_decision(hist.data(), C, nullptr, threshold, ignore_index);
        // The same float64 expression in every backend (reference.pseudo_label_downsample).
        const double count = static_cast<double>(kh * (x1[j] - x0[j]));
        out[r * w + j] = sum > confidence * count ? label : ignore_index;
      }
    }
  });
}

at::Tensor pseudo_label_downsample_cpu(const at::Tensor& probs, int64_t out_h, int64_t out_w, double threshold,
                                       double confidence, int64_t ignore_index) {
  constexpr const char* op = "pseudo_label_downsample";
  check_cpu(probs, op, "probs");
  check_pseudo_label_downsample_args(probs, out_h, out_w, threshold, confidence);
  const int64_t B = probs.size(0), C = probs.size(1), H = probs.size(2), W = probs.size(3);
  at::Tensor out = at::empty({B, out_h, out_w}, probs.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  // Any strides are read in place: NCHW rows take the vectorised path, others a per-pixel loop.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "lsr_fast_pseudo_label_cpu", [&] {
    pseudo_label_kernel<scalar_t>(probs.const_data_ptr<scalar_t>(), B, C, H, W, probs.stride(0), probs.stride(1),
                                  probs.stride(2), probs.stride(3), out_h, out_w, static_cast<float>(threshold),
                                  confidence, ignore_index, out.data_ptr<int64_t>());
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace lsr_fast

TORCH_LIBRARY_IMPL(lsr_fast, CPU, m) {
  m.impl("pseudo_label_downsample", &lsr_fast::cpu::pseudo_label_downsample_cpu);
}
