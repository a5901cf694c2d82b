// Per-dtype conversions shared by the CUDA kernels (fp32, fp16, bf16): the
// scalar and two-element (32-bit) forms, and the raw storage type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace adaptok {

template <typename T>
struct Elt;
template <>
struct Elt<float> {
  using Raw = uint32_t;
  using Pair = float2;
  static __device__ __forceinline__ float to_f(float x) { return x; }
  static __device__ __forceinline__ float from_f(float x) { return x; }
  static __device__ __forceinline__ float2 unpack(float2 x) { return x; }
  static __device__ __forceinline__ float2 pack(float a, float b) {
    return make_float2(a, b);
  }
};
template <>
struct Elt<__half> {
  using Raw = uint16_t;
  using Pair = __half2;
  static __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_f(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ float2 unpack(__half2 x) { return __half22float2(x); }
  static __device__ __forceinline__ __half2 pack(float a, float b) {
    return __floats2half2_rn(a, b);
  }
};
template <>
struct Elt<__nv_bfloat16> {
  using Raw = uint16_t;
  using Pair = __nv_bfloat162;
  static __device__ __forceinline__ float to_f(__nv_bfloat16 x) {
    return __bfloat162float(x);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float x) {
    return __float2bfloat16_rn(x);
  }
  static __device__ __forceinline__ float2 unpack(__nv_bfloat162 x) {
    return __bfloat1622float2(x);
  }
  static __device__ __forceinline__ __nv_bfloat162 pack(float a, float b) {
    return __floats2bfloat162_rn(a, b);
  }
};

}  // namespace adaptok
