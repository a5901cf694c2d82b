// CUDA kernel of patch packing (see pack_patches.h for the contract). Kernel
// and launcher only; the torch bindings live in pack_patches.cpp.
//
// One launch per group. Grid: x = tiles of kTile rows of an image (its n
// prefix rows, then its P patch rows), y = tiles of kTile channels, z =
// images (grid-strided). Block: kTile x kPasses threads, each thread writing
// kTile / kPasses rows of its channel, so every store to out is coalesced.
//   Unit (or small) channel stride: the patch element is loaded by the
//     thread that stores it, also coalesced.
//   Channel stride the larger one (the [B, C, h, w] output of the patch
//     convolution seen as [B, P, C]): loading with lanes along the channels
//     would touch one sector per element. The tile is loaded with lanes
//     along the tokens instead into shared memory, transposed there, and
//     stored with lanes along the channels; pos (contiguous along C) is added
//     on the way out.
// The sum is fp32 (one add, nothing to contract) rounded once to the dtype;
// prefix rows are copied as they are.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>

#include "cuda_dtype.cuh"
#include "pack_patches.h"

namespace adaptok {
namespace pack_patches {
namespace {

constexpr int kTile = 32;  // rows and channels of a tile; one warp spans its width
constexpr int kPasses = 8;  // warps a block
constexpr int64_t kMaxImageBlocks = 65535;  // grid z limit

template <typename T, bool kTransposed>
__global__ void __launch_bounds__(kTile * kPasses)
    pack_patches_kernel(const PatchGroup g, const PackOutput o) {
  // One float of padding a row keeps both the column-wise stores and the
  // row-wise loads free of bank conflicts.
  __shared__ float tile[kTransposed ? kTile : 1][kTile + 1];
  const T* __restrict__ patches = static_cast<const T*>(g.patches);
  const T* __restrict__ pos = static_cast<const T*>(g.pos);
  const T* __restrict__ prefix = static_cast<const T*>(g.prefix);
  T* __restrict__ out = static_cast<T*>(o.out);
  const int64_t n = g.prefix_rows, C = o.channels;
  const int64_t rows = n + g.tokens;  // of one image
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  const int64_t c = c0 + tx;  // this thread's channel when storing
  for (int64_t b = blockIdx.z; b < g.images; b += gridDim.z) {
    const T* x = patches + b * g.stride_b;
    if constexpr (kTransposed) {
      // Lanes along the tokens: row r0 + tx of channel c0 + i.
      const int64_t j = r0 + tx - n;
      const bool token = j >= 0 && j < g.tokens;
      for (int i = ty; i < kTile; i += kPasses) {
        const int64_t ci = c0 + i;
        tile[i][tx] = token && ci < C ? Elt<T>::to_f(x[j * g.stride_p + ci * g.stride_c]) : 0.0f;
      }
      __syncthreads();
    }
    const int64_t image_row = g.row0 + b * rows;
    for (int i = ty; i < kTile; i += kPasses) {
      const int64_t r = r0 + i;
      const int64_t dst = image_row + r;
      if (r >= rows || c >= C || dst >= o.total) continue;
      if (r < n) {
        out[dst * C + c] = prefix[r * C + c];
        continue;
      }
      const int64_t j = r - n;
      float v;
      if constexpr (kTransposed) {
        v = tile[tx][i];
      } else {
        v = Elt<T>::to_f(x[j * g.stride_p + c * g.stride_c]);
      }
      if (pos != nullptr) v += Elt<T>::to_f(pos[j * C + c]);
      out[dst * C + c] = Elt<T>::from_f(v);
    }
    if constexpr (kTransposed) __syncthreads();  // the next image refills the tile
  }
}

template <typename T>
cudaError_t launch(const PatchGroup& g, const PackOutput& o, cudaStream_t stream) {
  const int64_t row_tiles = (g.prefix_rows + g.tokens + kTile - 1) / kTile;
  const int64_t channel_tiles = (o.channels + kTile - 1) / kTile;
  if (row_tiles > INT_MAX || channel_tiles > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(channel_tiles),
                  static_cast<unsigned>(g.images < kMaxImageBlocks ? g.images : kMaxImageBlocks));
  const dim3 block(kTile, kPasses);
  if (read_transposed(g)) {
    pack_patches_kernel<T, true><<<grid, block, 0, stream>>>(g, o);
  } else {
    pack_patches_kernel<T, false><<<grid, block, 0, stream>>>(g, o);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t pack_patches_cuda(const PatchGroup& g, const PackOutput& o, PackDType dtype,
                              cudaStream_t stream) {
  if (g.images < 0 || g.tokens < 0 || g.row0 < 0 || g.prefix_rows < 0 || o.channels < 0 ||
      o.total < 0)
    return cudaErrorInvalidValue;
  if (g.images == 0 || o.channels == 0 || g.prefix_rows + g.tokens == 0) return cudaSuccess;
  switch (dtype) {
    case PackDType::kFloat:
      return launch<float>(g, o, stream);
    case PackDType::kHalf:
      return launch<__half>(g, o, stream);
    case PackDType::kBFloat16:
      return launch<__nv_bfloat16>(g, o, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pack_patches
}  // namespace adaptok
