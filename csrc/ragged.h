// Ragged-batch data movement shared by the CPU (ragged.cpp) and CUDA
// (ragged_cuda.cu) kernels. Plain C++: no torch headers, so the .cu stays cheap to
// compile.
//
// Every ragged op is a set of per-sequence row copies. A Map turns a sequence
// index b into a Segment; the CPU and CUDA kernels only know Segments, so the
// four ops share one kernel per device.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define ADAPTOK_HD __host__ __device__ __forceinline__
#else
#define ADAPTOK_HD inline
#endif

namespace adaptok {
namespace ragged {

// Rows [src_row, src_row + copy_rows) of the source go to rows
// [dst_row, dst_row + copy_rows) of the destination; destination rows
// [dst_row + copy_rows, dst_row + write_rows) receive the pad value.
struct Segment {
  int64_t src_row;
  int64_t dst_row;
  int64_t copy_rows;
  int64_t write_rows;
};

// pack: x [B, N, W] -> out [T, W]; sequence b is x[b, :len_b].
struct PackMap {
  const int32_t* cu_seqlens;
  int64_t n;
  ADAPTOK_HD Segment operator()(int64_t b) const {
    const int64_t start = cu_seqlens[b];
    const int64_t len = cu_seqlens[b + 1] - start;
    return {b * n, start, len, len};
  }
};

// unpack: values [T, W] -> out [B, L, W], rows past len_b set to the pad value.
struct UnpackMap {
  const int32_t* cu_seqlens;
  int64_t length;
  ADAPTOK_HD Segment operator()(int64_t b) const {
    const int64_t start = cu_seqlens[b];
    return {start, b * length, cu_seqlens[b + 1] - start, length};
  }
};

// cls_tokens: values [T, W] -> out [B, W], the first row of each sequence.
struct FirstMap {
  const int32_t* cu_seqlens;
  ADAPTOK_HD Segment operator()(int64_t b) const {
    return {cu_seqlens[b], b, 1, 1};
  }
};

// select_sequences: values [T, W] -> out [T_out, W], output sequence b is
// input sequence seq_idx[b]. An out-of-range index writes nothing.
struct SelectMap {
  const int32_t* cu_seqlens;
  const int64_t* seq_idx;
  const int32_t* cu_seqlens_out;
  int64_t batch;
  ADAPTOK_HD Segment operator()(int64_t b) const {
    const int64_t i = seq_idx[b];
    const int64_t dst = cu_seqlens_out[b];
    if (i < 0 || i >= batch) return {0, dst, 0, 0};
    const int64_t src = cu_seqlens[i];
    const int64_t len_in = cu_seqlens[i + 1] - src;
    const int64_t len_out = cu_seqlens_out[b + 1] - dst;
    const int64_t len = len_in < len_out ? len_in : len_out;
    return {src, dst, len, len};
  }
};

// The pad value of one element, repeated to fill 16 bytes.
struct PadBytes {
  alignas(16) unsigned char bytes[16];
};

}  // namespace ragged
}  // namespace adaptok

#if defined(__CUDACC__) || defined(ADAPTOK_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace adaptok {
namespace ragged {

// Launchers in ragged_cuda.cu. Rows are row_bytes wide; src_rows/dst_rows bound
// every access so malformed cu_seqlens cannot reach outside the tensors.
// rows_hint is the typical number of rows written per sequence (grid shape
// only; any value is correct). Each returns cudaGetLastError().
cudaError_t pack_cuda(const void* x, void* out, PackMap map, int64_t batch,
                      int64_t src_rows, int64_t dst_rows, int64_t row_bytes,
                      cudaStream_t stream);
cudaError_t unpack_cuda(const void* values, void* out, UnpackMap map,
                        int64_t batch, int64_t src_rows, int64_t dst_rows,
                        int64_t row_bytes, const PadBytes& pad,
                        cudaStream_t stream);
cudaError_t cls_tokens_cuda(const void* values, void* out, FirstMap map,
                            int64_t batch, int64_t src_rows, int64_t row_bytes,
                            cudaStream_t stream);
cudaError_t select_sequences_cuda(const void* values, void* out, SelectMap map,
                                  int64_t batch_out, int64_t src_rows,
                                  int64_t dst_rows, int64_t rows_hint,
                                  int64_t row_bytes, cudaStream_t stream);

}  // namespace ragged
}  // namespace adaptok
#endif
