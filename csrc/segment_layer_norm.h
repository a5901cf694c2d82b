// Segment layer norm: LayerNorm over the channels of every row of a packed
// batch, with the affine parameters of the row's sequence's group (ReViT's
// token-length-aware LayerNorm: one weight and bias per token grid), and an
// optional residual add fused in front. Shared by the CPU
// (segment_layer_norm.cpp) and CUDA (segment_layer_norm_cuda.cu) kernels.
// Plain C++: no torch headers.
//
// Sequence b is rows [cu_seqlens[b], cu_seqlens[b + 1]) and uses group
// g = group[b] (0 <= g < groups). For every row t of sequence b:
//
//   h_t    = x_t + residual_t          (h_t = x_t when residual is null)
//   mean_t = sum_c h_tc / C,  var_t = sum_c (h_tc - mean_t)^2 / C  (biased)
//   rstd_t = 1 / sqrt(var_t + eps), NaN when var_t overflows fp32 (so the
//            row is NaN, as in F.layer_norm, not its bias)
//   y_tc   = (h_tc - mean_t) * rstd_t * weight[g, c] + bias[g, c]
//
// Statistics in fp32 whatever the dtype; y (and h) rounded once to x's
// dtype. weight and bias are [groups, C] contiguous in x's dtype; weight
// null means 1, bias null means 0. Outputs: y [T, C] contiguous; h_out
// [T, C] contiguous (only with a residual; null otherwise); mean and rstd
// fp32 [T] (for the backward).
#pragma once

#include <cstdint>

namespace adaptok {
namespace segment_norm {

struct SegmentNormParams {
  const void* x;  // [T, C]: row stride x_stride (elements), unit column stride
  const void* residual;  // [T, C] or null: row stride r_stride, unit column stride
  const void* weight;  // [groups, C] or null
  const void* bias;  // [groups, C] or null
  const int32_t* cu_seqlens;  // [batch + 1]
  const int32_t* group;  // [batch]
  void* y;  // [T, C] contiguous
  void* h_out;  // [T, C] contiguous, or null (required when residual is set)
  float* mean;  // [T]
  float* rstd;  // [T]
  int64_t batch;
  int64_t total;  // T
  int64_t channels;  // C
  int64_t groups;
  int64_t x_stride;
  int64_t r_stride;
  float eps;
};

#ifdef ADAPTOK_WITH_CUDA
}  // namespace segment_norm
}  // namespace adaptok

#include <cuda_runtime_api.h>

namespace adaptok {
namespace segment_norm {

enum class NormDType { kFloat, kHalf, kBFloat16 };

// Forward in segment_layer_norm_cuda.cu: fills y, h_out (with a residual),
// mean and rstd on stream, without a host sync, one warp per row. h is
// x + residual in fp32; h_out is h rounded to the dtype and the statistics
// are those of the fp32 h (as the CPU kernel). cu_seqlens and group are not
// validated on the device: a row's sequence is clamped to [0, batch - 1] and
// its group to [0, groups - 1], so nothing is read or written outside the
// tensors whatever their values. Returns cudaErrorInvalidValue for negative
// sizes or strides, channels < 1 or batch < 1 (with total > 0), groups < 1
// with weight or bias set, or a residual without h_out; else
// cudaGetLastError().
cudaError_t segment_layer_norm_cuda(const SegmentNormParams& p, NormDType dtype,
                                    cudaStream_t stream);
#endif  // ADAPTOK_WITH_CUDA

}  // namespace segment_norm
}  // namespace adaptok
