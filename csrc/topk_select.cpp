// Top-k class-attention token selection with inattentive-token fusion (EViT)
// of the adaptok extension: schema, input checks, the CPU kernel and (when
// built with CUDA) the binding of topk_select_cuda.cu. Semantics: topk_select.h.
//
//   ext_topk_select(x [T, C], cu_seqlens [B+1], cls_attn fp32 [T], keep int32 [B],
//                   cu_seqlens_out [B+1], max_seqlen, fuse, renormalize,
//                   out [T_out, C], kept_index int64 [T_out])
//
// CPU kernel: sequences run in parallel. For each, a partial sort finds the k
// most attended candidates in rank order (O(N log k); the dropped tokens are
// never sorted), their rows are copied, and one walk over the candidates in
// index order accumulates the fused token in fp32 from the ones not marked
// kept, so its sum order is fixed.
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "checks.h"
#include "topk_select.h"

#ifdef ADAPTOK_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace adaptok {
namespace topk {
namespace {

// ---------------------------------------------------------------- checks

void check_args(const at::Tensor& x, const at::Tensor& cu, const at::Tensor& cls_attn,
                const at::Tensor& keep, const at::Tensor& cu_out, int64_t max_seqlen,
                const at::Tensor& out, const at::Tensor& kept_index) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must have shape [T, C], got ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                       x.scalar_type() == at::kBFloat16,
                   "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.stride(1) == 1, "x must be contiguous along C, got strides ", x.strides());
  check_cu_seqlens_meta(cu, "cu_seqlens", x, "x");
  check_cu_seqlens_meta(cu_out, "cu_seqlens_out", x, "x");
  const int64_t batch = cu.size(0) - 1;
  TORCH_CHECK_VALUE(cu_out.size(0) == cu.size(0), "cu_seqlens_out must have ", cu.size(0),
                    " entries, got ", cu_out.size(0));
  TORCH_CHECK_TYPE(cls_attn.scalar_type() == at::kFloat, "cls_attn must be float32, got ",
                   cls_attn.scalar_type());
  TORCH_CHECK_VALUE(cls_attn.dim() == 1 && cls_attn.size(0) == x.size(0),
                    "cls_attn must have shape [T] = [", x.size(0), "], got ", cls_attn.sizes());
  check_contiguous(cls_attn, "cls_attn");
  check_same_device(cls_attn, "cls_attn", x, "x");
  TORCH_CHECK_TYPE(keep.scalar_type() == at::kInt, "keep must be int32, got ", keep.scalar_type());
  TORCH_CHECK_VALUE(keep.dim() == 1 && keep.size(0) == batch, "keep must have shape [B] = [",
                    batch, "], got ", keep.sizes());
  check_contiguous(keep, "keep");
  check_same_device(keep, "keep", x, "x");
  TORCH_CHECK_VALUE(max_seqlen >= 1, "max_seqlen must be >= 1, got ", max_seqlen);
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(1) == x.size(1), "out must have shape [T_out, ",
                    x.size(1), "], got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == x.scalar_type(), "out must have the dtype of x (",
                   x.scalar_type(), "), got ", out.scalar_type());
  check_contiguous(out, "out");
  check_same_device(out, "out", x, "x");
  TORCH_CHECK_TYPE(kept_index.scalar_type() == at::kLong, "kept_index must be int64, got ",
                   kept_index.scalar_type());
  TORCH_CHECK_VALUE(kept_index.dim() == 1 && kept_index.size(0) == out.size(0),
                    "kept_index must have shape [T_out] = [", out.size(0), "], got ",
                    kept_index.sizes());
  check_contiguous(kept_index, "kept_index");
  check_same_device(kept_index, "kept_index", x, "x");
}

// Offsets, lengths and keep counts of CPU tensors, and the output layout they
// imply (topk_select.h), before any row is touched.
void check_values_cpu(const at::Tensor& cu, const at::Tensor& keep, const at::Tensor& cu_out,
                      int64_t total, int64_t total_out, int64_t max_seqlen, bool fuse) {
  check_cu_seqlens_values(cu, "cu_seqlens", total, "x.shape[0]");
  check_cu_seqlens_values(cu_out, "cu_seqlens_out", total_out, "out.shape[0]");
  const int32_t* c = cu.data_ptr<int32_t>();
  const int32_t* co = cu_out.data_ptr<int32_t>();
  const int32_t* k = keep.data_ptr<int32_t>();
  for (int64_t b = 0; b + 1 < cu.size(0); ++b) {
    const int64_t n = c[b + 1] - c[b];
    TORCH_CHECK_VALUE(n <= max_seqlen, "cu_seqlens holds a sequence of ", n,
                      " tokens, more than max_seqlen = ", max_seqlen);
    TORCH_CHECK_VALUE(k[b] >= 0 && k[b] <= n - 1, "keep[", b, "] = ", k[b],
                      " must lie in [0, N_b - 1 = ", n - 1, "] for sequence ", b, " of ", n,
                      " tokens");
    const int64_t expected = k[b] == n - 1 ? n : 1 + k[b] + (fuse ? 1 : 0);
    TORCH_CHECK_VALUE(co[b + 1] - co[b] == expected, "cu_seqlens_out gives sequence ", b, " ",
                      co[b + 1] - co[b], " tokens; with ", n, " tokens and keep ", k[b],
                      " it has ", expected);
  }
}

TopkParams params(const at::Tensor& x, const at::Tensor& cu, const at::Tensor& cls_attn,
                  const at::Tensor& keep, const at::Tensor& cu_out, int64_t max_seqlen,
                  bool fuse, bool renormalize, const at::Tensor& out,
                  const at::Tensor& kept_index) {
  TopkParams p;
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.kept_index = kept_index.data_ptr<int64_t>();
  p.cls_attn = cls_attn.data_ptr<float>();
  p.cu_seqlens = cu.data_ptr<int32_t>();
  p.cu_seqlens_out = cu_out.data_ptr<int32_t>();
  p.keep = keep.data_ptr<int32_t>();
  p.batch = cu.size(0) - 1;
  p.total = x.size(0);
  p.total_out = out.size(0);
  p.channels = x.size(1);
  p.x_stride = x.stride(0);
  p.max_seqlen = max_seqlen;
  p.fuse = fuse;
  p.renormalize = renormalize;
  return p;
}

// ------------------------------------------------------------ CPU kernel

// Per-thread scratch.
struct Scratch {
  std::vector<int32_t> order;  // candidates 1 .. n-1, the first k in rank order
  std::vector<uint8_t> kept;  // [n]: candidate j is kept
  std::vector<float> acc;  // [C]: the fused token in fp32
};

template <typename scalar_t>
void select_sequence(const TopkParams& p, int64_t b, Scratch& w) {
  const int64_t C = p.channels;
  const int64_t s = p.cu_seqlens[b];
  const int64_t n = p.cu_seqlens[b + 1] - s;
  const int64_t o = p.cu_seqlens_out[b];
  const int64_t k = p.keep[b];
  const scalar_t* x = static_cast<const scalar_t*>(p.x) + s * p.x_stride;
  scalar_t* out = static_cast<scalar_t*>(p.out) + o * C;
  int64_t* kept_index = p.kept_index + o;
  const size_t row_bytes = C * sizeof(scalar_t);
  const auto copy_row = [&](int64_t dst, int64_t src) {
    std::memcpy(out + dst * C, x + src * p.x_stride, row_bytes);
    kept_index[dst] = s + src;
  };

  if (k == n - 1) {  // nothing dropped: unchanged, in order
    for (int64_t i = 0; i < n; ++i) copy_row(i, i);
    return;
  }
  const float* a = p.cls_attn + s;
  w.order.resize(n - 1);
  std::iota(w.order.begin(), w.order.end(), 1);
  // Descending score, equal scores (and -0 == +0) by lower index; NaN ranks
  // first, as in a descending torch.sort and the GPU kernels.
  std::partial_sort(w.order.begin(), w.order.begin() + k, w.order.end(), [a](int32_t i, int32_t j) {
    const bool nan_i = std::isnan(a[i]), nan_j = std::isnan(a[j]);
    if (nan_i != nan_j) return nan_i;
    if (!nan_i && a[i] != a[j]) return a[i] > a[j];
    return i < j;
  });
  copy_row(0, 0);
  w.kept.assign(n, 0);
  for (int64_t r = 0; r < k; ++r) {
    copy_row(1 + r, w.order[r]);
    w.kept[w.order[r]] = 1;
  }
  if (!p.fuse) return;

  w.acc.assign(C, 0.0f);
  float* acc = w.acc.data();
  float weights = 0.0f;
  for (int64_t j = 1; j < n; ++j) {
    if (w.kept[j]) continue;
    const float aj = a[j];
    const scalar_t* xj = x + j * p.x_stride;
    weights += aj;
    for (int64_t c = 0; c < C; ++c) acc[c] += aj * static_cast<float>(xj[c]);
  }
  // Renormalized: divided by the weight sum; a sum that is not positive
  // (zero, negative or NaN) gives a zero token.
  scalar_t* fused = out + (1 + k) * C;
  for (int64_t c = 0; c < C; ++c) {
    const float v = !p.renormalize ? acc[c] : weights > 0.0f ? acc[c] / weights : 0.0f;
    fused[c] = static_cast<scalar_t>(v);
  }
  kept_index[1 + k] = -1;
}

template <typename scalar_t>
void topk_select_cpu_kernel(const TopkParams& p) {
  at::parallel_for(0, p.batch, 1, [&](int64_t b0, int64_t b1) {
    Scratch w;
    for (int64_t b = b0; b < b1; ++b) select_sequence<scalar_t>(p, b, w);
  });
}

void topk_select_cpu(const at::Tensor& x, const at::Tensor& cu, const at::Tensor& cls_attn,
                     const at::Tensor& keep, const at::Tensor& cu_out, int64_t max_seqlen,
                     bool fuse, bool renormalize, const at::Tensor& out,
                     const at::Tensor& kept_index) {
  check_args(x, cu, cls_attn, keep, cu_out, max_seqlen, out, kept_index);
  check_values_cpu(cu, keep, cu_out, x.size(0), out.size(0), max_seqlen, fuse);
  const TopkParams p =
      params(x, cu, cls_attn, keep, cu_out, max_seqlen, fuse, renormalize, out, kept_index);
  switch (x.scalar_type()) {
    case at::kFloat:
      return topk_select_cpu_kernel<float>(p);
    case at::kHalf:
      return topk_select_cpu_kernel<at::Half>(p);
    default:
      return topk_select_cpu_kernel<at::BFloat16>(p);
  }
}

// ------------------------------------------------------------ CUDA binding

#ifdef ADAPTOK_WITH_CUDA

void topk_select_cuda_op(const at::Tensor& x, const at::Tensor& cu, const at::Tensor& cls_attn,
                         const at::Tensor& keep, const at::Tensor& cu_out, int64_t max_seqlen,
                         bool fuse, bool renormalize, const at::Tensor& out,
                         const at::Tensor& kept_index) {
  check_args(x, cu, cls_attn, keep, cu_out, max_seqlen, out, kept_index);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dtype = x.scalar_type() == at::kFloat  ? TopkDType::kFloat
                     : x.scalar_type() == at::kHalf ? TopkDType::kHalf
                                                    : TopkDType::kBFloat16;
  C10_CUDA_CHECK(topk_select_cuda(
      params(x, cu, cls_attn, keep, cu_out, max_seqlen, fuse, renormalize, out, kept_index),
      dtype, c10::cuda::getCurrentCUDAStream()));
}

#endif  // ADAPTOK_WITH_CUDA

}  // namespace
}  // namespace topk
}  // namespace adaptok

TORCH_LIBRARY_FRAGMENT(adaptok, m) {
  m.def(
      "ext_topk_select(Tensor x, Tensor cu_seqlens, Tensor cls_attn, Tensor keep, "
      "Tensor cu_seqlens_out, int max_seqlen, bool fuse, bool renormalize, "
      "Tensor(a!) out, Tensor(b!) kept_index) -> ()");
}

TORCH_LIBRARY_IMPL(adaptok, CPU, m) {
  m.impl("ext_topk_select", &adaptok::topk::topk_select_cpu);
}

#ifdef ADAPTOK_WITH_CUDA
TORCH_LIBRARY_IMPL(adaptok, CUDA, m) {
  m.impl("ext_topk_select", &adaptok::topk::topk_select_cuda_op);
}
#endif
