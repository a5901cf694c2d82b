// CUDA kernels of CF-ViT's fine-stage sequences (see fine_tokens.h for the
// contract). Kernels and launcher only; the torch bindings live in
// fine_tokens.cpp.
//
// Plan kernel: one block an image. Its keys (NaN read as -inf) go to shared
// memory; each thread ranks some patches against all Nc (O(Nc^2 / threads):
// 150 compares a thread at Nc = 196, no sort and no global scratch); a
// block-wide scan of the chosen flags over contiguous chunks (warp shuffles,
// then the warps' totals) gives every patch its slot, and each thread
// writes the source entries of its chunk.
// Row kernel: a warp a row of out, lanes along the channels (coalesced loads
// and stores); the row's source entry says what to read; fine rows are one
// fp32 sum rounded once, coarse and prefix rows are copied.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>

#include "cuda_dtype.cuh"
#include "fine_tokens.h"

namespace adaptok {
namespace fine_tokens {
namespace {

constexpr int kPlanThreads = 256;
constexpr int kWarps = kPlanThreads / 32;
constexpr int kRowsPerBlock = 8;  // warps of the row kernel's block
constexpr int64_t kMaxImageBlocks = 65535;  // grid y limit

__global__ void __launch_bounds__(kPlanThreads) plan_kernel(const Problem p) {
  extern __shared__ float key[];  // [Nc], then the flags [Nc] as int
  int* chosen = reinterpret_cast<int*>(key + p.coarse_patches());
  __shared__ int warp_total[kWarps];
  const int64_t Nc = p.coarse_patches(), K = p.keep, Nf = p.fine_patches();
  const int t = static_cast<int>(threadIdx.x), lane = t % 32, warp = t / 32;
  const int64_t b = blockIdx.x;
  const float* score = p.score + b * Nc;
  for (int64_t i = t; i < Nc; i += kPlanThreads) {
    const float s = score[i];
    key[i] = isnan(s) ? -INFINITY : s;
  }
  __syncthreads();
  for (int64_t i = t; i < Nc; i += kPlanThreads) {
    const float ki = key[i];
    int64_t rank = 0;
    for (int64_t j = 0; j < Nc; ++j) {
      const float kj = key[j];
      rank += (kj > ki) | ((kj == ki) & (j < i));
    }
    chosen[i] = rank < K;
  }
  __syncthreads();
  // Thread t owns patches [lo, hi): its chosen count, scanned across the block.
  const int64_t per = (Nc + kPlanThreads - 1) / kPlanThreads;
  const int64_t lo = t * per < Nc ? t * per : Nc, hi = lo + per < Nc ? lo + per : Nc;
  int count = 0;
  for (int64_t i = lo; i < hi; ++i) count += chosen[i];
  int inclusive = count;
  for (int d = 1; d < 32; d *= 2) {
    const int v = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += v;
  }
  if (lane == 31) warp_total[warp] = inclusive;
  __syncthreads();
  int before = inclusive - count;
  for (int k = 0; k < warp; ++k) before += warp_total[k];
  int64_t* src = p.source + b * p.placed();
  int64_t m = before;
  for (int64_t i = lo; i < hi; ++i) {
    if (chosen[i]) {
      for (int64_t q = 0; q < 4; ++q) src[4 * m + q] = child(i, q, p.w);
      ++m;
    } else {
      src[4 * K + (i - m)] = Nf + i;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(32 * kRowsPerBlock) rows_kernel(const Problem p) {
  const T* __restrict__ fine = static_cast<const T*>(p.fine.data);
  const T* __restrict__ coarse = static_cast<const T*>(p.coarse.data);
  const T* __restrict__ reuse = static_cast<const T*>(p.reuse.data);
  const T* __restrict__ pos = static_cast<const T*>(p.pos);
  const T* __restrict__ prefix = static_cast<const T*>(p.prefix);
  T* __restrict__ out = static_cast<T*>(p.out);
  const int64_t C = p.channels, L = p.rows(), n = p.prefix_rows, Nf = p.fine_patches();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (t >= L) return;
  for (int64_t b = blockIdx.y; b < p.images; b += gridDim.y) {
    T* y = out + (b * L + t) * C;
    if (t < n) {
      for (int64_t c = threadIdx.x; c < C; c += 32) y[c] = prefix[t * C + c];
      continue;
    }
    const int64_t s = p.source[b * p.placed() + t - n];
    if (s >= Nf) {
      const T* x = coarse + b * p.coarse.stride_b + (s - Nf) * p.coarse.stride_row;
      for (int64_t c = threadIdx.x; c < C; c += 32) y[c] = x[c];
      continue;
    }
    const T* x = fine + b * p.fine.stride_b + s * p.fine.stride_row;
    const T* ps = pos == nullptr ? nullptr : pos + s * C;
    const T* re = reuse == nullptr ? nullptr : reuse + b * p.reuse.stride_b + parent(s, p.w) * p.reuse.stride_row;
    for (int64_t c = threadIdx.x; c < C; c += 32) {
      float v = Elt<T>::to_f(x[c]);
      if (ps != nullptr) v += Elt<T>::to_f(ps[c]);
      if (re != nullptr) v += Elt<T>::to_f(re[c]);
      y[c] = Elt<T>::from_f(v);
    }
  }
}

template <typename T>
cudaError_t launch_rows(const Problem& p, cudaStream_t stream) {
  const int64_t row_blocks = (p.rows() + kRowsPerBlock - 1) / kRowsPerBlock;
  if (row_blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(row_blocks),
                  static_cast<unsigned>(p.images < kMaxImageBlocks ? p.images : kMaxImageBlocks));
  rows_kernel<T><<<grid, dim3(32, kRowsPerBlock), 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t fine_tokens_cuda(const Problem& p, DType dtype, cudaStream_t stream) {
  const int64_t Nc = p.coarse_patches();
  if (p.images < 0 || p.h < 1 || p.w < 1 || Nc > kMaxCoarsePatches || p.keep < 0 || p.keep > Nc ||
      p.prefix_rows < 0 || p.channels < 1 || p.images > INT_MAX)
    return cudaErrorInvalidValue;
  if (p.images == 0) return cudaSuccess;
  const size_t shared = static_cast<size_t>(Nc) * (sizeof(float) + sizeof(int));
  plan_kernel<<<static_cast<unsigned>(p.images), kPlanThreads, shared, stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  switch (dtype) {
    case DType::kFloat:
      return launch_rows<float>(p, stream);
    case DType::kHalf:
      return launch_rows<__half>(p, stream);
    case DType::kBFloat16:
      return launch_rows<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fine_tokens
}  // namespace adaptok
