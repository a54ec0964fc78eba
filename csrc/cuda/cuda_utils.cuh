// Helpers shared by the CUDA kernels of lsr_fast (csrc/cuda/*.cu). The entry points check their
// arguments with arg_checks.h (shared with the CPU kernels) after the device checks below.
//
// Only c10/cuda and ATen core headers are included (not ATen/cuda/CUDAContext.h, which pulls in
// the cuBLAS/cuSPARSE/cuSOLVER headers that a bare CUDA toolkit lacks).
#pragma once

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>

#include "arg_checks.h"
#include "common.h"

namespace lsr_fast {
namespace cuda {

// Every kernel runs 256 threads = 8 warps per block.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Dynamic shared memory a block may use without the opt-in attribute (see smem_budget).
constexpr int64_t kSmemBudget = 48 * 1024;
// Upper bound of the global-memory scratch of the large-C fallbacks.
constexpr int64_t kScratchBytes = int64_t(256) << 20;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int sm_count(const at::Tensor& t) {
  int count = 0;
  // A cached device attribute: no synchronisation.
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.get_device()));
  return std::max(count, 1);
}

inline bool deterministic() { return at::globalContext().deterministicAlgorithms(); }

// ---- shared memory beyond 48 KB -------------------------------------------------------------
// The dynamic shared memory per block a plan may use on `device`: the opt-in maximum (163 KB on
// sm_80, 227 KB on sm_90), but at most half of an SM's shared memory less the per-block
// reservation (81 KB on sm_80, 113 KB on sm_90), so that two blocks stay resident per SM and one
// block's loads overlap the other's shared-memory phase; never below the default 48 KB.
inline int64_t smem_budget(int device) {
  int optin = 0, per_sm = 0, reserved = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device));
  return std::max<int64_t>(kSmemBudget, std::min<int64_t>(optin, per_sm / 2 - reserved));
}

// Lets one kernel launch with up to smem_budget() bytes of dynamic shared memory on the current
// device: beyond 48 KB a launch fails unless cudaFuncAttributeMaxDynamicSharedMemorySize allows
// it, and the occupancy calculator counts 0 blocks. The attribute belongs to the kernel on one
// device, so it is set once per device (std::call_once: any thread may launch; a failed call is
// retried). Keep one instance per kernel instantiation: a static local of the function template
// that plans its launches. Kernels using this must have no static shared memory.
class SmemOptIn {
 public:
  template <typename Kernel>
  int64_t enable(Kernel* kernel) {
    const int device = c10::cuda::current_device();
    TORCH_CHECK(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "lsr_fast: CUDA device index ", device,
                " out of range");
    const int64_t budget = smem_budget(device);
    std::call_once(once_[device], [&] {
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(budget)));
    });
    return budget;
  }

 private:
  std::once_flag once_[C10_COMPILE_TIME_MAX_GPUS];
};

// ---- fresh buffers that a kernel writes in full ----------------------------------------------
// at::empty / empty_like fill new memory with NaN (integers: their maximum) while
// torch.use_deterministic_algorithms(True) and torch.utils.deterministic.fill_uninitialized_memory
// (default True) are on: a debugging aid that costs one more write of the buffer (a 120 MB
// gradient at the paper's shape). Buffers whose every element a kernel writes before anything
// reads it are allocated with at::detail::empty_cuda, the allocation behind at::empty without
// the fill. Each use says why every element is written; anything else keeps at::empty/zeros.
inline at::Tensor empty_written(at::IntArrayRef size, const at::TensorOptions& options) {
  return at::Tensor(at::detail::empty_cuda(size, options));
}

// As at::empty_like(t) (preserve_format), without the fill. The strides are empty_like's own,
// taken from a meta tensor (no memory), so a gradient has the strides the fake kernels and the
// CPU backend promise (torch.empty_like there), non-dense inputs included.
inline at::Tensor empty_like_written(const at::Tensor& t) {
  if (t.is_non_overlapping_and_dense()) {
    return at::Tensor(at::detail::empty_strided_cuda(t.sizes(), t.strides(), t.options()));
  }
  const at::Tensor shape = at::empty_like(t, t.options().device(at::kMeta));
  return at::Tensor(at::detail::empty_strided_cuda(t.sizes(), shape.strides(), t.options()));
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor for the CUDA kernel, got one on ", t.device());
}

// b on a's device (a: the op's first tensor, already checked by check_cuda).
inline void check_same_device(const char* op, const at::Tensor& a, const at::Tensor& b, const char* name_a,
                              const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name_b, " is on ", b.device(), " but ", name_a, " is on ",
              a.device());
}

inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- labels -------------------------------------------------------------------------------
// Labels of any integer dtype are read through one kernel instantiation: the element type is a
// run-time switch (uniform across the grid, so it costs no divergence). The entry points admit
// only these five dtypes (arg_checks.h's check_labels_dtype); any other is converted to int64.
enum LabelKind : int { kU8 = 0, kI8 = 1, kI16 = 2, kI32 = 3, kI64 = 4 };

struct Labels {
  at::Tensor tensor;  // contiguous
  int kind;
};

inline Labels prepare_labels(const at::Tensor& labels) {
  at::Tensor t = labels.contiguous();
  switch (t.scalar_type()) {
    case at::kByte: return {t, kU8};
    case at::kChar: return {t, kI8};
    case at::kShort: return {t, kI16};
    case at::kInt: return {t, kI32};
    case at::kLong: return {t, kI64};
    default: return {t.to(at::kLong), kI64};
  }
}

__device__ __forceinline__ int64_t load_label(const void* p, int kind, int64_t i) {
  switch (kind) {
    case kU8: return static_cast<const uint8_t*>(p)[i];
    case kI8: return static_cast<const int8_t*>(p)[i];
    case kI16: return static_cast<const int16_t*>(p)[i];
    case kI32: return static_cast<const int32_t*>(p)[i];
    default: return static_cast<const int64_t*>(p)[i];
  }
}

// Class index of a label, or -1 for void. ignore_index never votes; a value outside [0, C)
// (rejected by the Python value checks, which may be switched off) is treated as void so that
// no kernel writes out of bounds.
__device__ __forceinline__ int class_of(int64_t v, int64_t ignore_index, int num_classes) {
  return (v != ignore_index && v >= 0 && v < num_classes) ? static_cast<int>(v) : -1;
}

// ---- warp helpers -------------------------------------------------------------------------
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }
__device__ __forceinline__ int warp_id() { return threadIdx.x >> 5; }

// hist[key] += number of lanes holding key (key < 0: nothing). One atomic per distinct key per
// warp instead of one per lane: labels are spatially coherent, so most lanes of a warp share a
// bin and plain atomics would serialise on it. All 32 lanes must call (full mask).
__device__ __forceinline__ void warp_count(int* hist, int key) {
  const unsigned peers = __match_any_sync(kFullMask, key);
  if (key >= 0 && lane_id() == __ffs(peers) - 1) atomicAdd(hist + key, __popc(peers));
}

__device__ __forceinline__ void warp_count_global(unsigned long long* counts, int key) {
  const unsigned peers = __match_any_sync(kFullMask, key);
  if (key >= 0 && lane_id() == __ffs(peers) - 1) atomicAdd(counts + key, static_cast<unsigned long long>(__popc(peers)));
}

// acc[key] += sum of val over the lanes holding key, summed in lane order by the lowest such
// lane: a segmented reduction whose rounding does not depend on scheduling (deterministic).
// acc must be private to the warp. scratch: 32 elements private to the warp. All lanes call.
template <typename T>
__device__ __forceinline__ void warp_segmented_add(T* acc, T* scratch, int key, T val) {
  const int lane = lane_id();
  scratch[lane] = val;
  __syncwarp();
  const unsigned peers = __match_any_sync(kFullMask, key);
  if (key >= 0 && lane == __ffs(peers) - 1) {
    T s = T(0);
    unsigned m = peers;
    while (m) {
      s += scratch[__ffs(m) - 1];
      m &= m - 1;
    }
    acc[key] += s;
  }
  __syncwarp();
}

// Sum over the block in a fixed order (shuffle tree, then warp 0 over the warp sums); the
// result is valid in thread 0. scratch: kWarps elements. Contains __syncthreads.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullMask, v, offset);
  if (lane_id() == 0) scratch[warp_id()] = v;
  __syncthreads();
  T total = T(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total += scratch[w];
  }
  __syncthreads();
  return total;
}

// Top class and runner-up of a histogram: n1 = largest score (c1 = lowest index among the
// maxima), n2 = largest score of the other classes. score = count (* weight, float32). Every
// lane of the warp gets the same result (the merge is symmetric: ties go to the lower index).
struct Top2 {
  float n1;
  int c1;
  float n2;
};

__device__ __forceinline__ Top2 warp_top2(const int* hist, int num_classes, const float* weights) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float m1 = kNegInf, m2 = kNegInf;
  int i1 = std::numeric_limits<int>::max();
  // Each lane scans its classes in increasing order: a later equal score is a runner-up.
  for (int c = lane_id(); c < num_classes; c += 32) {
    float s = static_cast<float>(hist[c]);
    if (weights != nullptr) s = s * weights[c];
    if (s > m1) {
      m2 = m1;
      m1 = s;
      i1 = c;
    } else {
      m2 = fmaxf(m2, s);
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float o1 = __shfl_xor_sync(kFullMask, m1, offset);
    const int oi = __shfl_xor_sync(kFullMask, i1, offset);
    const float o2 = __shfl_xor_sync(kFullMask, m2, offset);
    if (o1 > m1 || (o1 == m1 && oi < i1)) {
      m2 = fmaxf(m1, o2);
      m1 = o1;
      i1 = oi;
    } else {
      m2 = fmaxf(m2, o1);
    }
  }
  // With one class there is no runner-up: n2 = 0.
  return {m1, i1, num_classes > 1 ? m2 : 0.f};
}

// The peak-ratio decision of DESIGN.md, in float32 like every backend.
__device__ __forceinline__ bool keep_peak(const Top2& t, float threshold) {
  return t.n1 > 0.f && t.n2 < threshold * t.n1;
}

// torch.max semantics for argmax: NaN wins (the first one), otherwise strictly greater.
template <typename T>
__device__ __forceinline__ bool beats(T v, T best) {
  return v > best || (v != v && best == best);
}

// ---- vector loads -------------------------------------------------------------------------
// 16-byte loads of V = 16 / sizeof(scalar_t) elements; callers check the alignment.
// NCHW planes of an odd h*w (91x161) start at every alignment, so the kernels do not require
// aligned planes: they find each plane's first 16-byte boundary (head_elems) and load whole
// vectors from there, the few elements outside whole vectors one by one (feature_pass.cuh,
// feature_common.cuh's LaneSlots).
template <typename scalar_t>
struct Vec16 {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

template <typename scalar_t>
__device__ __forceinline__ Vec16<scalar_t> load_vec16(const scalar_t* p) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  Vec16<scalar_t> out;
  static_assert(sizeof(out) == sizeof(raw), "Vec16 must be 16 bytes");
  memcpy(&out, &raw, sizeof(raw));
  return out;
}

template <typename scalar_t>
__device__ __forceinline__ void store_vec16(scalar_t* p, const Vec16<scalar_t>& v) {
  uint4 raw;
  memcpy(&raw, &v, sizeof(raw));
  *reinterpret_cast<uint4*>(p) = raw;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Whether p is aligned to its element size (true of every tensor; checked before relying on it).
template <typename scalar_t>
inline bool aligned_elem(const scalar_t* p) { return reinterpret_cast<uintptr_t>(p) % sizeof(scalar_t) == 0; }

// Elements from base + offset to the next 16-byte boundary (0 when aligned), for an element-aligned
// base. Integer arithmetic: the address need not be dereferenceable.
template <typename scalar_t>
__device__ __forceinline__ int head_elems(const scalar_t* base, int64_t offset) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(offset) * sizeof(scalar_t);
  return static_cast<int>(((16u - (addr & 15u)) & 15u) / sizeof(scalar_t));
}

// ---- feature layouts ----------------------------------------------------------------------
// Features (B, K, h, w) or rows (N, K) seen as element (b, k, n) at b*sB + k*sK + n*sN, with
// n = y*w + x. NCHW has sN == 1 (positions contiguous), channels_last and rows have sK == 1.
struct FeatureLayout {
  int64_t B, K, HW;
  int64_t sB, sK, sN;
};

// The layout of t if its spatial dims flatten to one stride, else nullopt. Images stored one
// after another with the same position stride (channels_last, h*w == 1) merge into one run of
// B*HW positions: labels are flattened in the same order, so position b*HW + n is unchanged.
inline std::optional<FeatureLayout> feature_layout(const at::Tensor& t, bool merge_batch = true) {
  FeatureLayout L;
  if (t.dim() == 2) {
    L = FeatureLayout{1, t.size(1), t.size(0), 0, t.stride(1), t.stride(0)};
  } else {
    TORCH_CHECK(t.dim() == 4, "lsr_fast: internal error: features must be (B, K, h, w) or (N, K), got shape ",
                t.sizes());
    const int64_t h = t.size(2), w = t.size(3);
    int64_t sN;
    if (h * w <= 1) {
      sN = t.stride(0);  // one position per image (or none): the images are the positions
    } else if (w == 1) {
      sN = t.stride(2);
    } else if (h == 1 || t.stride(2) == w * t.stride(3) || t.numel() == 0) {  // empty: nothing is read
      sN = t.stride(3);
    } else {
      return std::nullopt;
    }
    L = FeatureLayout{t.size(0), t.size(1), h * w, t.stride(0), t.stride(1), sN};
  }
  if (merge_batch && L.B > 1 && L.sB == L.HW * L.sN) {
    L.HW *= L.B;
    L.B = 1;
    L.sB = 0;
  }
  return L;
}

// Positions contiguous (NCHW): threads map to positions; otherwise to channels.
inline bool position_major(const FeatureLayout& L) { return L.sN == 1 && L.HW > 1; }

// Features in a layout the kernels read: as given when it flattens, else a contiguous copy.
inline std::pair<at::Tensor, FeatureLayout> flat_features(const at::Tensor& features, bool merge_batch = true) {
  if (auto layout = feature_layout(features, merge_batch)) return {features, *layout};
  at::Tensor c = features.contiguous();
  return {c, *feature_layout(c, merge_batch)};
}

// The input (features or probs) and a same-strided gradient tensor for the backward kernels.
// The gradient has the input's shape, dtype and memory format (empty_like); when the input is
// not dense, or its dense layout does not flatten (h, w) to one stride, the kernels work on
// contiguous copies and the result is copied into the gradient.
struct BackwardTensors {
  at::Tensor f;     // what the kernel reads
  at::Tensor work;  // what the kernel writes (same strides as f)
  at::Tensor out;   // what is returned
  FeatureLayout layout;
};

// out and work are written in full (the kernel writes every element of work; out is work or gets
// a copy of it), so they skip the deterministic NaN fill.
inline BackwardTensors backward_tensors(const at::Tensor& features, bool merge_batch = true) {
  BackwardTensors r;
  r.out = empty_like_written(features);
  at::Tensor f = features.is_non_overlapping_and_dense() ? features
                                                          : features.contiguous(features.suggest_memory_format());
  auto layout = feature_layout(f, merge_batch);
  if (layout && f.strides() == r.out.strides()) {
    r.f = f;
    r.work = r.out;
    r.layout = *layout;
  } else {
    r.f = features.contiguous();
    r.work = empty_like_written(r.f);
    r.layout = *feature_layout(r.f, merge_batch);
  }
  return r;
}

inline void finish_backward(BackwardTensors& r) {
  if (!r.work.is_same(r.out)) r.out.copy_(r.work);
}

// Deterministic reduction of per-block partials: out[e] = sum_p partial[p * M + e], p in order.
template <typename T>
__global__ void __launch_bounds__(kThreads) reduce_partials_kernel(const T* __restrict__ partial, int64_t P,
                                                                    int64_t M, T* __restrict__ out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < M;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T s = T(0);
    for (int64_t p = 0; p < P; ++p) s += partial[p * M + e];
    out[e] = s;
  }
}

template <typename T>
inline void reduce_partials(const at::Tensor& partial, int64_t P, int64_t M, T* out, int sms) {
  if (M == 0) return;
  const int64_t blocks = std::min<int64_t>(ceil_div(M, kThreads), int64_t(sms) * 8);
  reduce_partials_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream()>>>(partial.data_ptr<T>(), P, M, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace lsr_fast
