// Loops converting float16 <-> float32 that the compiler vectorises at the build's baseline ISA
// (c10::Half's scalar conversions do not, and cost several times the rest of a kernel's row
// loop). Same algorithms as c10 (from the FP16 library), so the values are identical.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace lsr_fast {
namespace cpu {

inline float f32_from_bits(uint32_t w) {
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t w;
  std::memcpy(&w, &f, sizeof(w));
  return w;
}

// dst[i] = float(src[i]) for n float16 values.
inline void half_to_float(const c10::Half* src, float* dst, int64_t n) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t w = static_cast<uint32_t>(h[i]) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    // Branch-free select (a ?: here keeps the loop scalar).
    const uint32_t denormal = 0u - static_cast<uint32_t>(two_w < (1u << 27));
    const uint32_t bits = (f32_to_bits(denormalized) & denormal) | (f32_to_bits(normalized) & ~denormal);
    dst[i] = f32_from_bits(sign | bits);
  }
}

// dst[i] = float16(src[i]) (round to nearest even) for n float32 values.
inline void float_to_half(const float* src, c10::Half* dst, int64_t n) {
  uint16_t* h = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    const float f = src[i];
    const uint32_t w = f32_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    float base = (f32_from_bits(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
    uint32_t bias = shl1_w & 0xFF000000u;
    const uint32_t small = 0u - static_cast<uint32_t>(bias < 0x71000000u);
    bias = (0x71000000u & small) | (bias & ~small);
    base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    const uint32_t nan = 0u - static_cast<uint32_t>(shl1_w > 0xFF000000u);
    h[i] = static_cast<uint16_t>((sign >> 16) | (0x7E00u & nan) | (nonsign & ~nan));
  }
}

// n values of src as T (a kernel's compute type): src itself when it already is T, else converted
// into buf (n elements).
template <typename T, typename scalar_t>
inline const T* load_row(const scalar_t* src, int64_t n, T* buf) {
  if constexpr (std::is_same<scalar_t, T>::value) {
    return src;
  } else if constexpr (std::is_same<scalar_t, c10::Half>::value && std::is_same<T, float>::value) {
    half_to_float(src, buf, n);
    return buf;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<T>(src[i]);
    return buf;
  }
}

// dst[i] = scalar_t(src[i]) for n values.
template <typename T, typename scalar_t>
inline void store_row(const T* src, int64_t n, scalar_t* dst) {
  if constexpr (std::is_same<scalar_t, c10::Half>::value && std::is_same<T, float>::value) {
    float_to_half(src, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

}  // namespace cpu
}  // namespace lsr_fast
