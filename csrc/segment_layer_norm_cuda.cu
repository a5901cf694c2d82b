// CUDA forward of the segment layer norm (see segment_layer_norm.h for the
// contract). Kernels and launcher only; the torch bindings live in
// segment_layer_norm.cpp.
//
// One warp per row, kWarps rows per CTA, a grid-stride loop over rows (every
// loop condition and branch around a shuffle is warp-uniform: a warp owns
// its row, and all 32 lanes run every shuffle with the full mask). A row
// finds its sequence by a binary search of cu_seqlens, then its group.
//   C <= 1024 (register kernel): the row is loaded once into registers (16-
//     byte vectors when every row start is 16-byte aligned, else scalars),
//     the mean and the variance are two warp reductions in fp32 (sum, then
//     the sum of squared deviations), and y is written from the registers.
//   Larger C (streaming kernel): a Welford pass over the row for the mean
//     and the variance (per lane, merged across lanes), then a second pass
//     that rereads x (and the residual) to write h_out and y.
// A lane writes only row elements it has already read, so y may alias x and
// h_out the residual (same strides).
// With a residual, h = x + residual is added in fp32 from both inputs; h_out
// is h rounded once to the dtype, and the statistics and y come from the
// fp32 h, not from the rounded h_out (as the CPU kernel does).
// The affine step is (h - mean) * rstd, times weight, plus bias, rounded at
// each step (no contraction into FMAs), as the CPU kernel computes it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "cuda_dtype.cuh"
#include "segment_layer_norm.h"

namespace adaptok {
namespace segment_norm {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;  // rows per CTA and sweep
constexpr unsigned kFullMask = 0xffffffffu;
// Largest number of fp32 values a lane keeps of its row in the register
// kernel (32 lanes x 32 = C up to 1024).
constexpr int kMaxPerLane = 32;
// Launch-bounds hint: at most 64 registers a thread, every kernel fits
// (ptxas otherwise picked 48 for some and spilled).
constexpr int kMinBlocks = 4;
// Grid cap (grid-stride loop, so any grid is correct).
constexpr int64_t kMaxBlocks = int64_t{1} << 16;

// kVec consecutive elements at p as fp32: one 16-byte load when kVec * sizeof(T)
// is 16 (p must then be 16-byte aligned), else kVec == 1.
template <typename T, int kVec>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[kVec]) {
  static_assert(kVec == 1 || kVec * sizeof(T) == 16, "scalar or 16-byte vectors");
  if constexpr (kVec == 1) {
    f[0] = Elt<T>::to_f(p[0]);
  } else {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if constexpr (sizeof(T) == 4) {
        f[k] = __uint_as_float(w[k]);
      } else {
        typename Elt<T>::Pair pair;
        memcpy(&pair, &w[k], 4);
        const float2 v = Elt<T>::unpack(pair);
        f[2 * k] = v.x;
        f[2 * k + 1] = v.y;
      }
    }
  }
}

// Rounds kVec fp32 values to T and stores them at p (as load_vec).
template <typename T, int kVec>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[kVec]) {
  static_assert(kVec == 1 || kVec * sizeof(T) == 16, "scalar or 16-byte vectors");
  if constexpr (kVec == 1) {
    p[0] = Elt<T>::from_f(f[0]);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if constexpr (sizeof(T) == 4) {
        w[k] = __float_as_uint(f[k]);
      } else {
        const typename Elt<T>::Pair pair = Elt<T>::pack(f[2 * k], f[2 * k + 1]);
        memcpy(&w[k], &pair, 4);
      }
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  // xor butterfly: a + b == b + a, so every lane ends with the same bits.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// The sequence of row t: the last b in [0, batch - 1] with cu[b] <= t, or 0
// when there is none. Reads only cu[1 .. batch - 1] and always returns a
// value in [0, batch - 1] (batch >= 1), whatever cu holds (sorted or not).
__device__ __forceinline__ int64_t find_sequence(const int32_t* __restrict__ cu, int64_t batch,
                                                 int64_t t) {
  int64_t lo = 0, hi = batch - 1;  // the answer lies in [lo, hi]
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;  // lo < mid <= hi
    if (static_cast<int64_t>(__ldg(cu + mid)) <= t) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Offset of row t's affine parameters (group row g times C), g clamped to
// [0, groups - 1]. Only called when weight or bias is set (groups >= 1).
__device__ __forceinline__ int64_t affine_offset(const SegmentNormParams& p, int64_t t) {
  const int64_t b = find_sequence(p.cu_seqlens, p.batch, t);
  int64_t g = __ldg(p.group + b);
  g = g < 0 ? 0 : (g >= p.groups ? p.groups - 1 : g);
  return g * p.channels;
}

// y = ((h - mean) * rstd) * w + b for kVec values: each step rounded (no
// FMA), as the CPU kernel.
template <typename T, int kVec>
__device__ __forceinline__ void normalize(float (&v)[kVec], float mean, float rstd,
                                          const T* w, const T* b) {
#pragma unroll
  for (int k = 0; k < kVec; ++k) v[k] = __fmul_rn(v[k] - mean, rstd);
  if (w != nullptr) {
    float wf[kVec];
    load_vec<T, kVec>(w, wf);
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = __fmul_rn(v[k], wf[k]);
  }
  if (b != nullptr) {
    float bf[kVec];
    load_vec<T, kVec>(b, bf);
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = __fadd_rn(v[k], bf[k]);
  }
}

// Register kernel: lane `lane` owns the kIters chunks (i * 32 + lane) of kVec
// elements each; a chunk is either wholly inside the row or wholly outside
// (kVec > 1 only when C is a multiple of kVec). Needs C <= 32 * kIters * kVec.
// kVec > 1: every row start of x, residual, y, h_out, weight and bias is
// 16-byte aligned (checked by the launcher). Chunks out of the row hold 0 and
// are skipped by every load, store and the variance.
template <typename T, int kVec, int kIters>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    segment_layer_norm_reg_kernel(const SegmentNormParams p) {
  static_assert(kVec * kIters <= kMaxPerLane, "row slice too large for registers");
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ res = static_cast<const T*>(p.residual);
  const T* __restrict__ weight = static_cast<const T*>(p.weight);
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  T* __restrict__ y = static_cast<T*>(p.y);
  T* __restrict__ h_out = static_cast<T*>(p.h_out);
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int C = static_cast<int>(p.channels);  // <= 1024 here
  const float count = static_cast<float>(p.channels);
  const bool affine = weight != nullptr || bias != nullptr;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; t < p.total;
       t += step) {
    float h[kIters][kVec];
    const T* xt = x + t * p.x_stride;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int c0 = (i * 32 + lane) * kVec;
      if (c0 < C) {
        load_vec<T, kVec>(xt + c0, h[i]);
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) h[i][k] = 0.0f;
      }
    }
    if (res != nullptr) {
      const T* rt = res + t * p.r_stride;
      T* ht = h_out + t * p.channels;
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const int c0 = (i * 32 + lane) * kVec;
        if (c0 < C) {
          float r[kVec];
          load_vec<T, kVec>(rt + c0, r);
#pragma unroll
          for (int k = 0; k < kVec; ++k) h[i][k] = __fadd_rn(h[i][k], r[k]);
          store_vec<T, kVec>(ht + c0, h[i]);
        }
      }
    }
    // Out-of-row slots hold 0: they add nothing to the sum.
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) s += h[i][k];
    }
    const float mean = warp_sum(s) / count;
    float sq = 0.0f;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      if ((i * 32 + lane) * kVec < C) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const float d = h[i][k] - mean;
          sq += d * d;
        }
      }
    }
    const float var = warp_sum(sq) / count;
    const float rstd = isinf(var) ? __int_as_float(0x7fc00000) : 1.0f / sqrtf(var + p.eps);  // NaN past fp32
    if (lane == 0) {
      p.mean[t] = mean;
      p.rstd[t] = rstd;
    }
    const int64_t a = affine ? affine_offset(p, t) : 0;
    const T* wt = weight != nullptr ? weight + a : nullptr;
    const T* bt = bias != nullptr ? bias + a : nullptr;
    T* yt = y + t * p.channels;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int c0 = (i * 32 + lane) * kVec;
      if (c0 < C) {
        normalize<T, kVec>(h[i], mean, rstd, wt != nullptr ? wt + c0 : nullptr,
                           bt != nullptr ? bt + c0 : nullptr);
        store_vec<T, kVec>(yt + c0, h[i]);
      }
    }
  }
}

// h of chunk j (kVec elements at c0 = j * kVec) of row t in fp32.
template <typename T, int kVec>
__device__ __forceinline__ void load_h(const T* xt, const T* rt, int64_t c0, float (&h)[kVec]) {
  load_vec<T, kVec>(xt + c0, h);
  if (rt != nullptr) {
    float r[kVec];
    load_vec<T, kVec>(rt + c0, r);
#pragma unroll
    for (int k = 0; k < kVec; ++k) h[k] = __fadd_rn(h[k], r[k]);
  }
}

// Streaming kernel, any C >= 1: pass 1 Welford (mean, M2) per lane over the
// lane's chunks j = lane, lane + 32, ..., merged across the warp (Chan); pass
// 2 recomputes h (same bits) and writes h_out and y. Alignment as the
// register kernel.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    segment_layer_norm_stream_kernel(const SegmentNormParams p) {
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ res = static_cast<const T*>(p.residual);
  const T* __restrict__ weight = static_cast<const T*>(p.weight);
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  T* __restrict__ y = static_cast<T*>(p.y);
  T* __restrict__ h_out = static_cast<T*>(p.h_out);
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t C = p.channels;
  const int64_t chunks = C / kVec;  // kVec divides C
  const float count = static_cast<float>(C);
  const bool affine = weight != nullptr || bias != nullptr;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; t < p.total;
       t += step) {
    const T* xt = x + t * p.x_stride;
    const T* rt = res != nullptr ? res + t * p.r_stride : nullptr;
    T* ht = rt != nullptr ? h_out + t * C : nullptr;
    float n = 0.0f, m = 0.0f, m2 = 0.0f;
    for (int64_t j = lane; j < chunks; j += 32) {
      float h[kVec];
      load_h<T, kVec>(xt, rt, j * kVec, h);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        n += 1.0f;
        const float d = h[k] - m;
        m += d / n;
        m2 += d * (h[k] - m);
      }
    }
    // Chan's merge along the butterfly; the merge is not symmetric in its
    // operands, so lane 0's result is broadcast afterwards.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float nb = __shfl_xor_sync(kFullMask, n, o);
      const float mb = __shfl_xor_sync(kFullMask, m, o);
      const float m2b = __shfl_xor_sync(kFullMask, m2, o);
      const float nab = n + nb;
      if (nab > 0.0f) {
        const float d = mb - m;
        const float fb = nb / nab;
        m += d * fb;
        m2 += m2b + d * d * n * fb;
        n = nab;
      }
    }
    const float mean = __shfl_sync(kFullMask, m, 0);
    const float var = __shfl_sync(kFullMask, m2, 0) / count;
    const float rstd = isinf(var) ? __int_as_float(0x7fc00000) : 1.0f / sqrtf(var + p.eps);  // NaN past fp32
    if (lane == 0) {
      p.mean[t] = mean;
      p.rstd[t] = rstd;
    }
    const int64_t a = affine ? affine_offset(p, t) : 0;
    const T* wt = weight != nullptr ? weight + a : nullptr;
    const T* bt = bias != nullptr ? bias + a : nullptr;
    T* yt = y + t * C;
    for (int64_t j = lane; j < chunks; j += 32) {
      const int64_t c0 = j * kVec;
      float h[kVec];
      load_h<T, kVec>(xt, rt, c0, h);
      if (rt != nullptr) store_vec<T, kVec>(ht + c0, h);
      normalize<T, kVec>(h, mean, rstd, wt != nullptr ? wt + c0 : nullptr,
                         bt != nullptr ? bt + c0 : nullptr);
      store_vec<T, kVec>(yt + c0, h);
    }
  }
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, const SegmentNormParams& p, cudaStream_t stream) {
  int64_t blocks = (p.total + kWarps - 1) / kWarps;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// Smallest register kernel whose kIters covers C (iters = chunks a lane
// needs), else the streaming kernel.
template <typename T, int kVec>
cudaError_t launch_width(const SegmentNormParams& p, cudaStream_t stream) {
  const int64_t iters = (p.channels + 32 * kVec - 1) / (32 * kVec);
  if constexpr (kVec == 1) {
    if (iters <= 4) return launch(segment_layer_norm_reg_kernel<T, 1, 4>, p, stream);
    if (iters <= 8) return launch(segment_layer_norm_reg_kernel<T, 1, 8>, p, stream);
    if (iters <= 16) return launch(segment_layer_norm_reg_kernel<T, 1, 16>, p, stream);
    if (iters <= 32) return launch(segment_layer_norm_reg_kernel<T, 1, 32>, p, stream);
  } else {
    // ViT widths: 192, 384, 768, 1024 channels.
    if (iters <= 1) return launch(segment_layer_norm_reg_kernel<T, kVec, 1>, p, stream);
    if (iters <= 2) return launch(segment_layer_norm_reg_kernel<T, kVec, 2>, p, stream);
    if (iters <= 3) return launch(segment_layer_norm_reg_kernel<T, kVec, 3>, p, stream);
    if (iters <= 4) return launch(segment_layer_norm_reg_kernel<T, kVec, 4>, p, stream);
    if constexpr (kVec <= 4) {
      if (iters <= 6) return launch(segment_layer_norm_reg_kernel<T, kVec, 6>, p, stream);
      if (iters <= 8) return launch(segment_layer_norm_reg_kernel<T, kVec, 8>, p, stream);
    }
  }
  return launch(segment_layer_norm_stream_kernel<T, kVec>, p, stream);
}

template <typename T>
cudaError_t launch_aligned(const SegmentNormParams& p, cudaStream_t stream) {
  // 16-byte vectors need every row start aligned: the base pointers, the row
  // strides (a single row's stride is never used) and C, in bytes.
  const bool res = p.residual != nullptr;
  const int64_t strides = (p.total > 1 ? p.x_stride | (res ? p.r_stride : 0) : 0) | p.channels;
  const uint64_t bits =
      reinterpret_cast<uintptr_t>(p.x) | reinterpret_cast<uintptr_t>(p.y) |
      (res ? reinterpret_cast<uintptr_t>(p.residual) | reinterpret_cast<uintptr_t>(p.h_out) : 0) |
      reinterpret_cast<uintptr_t>(p.weight) | reinterpret_cast<uintptr_t>(p.bias) |
      static_cast<uint64_t>(strides) * sizeof(T);
  if (bits % 16 == 0) return launch_width<T, static_cast<int>(16 / sizeof(T))>(p, stream);
  return launch_width<T, 1>(p, stream);
}

}  // namespace

cudaError_t segment_layer_norm_cuda(const SegmentNormParams& p, NormDType dtype,
                                    cudaStream_t stream) {
  if (p.batch < 0 || p.total < 0 || p.channels < 0 || p.groups < 0 || p.x_stride < 0 ||
      p.r_stride < 0)
    return cudaErrorInvalidValue;
  if (p.total == 0) return cudaSuccess;
  // Every row needs a sequence (batch >= 1) and a channel; the affine
  // parameters need a group row; h_out is required with a residual.
  if (p.batch < 1 || p.channels < 1) return cudaErrorInvalidValue;
  if ((p.weight != nullptr || p.bias != nullptr) && p.groups < 1) return cudaErrorInvalidValue;
  if (p.residual != nullptr && p.h_out == nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case NormDType::kFloat:
      return launch_aligned<float>(p, stream);
    case NormDType::kHalf:
      return launch_aligned<__half>(p, stream);
    case NormDType::kBFloat16:
      return launch_aligned<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace segment_norm
}  // namespace adaptok
