// CF-ViT's fine-stage sequences, shared by the CPU (fine_tokens.cpp) and
// CUDA (fine_tokens_cuda.cu) kernels. Plain C++: no torch headers.
//
// B images; image b has Nc = h w coarse patches and the 2h x 2w fine grid
// (Nf = 4 Nc); coarse patch i = (r, c) covers the fine patches
// (2r + dr, 2c + dc), dr, dc in {0, 1}. K = keep patches are re-split.
//
// Plan (per image): key[i] = score[b, i], NaN read as -inf; rank[i] = #{j :
// key[j] > key[i] or (key[j] == key[i] and j < i)}; patch i is chosen when
// rank[i] < K (exactly K patches, ties to the lower index). With m = the
// chosen patches before i and u = i - m the others before it:
//
//   chosen i:  source[b, 4m + q] = child(i, q), q = 0..3 (TL, TR, BL, BR)
//   other i:   source[b, 4K + u] = Nf + i
//
// Rows (L = n + Nc + 3K rows an image in out [B, L, C]):
//
//   out[b, t]     = prefix[t]                                        t < n
//   out[b, n + s] = fine[b, f] + pos[f] + reuse[b, i(f)]   source[b, s] = f < Nf
//   out[b, n + s] = coarse[b, i]                           source[b, s] = Nf + i
//
// The sum is fp32, rounded once; pos, reuse and prefix may be absent.
// fine, coarse and reuse rows are read at element offsets b * stride_b +
// row * stride_row (unit channel stride); score [B, Nc] fp32, pos [Nf, C],
// prefix [n, C], out and source [B, Nc + 3K] int64 are contiguous.
#pragma once

#include <cstdint>

// The layout helpers run on the host and in the CUDA kernels.
#ifdef __CUDACC__
#define ADAPTOK_HD __host__ __device__
#else
#define ADAPTOK_HD
#endif

namespace adaptok {
namespace fine_tokens {

struct Rows {
  const void* data;  // null: absent
  int64_t stride_b;
  int64_t stride_row;
};

struct Problem {
  Rows fine, coarse, reuse;
  const float* score;  // [B, Nc]
  const void* pos;  // [Nf, C] or null
  const void* prefix;  // [n, C] or null when n == 0
  void* out;  // [B, L, C]
  int64_t* source;  // [B, Nc + 3K]
  int64_t images, h, w, keep, prefix_rows, channels;

  ADAPTOK_HD int64_t coarse_patches() const { return h * w; }
  ADAPTOK_HD int64_t fine_patches() const { return 4 * h * w; }
  ADAPTOK_HD int64_t placed() const { return h * w + 3 * keep; }  // rows of source an image
  ADAPTOK_HD int64_t rows() const { return prefix_rows + placed(); }  // rows of out an image
};

// The fine index of child q (0..3: TL, TR, BL, BR) of coarse patch i.
ADAPTOK_HD inline int64_t child(int64_t i, int64_t q, int64_t w) {
  return (2 * (i / w) + q / 2) * (2 * w) + 2 * (i % w) + q % 2;
}

// The coarse patch of fine patch f.
ADAPTOK_HD inline int64_t parent(int64_t f, int64_t w) {
  return (f / (2 * w)) / 2 * w + (f % (2 * w)) / 2;
}

}  // namespace fine_tokens
}  // namespace adaptok

#ifdef ADAPTOK_WITH_CUDA
#include <cuda_runtime_api.h>

namespace adaptok {
namespace fine_tokens {

enum class DType { kFloat, kHalf, kBFloat16 };

// At most this many coarse patches an image (the plan holds an image's
// scores in shared memory); the Python side keeps to MAX_KERNEL_PATCHES.
constexpr int64_t kMaxCoarsePatches = 4096;

// Launcher in fine_tokens_cuda.cu: the plan kernel (source), then the row
// kernel (out), on stream, without a host sync. Returns
// cudaErrorInvalidValue for sizes out of range, else cudaGetLastError().
cudaError_t fine_tokens_cuda(const Problem& p, DType dtype, cudaStream_t stream);

}  // namespace fine_tokens
}  // namespace adaptok
#endif  // ADAPTOK_WITH_CUDA
