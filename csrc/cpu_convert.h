// fp32 <-> storage conversions of the CPU kernels (fp32, bf16, fp16): a
// Raw storage type, load (to fp32) and store (rounded once). Plain C++.
#pragma once

#include <cstdint>
#include <cstring>

namespace adaptok {

// fp32 <-> storage conversions, rounding to nearest even as c10's do, but
// without branches or calls: c10's fp16 ones (without F16C) kept the kernels'
// loops scalar, 10x slower than bf16. Selects are bit masks so that GCC
// if-converts them, and everything is forced inline (GCC otherwise called
// the fp16 store out of line from some loops, which then stayed scalar).
#if defined(__GNUC__)
#define ADAPTOK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ADAPTOK_ALWAYS_INLINE inline
#endif

ADAPTOK_ALWAYS_INLINE float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
ADAPTOK_ALWAYS_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
ADAPTOK_ALWAYS_INLINE uint32_t pick(bool cond, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(cond);
  return (a & m) | (b & ~m);
}

struct Float32 {
  using Raw = float;
  ADAPTOK_ALWAYS_INLINE static float load(float x) { return x; }
  ADAPTOK_ALWAYS_INLINE static float store(float x) { return x; }
};

struct BFloat16 {
  using Raw = uint16_t;
  ADAPTOK_ALWAYS_INLINE static float load(uint16_t x) { return bits_float(static_cast<uint32_t>(x) << 16); }
  ADAPTOK_ALWAYS_INLINE static uint16_t store(float x) {
    const uint32_t u = float_bits(x);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(pick((u & 0x7fffffffu) > 0x7f800000u, 0x7fc0u, rounded));
  }
};

struct Float16 {
  using Raw = uint16_t;
  ADAPTOK_ALWAYS_INLINE static float load(uint16_t x) {
    const uint32_t sign = static_cast<uint32_t>(x & 0x8000u) << 16;
    const uint32_t em = x & 0x7fffu;
    // Rebiasing the exponent by a multiply also scales subnormals right.
    const uint32_t finite = float_bits(bits_float(em << 13) * 0x1p112f);
    return bits_float(pick(em >= 0x7c00u, (em << 13) | 0x7f800000u, finite) | sign);
  }
  ADAPTOK_ALWAYS_INLINE static uint16_t store(float x) {
    const uint32_t u = float_bits(x);
    const uint32_t f = u & 0x7fffffffu;
    // Normal results: rebias, round the 13 dropped bits to nearest even.
    const uint32_t normal = (f - 0x38000000u + 0xfffu + ((f >> 13) & 1u)) >> 13;
    // Below 2^-14: adding 0.5 lines the subnormal's bits up at the bottom of
    // the fp32 mantissa, rounded by the FPU.
    const uint32_t tiny = float_bits(bits_float(f) + 0.5f) - 0x3f000000u;
    uint32_t h = pick(f < 0x38800000u, tiny, normal);
    h = pick(f >= 0x47800000u, 0x7c00u, h);
    h = pick(f > 0x7f800000u, 0x7e00u, h);
    return static_cast<uint16_t>(h | ((u >> 16) & 0x8000u));
  }
};

}  // namespace adaptok
