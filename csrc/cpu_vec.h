// 16-float vectors and per-ISA compilation for the CPU kernels. Plain C++
// with GCC/Clang vector extensions: the same source runs on AVX-512, AVX2 or
// the baseline, whichever clone the CPU picks when the library loads.
#pragma once

#include <cstdint>

namespace adaptok {

// Hot loops are compiled once per ISA and picked at load time (GCC on x86-64
// Linux: target_clones needs ifunc); elsewhere they are compiled for the
// baseline.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define ADAPTOK_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ADAPTOK_CPU_CLONES
#endif

// 16 floats as one value. GCC and Clang lower it to the widest registers of
// each ISA clone (one zmm, two ymm, four xmm); aligned(4) and may_alias make
// loads through it plain unaligned loads.
typedef float vfloat __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t vint __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

// Sum of the 16 lanes.
inline float sum_lanes(vfloat v) {
  float s = 0.0f;
  for (int64_t u = 0; u < kLanes; ++u) s += v[u];
  return s;
}

// The 16 floats at p (any alignment).
inline vfloat load_lanes(const float* p) { return *reinterpret_cast<const vfloat*>(p); }

// n rounded up to a multiple of 16.
inline int64_t round_lanes(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

}  // namespace adaptok
