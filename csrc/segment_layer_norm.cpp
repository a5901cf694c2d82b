// Segment layer norm of the adaptok extension: schema, input checks, the CPU
// kernel and (when built with CUDA) the binding of segment_layer_norm_cuda.cu.
// Semantics: segment_layer_norm.h.
//
//   ext_segment_layer_norm(x [T, C], residual [T, C]?, weight [G, C]?,
//                          bias [G, C]?, cu_seqlens [B+1], group int32 [B], eps,
//                          y [T, C], h_out [T, C]?, mean fp32 [T], rstd fp32 [T])
//
// CPU kernel: rows run in parallel; each row is gathered in fp32 (with the
// residual added), padded to a multiple of 16 and normalized on 16-float
// vectors (cpu_vec.h): a sum pass for the mean, a pass for the variance (the
// padding set to the mean, so it adds nothing), and the affine pass with the
// group's fp32 weight and bias rows, which are converted and padded once.
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu_vec.h"
#include "segment_layer_norm.h"

#ifdef ADAPTOK_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace adaptok {
namespace segment_norm {
namespace {

using OptTensor = std::optional<at::Tensor>;

// ---------------------------------------------------------------- checks

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), name, " must have the shape of x ", x.sizes(),
                    ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " must have the dtype of x (",
                   x.scalar_type(), "), got ", t.scalar_type());
  check_same_device(t, name, x, "x");
}

int64_t check_args(const at::Tensor& x, const OptTensor& residual, const OptTensor& weight,
                   const OptTensor& bias, const at::Tensor& cu, const at::Tensor& group,
                   double eps, const at::Tensor& y, const OptTensor& h_out,
                   const at::Tensor& mean, const at::Tensor& rstd) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) > 0 && x.size(1) > 0,
                    "x must have shape [T, C] with T, C >= 1, got ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                       x.scalar_type() == at::kBFloat16,
                   "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.stride(1) == 1, "x must be contiguous along C, got strides ", x.strides());
  if (residual) {
    check_rows(*residual, "residual", x);
    TORCH_CHECK_VALUE(residual->stride(1) == 1, "residual must be contiguous along C");
    TORCH_CHECK_VALUE(h_out.has_value(), "h_out is required with a residual");
  }
  if (h_out) {
    TORCH_CHECK_VALUE(residual.has_value(), "h_out is written only with a residual");
    check_rows(*h_out, "h_out", x);
    check_contiguous(*h_out, "h_out");
  }
  int64_t groups = 0;
  for (const auto& [p, name] : {std::pair{&weight, "weight"}, std::pair{&bias, "bias"}}) {
    if (!*p) continue;
    const at::Tensor& t = **p;
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) >= 1 && t.size(1) == x.size(1), name,
                      " must have shape [G, C] with C = ", x.size(1), ", got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " must have the dtype of x (",
                     x.scalar_type(), "), got ", t.scalar_type());
    check_contiguous(t, name);
    check_same_device(t, name, x, "x");
    TORCH_CHECK_VALUE(groups == 0 || groups == t.size(0),
                      "weight and bias must have the same number of groups, got ", groups,
                      " and ", t.size(0));
    groups = t.size(0);
  }
  check_cu_seqlens_meta(cu, "cu_seqlens", x, "x");
  TORCH_CHECK_TYPE(group.scalar_type() == at::kInt, "group must be int32, got ", group.scalar_type());
  TORCH_CHECK_VALUE(group.dim() == 1 && group.size(0) == cu.size(0) - 1,
                    "group must have shape [B] = [", cu.size(0) - 1, "], got ", group.sizes());
  check_contiguous(group, "group");
  check_same_device(group, "group", x, "x");
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), "eps must be finite and >= 0, got ", eps);
  check_rows(y, "y", x);
  check_contiguous(y, "y");
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, std::pair{&rstd, "rstd"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == x.size(0), name, " must have shape [T] = [",
                      x.size(0), "], got ", t->sizes());
    check_contiguous(*t, name);
    check_same_device(*t, name, x, "x");
  }
  return groups;
}

SegmentNormParams params(const at::Tensor& x, const OptTensor& residual, const OptTensor& weight,
                         const OptTensor& bias, const at::Tensor& cu, const at::Tensor& group,
                         double eps, const at::Tensor& y, const OptTensor& h_out,
                         const at::Tensor& mean, const at::Tensor& rstd, int64_t groups) {
  SegmentNormParams p;
  p.x = x.data_ptr();
  p.residual = residual ? residual->data_ptr() : nullptr;
  p.weight = weight ? weight->data_ptr() : nullptr;
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.cu_seqlens = cu.data_ptr<int32_t>();
  p.group = group.data_ptr<int32_t>();
  p.y = y.data_ptr();
  p.h_out = h_out ? h_out->data_ptr() : nullptr;
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.batch = cu.size(0) - 1;
  p.total = x.size(0);
  p.channels = x.size(1);
  p.groups = std::max<int64_t>(groups, 1);
  p.x_stride = x.stride(0);
  p.r_stride = residual ? residual->stride(0) : 0;
  p.eps = static_cast<float>(eps);
  return p;
}

// ------------------------------------------------------------ CPU kernel

// Normalizes the fp32 row h (length C, storage padded to a multiple of 16)
// into y (padded too) with the optional fp32 affine rows w and b (padded).
ADAPTOK_CPU_CLONES void normalize_row(float* h, int64_t C, float eps, const float* w,
                                      const float* b, float* y, float* mean_out,
                                      float* rstd_out) {
  const int64_t padded = round_lanes(C);
  for (int64_t c = C; c < padded; ++c) h[c] = 0.0f;
  vfloat sum{};
  for (int64_t c = 0; c < padded; c += kLanes) sum += load_lanes(h + c);
  const float mean = sum_lanes(sum) / C;
  for (int64_t c = C; c < padded; ++c) h[c] = mean;  // adds nothing to the variance
  vfloat squares{};
  for (int64_t c = 0; c < padded; c += kLanes) {
    const vfloat d = load_lanes(h + c) - mean;
    squares += d * d;
  }
  // A variance past the fp32 range (|h| >~ 1e18) would give rstd = 0 and
  // y = bias, finite and wrong: make it NaN instead, as F.layer_norm does.
  const float var = sum_lanes(squares) / C;
  const float rstd = std::isinf(var) ? std::numeric_limits<float>::quiet_NaN() : 1.0f / std::sqrt(var + eps);
  for (int64_t c = 0; c < padded; c += kLanes) {
    vfloat v = (load_lanes(h + c) - mean) * rstd;
    if (w != nullptr) v *= load_lanes(w + c);
    if (b != nullptr) v += load_lanes(b + c);
    *reinterpret_cast<vfloat*>(y + c) = v;
  }
  *mean_out = mean;
  *rstd_out = rstd;
}

// [groups, C] parameters as fp32 rows padded to `padded` floats (empty if absent).
template <typename scalar_t>
std::vector<float> padded_rows(const void* p, int64_t groups, int64_t C, int64_t padded) {
  std::vector<float> rows;
  if (p == nullptr) return rows;
  rows.assign(groups * padded, 0.0f);
  const scalar_t* src = static_cast<const scalar_t*>(p);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t c = 0; c < C; ++c) rows[g * padded + c] = static_cast<float>(src[g * C + c]);
  }
  return rows;
}

template <typename scalar_t>
void segment_layer_norm_cpu_kernel(const SegmentNormParams& p) {
  const int64_t C = p.channels, T = p.total, padded = round_lanes(C);
  const std::vector<float> w = padded_rows<scalar_t>(p.weight, p.groups, C, padded);
  const std::vector<float> b = padded_rows<scalar_t>(p.bias, p.groups, C, padded);
  const int32_t* cu = p.cu_seqlens;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const scalar_t* r = static_cast<const scalar_t*>(p.residual);
  scalar_t* y = static_cast<scalar_t*>(p.y);
  scalar_t* h_out = static_cast<scalar_t*>(p.h_out);
  // About 16 KiB of rows per task.
  const int64_t grain = std::max<int64_t>(1, 4096 / C);
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> h(padded), out(padded);
    // The sequence of row t0, then walk forward.
    int64_t seq = std::upper_bound(cu, cu + p.batch + 1, static_cast<int32_t>(t0)) - cu - 1;
    for (int64_t t = t0; t < t1; ++t) {
      while (cu[seq + 1] <= t) ++seq;
      const int64_t g = p.group[seq];
      const scalar_t* xt = x + t * p.x_stride;
      if (r != nullptr) {
        const scalar_t* rt = r + t * p.r_stride;
        for (int64_t c = 0; c < C; ++c) h[c] = static_cast<float>(xt[c]) + static_cast<float>(rt[c]);
        for (int64_t c = 0; c < C; ++c) h_out[t * C + c] = static_cast<scalar_t>(h[c]);
      } else {
        for (int64_t c = 0; c < C; ++c) h[c] = static_cast<float>(xt[c]);
      }
      normalize_row(h.data(), C, p.eps, w.empty() ? nullptr : w.data() + g * padded,
                    b.empty() ? nullptr : b.data() + g * padded, out.data(), p.mean + t, p.rstd + t);
      for (int64_t c = 0; c < C; ++c) y[t * C + c] = static_cast<scalar_t>(out[c]);
    }
  });
}

void segment_layer_norm_cpu(const at::Tensor& x, const OptTensor& residual, const OptTensor& weight,
                            const OptTensor& bias, const at::Tensor& cu, const at::Tensor& group,
                            double eps, const at::Tensor& y, const OptTensor& h_out,
                            const at::Tensor& mean, const at::Tensor& rstd) {
  const int64_t groups =
      check_args(x, residual, weight, bias, cu, group, eps, y, h_out, mean, rstd);
  check_cu_seqlens_values(cu, "cu_seqlens", x.size(0), "x.shape[0]");
  if (groups > 0) {
    const int32_t* g = group.data_ptr<int32_t>();
    for (int64_t b = 0; b < group.size(0); ++b) {
      TORCH_CHECK_VALUE(g[b] >= 0 && g[b] < groups, "group[", b, "] = ", g[b],
                        " must lie in [0, G - 1 = ", groups - 1, "]");
    }
  }
  const SegmentNormParams p =
      params(x, residual, weight, bias, cu, group, eps, y, h_out, mean, rstd, groups);
  switch (x.scalar_type()) {
    case at::kFloat:
      return segment_layer_norm_cpu_kernel<float>(p);
    case at::kHalf:
      return segment_layer_norm_cpu_kernel<at::Half>(p);
    default:
      return segment_layer_norm_cpu_kernel<at::BFloat16>(p);
  }
}

// ------------------------------------------------------------ CUDA binding

#ifdef ADAPTOK_WITH_CUDA

void segment_layer_norm_cuda_op(const at::Tensor& x, const OptTensor& residual,
                                const OptTensor& weight, const OptTensor& bias,
                                const at::Tensor& cu, const at::Tensor& group, double eps,
                                const at::Tensor& y, const OptTensor& h_out,
                                const at::Tensor& mean, const at::Tensor& rstd) {
  const int64_t groups =
      check_args(x, residual, weight, bias, cu, group, eps, y, h_out, mean, rstd);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dtype = x.scalar_type() == at::kFloat  ? NormDType::kFloat
                     : x.scalar_type() == at::kHalf ? NormDType::kHalf
                                                    : NormDType::kBFloat16;
  C10_CUDA_CHECK(segment_layer_norm_cuda(
      params(x, residual, weight, bias, cu, group, eps, y, h_out, mean, rstd, groups), dtype,
      c10::cuda::getCurrentCUDAStream()));
}

#endif  // ADAPTOK_WITH_CUDA

}  // namespace
}  // namespace segment_norm
}  // namespace adaptok

TORCH_LIBRARY_FRAGMENT(adaptok, m) {
  m.def(
      "ext_segment_layer_norm(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, "
      "Tensor cu_seqlens, Tensor group, float eps, Tensor(a!) y, Tensor(b!)? h_out, "
      "Tensor(c!) mean, Tensor(d!) rstd) -> ()");
}

TORCH_LIBRARY_IMPL(adaptok, CPU, m) {
  m.impl("ext_segment_layer_norm", &adaptok::segment_norm::segment_layer_norm_cpu);
}

#ifdef ADAPTOK_WITH_CUDA
TORCH_LIBRARY_IMPL(adaptok, CUDA, m) {
  m.impl("ext_segment_layer_norm", &adaptok::segment_norm::segment_layer_norm_cuda_op);
}
#endif
