// Variable-length attention with the class-attention row as a side output,
// shared by the CPU (varlen_attention.cpp) and CUDA (varlen_attention_cuda.cu)
// kernels. Plain C++: no torch headers, so the .cu stays cheap to compile.
//
// B sequences are packed along the token axis: sequence b is rows
// [cu_seqlens[b], cu_seqlens[b + 1]) of q, k, v ([T, H, D], any token and head
// strides, unit stride along D). Every sequence attends to itself only, without
// a causal mask. Outputs:
//   out [T, H, D]  (the input dtype; any token and head strides, unit along D)
//   lse [H, T]     fp32, contiguous: natural-log sum of exp(scores) of each row
//   cls [H, T]     fp32, contiguous, optional (nullptr): cls[h, j] is the
//                  probability with which the first token of j's sequence
//                  attends to j in head h.
#pragma once

#include <cstdint>

namespace adaptok {
namespace attention {

struct VarlenParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  float* cls;  // nullptr: not requested
  const int32_t* cu_seqlens;  // [batch + 1]
  int64_t batch;
  int64_t total;  // T
  int64_t heads;  // H
  int64_t head_dim;  // D
  int64_t max_seqlen;
  // Strides in elements.
  int64_t q_stride_t, q_stride_h;
  int64_t k_stride_t, k_stride_h;
  int64_t v_stride_t, v_stride_h;
  int64_t o_stride_t, o_stride_h;
  float scale;
};

#ifdef ADAPTOK_WITH_CUDA
}  // namespace attention
}  // namespace adaptok

#include <cuda_runtime_api.h>

namespace adaptok {
namespace attention {

enum class CudaDType { kHalf, kBFloat16 };

// Head dims the CUDA kernel serves.
inline bool cuda_supports_head_dim(int64_t d) { return d == 32 || d == 64 || d == 128; }

// Forward in varlen_attention_cuda.cu: fills out, lse and (unless nullptr) cls
// on stream, without a host sync. Returns cudaErrorInvalidValue for a head dim
// that cuda_supports_head_dim rejects, else cudaGetLastError().
cudaError_t varlen_attention_fwd_cuda(const VarlenParams& p, CudaDType dtype,
                                      cudaStream_t stream);
#endif  // ADAPTOK_WITH_CUDA

}  // namespace attention
}  // namespace adaptok
