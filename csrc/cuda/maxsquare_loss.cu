// Image-wise weighted MaxSquare on CUDA (lsr_fast.reference.maxsquare_loss).
//
// The weights depend on the per-image argmax histogram, which is only complete after the whole
// image is seen. Since the loss is linear in the weights,
//   L = -1/(B*C) * sum_b sum_c w[b,c] * S[b,c],  S[b,c] = sum over pixels x with argmax c of sum_c' p^2,
// one pass over the probabilities collects the histogram N[b,c] (integer atomics) and S[b,c];
// a one-block kernel then computes the weights and the loss. Nothing leaves the device.
//
// Forward pass: grid (blocks per image, images); a warp takes 32 consecutive pixels, each
// thread computes its pixel's argmax (first on ties) and sum of squares, and the warp adds them
// per class with a deterministic segmented reduction into a warp-private accumulator (shared
// memory for C <= 1024 float / 512 double, else global scratch). Block results go to S with
// float atomics (default), or to per-block partials that the weight kernel sums in a fixed order
// (deterministic mode: costs B * blocks_per_image * C * 4 bytes, a few KB).
// Backward: one thread per pixel re-derives the argmax (values kept in registers when C <= 32)
// and writes -2 p w[b, argmax] grad / (B*C) for every class.
#include "cuda_utils.cuh"

#include <cmath>

namespace lsr_fast {
namespace cuda {
namespace {

constexpr int kCacheClasses = 32;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    maxsquare_forward_kernel(const scalar_t* __restrict__ probs, int64_t B, int C, int64_t HW, int64_t sB, int64_t sC,
                             int64_t sN, int* __restrict__ hist, at::opmath_type<scalar_t>* __restrict__ S,
                             at::opmath_type<scalar_t>* __restrict__ partial,
                             at::opmath_type<scalar_t>* __restrict__ acc_global) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* scratch = reinterpret_cast<acc_t*>(smem);  // kWarps x 32
  const int64_t block_id = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  acc_t* acc = acc_global != nullptr ? acc_global + block_id * kWarps * C : scratch + kWarps * 32;  // kWarps x C
  const int t = threadIdx.x;
  const int lane = lane_id();
  const int warp = warp_id();
  acc_t* my_acc = acc + static_cast<int64_t>(warp) * C;
  acc_t* my_scratch = scratch + warp * 32;

  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    for (int64_t e = t; e < static_cast<int64_t>(kWarps) * C; e += kThreads) acc[e] = acc_t(0);
    __syncthreads();
    const scalar_t* pb = probs + b * sB;
    for (int64_t base = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * 32; base < HW;
         base += static_cast<int64_t>(gridDim.x) * kThreads) {
      const int64_t n = base + lane;
      int key = -1;
      acc_t sq = acc_t(0);
      if (n < HW) {
        const scalar_t* p = pb + n * sN;
        acc_t best = -std::numeric_limits<acc_t>::infinity();
        int arg = 0;
        int c = 0;
        for (; c + 8 <= C; c += 8) {
          acc_t v[8];
#pragma unroll
          for (int u = 0; u < 8; ++u) v[u] = static_cast<acc_t>(p[(c + u) * sC]);
#pragma unroll
          for (int u = 0; u < 8; ++u) {
            sq += v[u] * v[u];
            if (beats(v[u], best)) {
              best = v[u];
              arg = c + u;
            }
          }
        }
        for (; c < C; ++c) {
          const acc_t v = static_cast<acc_t>(p[c * sC]);
          sq += v * v;
          if (beats(v, best)) {
            best = v;
            arg = c;
          }
        }
        key = arg;
      }
      warp_segmented_add(my_acc, my_scratch, key, sq);
      warp_count(hist + b * C, key);
    }
    __syncthreads();
    for (int c = t; c < C; c += kThreads) {
      acc_t s = acc_t(0);
      for (int w = 0; w < kWarps; ++w) s += acc[static_cast<int64_t>(w) * C + c];
      if (partial != nullptr) {
        partial[(b * gridDim.x + blockIdx.x) * C + c] = s;
      } else if (s != acc_t(0)) {
        atomicAdd(S + b * C + c, s);
      }
    }
    __syncthreads();  // acc is cleared for the next image
  }
}

// w = 1 / max(N^alpha * HW^(1-alpha), 1) in the accumulation type, like the reference's
// float32 tensor ops (hist.pow(alpha) special-cases 0, 0.5, 1 and 2).
template <typename acc_t>
__device__ __forceinline__ acc_t pow_alpha(acc_t n, acc_t alpha) {
  if (alpha == acc_t(0)) return acc_t(1);
  if (alpha == acc_t(1)) return n;
  if (alpha == acc_t(2)) return n * n;
  if constexpr (std::is_same_v<acc_t, double>) {
    return alpha == 0.5 ? ::sqrt(n) : ::pow(n, alpha);
  } else {
    return alpha == 0.5f ? ::sqrtf(n) : ::powf(n, alpha);
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    maxsquare_weights_kernel(const int* __restrict__ hist, const acc_t* __restrict__ S,
                             const acc_t* __restrict__ partial, int64_t blocks_per_image, int64_t B, int C,
                             acc_t alpha, acc_t pixels_pow, acc_t* __restrict__ class_weight,
                             acc_t* __restrict__ loss) {
  __shared__ acc_t red[kWarps];
  acc_t local = acc_t(0);
  for (int64_t e = threadIdx.x; e < B * C; e += kThreads) {
    acc_t s;
    if (partial != nullptr) {
      const int64_t b = e / C;
      const int c = static_cast<int>(e % C);
      s = acc_t(0);
      for (int64_t x = 0; x < blocks_per_image; ++x) s += partial[(b * blocks_per_image + x) * C + c];
    } else {
      s = S[e];
    }
    const acc_t scaled = pow_alpha(static_cast<acc_t>(hist[e]), alpha) * pixels_pow;
    const acc_t w = acc_t(1) / (scaled > acc_t(1) ? scaled : acc_t(1));
    class_weight[e] = w;
    local += w * s;
  }
  const acc_t total = block_sum(local, red);
  if (threadIdx.x == 0) *loss = -total / static_cast<acc_t>(B * C);
}

template <typename scalar_t, bool kCache>
__global__ void __launch_bounds__(kThreads)
    maxsquare_backward_kernel(const scalar_t* __restrict__ probs, scalar_t* __restrict__ out, int64_t B, int C,
                              int64_t HW, int64_t sB, int64_t sC, int64_t sN,
                              const at::opmath_type<scalar_t>* __restrict__ class_weight,
                              const at::opmath_type<scalar_t>* __restrict__ grad_loss) {
  using acc_t = at::opmath_type<scalar_t>;
  // d/dp of -(1/(B*C)) * w * sum_c p^2 = -2 p w / (B*C).
  const acc_t scale = acc_t(-2) * (*grad_loss) / static_cast<acc_t>(B * C);
  const int64_t total = B * HW;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t b = idx / HW;
    const int64_t off = b * sB + (idx % HW) * sN;
    const scalar_t* p = probs + off;
    scalar_t* o = out + off;
    acc_t best = -std::numeric_limits<acc_t>::infinity();
    int arg = 0;
    if constexpr (kCache) {
      acc_t v[kCacheClasses];
#pragma unroll
      for (int c = 0; c < kCacheClasses; ++c) {
        if (c < C) {
          v[c] = static_cast<acc_t>(p[c * sC]);
          if (beats(v[c], best)) {
            best = v[c];
            arg = c;
          }
        }
      }
      const acc_t coef = scale * class_weight[b * C + arg];
#pragma unroll
      for (int c = 0; c < kCacheClasses; ++c) {
        if (c < C) o[c * sC] = static_cast<scalar_t>(coef * v[c]);
      }
    } else {
      for (int c = 0; c < C; ++c) {
        const acc_t v = static_cast<acc_t>(p[c * sC]);
        if (beats(v, best)) {
          best = v;
          arg = c;
        }
      }
      const acc_t coef = scale * class_weight[b * C + arg];
      // Second read of the pixel's C values: an L1/L2 hit, they were just read.
      for (int c = 0; c < C; ++c) o[c * sC] = static_cast<scalar_t>(coef * static_cast<acc_t>(p[c * sC]));
    }
  }
}

// Limits of the CUDA kernels only (32-bit pixel offsets within an image), checked after the
// shared argument checks; the CPU kernels have none.
void check_cuda_pixels(const char* op, const at::Tensor& probs) {
  TORCH_CHECK(probs.size(2) * probs.size(3) < (int64_t(1) << 31), op,
              ": probs must have at most 2^31 - 1 pixels per image on CUDA, got ", probs.size(2), " x ",
              probs.size(3));
}

std::tuple<at::Tensor, at::Tensor> maxsquare_loss_cuda(const at::Tensor& probs, double alpha) {
  constexpr const char* op = "maxsquare_loss";
  check_cuda(probs, op, "probs");
  // Before any arithmetic on the sizes: B = 0 or C = 0 (empty probs) would divide by zero below.
  check_maxsquare_loss_args(probs, alpha);
  check_cuda_pixels(op, probs);
  c10::cuda::CUDAGuard guard(probs.device());
  const int64_t B = probs.size(0), C = probs.size(1), HW = probs.size(2) * probs.size(3);
  const auto acc = accumulate_type(probs.scalar_type());
  const auto acc_options = probs.options().dtype(acc);
  // Both written in full by maxsquare_weights_kernel (no deterministic NaN fill).
  at::Tensor loss = empty_written({}, acc_options);
  at::Tensor class_weight = empty_written({B, C}, acc_options);
  at::Tensor hist = at::zeros({B * C}, probs.options().dtype(at::kInt));
  const bool det = deterministic();
  const int sms = sm_count(probs);
  // Per-image pixel index with one stride (no batch merge: the histograms are per image).
  const auto [p, layout] = flat_features(probs, /*merge_batch=*/false);
  const int64_t gx = std::clamp<int64_t>(ceil_div(HW, kThreads), 1, std::max<int64_t>(1, ceil_div(int64_t(sms) * 4, B)));
  const int64_t gy = std::clamp<int64_t>(B, 1, 65535);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "maxsquare_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor S, partial, acc_scratch;
    if (det) {
      partial = empty_written({B * gx * C}, acc_options);  // every (b, block, c) written, or zeroed below
    } else {
      S = at::zeros({B * C}, acc_options);
    }
    if (B * C > 0 && HW > 0) {
      const bool acc_in_smem = int64_t(kWarps) * C * int64_t(sizeof(acc_t)) <= 32 * 1024;
      if (!acc_in_smem) acc_scratch = empty_written({gx * gy * kWarps * C}, acc_options);  // zeroed per image
      const size_t smem = sizeof(acc_t) * static_cast<size_t>(kWarps * 32 + (acc_in_smem ? kWarps * C : 0));
      maxsquare_forward_kernel<scalar_t><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, smem,
                                           stream()>>>(
          p.const_data_ptr<scalar_t>(), B, static_cast<int>(C), HW, layout.sB, layout.sK, layout.sN,
          hist.data_ptr<int>(), det ? nullptr : S.data_ptr<acc_t>(), det ? partial.data_ptr<acc_t>() : nullptr,
          acc_in_smem ? nullptr : acc_scratch.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (det) {
      partial.zero_();
    }
    // N^(1-alpha) in double, then rounded to the accumulation type like a Python scalar.
    const acc_t pixels_pow = static_cast<acc_t>(std::pow(static_cast<double>(HW), 1.0 - alpha));
    maxsquare_weights_kernel<acc_t><<<1, kThreads, 0, stream()>>>(
        hist.const_data_ptr<int>(), det ? nullptr : S.const_data_ptr<acc_t>(),
        det ? partial.const_data_ptr<acc_t>() : nullptr, gx, B, static_cast<int>(C), static_cast<acc_t>(alpha),
        pixels_pow, class_weight.data_ptr<acc_t>(), loss.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, class_weight};
}

at::Tensor maxsquare_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& probs,
                                        const at::Tensor& class_weight) {
  constexpr const char* op = "maxsquare_loss_backward";
  check_cuda(probs, op, "probs");
  check_same_device(op, probs, grad_loss, "probs", "grad_loss");
  check_same_device(op, probs, class_weight, "probs", "class_weight");
  check_maxsquare_loss_backward_args(grad_loss, probs, class_weight);
  check_cuda_pixels(op, probs);
  const int64_t B = probs.size(0), C = probs.size(1), HW = probs.size(2) * probs.size(3);
  c10::cuda::CUDAGuard guard(probs.device());
  BackwardTensors bt = backward_tensors(probs, /*merge_batch=*/false);
  const auto acc = accumulate_type(probs.scalar_type());
  const at::Tensor w = class_weight.to(acc).contiguous();
  const at::Tensor g = grad_loss.to(acc).reshape({});
  const int sms = sm_count(probs);
  const FeatureLayout& L = bt.layout;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(ceil_div(B * HW, kThreads), int64_t(sms) * 16));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "maxsquare_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (C <= kCacheClasses) {
      maxsquare_backward_kernel<scalar_t, true><<<grid, kThreads, 0, stream()>>>(
          bt.f.const_data_ptr<scalar_t>(), bt.work.data_ptr<scalar_t>(), B, static_cast<int>(C), HW, L.sB, L.sK, L.sN,
          w.const_data_ptr<acc_t>(), g.const_data_ptr<acc_t>());
    } else {
      maxsquare_backward_kernel<scalar_t, false><<<grid, kThreads, 0, stream()>>>(
          bt.f.const_data_ptr<scalar_t>(), bt.work.data_ptr<scalar_t>(), B, static_cast<int>(C), HW, L.sB, L.sK, L.sN,
          w.const_data_ptr<acc_t>(), g.const_data_ptr<acc_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finish_backward(bt);
  return bt.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lsr_fast, CUDA, m) {
  m.impl("maxsquare_loss", &maxsquare_loss_cuda);
  m.impl("maxsquare_loss_backward", &maxsquare_loss_backward_cuda);
}

}  // namespace cuda
}  // namespace lsr_fast
