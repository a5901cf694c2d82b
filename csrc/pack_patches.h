// Packing the patch embeddings of groups of images into one ragged batch,
// shared by the CPU (pack_patches.cpp) and CUDA (pack_patches_cuda.cu)
// kernels. Plain C++: no torch headers, so the .cu stays cheap to compile.
//
// G groups; group g holds B_g images of P_g patch tokens of C channels,
// patches[g][b, j, c] at element offset b * stride_b + j * stride_p +
// c * stride_c (any strides: the patch convolution's [B, C, h, w] output seen
// as [B, P, C] has stride_c = P and stride_p = 1). With the group's n_g
// prefix rows (prefix[g] [n_g, C] contiguous, n_g >= 0: CLS, registers, a
// distillation token only some groups carry) and its position table pos[g]
// [P_g, C] (contiguous, or absent), image b of group g is the n_g + P_g rows
// starting at row0_g + b (n_g + P_g) of out [T, C] (contiguous):
//
//   out[row0_g + b (n_g + P_g) + i]       = prefix[g][i]                 i < n_g
//   out[row0_g + b (n_g + P_g) + n_g + j] = patches[g][b, j] + pos[g][j] j < P_g
//
// row0_g = sum over g' < g of B_g' (n_g' + P_g'), T = row0_G. The sum is
// taken in fp32 and rounded once to the dtype (a plain copy without pos).
#pragma once

#include <cstdint>

namespace adaptok {
namespace pack_patches {

// One group: its patches, its position table and where its rows go.
struct PatchGroup {
  const void* patches;  // [images, tokens, C] with the element strides below
  const void* pos;  // [tokens, C] contiguous, or null
  const void* prefix;  // [prefix_rows, C] contiguous, or null when prefix_rows == 0
  int64_t prefix_rows;  // n_g
  int64_t images;  // B_g
  int64_t tokens;  // P_g
  int64_t stride_b;
  int64_t stride_p;
  int64_t stride_c;
  int64_t row0;  // first row of out the group writes
};

// What every group shares.
struct PackOutput {
  void* out;  // [total, C] contiguous
  int64_t channels;  // C
  int64_t total;  // T
};

// Whether the channel stride is not the smallest one, so that reading a row
// of patches would touch one cache line (one memory sector) per element: the
// kernels then read a tile of tokens along the token stride and transpose it.
inline bool read_transposed(const PatchGroup& g) {
  return g.stride_c != 1 && g.stride_p < g.stride_c;
}

}  // namespace pack_patches
}  // namespace adaptok

#ifdef ADAPTOK_WITH_CUDA
#include <cuda_runtime_api.h>

namespace adaptok {
namespace pack_patches {

enum class PackDType { kFloat, kHalf, kBFloat16 };

// Launcher in pack_patches_cuda.cu: writes the rows of group g (its images'
// prefix rows and patch rows) on stream, without a host sync. Rows are
// bounded by o.total, so a group that does not fit writes nothing outside
// out. Returns cudaErrorInvalidValue for negative sizes, else
// cudaGetLastError().
cudaError_t pack_patches_cuda(const PatchGroup& g, const PackOutput& o, PackDType dtype,
                              cudaStream_t stream);

}  // namespace pack_patches
}  // namespace adaptok
#endif  // ADAPTOK_WITH_CUDA
