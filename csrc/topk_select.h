// Top-k class-attention token selection with inattentive-token fusion (EViT's
// token reorganization) over a packed batch, shared by the CPU
// (topk_select.cpp) and CUDA (topk_select_cuda.cu) kernels. Plain C++: no
// torch headers, so the .cu stays cheap to compile.
//
// Sequence b is rows [s, s + n) of x, s = cu_seqlens[b], n = its length; its
// output is rows [o, o + n_out) of out, o = cu_seqlens_out[b]. Row s is the
// sequence's CLS token; the candidates are its tokens j = 1 .. n-1, scored
// a_j = cls_attn[s + j]. With k = keep[b] (0 <= k <= n - 1):
//
//   rank_j = #{ i in [1, n) : a_i > a_j  or  (a_i == a_j and i < j) }
//
// (descending score, equal scores by lower index first, -0 equal to +0, NaN
// above every number: the same on every backend), and token j is kept iff
// rank_j < k.
//
//   k == n - 1 (nothing dropped): the sequence is copied unchanged, in its
//       own order: out[o + i] = x[s + i], kept_index[o + i] = s + i.
//   otherwise: out[o] = x[s] (kept_index s);
//       out[o + 1 + rank_j] = x[s + j] for every kept j (kept_index s + j);
//       if fuse: out[o + 1 + k] = sum over dropped j of w_j x[s + j], with
//       w_j = a_j; with renormalize, the sum is divided by the sum S of a
//       over the dropped tokens (a zero token when S is not positive);
//       accumulated in fp32, rounded once; kept_index -1.
//
// So n_out = n when k == n - 1, else 1 + k + fuse; the op layer computes
// cu_seqlens_out and total_out from the lengths and keep on the host.
#pragma once

#include <cstdint>

namespace adaptok {
namespace topk {

struct TopkParams {
  const void* x;  // [T, C]: row stride x_stride (elements), unit column stride
  void* out;  // [total_out, C], contiguous, x's dtype
  int64_t* kept_index;  // [total_out]
  const float* cls_attn;  // [T], contiguous
  const int32_t* cu_seqlens;  // [batch + 1]
  const int32_t* cu_seqlens_out;  // [batch + 1]
  const int32_t* keep;  // [batch]
  int64_t batch;
  int64_t total;  // T
  int64_t total_out;
  int64_t channels;  // C
  int64_t x_stride;
  int64_t max_seqlen;  // >= every n (a host int; sizes tiles, never read from the device)
  bool fuse;
  bool renormalize;
};

#ifdef ADAPTOK_WITH_CUDA
}  // namespace topk
}  // namespace adaptok

#include <cuda_runtime_api.h>

namespace adaptok {
namespace topk {

enum class TopkDType { kFloat, kHalf, kBFloat16 };

// Forward in topk_select_cuda.cu: fills out and kept_index on stream, without
// a host sync, one CTA per sequence. cu_seqlens, cu_seqlens_out and keep are
// not validated on the device; malformed values are clamped so that nothing
// is read or written outside x, cls_attn, out and kept_index. Ranks order NaN
// scores above every number (as a stable descending torch.sort). A
// sequence's scores and ranks live in shared memory (8 bytes a token, for
// min(max_seqlen, T) tokens): returns cudaErrorInvalidValue when that exceeds
// the device's opt-in shared memory per block (about 20k tokens on A100, 29k
// on H100), for negative sizes or max_seqlen < 1, cudaErrorInvalidConfiguration
// for more than 2^31 - 1 sequences, else cudaGetLastError().
cudaError_t topk_select_cuda(const TopkParams& p, TopkDType dtype, cudaStream_t stream);
#endif  // ADAPTOK_WITH_CUDA

}  // namespace topk
}  // namespace adaptok
