// Ragged-batch ops of the adaptok extension: schemas, input checks, the CPU
// kernels, and (when built with CUDA) the CUDA bindings of ragged_cuda.cu.
//
// The ops write into a caller-allocated `out` so that allocation (and NaN
// poisoning in tests) stays in one place, the Python op layer. Shapes:
//   ext_pack(x [B, N, *F], cu_seqlens [B+1], out [T, *F])
//   ext_unpack(values [T, *F], cu_seqlens [B+1], pad_value, out [B, L, *F])
//   ext_cls_tokens(values [T, *F], cu_seqlens [B+1], out [B, *F])
//   ext_select_sequences(values [T, *F], cu_seqlens [B+1], seq_idx [B'],
//                        cu_seqlens_out [B'+1], out [T', *F])
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "checks.h"
#include "ragged.h"

#ifdef ADAPTOK_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace adaptok {
namespace ragged {
namespace {

// ---------------------------------------------------------------- checks

void check_rows(const at::Tensor& t, const char* name, int64_t row_dims,
                const at::Tensor& out) {
  TORCH_CHECK_VALUE(t.dim() >= row_dims, name, " must have at least ",
                    row_dims, " dims, got shape ", t.sizes());
  check_contiguous(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == out.scalar_type(), "out must have the dtype of ",
                   name, " (", t.scalar_type(), "), got ", out.scalar_type());
  check_same_device(out, "out", t, name);
  check_contiguous(out, "out");
}

// out's trailing (feature) dims must equal t's after their row dims.
void check_features(const at::Tensor& t, const char* name, int64_t t_row_dims,
                    const at::Tensor& out, int64_t out_row_dims) {
  TORCH_CHECK_VALUE(
      out.dim() - out_row_dims == t.dim() - t_row_dims &&
          out.sizes().slice(out_row_dims) == t.sizes().slice(t_row_dims),
      "out must have the feature dims of ", name, " ",
      t.sizes().slice(t_row_dims), ", got shape ", out.sizes());
}

void check_max_len(const at::Tensor& cu, int64_t limit, const char* what) {
  const int32_t* c = cu.data_ptr<int32_t>();
  for (int64_t b = 0; b + 1 < cu.size(0); ++b) {
    TORCH_CHECK_VALUE(c[b + 1] - c[b] <= limit, "sequence ", b, " of cu_seqlens has ",
                      c[b + 1] - c[b], " tokens, more than ", what, " = ", limit);
  }
}

void check_pack(const at::Tensor& x, const at::Tensor& cu, const at::Tensor& out) {
  check_rows(x, "x", 2, out);
  check_cu_seqlens_meta(cu, "cu_seqlens", x, "x");
  TORCH_CHECK_VALUE(cu.size(0) - 1 == x.size(0), "cu_seqlens must have B + 1 = ",
                    x.size(0) + 1, " entries for x of shape ", x.sizes(), ", got ",
                    cu.size(0));
  TORCH_CHECK_VALUE(out.dim() >= 1, "out must have at least 1 dim");
  check_features(x, "x", 2, out, 1);
  if (x.is_cpu()) {
    check_cu_seqlens_values(cu, "cu_seqlens", out.size(0), "out.shape[0] (the total token count)");
    check_max_len(cu, x.size(1), "x.shape[1]");
  }
}

void check_unpack(const at::Tensor& values, const at::Tensor& cu,
                  const at::Tensor& out) {
  check_rows(values, "values", 1, out);
  check_cu_seqlens_meta(cu, "cu_seqlens", values, "values");
  TORCH_CHECK_VALUE(out.dim() >= 2 && out.size(0) == cu.size(0) - 1,
                    "out must have shape [B, L, ...] with B = ", cu.size(0) - 1,
                    ", got ", out.sizes());
  check_features(values, "values", 1, out, 2);
  if (values.is_cpu()) {
    check_cu_seqlens_values(cu, "cu_seqlens", values.size(0), "values.shape[0]");
    check_max_len(cu, out.size(1), "out.shape[1] (the padded length)");
  }
}

void check_cls_tokens(const at::Tensor& values, const at::Tensor& cu,
                      const at::Tensor& out) {
  check_rows(values, "values", 1, out);
  check_cu_seqlens_meta(cu, "cu_seqlens", values, "values");
  TORCH_CHECK_VALUE(out.dim() >= 1 && out.size(0) == cu.size(0) - 1,
                    "out must have B = ", cu.size(0) - 1, " rows, got shape ",
                    out.sizes());
  check_features(values, "values", 1, out, 1);
  if (values.is_cpu()) {
    check_cu_seqlens_values(cu, "cu_seqlens", values.size(0), "values.shape[0]");
  }
}

void check_select(const at::Tensor& values, const at::Tensor& cu,
                  const at::Tensor& seq_idx, const at::Tensor& cu_out,
                  const at::Tensor& out) {
  check_rows(values, "values", 1, out);
  check_cu_seqlens_meta(cu, "cu_seqlens", values, "values");
  check_cu_seqlens_meta(cu_out, "cu_seqlens_out", values, "values");
  TORCH_CHECK_TYPE(seq_idx.scalar_type() == at::kLong, "seq_idx must be int64, got ",
                   seq_idx.scalar_type());
  TORCH_CHECK_VALUE(seq_idx.dim() == 1 && seq_idx.size(0) == cu_out.size(0) - 1,
                    "seq_idx must be 1-D with one entry per output sequence (",
                    cu_out.size(0) - 1, "), got shape ", seq_idx.sizes());
  check_contiguous(seq_idx, "seq_idx");
  check_same_device(seq_idx, "seq_idx", values, "values");
  TORCH_CHECK_VALUE(out.dim() >= 1, "out must have at least 1 dim");
  check_features(values, "values", 1, out, 1);
  if (values.is_cpu()) {
    check_cu_seqlens_values(cu, "cu_seqlens", values.size(0), "values.shape[0]");
    check_cu_seqlens_values(cu_out, "cu_seqlens_out", out.size(0), "out.shape[0] (total_out)");
    const int64_t batch = cu.size(0) - 1;
    const int64_t* idx = seq_idx.data_ptr<int64_t>();
    const int32_t* c = cu.data_ptr<int32_t>();
    const int32_t* co = cu_out.data_ptr<int32_t>();
    for (int64_t b = 0; b < seq_idx.size(0); ++b) {
      TORCH_CHECK_VALUE(idx[b] >= 0 && idx[b] < batch, "seq_idx[", b, "] = ", idx[b],
                        " is out of range for a batch of ", batch, " sequences");
      TORCH_CHECK_VALUE(co[b + 1] - co[b] == c[idx[b] + 1] - c[idx[b]],
                        "cu_seqlens_out gives output sequence ", b, " ",
                        co[b + 1] - co[b], " tokens, but input sequence ", idx[b],
                        " has ", c[idx[b] + 1] - c[idx[b]]);
    }
  }
}

// ------------------------------------------------------------ CPU kernels

// Copies each sequence's rows with memcpy; sequences run in parallel.
// pad_row (row_bytes bytes) fills rows past copy_rows.
template <typename Map>
void copy_segments_cpu(const at::Tensor& src, const at::Tensor& dst, Map map,
                       int64_t nseq, int64_t rows_hint, int64_t rbytes,
                       const char* pad_row) {
  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  // About 64 KiB per task: below that, threading costs more than it gains.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, rows_hint * rbytes));
  at::parallel_for(0, nseq, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const Segment g = map(b);
      if (g.copy_rows > 0) {
        std::memcpy(d + g.dst_row * rbytes, s + g.src_row * rbytes, g.copy_rows * rbytes);
      }
      for (int64_t r = g.copy_rows; r < g.write_rows; ++r) {
        std::memcpy(d + (g.dst_row + r) * rbytes, pad_row, rbytes);
      }
    }
  });
}

void pack_cpu(const at::Tensor& x, const at::Tensor& cu, const at::Tensor& out) {
  check_pack(x, cu, out);
  const int64_t n = x.size(1);
  copy_segments_cpu(x, out, PackMap{cu.data_ptr<int32_t>(), n}, x.size(0), n,
                    row_bytes(x, 2), nullptr);
}

void unpack_cpu(const at::Tensor& values, const at::Tensor& cu,
                const at::Scalar& pad_value, const at::Tensor& out) {
  check_unpack(values, cu, out);
  const int64_t length = out.size(1);
  const at::Tensor pad_row =
      at::full(out.sizes().slice(2), pad_value, out.options());
  copy_segments_cpu(values, out, UnpackMap{cu.data_ptr<int32_t>(), length},
                    out.size(0), length, row_bytes(values, 1),
                    static_cast<const char*>(pad_row.data_ptr()));
}

void cls_tokens_cpu(const at::Tensor& values, const at::Tensor& cu,
                    const at::Tensor& out) {
  check_cls_tokens(values, cu, out);
  copy_segments_cpu(values, out, FirstMap{cu.data_ptr<int32_t>()}, out.size(0), 1,
                    row_bytes(values, 1), nullptr);
}

void select_sequences_cpu(const at::Tensor& values, const at::Tensor& cu,
                          const at::Tensor& seq_idx, const at::Tensor& cu_out,
                          const at::Tensor& out) {
  check_select(values, cu, seq_idx, cu_out, out);
  const int64_t batch_out = seq_idx.size(0);
  const SelectMap map{cu.data_ptr<int32_t>(), seq_idx.data_ptr<int64_t>(),
                      cu_out.data_ptr<int32_t>(), cu.size(0) - 1};
  copy_segments_cpu(values, out, map, batch_out, out.size(0) / batch_out,
                    row_bytes(values, 1), nullptr);
}

// ------------------------------------------------------------ CUDA bindings

#ifdef ADAPTOK_WITH_CUDA

PadBytes pad_bytes(const at::Scalar& pad_value, const at::Tensor& like) {
  PadBytes pad{};
  const int64_t elem = like.element_size();
  TORCH_CHECK(elem > 0 && 16 % elem == 0, "unsupported element size ", elem);
  const at::Tensor p = at::full({16 / elem}, pad_value,
                                like.options().device(at::kCPU));
  std::memcpy(pad.bytes, p.data_ptr(), 16);
  return pad;
}

void pack_cuda_op(const at::Tensor& x, const at::Tensor& cu, const at::Tensor& out) {
  check_pack(x, cu, out);
  const c10::cuda::CUDAGuard guard(x.device());
  C10_CUDA_CHECK(pack_cuda(x.data_ptr(), out.data_ptr(),
                           PackMap{cu.data_ptr<int32_t>(), x.size(1)}, x.size(0),
                           x.size(0) * x.size(1), out.size(0), row_bytes(x, 2),
                           c10::cuda::getCurrentCUDAStream()));
}

void unpack_cuda_op(const at::Tensor& values, const at::Tensor& cu,
                    const at::Scalar& pad_value, const at::Tensor& out) {
  check_unpack(values, cu, out);
  const c10::cuda::CUDAGuard guard(values.device());
  C10_CUDA_CHECK(unpack_cuda(values.data_ptr(), out.data_ptr(),
                             UnpackMap{cu.data_ptr<int32_t>(), out.size(1)},
                             out.size(0), values.size(0), out.size(0) * out.size(1),
                             row_bytes(values, 1), pad_bytes(pad_value, out),
                             c10::cuda::getCurrentCUDAStream()));
}

void cls_tokens_cuda_op(const at::Tensor& values, const at::Tensor& cu,
                        const at::Tensor& out) {
  check_cls_tokens(values, cu, out);
  const c10::cuda::CUDAGuard guard(values.device());
  C10_CUDA_CHECK(cls_tokens_cuda(values.data_ptr(), out.data_ptr(),
                                 FirstMap{cu.data_ptr<int32_t>()}, out.size(0),
                                 values.size(0), row_bytes(values, 1),
                                 c10::cuda::getCurrentCUDAStream()));
}

void select_sequences_cuda_op(const at::Tensor& values, const at::Tensor& cu,
                              const at::Tensor& seq_idx, const at::Tensor& cu_out,
                              const at::Tensor& out) {
  check_select(values, cu, seq_idx, cu_out, out);
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t batch_out = seq_idx.size(0);
  const SelectMap map{cu.data_ptr<int32_t>(), seq_idx.data_ptr<int64_t>(),
                      cu_out.data_ptr<int32_t>(), cu.size(0) - 1};
  C10_CUDA_CHECK(select_sequences_cuda(values.data_ptr(), out.data_ptr(), map,
                                       batch_out, values.size(0), out.size(0),
                                       out.size(0) / batch_out, row_bytes(values, 1),
                                       c10::cuda::getCurrentCUDAStream()));
}

#endif  // ADAPTOK_WITH_CUDA

}  // namespace
}  // namespace ragged
}  // namespace adaptok

TORCH_LIBRARY_FRAGMENT(adaptok, m) {
  m.def("ext_pack(Tensor x, Tensor cu_seqlens, Tensor(a!) out) -> ()");
  m.def("ext_unpack(Tensor values, Tensor cu_seqlens, Scalar pad_value, Tensor(a!) out) -> ()");
  m.def("ext_cls_tokens(Tensor values, Tensor cu_seqlens, Tensor(a!) out) -> ()");
  m.def(
      "ext_select_sequences(Tensor values, Tensor cu_seqlens, Tensor seq_idx, "
      "Tensor cu_seqlens_out, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(adaptok, CPU, m) {
  m.impl("ext_pack", &adaptok::ragged::pack_cpu);
  m.impl("ext_unpack", &adaptok::ragged::unpack_cpu);
  m.impl("ext_cls_tokens", &adaptok::ragged::cls_tokens_cpu);
  m.impl("ext_select_sequences", &adaptok::ragged::select_sequences_cpu);
}

#ifdef ADAPTOK_WITH_CUDA
TORCH_LIBRARY_IMPL(adaptok, CUDA, m) {
  m.impl("ext_pack", &adaptok::ragged::pack_cuda_op);
  m.impl("ext_unpack", &adaptok::ragged::unpack_cuda_op);
  m.impl("ext_cls_tokens", &adaptok::ragged::cls_tokens_cuda_op);
  m.impl("ext_select_sequences", &adaptok::ragged::select_sequences_cuda_op);
}
#endif
