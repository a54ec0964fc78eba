// Helpers shared by the CPU kernels of lsr_fast (csrc/cpu/*.cpp): argument checks, label
// buckets, the peak-ratio decision of hist_downsample, views of (B, K, h, w) / (N, K) feature
// tensors as (B, K, N) with either contiguous planes or contiguous rows, the fixed (thread-count
// independent) partitions that keep every reduction reproducible, and cache/page helpers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "arg_checks.h"
#include "common.h"
#include "half_convert.h"

namespace lsr_fast {
namespace cpu {

// Accumulation type: float32 for half/bfloat16/float32, float64 for float64 (ops.cpp convention).
template <typename scalar_t>
using acc_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the CPU kernel, got one on ",
              t.device());
}

// The value of a 0-dim floating-point tensor (checked by arg_checks.h) as double; CPU memory,
// so no device sync.
inline double scalar_value(const at::Tensor& t) { return t.to(at::kDouble).item<double>(); }

// Bucket of a label value: the class in [0, C), or C (void) for ignore_index and for any value
// outside [0, C). The Python API rejects such values first (value checks on); the kernels of
// every backend count them as void, so that no backend writes out of bounds or disagrees when
// the checks are off (README, "The raw ops' input contract"). Branch-free.
inline int64_t label_bucket(int64_t v, int64_t C) {
  return static_cast<uint64_t>(v) < static_cast<uint64_t>(C) ? v : C;
}

// Labels (any integer dtype, any shape with `count` elements, row-major order) -> int32 buckets in
// [0, C] (C = void).
inline at::Tensor label_buckets(const at::Tensor& labels, int64_t count, int64_t C, int64_t ignore_index,
                                const char* op) {
  TORCH_CHECK(labels.numel() == count, op, ": labels must have ", count, " elements, got ", labels.numel());
  TORCH_CHECK(C < std::numeric_limits<int32_t>::max() - 1, op, ": num_classes must be < 2^31 - 2, got ", C);
  at::Tensor src = labels.contiguous();
  at::Tensor out = at::empty({count}, labels.options().dtype(at::kInt));
  int32_t* dst = out.data_ptr<int32_t>();
  // ignore_index inside [0, C) is a class id that must not vote: only then does it need a test.
  const bool ignore_is_class = ignore_index >= 0 && ignore_index < C;
  AT_DISPATCH_INTEGRAL_TYPES(src.scalar_type(), "lsr_fast_label_buckets", [&] {
    const scalar_t* in = src.data_ptr<scalar_t>();
    at::parallel_for(0, count, 1 << 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t v = static_cast<int64_t>(in[i]);
        dst[i] = static_cast<int32_t>(ignore_is_class && v == ignore_index ? C : label_bucket(v, C));
      }
    });
  });
  return out;
}

// DESIGN.md's decision on one window histogram, as reference._peak_ratio_decision does it in
// float32: scores = count (* weight), n1 = max (lowest class on ties), n2 = max of the others
// (0 when C == 1); keep c1 if n1 > 0 and n2 < threshold * n1.
template <typename count_t>
inline int64_t peak_ratio_decision(const count_t* counts, int64_t C, const float* weights, float threshold,
                                   int64_t ignore_index) {
  auto score = [&](int64_t c) {
    const float s = static_cast<float>(counts[c]);
    return weights ? s * weights[c] : s;
  };
  float n1 = score(0);
  int64_t c1 = 0;
  for (int64_t c = 1; c < C; ++c) {
    const float s = score(c);
    if (s > n1) {
      n1 = s;
      c1 = c;
    }
  }
  float n2 = C > 1 ? -std::numeric_limits<float>::infinity() : 0.0f;
  for (int64_t c = 0; c < C; ++c) {
    if (c != c1) n2 = std::max(n2, score(c));
  }
  return (n1 > 0.0f && n2 < threshold * n1) ? c1 : ignore_index;
}

// Features as (B, K, N): element (b, k, n) at data + b*sB + k*sK + n*sN, with either contiguous
// planes (sN == 1: NCHW maps, column-major rows) or contiguous rows (sK == 1: channels_last maps,
// row-major (N, K) rows). Any other layout is copied to a contiguous tensor first (a documented
// extra pass; the network's own outputs never need it).
struct FeatureView {
  at::Tensor tensor;  // the tensor the view reads (the input, or its contiguous copy)
  int64_t B = 0, K = 0, N = 0;
  int64_t sB = 0, sK = 0, sN = 0;
  bool planes = true;
};

// Tries to describe t as (B, K, N) without copying; false when its strides do not allow it.
inline bool describe_features(const at::Tensor& t, FeatureView& v) {
  v.tensor = t;
  if (t.dim() == 2) {
    v.B = 1;
    v.N = t.size(0);
    v.K = t.size(1);
    v.sB = 0;
    v.sN = t.stride(0);
    v.sK = t.stride(1);
  } else {
    const int64_t h = t.size(2), w = t.size(3);
    v.B = t.size(0);
    v.K = t.size(1);
    v.N = h * w;
    v.sB = t.stride(0);
    v.sK = t.stride(1);
    if (h == 1) {
      v.sN = t.stride(3);
    } else if (w == 1) {
      v.sN = t.stride(2);
    } else if (t.stride(2) == t.stride(3) * w || t.numel() == 0) {
      v.sN = t.stride(3);
    } else {
      return false;
    }
  }
  if (t.numel() == 0) {  // nothing is read; an empty tensor's strides can be anything
    v.sB = v.K * v.N;
    v.sK = v.N;
    v.sN = 1;
    v.planes = true;
    return true;
  }
  // Size-1 dimensions have arbitrary strides: normalise them so the layout tests below see them.
  if (v.N <= 1) v.sN = 1;
  if (v.K <= 1 && v.sN != 1) v.sK = 1;
  if (v.sN == 1) {
    v.planes = true;
    return true;
  }
  if (v.sK == 1) {
    v.planes = false;
    return true;
  }
  return false;
}

// A view the kernels can read AND whose gradient they can write with the same strides. An
// overlapping input (stride 0 from expand(), or a view that reuses memory) is copied first:
// empty_like of it is dense, so a gradient with its strides would not exist.
inline FeatureView view_features(const at::Tensor& features, const char* op) {
  FeatureView v;
  if (!features.is_non_overlapping_and_dense()) {
    TORCH_CHECK(describe_features(features.contiguous(), v), op, ": internal error describing features");
  } else if (!describe_features(features, v)) {
    TORCH_CHECK(describe_features(features.contiguous(), v), op, ": internal error describing features");
  }
  return v;
}

// The CPU placement of features and labels (their dtypes and shapes: arg_checks.h).
inline void check_cpu_features_labels(const at::Tensor& features, const at::Tensor& labels, const char* op) {
  check_cpu(features, op, "features");
  check_cpu(labels, op, "labels");
}

// The gradient buffer of a kernel that reads `in`: `out` (empty_like(features), what the fake
// impl promises) when it has in's strides, else a scratch tensor to copy into `out` at the end.
inline FeatureView writable_like(const FeatureView& in, const at::Tensor& out) {
  FeatureView v;
  if (describe_features(out, v) && v.planes == in.planes && v.sB == in.sB && v.sK == in.sK && v.sN == in.sN) {
    return v;
  }
  FeatureView w;
  describe_features(at::empty_like(in.tensor), w);  // dense in.tensor: same strides
  return w;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A freshly allocated output of a backward kernel (a gradient as large as the features: 120 MB at
// the paper's shape) costs more in 4 KiB page faults on first touch than the kernel's own work.
// On Linux, advise transparent huge pages for its 2 MiB-aligned interior before writing it (what
// PyTorch's THP_MEM_ALLOC_ENABLE=1 does for every allocation): about 3x less fault time. Only
// for large, not-yet-touched buffers; advisory, so a refusal changes nothing. LSR_FAST_HUGEPAGES=0
// turns it off.
inline void advise_huge_pages(const at::Tensor& fresh) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* v = std::getenv("LSR_FAST_HUGEPAGES");
    return v == nullptr || std::string(v) != "0";
  }();
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const int64_t bytes = fresh.numel() * static_cast<int64_t>(fresh.element_size());
  if (!enabled || bytes < int64_t{8} << 20 || !fresh.is_cpu()) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(fresh.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)fresh;
#endif
}

// Rows-layout reductions over vectors (channels_last maps, (N, K) rows) use fixed blocks of
// vectors, each with its own per-class partial sums, combined in block order. The block count
// depends on the shape only (never on the thread count), so results are reproducible; it is
// capped so that the partials stay within ~16M values.
inline int64_t rows_blocks(int64_t P, int64_t C, int64_t K) {
  const int64_t by_size = ceil_div(P, 256);
  const int64_t by_memory = std::max<int64_t>(1, (int64_t{1} << 24) / std::max<int64_t>(1, C * K));
  return std::max<int64_t>(1, std::min<int64_t>({int64_t{64}, by_size, by_memory}));
}

// Per-class partial sums of fixed blocks of row vectors: part (blocks, C, K), touched (blocks, C)
// (a class's row is written by its first vector in the block, so untouched rows are never read).
template <typename acc>
struct RowPartials {
  int64_t blocks, C, K;
  std::vector<acc> part;
  std::vector<uint8_t> touched;
  RowPartials(int64_t blocks_, int64_t C_, int64_t K_)
      : blocks(blocks_), C(C_), K(K_), part(blocks_ * C_ * K_), touched(blocks_ * C_, 0) {}

  // Adds one vector (K values in the accumulation type) to class c of block q.
  void add(int64_t q, int64_t c, const acc* v) {
    acc* dst = part.data() + (q * C + c) * K;
    uint8_t& t = touched[q * C + c];
    if (t) {
      for (int64_t k = 0; k < K; ++k) dst[k] += v[k];
    } else {
      std::copy(v, v + K, dst);
      t = 1;
    }
  }

  // out (C, K) = sum over blocks, in block order, in float64.
  template <typename out_t>
  void combine(out_t* out) const {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      std::vector<double> s(K);
      for (int64_t c = c0; c < c1; ++c) {
        std::fill(s.begin(), s.end(), 0.0);
        for (int64_t q = 0; q < blocks; ++q) {
          if (!touched[q * C + c]) continue;
          const acc* src = part.data() + (q * C + c) * K;
          for (int64_t k = 0; k < K; ++k) s[k] += static_cast<double>(src[k]);
        }
        for (int64_t k = 0; k < K; ++k) out[c * K + k] = static_cast<out_t>(s[k]);
      }
    });
  }
};

// The vectors of each image, in blocks of `block` positions, grouped by class bucket within each
// block (a stable counting sort of the label buckets). Block q of image b holds the positions
// [q*block, min(N, (q+1)*block)); its vectors of bucket c (C = void) are
// order[b*N + start(b, q, c) .. b*N + start(b, q, c + 1)), in increasing position. The plane
// kernels use it to work one class at a time (no scatter, class constants hoisted) on a block
// of a plane small enough to stay in L1.
struct ClassOrder {
  int64_t N = 0, C = 0, block = 1, blocks = 0;
  std::vector<int32_t> order;
  std::vector<int64_t> offsets;  // (B, blocks, C + 2)
  int64_t start(int64_t b, int64_t q, int64_t c) const { return offsets[(b * blocks + q) * (C + 2) + c]; }
};

inline ClassOrder class_order(const int32_t* idx, int64_t B, int64_t N, int64_t C, int64_t block) {
  TORCH_CHECK(N < std::numeric_limits<int32_t>::max(), "lsr_fast: too many vectors per image (", N, ")");
  ClassOrder o;
  o.N = N;
  o.C = C;
  o.block = block;
  o.blocks = ceil_div(N, block);
  o.order.resize(B * N);
  o.offsets.assign(B * o.blocks * (C + 2), 0);
  std::vector<int64_t> next(C + 1);
  for (int64_t b = 0; b < B; ++b) {
    const int32_t* lb = idx + b * N;
    int32_t* ob = o.order.data() + b * N;
    for (int64_t q = 0; q < o.blocks; ++q) {
      const int64_t n0 = q * block, n1 = std::min(N, n0 + block);
      int64_t* off = o.offsets.data() + (b * o.blocks + q) * (C + 2);
      off[0] = n0;
      for (int64_t n = n0; n < n1; ++n) ++off[lb[n] + 1];
      for (int64_t c = 0; c <= C; ++c) off[c + 1] += off[c];
      std::copy(off, off + C + 1, next.begin());
      for (int64_t n = n0; n < n1; ++n) ob[next[lb[n]]++] = static_cast<int32_t>(n);
    }
  }
  return o;
}

// Reads one byte per cache line of [ptr, ptr + bytes) in order, so the range is in cache before a
// gather in class order touches it at random.
inline void touch(const void* ptr, int64_t bytes) {
  const volatile char* p = static_cast<const volatile char*>(ptr);
  for (int64_t i = 0; i < bytes; i += 64) (void)p[i];
}

// Brings a range into cache a few lines at a time while other work runs (a burst of prefetches
// would stall like plain loads): the class-order kernels prefetch the next block of a plane
// while they gather the current one, so memory traffic and arithmetic overlap.
class Prefetcher {
 public:
  Prefetcher(const void* ptr, int64_t bytes) : p_(static_cast<const char*>(ptr)), bytes_(ptr ? bytes : 0) {}
  // Prefetches up to `fraction` of the range (calls with increasing fractions).
  void advance(double fraction) {
    const int64_t target = static_cast<int64_t>(fraction * static_cast<double>(bytes_));
    for (; done_ < target; done_ += 64) {
#if defined(__GNUC__) || defined(__clang__)
      __builtin_prefetch(p_ + done_, 0, 3);
#endif
    }
  }

 private:
  const char* p_;
  int64_t bytes_;
  int64_t done_ = 0;
};

// Channel chunk of the fused feature passes over planes. It depends on K only (never on the
// thread count), so every reduction has the same order whatever the parallelism: results are
// reproducible. Up to 32 chunks of at least 16 planes.
inline int64_t channel_chunk(int64_t K) { return std::max<int64_t>(16, ceil_div(K, 32)); }

}  // namespace cpu
}  // namespace lsr_fast
