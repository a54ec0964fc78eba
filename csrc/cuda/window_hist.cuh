// The window-histogram kernel behind hist_downsample and pseudo_label_downsample.
//
// Parallelisation: a block owns a "tile": one output row i of one image and a run of
// `cells_per_tile` consecutive output cells of that row. It walks the tile's input pixels
// (the union of the cells' windows, rows [y0, y1) x columns [x0, x1)) in row-major order, so
// consecutive threads read consecutive columns (coalesced). Each pixel votes in the one or two
// cells whose window holds its column (adaptive windows overlap by at most one pixel when the
// sizes do not divide) through warp-aggregated shared-memory atomics on a (cell, class)
// histogram. Then one warp per cell finds the top class and runner-up and writes the label.
// Pixels on a window boundary between two tiles are read by both tiles (<= 1 row/column).
//
// pseudo_label_downsample computes the per-pixel argmax and max probability on the fly (no
// full-resolution argmax tensor). The confidence test is the reference's: the window sum of the
// float32 maxima, added in float64 (exact for probabilities, whatever the order), against
// confidence * pixel count in float64. The maxima of a chunk of kConfChunk pixels are parked in
// shared memory and one thread per cell adds its window's values.
//
// Histogram storage: shared memory while cells_per_tile * C ints fit (C <= ~9,700 for
// pseudo_label_downsample, ~12,000 for hist_downsample at one cell per tile); beyond that each
// block gets a private slice of a global-memory scratch buffer (slower: the per-cell O(C) clear
// and scan then go through L2). num_classes is limited to 2^24 (kMaxClasses).
#pragma once

#include "cuda_utils.cuh"

namespace lsr_fast {
namespace cuda {

constexpr int kConfChunk = 2048;

struct WindowGeometry {
  int64_t B;
  int H, W, h, w;
  int cells_per_tile;
  int chunks_per_row;
  int64_t num_tiles;
  bool mul32;  // W * w < 2^31: column -> window index math in 32 bits
};

template <typename scalar_t, bool kProbs>
__global__ void __launch_bounds__(kThreads)
    window_label_kernel(const void* __restrict__ src, int label_kind, int64_t sB, int64_t sC, int64_t sH, int64_t sW,
                        int num_classes, WindowGeometry g, const float* __restrict__ weights, float threshold,
                        double confidence, int64_t ignore_index, int* __restrict__ global_hist,
                        int64_t* __restrict__ out) {
  using opmath_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int C = num_classes;
  const int cpt = g.cells_per_tile;
  // cpt <= kThreads doubles of window sums first (8-byte aligned), then the chunk's maxima, then
  // the histogram.
  unsigned char* cursor = smem;
  double* cell_sum = reinterpret_cast<double*>(cursor);  // kProbs
  float* conf = reinterpret_cast<float*>(cursor + (kProbs ? kThreads * sizeof(double) : 0));
  cursor += kProbs ? kThreads * sizeof(double) + kConfChunk * sizeof(float) : 0;
  int* hist;
  if (global_hist != nullptr) {
    hist = global_hist + static_cast<int64_t>(blockIdx.x) * cpt * C;
  } else {
    hist = reinterpret_cast<int*>(cursor);
    cursor += static_cast<size_t>(cpt) * C * sizeof(int);
  }

  const int t = threadIdx.x;
  const int lane = lane_id();
  const int warp = warp_id();
  const int64_t tiles_per_image = static_cast<int64_t>(g.h) * g.chunks_per_row;

  for (int64_t tile = blockIdx.x; tile < g.num_tiles; tile += gridDim.x) {
    const int64_t b = tile / tiles_per_image;
    const int rem = static_cast<int>(tile % tiles_per_image);
    const int i = rem / g.chunks_per_row;
    const int j0 = (rem % g.chunks_per_row) * cpt;
    const int j1 = min(g.w, j0 + cpt);
    const int ncell = j1 - j0;
    const int y0 = static_cast<int>(window_start(i, g.H, g.h));
    const int y1 = static_cast<int>(window_end(i, g.H, g.h));
    const int x0 = static_cast<int>(window_start(j0, g.W, g.w));
    const int x1 = static_cast<int>(window_end(j1 - 1, g.W, g.w));
    const int tw = x1 - x0;
    const int64_t npx = static_cast<int64_t>(y1 - y0) * tw;

    for (int64_t k = t; k < static_cast<int64_t>(ncell) * C; k += kThreads) hist[k] = 0;
    // Phase-2 state of cell j0 + t: its columns (tile-local) and running sum.
    double run = 0.0;
    int cx0 = 0, cx1 = 0;
    if (kProbs && t < ncell) {
      cx0 = static_cast<int>(window_start(j0 + t, g.W, g.w)) - x0;
      cx1 = static_cast<int>(window_end(j0 + t, g.W, g.w)) - x0;
    }
    __syncthreads();

    const int64_t chunk = kProbs ? kConfChunk : npx;
    for (int64_t base = 0; base < npx; base += chunk) {
      const int cnt = static_cast<int>(min(chunk, npx - base));
      // Phase 1: classify the chunk's pixels and vote. The loop bound is warp-uniform so the
      // warp-level match/ballot below always see all 32 lanes.
      for (int e0 = warp * 32; e0 < cnt; e0 += kThreads) {
        const int e = e0 + lane;
        int key1 = -1, key2 = -1;
        if (e < cnt) {
          const int L = static_cast<int>(base + e);  // npx <= H * W < 2^31
          const int y = y0 + L / tw;
          const int x = x0 + L % tw;
          int cls;
          if constexpr (kProbs) {
            const scalar_t* p = static_cast<const scalar_t*>(src) + b * sB + y * sH + x * sW;
            opmath_t best = -std::numeric_limits<opmath_t>::infinity();
            int arg = 0;
            int c = 0;
            // Batches of 8 independent loads keep several requests in flight per thread.
            for (; c + 8 <= C; c += 8) {
              opmath_t v[8];
#pragma unroll
              for (int u = 0; u < 8; ++u) v[u] = static_cast<opmath_t>(p[(c + u) * sC]);
#pragma unroll
              for (int u = 0; u < 8; ++u) {
                if (beats(v[u], best)) {
                  best = v[u];
                  arg = c + u;
                }
              }
            }
            for (; c < C; ++c) {
              const opmath_t v = static_cast<opmath_t>(p[c * sC]);
              if (beats(v, best)) {
                best = v;
                arg = c;
              }
            }
            // The reference runs hist_downsample on the predictions, where a value equal to
            // ignore_index does not vote: with ignore_index in [0, C) that class never counts.
            cls = arg == ignore_index ? -1 : arg;
            conf[e] = static_cast<float>(best);
          } else {
            cls = class_of(load_label(src, label_kind, b * sB + y * sH + x * sW), ignore_index, C);
          }
          if (cls >= 0) {
            // x lies in window jA = floor(x * w / W) and, when the windows overlap there, in jA + 1.
            const int jA = g.mul32 ? (x * g.w) / g.W : static_cast<int>((static_cast<int64_t>(x) * g.w) / g.W);
            if (jA >= j0 && jA < j1) key1 = (jA - j0) * C + cls;
            const int jB = jA + 1;
            if (jB >= j0 && jB < j1) {
              const int startB = g.mul32 ? (jB * g.W) / g.w : static_cast<int>(window_start(jB, g.W, g.w));
              if (startB <= x) key2 = (jB - j0) * C + cls;
            }
          }
        }
        warp_count(hist, key1);
        if (__any_sync(kFullMask, key2 >= 0)) warp_count(hist, key2);
      }
      if constexpr (kProbs) {
        __syncthreads();
        // Phase 2: thread t adds the maxima of cell j0 + t found in this chunk, row by row.
        if (t < ncell) {
          const int64_t end = base + cnt;
          for (int64_t r = base / tw; r * tw < end; ++r) {
            const int64_t row0 = r * tw;
            const int lo = static_cast<int>(max(static_cast<int64_t>(cx0), base - row0));
            const int hi = static_cast<int>(min(static_cast<int64_t>(cx1), end - row0));
            for (int x = lo; x < hi; ++x) run += conf[row0 + x - base];
          }
        }
        __syncthreads();  // conf is overwritten by the next chunk
      }
    }
    if constexpr (kProbs) {
      if (t < ncell) cell_sum[t] = run;
    }
    __syncthreads();

    // Decision: one warp per cell.
    for (int cl = warp; cl < ncell; cl += kWarps) {
      const Top2 top = warp_top2(hist + static_cast<int64_t>(cl) * C, C, weights);
      if (lane == 0) {
        int64_t label = keep_peak(top, threshold) ? static_cast<int64_t>(top.c1) : ignore_index;
        if constexpr (kProbs) {
          const int kH = y1 - y0;
          const int kW = static_cast<int>(window_end(j0 + cl, g.W, g.w) - window_start(j0 + cl, g.W, g.w));
          // The same float64 expression in every backend (reference.pseudo_label_downsample).
          const double count = static_cast<double>(kH * kW);
          if (!(cell_sum[cl] > confidence * count)) label = ignore_index;
        }
        out[(b * g.h + i) * g.w + j0 + cl] = label;
      }
    }
    __syncthreads();  // hist and cell_sum are reused by the next tile
  }
}

struct WindowPlan {
  WindowGeometry g;
  size_t smem;
  bool global_hist;
  int64_t grid;
};

// A limit of the CUDA kernels only (32-bit pixel offsets within an image), checked after the
// shared arguments checks; the CPU kernels have none.
inline void check_window_pixels(const char* op, const char* name, int64_t H, int64_t W) {
  TORCH_CHECK(H * W < (int64_t(1) << 31), op, ": ", name, " must have at most 2^31 - 1 pixels per image on CUDA, got ",
              H, " x ", W);
}

inline WindowPlan plan_windows(int64_t B, int64_t H, int64_t W, int64_t h, int64_t w, int64_t C, bool probs,
                               int sms) {
  // The entry points' shared checks bound C to [1, kMaxClasses]; this guards the plan's own use.
  TORCH_CHECK(C >= 1 && C <= kMaxClasses, "lsr_fast: internal error: num_classes must be in [1, ", kMaxClasses,
              "] for the CUDA kernels, got ", C);
  // About 512 input columns per tile, but enough tiles to fill the GPU.
  const int64_t win_w = ceil_div(W, w) + 1;
  int64_t cpt = std::clamp<int64_t>(ceil_div(512, win_w), 1, std::min<int64_t>(w, kThreads));
  while (cpt > 8 && B * h * ceil_div(w, cpt) < 2 * sms) cpt = ceil_div(cpt, 2);
  const int64_t extra = probs ? int64_t(kThreads * sizeof(double) + kConfChunk * sizeof(float)) : 0;
  const int64_t fit = (kSmemBudget - extra) / (C * int64_t(sizeof(int)));
  WindowPlan plan{};
  plan.global_hist = fit < 1;
  if (plan.global_hist) {
    cpt = 1;
  } else {
    cpt = std::min(cpt, fit);
  }
  const int64_t chunks = ceil_div(w, cpt);
  plan.g = WindowGeometry{B, int(H), int(W), int(h), int(w), int(cpt), int(chunks), B * h * chunks, W * w < (int64_t(1) << 31)};
  plan.smem = static_cast<size_t>(extra + (plan.global_hist ? 0 : cpt * C * int64_t(sizeof(int))));
  if (plan.global_hist) {
    plan.grid = std::min<int64_t>({plan.g.num_tiles, int64_t(sms) * 4,
                                   std::max<int64_t>(1, kScratchBytes / (C * int64_t(sizeof(int))))});
  } else {
    plan.grid = std::min<int64_t>(plan.g.num_tiles, int64_t(sms) * 32);
  }
  return plan;
}

template <typename scalar_t, bool kProbs>
inline void launch_window_kernel(const WindowPlan& plan, const at::Tensor& like, const void* src, int label_kind,
                                 int64_t sB, int64_t sC, int64_t sH, int64_t sW, int64_t C, const float* weights,
                                 double threshold, double confidence, int64_t ignore_index, at::Tensor& out) {
  at::Tensor scratch;
  int* global_hist = nullptr;
  if (plan.global_hist) {
    // Each block clears its cells' bins before every tile: no deterministic fill needed.
    scratch = empty_written({plan.grid * plan.g.cells_per_tile * C}, like.options().dtype(at::kInt));
    global_hist = scratch.data_ptr<int>();
  }
  window_label_kernel<scalar_t, kProbs><<<static_cast<unsigned>(plan.grid), kThreads, plan.smem, stream()>>>(
      src, label_kind, sB, sC, sH, sW, static_cast<int>(C), plan.g, weights, static_cast<float>(threshold),
      confidence, ignore_index, global_hist, out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace lsr_fast
