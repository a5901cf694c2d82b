// CUDA kernels for the ragged-batch ops: one segment-copy kernel, templated on
// the vector width and on the op's Map (see ragged.h). Kernels and launchers
// only; the torch bindings live in ragged.cpp.
#include <algorithm>
#include <cstring>

#include "ragged.h"

namespace adaptok {
namespace ragged {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 4;  // rows one warp copies per grid-y block

// Grid: x = sequence, y = blocks of rows (grid-stride, so any y is correct).
// One warp copies one row at a time with vector loads; rows are short
// (a ViT token is 0.75-3 KiB), so a row per warp keeps every lane busy.
template <typename V, typename Map>
__global__ void __launch_bounds__(kThreads)
    copy_segments_kernel(const V* __restrict__ src, V* __restrict__ dst,
                         Map map, int64_t row_vecs, int64_t src_rows,
                         int64_t dst_rows, V pad) {
  const Segment seg = map(blockIdx.x);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  // Clamp to the destination so malformed offsets stay in bounds and finite.
  const int64_t first = seg.dst_row < 0 ? -seg.dst_row : 0;
  const int64_t last = min(seg.write_rows, dst_rows - seg.dst_row);
  const int64_t stride = static_cast<int64_t>(gridDim.y) * kWarps;
  for (int64_t r = first + static_cast<int64_t>(blockIdx.y) * kWarps + warp;
       r < last; r += stride) {
    const int64_t s = seg.src_row + r;
    const bool copy = r < seg.copy_rows && s >= 0 && s < src_rows;
    V* drow = dst + (seg.dst_row + r) * row_vecs;
    if (copy) {
      const V* srow = src + s * row_vecs;
      for (int64_t c = lane; c < row_vecs; c += 32) drow[c] = srow[c];
    } else {
      for (int64_t c = lane; c < row_vecs; c += 32) drow[c] = pad;
    }
  }
}

template <typename V, typename Map>
cudaError_t launch_width(const void* src, void* dst, Map map, int64_t nseq,
                         int64_t rows_hint, int64_t row_bytes,
                         int64_t src_rows, int64_t dst_rows,
                         const PadBytes& pad, cudaStream_t stream) {
  V pad_v;
  std::memcpy(&pad_v, pad.bytes, sizeof(V));
  const int64_t blocks_y = (rows_hint + kWarps * kRowsPerWarp - 1) /
                           (kWarps * kRowsPerWarp);
  const dim3 grid(static_cast<unsigned>(nseq),
                  static_cast<unsigned>(std::min<int64_t>(
                      std::max<int64_t>(blocks_y, 1), 65535)));
  copy_segments_kernel<V, Map><<<grid, kThreads, 0, stream>>>(
      static_cast<const V*>(src), static_cast<V*>(dst), map,
      row_bytes / static_cast<int64_t>(sizeof(V)), src_rows, dst_rows, pad_v);
  return cudaGetLastError();
}

// Widest vector that divides the row and both base addresses. Element sizes
// are powers of two up to 16 bytes, so the pad pattern stays element-aligned.
template <typename Map>
cudaError_t launch(const void* src, void* dst, Map map, int64_t nseq,
                   int64_t rows_hint, int64_t row_bytes, int64_t src_rows,
                   int64_t dst_rows, const PadBytes& pad, cudaStream_t stream) {
  if (nseq == 0 || row_bytes == 0 || dst_rows == 0) return cudaSuccess;
  const uint64_t align = reinterpret_cast<uintptr_t>(src) |
                         reinterpret_cast<uintptr_t>(dst) |
                         static_cast<uint64_t>(row_bytes);
  if (align % 16 == 0)
    return launch_width<uint4>(src, dst, map, nseq, rows_hint, row_bytes,
                               src_rows, dst_rows, pad, stream);
  if (align % 8 == 0)
    return launch_width<uint2>(src, dst, map, nseq, rows_hint, row_bytes,
                               src_rows, dst_rows, pad, stream);
  if (align % 4 == 0)
    return launch_width<uint32_t>(src, dst, map, nseq, rows_hint, row_bytes,
                                  src_rows, dst_rows, pad, stream);
  if (align % 2 == 0)
    return launch_width<uint16_t>(src, dst, map, nseq, rows_hint, row_bytes,
                                  src_rows, dst_rows, pad, stream);
  return launch_width<uint8_t>(src, dst, map, nseq, rows_hint, row_bytes,
                               src_rows, dst_rows, pad, stream);
}

const PadBytes kNoPad = {};

}  // namespace

cudaError_t pack_cuda(const void* x, void* out, PackMap map, int64_t batch,
                      int64_t src_rows, int64_t dst_rows, int64_t row_bytes,
                      cudaStream_t stream) {
  return launch(x, out, map, batch, map.n, row_bytes, src_rows, dst_rows,
                kNoPad, stream);
}

cudaError_t unpack_cuda(const void* values, void* out, UnpackMap map,
                        int64_t batch, int64_t src_rows, int64_t dst_rows,
                        int64_t row_bytes, const PadBytes& pad,
                        cudaStream_t stream) {
  return launch(values, out, map, batch, map.length, row_bytes, src_rows,
                dst_rows, pad, stream);
}

cudaError_t cls_tokens_cuda(const void* values, void* out, FirstMap map,
                            int64_t batch, int64_t src_rows, int64_t row_bytes,
                            cudaStream_t stream) {
  return launch(values, out, map, batch, 1, row_bytes, src_rows, batch,
                kNoPad, stream);
}

cudaError_t select_sequences_cuda(const void* values, void* out, SelectMap map,
                                  int64_t batch_out, int64_t src_rows,
                                  int64_t dst_rows, int64_t rows_hint,
                                  int64_t row_bytes, cudaStream_t stream) {
  return launch(values, out, map, batch_out, rows_hint, row_bytes, src_rows,
                dst_rows, kNoPad, stream);
}

}  // namespace ragged
}  // namespace adaptok
