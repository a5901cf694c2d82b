// CF-ViT's fine-stage sequences in the adaptok extension: schema, input
// checks, the CPU kernel and (when built with CUDA) the binding of
// fine_tokens_cuda.cu. Semantics: fine_tokens.h.
//
//   ext_fine_tokens(fine [B, 4Nc, C], coarse [B, Nc, C], score [B, Nc] fp32,
//                   keep, h, w, pos [4Nc, C]?, prefix [n, C]?,
//                   reuse [B, Nc, C]?, out [B, n + Nc + 3 keep, C],
//                   source [B, Nc + 3 keep] int64)
//
// CPU kernel: the plan of each image (a stable sort of its Nc scores,
// O(Nc log Nc)), images in parallel, writes source; then the rows, in
// parallel over blocks of rows, each read from where source says (one fp32
// sum for a fine row, a copy for a coarse or prefix row).
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu_convert.h"
#include "cpu_vec.h"
#include "fine_tokens.h"

#ifdef ADAPTOK_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace adaptok {
namespace fine_tokens {
namespace {

using OptTensor = std::optional<at::Tensor>;

// ---------------------------------------------------------------- checks

// A [B, rows, C] operand read by rows: unit channel stride, in the dtype and
// on the device of coarse.
void check_rows(const at::Tensor& t, const char* name, int64_t B, int64_t rows, int64_t C,
                const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == B && t.size(1) == rows && t.size(2) == C, name,
                    " must have shape [", B, ", ", rows, ", ", C, "], got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of coarse (",
                   ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.stride(2) == 1 || C == 1, name, " must have unit channel stride, got strides ",
                    t.strides());
  check_same_device(t, name, ref, "coarse");
}

void check_table(const at::Tensor& t, const char* name, int64_t rows, int64_t C, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.dim() == 2 && (rows < 0 || t.size(0) == rows) && t.size(1) == C, name,
                    " must have shape [", rows < 0 ? std::string("n") : std::to_string(rows), ", ", C,
                    "], got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of coarse (",
                   ref.scalar_type(), "), got ", t.scalar_type());
  check_contiguous(t, name);
  check_same_device(t, name, ref, "coarse");
}

Rows rows_of(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1)};
}

// Checks every argument before any work; returns the problem.
Problem check_args(const at::Tensor& fine, const at::Tensor& coarse, const at::Tensor& score, int64_t keep,
                   int64_t h, int64_t w, const OptTensor& pos,
                   const OptTensor& prefix, const OptTensor& reuse,
                   const at::Tensor& out, const at::Tensor& source) {
  TORCH_CHECK_VALUE(coarse.dim() == 3 && coarse.size(0) >= 1 && coarse.size(1) >= 1 && coarse.size(2) >= 1,
                    "coarse must have shape [B, Nc, C] with every size >= 1, got ", coarse.sizes());
  const at::ScalarType dtype = coarse.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "coarse must be float32, float16 or bfloat16, got ", dtype);
  const int64_t B = coarse.size(0), Nc = coarse.size(1), C = coarse.size(2);
  TORCH_CHECK_VALUE(h >= 1 && w >= 1 && h * w == Nc, "grid (h, w) = (", h, ", ", w,
                    ") must be the coarse grid of the Nc = ", Nc, " patches of coarse");
  TORCH_CHECK_VALUE(keep >= 0 && keep <= Nc, "keep must be in [0, Nc] = [0, ", Nc, "], got ", keep);
  check_rows(coarse, "coarse", B, Nc, C, coarse);
  check_rows(fine, "fine", B, 4 * Nc, C, coarse);
  TORCH_CHECK_VALUE(score.dim() == 2 && score.size(0) == B && score.size(1) == Nc,
                    "score must have shape [B, Nc] = [", B, ", ", Nc, "], got ", score.sizes());
  TORCH_CHECK_TYPE(score.scalar_type() == at::kFloat, "score must be float32, got ", score.scalar_type());
  check_contiguous(score, "score");
  check_same_device(score, "score", coarse, "coarse");
  if (pos) check_table(*pos, "pos", 4 * Nc, C, coarse);
  if (prefix) check_table(*prefix, "prefix", -1, C, coarse);
  if (reuse) check_rows(*reuse, "reuse", B, Nc, C, coarse);
  const int64_t n = prefix ? prefix->size(0) : 0;
  const int64_t L = n + Nc + 3 * keep;
  TORCH_CHECK_VALUE(out.dim() == 3 && out.size(0) == B && out.size(1) == L && out.size(2) == C,
                    "out must have shape [B, n + Nc + 3 keep, C] = [", B, ", ", L, ", ", C, "], got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == dtype, "out must have the dtype of coarse (", dtype, "), got ",
                   out.scalar_type());
  check_contiguous(out, "out");
  check_same_device(out, "out", coarse, "coarse");
  TORCH_CHECK_VALUE(source.dim() == 2 && source.size(0) == B && source.size(1) == Nc + 3 * keep,
                    "source must have shape [B, Nc + 3 keep] = [", B, ", ", Nc + 3 * keep, "], got ",
                    source.sizes());
  TORCH_CHECK_TYPE(source.scalar_type() == at::kLong, "source must be int64, got ", source.scalar_type());
  check_contiguous(source, "source");
  check_same_device(source, "source", coarse, "coarse");
  Problem p;
  p.fine = rows_of(fine);
  p.coarse = rows_of(coarse);
  p.reuse = reuse ? rows_of(*reuse) : Rows{nullptr, 0, 0};
  p.score = score.data_ptr<float>();
  p.pos = pos ? pos->data_ptr() : nullptr;
  p.prefix = n > 0 ? prefix->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.source = source.data_ptr<int64_t>();
  p.images = B;
  p.h = h;
  p.w = w;
  p.keep = keep;
  p.prefix_rows = n;
  p.channels = C;
  return p;
}

// ------------------------------------------------------------ CPU kernel

// source of image b (fine_tokens.h): a stable descending sort of the keys
// picks the K patches, one pass in index order places them.
void plan_image(const Problem& p, int64_t b, std::vector<int64_t>& order, std::vector<uint8_t>& chosen) {
  const int64_t Nc = p.coarse_patches(), K = p.keep, Nf = p.fine_patches();
  const float* key = p.score + b * Nc;
  auto value = [&](int64_t i) { return std::isnan(key[i]) ? -INFINITY : key[i]; };
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return value(a) > value(c); });
  std::fill(chosen.begin(), chosen.end(), 0);
  for (int64_t r = 0; r < K; ++r) chosen[order[r]] = 1;
  int64_t* src = p.source + b * p.placed();
  int64_t m = 0;
  for (int64_t i = 0; i < Nc; ++i) {
    if (chosen[i]) {
      for (int64_t q = 0; q < 4; ++q) src[4 * m + q] = child(i, q, p.w);
      ++m;
    } else {
      src[4 * K + (i - m)] = Nf + i;
    }
  }
}

// y = x + pos + reuse (each possibly null but x), in fp32, rounded once.
template <typename E>
ADAPTOK_CPU_CLONES void sum_row(const typename E::Raw* __restrict__ x, const typename E::Raw* __restrict__ pos,
                                const typename E::Raw* __restrict__ reuse, typename E::Raw* __restrict__ y,
                                int64_t C) {
  if (pos != nullptr && reuse != nullptr) {
    for (int64_t c = 0; c < C; ++c) y[c] = E::store(E::load(x[c]) + E::load(pos[c]) + E::load(reuse[c]));
  } else if (pos != nullptr || reuse != nullptr) {
    const typename E::Raw* a = pos != nullptr ? pos : reuse;
    for (int64_t c = 0; c < C; ++c) y[c] = E::store(E::load(x[c]) + E::load(a[c]));
  } else {
    std::memcpy(y, x, C * sizeof(typename E::Raw));
  }
}

template <typename E>
void rows_kernel(const Problem& p) {
  using Raw = typename E::Raw;
  const int64_t C = p.channels, L = p.rows(), S = p.placed(), n = p.prefix_rows, Nf = p.fine_patches();
  const Raw* fine = static_cast<const Raw*>(p.fine.data);
  const Raw* coarse = static_cast<const Raw*>(p.coarse.data);
  const Raw* reuse = static_cast<const Raw*>(p.reuse.data);
  const Raw* pos = static_cast<const Raw*>(p.pos);
  Raw* out = static_cast<Raw*>(p.out);
  const int64_t row_bytes = C * static_cast<int64_t>(sizeof(Raw));
  // About 64 KiB of output per task: below that, threading costs more than it gains.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / row_bytes);
  // The fine rows a task reads jump across the fine grid (two runs of two rows per re-split
  // patch), which the hardware prefetchers do not follow: each row's lines are prefetched
  // kAhead rows before it is read (measured on a 64-image batch: ~1.9x faster).
  constexpr int64_t kAhead = 4;
  auto prefetch_row = [&](int64_t r) {
    const int64_t b = r / L, t = r % L;
    if (t < n) return;
    const int64_t s = p.source[b * S + t - n];
    const char* x = s >= Nf ? reinterpret_cast<const char*>(coarse + b * p.coarse.stride_b +
                                                            (s - Nf) * p.coarse.stride_row)
                            : reinterpret_cast<const char*>(fine + b * p.fine.stride_b + s * p.fine.stride_row);
    for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(x + off);
  };
  at::parallel_for(0, p.images * L, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < std::min(r1, r0 + kAhead); ++r) prefetch_row(r);
    for (int64_t r = r0; r < r1; ++r) {
      if (r + kAhead < r1) prefetch_row(r + kAhead);
      const int64_t b = r / L, t = r % L;
      Raw* y = out + r * C;
      if (t < n) {
        std::memcpy(y, static_cast<const Raw*>(p.prefix) + t * C, row_bytes);
        continue;
      }
      const int64_t s = p.source[b * S + t - n];
      if (s >= Nf) {
        std::memcpy(y, coarse + b * p.coarse.stride_b + (s - Nf) * p.coarse.stride_row, row_bytes);
        continue;
      }
      const Raw* re = reuse == nullptr ? nullptr
                                       : reuse + b * p.reuse.stride_b + parent(s, p.w) * p.reuse.stride_row;
      sum_row<E>(fine + b * p.fine.stride_b + s * p.fine.stride_row, pos == nullptr ? nullptr : pos + s * C, re,
                 y, C);
    }
  });
}

void fine_tokens_cpu(const at::Tensor& fine, const at::Tensor& coarse, const at::Tensor& score, int64_t keep,
                     int64_t h, int64_t w, const OptTensor& pos,
                     const OptTensor& prefix, const OptTensor& reuse,
                     const at::Tensor& out, const at::Tensor& source) {
  const Problem p = check_args(fine, coarse, score, keep, h, w, pos, prefix, reuse, out, source);
  const int64_t Nc = p.coarse_patches();
  at::parallel_for(0, p.images, std::max<int64_t>(1, 4096 / Nc), [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> order(Nc);
    std::vector<uint8_t> chosen(Nc);
    for (int64_t b = b0; b < b1; ++b) plan_image(p, b, order, chosen);
  });
  switch (coarse.scalar_type()) {
    case at::kFloat:
      return rows_kernel<Float32>(p);
    case at::kHalf:
      return rows_kernel<Float16>(p);
    default:
      return rows_kernel<BFloat16>(p);
  }
}

// ------------------------------------------------------------ CUDA binding

#ifdef ADAPTOK_WITH_CUDA

void fine_tokens_cuda_op(const at::Tensor& fine, const at::Tensor& coarse, const at::Tensor& score, int64_t keep,
                         int64_t h, int64_t w, const OptTensor& pos,
                         const OptTensor& prefix, const OptTensor& reuse,
                         const at::Tensor& out, const at::Tensor& source) {
  const Problem p = check_args(fine, coarse, score, keep, h, w, pos, prefix, reuse, out, source);
  TORCH_CHECK_VALUE(p.coarse_patches() <= kMaxCoarsePatches, "coarse must have at most ", kMaxCoarsePatches,
                    " patches an image on CUDA, got ", p.coarse_patches());
  const c10::cuda::CUDAGuard guard(out.device());
  const DType dtype = out.scalar_type() == at::kFloat  ? DType::kFloat
                      : out.scalar_type() == at::kHalf ? DType::kHalf
                                                       : DType::kBFloat16;
  C10_CUDA_CHECK(fine_tokens_cuda(p, dtype, c10::cuda::getCurrentCUDAStream()));
}

#endif  // ADAPTOK_WITH_CUDA

}  // namespace
}  // namespace fine_tokens
}  // namespace adaptok

TORCH_LIBRARY_FRAGMENT(adaptok, m) {
  m.def(
      "ext_fine_tokens(Tensor fine, Tensor coarse, Tensor score, int keep, int h, int w, Tensor? pos, "
      "Tensor? prefix, Tensor? reuse, Tensor(a!) out, Tensor(b!) source) -> ()");
}

TORCH_LIBRARY_IMPL(adaptok, CPU, m) {
  m.impl("ext_fine_tokens", &adaptok::fine_tokens::fine_tokens_cpu);
}

#ifdef ADAPTOK_WITH_CUDA
TORCH_LIBRARY_IMPL(adaptok, CUDA, m) {
  m.impl("ext_fine_tokens", &adaptok::fine_tokens::fine_tokens_cuda_op);
}
#endif
