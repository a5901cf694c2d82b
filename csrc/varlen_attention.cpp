// Variable-length attention of the adaptok extension: schema, input checks,
// the CPU kernel and (when built with CUDA) the binding of
// varlen_attention_cuda.cu.
//
//   ext_varlen_attention(q, k, v [T, H, D], cu_seqlens [B+1], max_seqlen,
//                        scale, out [T, H, D], lse [H, T], cls [H, T] or [H, 0])
//
// Like the ragged ops it writes into caller-allocated outputs, so allocation
// (and NaN poisoning in tests) stays in the Python op layer.
//
// CPU kernel. One task is a (sequence, head) pair; tasks are split between
// threads by their cost (~N^2), so a batch sorted by length does not leave a
// thread idle. A task transposes (and scales) its keys once into [D, N], then
// for each block of queries (a whole ViT sequence is one block) computes the
// score block [bm, N] with one GEMM (oneDNN's brgemm, through ATen), an exact
// softmax over whole rows (rows are short, so the block stays in cache and no
// online rescaling is needed), and the output block with a second GEMM. The
// class-attention row is the first row of the first block's probabilities:
// one division per key. fp16/bf16 inputs are converted to fp32 per task
// (O(N D) next to the O(N^2 D) GEMMs) and accumulate in fp32. The softmax,
// the transpose and the stores are written on 16-float vectors and compiled
// once per ISA (AVX-512, AVX2, baseline), picked when the library loads.
#include <torch/library.h>

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "checks.h"
#include "cpu_vec.h"
#include "varlen_attention.h"

#ifdef ADAPTOK_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace adaptok {
namespace attention {
namespace {

// Query rows per score block: a whole ViT sequence (<= 256 tokens) is one
// block; longer rows get fewer, so the block stays near 512 KiB (in L2).
constexpr int64_t kMaxBlockM = 256;
constexpr int64_t kScoreBlockFloats = 128 << 10;

// ---------------------------------------------------------------- checks

void check_qkv(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.dim() == 3, name, " must have shape [T, H, D], got ", t.sizes());
  TORCH_CHECK_VALUE(t.sizes() == q.sizes(), name, " must have the shape of q ",
                    q.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name,
                   " must have the dtype of q (", q.scalar_type(), "), got ",
                   t.scalar_type());
  check_same_device(t, name, q, "q");
  TORCH_CHECK_VALUE(t.stride(2) == 1 || t.size(2) == 1, name,
                    " must be contiguous along its last dim (D), got strides ",
                    t.strides());
}

void check_stat(const at::Tensor& t, const char* name, int64_t heads,
                int64_t cols, const at::Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == heads && t.size(1) == cols, name,
                    " must have shape [", heads, ", ", cols, "], got ", t.sizes());
  check_contiguous(t, name);
  check_same_device(t, name, q, "q");
}

void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& cu, int64_t max_seqlen, double scale,
                const at::Tensor& out, const at::Tensor& lse,
                const at::Tensor& cls) {
  check_qkv(q, "q", q);
  check_qkv(k, "k", q);
  check_qkv(v, "v", q);
  check_qkv(out, "out", q);
  const int64_t T = q.size(0), H = q.size(1);
  TORCH_CHECK_VALUE(T > 0 && H > 0 && q.size(2) > 0,
                    "q must have at least one token, head and channel, got shape ",
                    q.sizes());
  check_cu_seqlens_meta(cu, "cu_seqlens", q, "q");
  TORCH_CHECK_VALUE(max_seqlen >= 1, "max_seqlen must be >= 1, got ", max_seqlen);
  TORCH_CHECK_VALUE(std::isfinite(scale) && std::abs(scale) <= FLT_MAX,
                    "scale must be finite in float32, got ", scale);
  check_stat(lse, "lse", H, T, q);
  TORCH_CHECK_VALUE(cls.dim() == 2 && (cls.size(1) == 0 || cls.size(1) == T),
                    "cls must have shape [H, T] or [H, 0], got ", cls.sizes());
  check_stat(cls, "cls", H, cls.size(1), q);
  // Outputs are written in parallel and inputs read after outputs are
  // written: neither may overlap.
  at::assert_no_internal_overlap(out);
  for (const at::Tensor* t : {&q, &k, &v, &lse, &cls}) at::assert_no_overlap(out, *t);
  at::assert_no_overlap(lse, cls);
}

void check_values_cpu(const at::Tensor& cu, int64_t total, int64_t max_seqlen) {
  check_cu_seqlens_values(cu, "cu_seqlens", total, "q.shape[0]");
  const int32_t* c = cu.data_ptr<int32_t>();
  for (int64_t b = 0; b + 1 < cu.size(0); ++b) {
    TORCH_CHECK_VALUE(c[b + 1] - c[b] <= max_seqlen, "cu_seqlens holds a sequence of ",
                      c[b + 1] - c[b], " tokens, more than max_seqlen = ", max_seqlen);
  }
}

VarlenParams params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& cu, int64_t max_seqlen, double scale,
                    const at::Tensor& out, const at::Tensor& lse,
                    const at::Tensor& cls) {
  VarlenParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.cls = cls.numel() > 0 ? cls.data_ptr<float>() : nullptr;
  p.cu_seqlens = cu.data_ptr<int32_t>();
  p.batch = cu.size(0) - 1;
  p.total = q.size(0);
  p.heads = q.size(1);
  p.head_dim = q.size(2);
  p.max_seqlen = max_seqlen;
  p.q_stride_t = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_stride_t = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.v_stride_t = v.stride(0);
  p.v_stride_h = v.stride(1);
  p.o_stride_t = out.stride(0);
  p.o_stride_h = out.stride(1);
  p.scale = static_cast<float>(scale);
  return p;
}

#ifdef CPUBLAS_BRGEMM_F32F32F32

// ------------------------------------------------------------ CPU kernel

// exp(x), branch-free: 2^(x log2 e) split into an integer power, built in the
// exponent bits, and 2^f for |f| <= 1/2 from a degree-7 Taylor polynomial of
// e^(f ln 2) (relative error ~5e-9, below fp32 rounding). x < -87 (and
// -inf) gives exactly 0; above, results are normal floats (>= 2^-125.5), so
// no subnormal reaches the output GEMM.
inline vfloat exp_lanes(vfloat x) {
  const auto underflow = x < -87.0f;
  x = underflow ? vfloat{} - 87.0f : x;
  const vfloat t = x * 1.44269504088896341f;
  // Round to nearest with the 1.5 * 2^23 trick; exact for |t| < 2^22.
  const vfloat n = (t + 12582912.0f) - 12582912.0f;
  const vfloat y = (t - n) * 0.693147180559945309f;
  vfloat p = y * (1.0f / 5040.0f) + 1.0f / 720.0f;
  p = p * y + 1.0f / 120.0f;
  p = p * y + 1.0f / 24.0f;
  p = p * y + 1.0f / 6.0f;
  p = p * y + 0.5f;
  p = p * y + 1.0f;
  p = p * y + 1.0f;
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  const vfloat e = p * reinterpret_cast<const vfloat&>(bits);
  return underflow ? vfloat{} : e;
}

// Softmax statistics of `rows` (scaled) score rows of length n (stride ld,
// each row padded to a multiple of 16): each row becomes exp(s - max), its
// sum goes to l[i] and its natural-log normalizer (max + log sum) to lse[i].
// Cloned per ISA so the same code runs on the widest vectors the CPU has.
ADAPTOK_CPU_CLONES void softmax_rows(
    float* s, int64_t rows, int64_t n, int64_t ld, float* l, float* lse) {
  const int64_t padded = round_lanes(n);
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * ld;
    for (int64_t j = n; j < padded; ++j) row[j] = -INFINITY;  // exp gives 0
    vfloat m = vfloat{} - INFINITY;
    for (int64_t j = 0; j < padded; j += kLanes) {
      const vfloat x = *reinterpret_cast<const vfloat*>(row + j);
      m = m < x ? x : m;
    }
    float row_max = m[0];
    for (int64_t u = 1; u < kLanes; ++u) row_max = std::max(row_max, m[u]);
    vfloat sum{};
    for (int64_t j = 0; j < padded; j += kLanes) {
      vfloat& x = *reinterpret_cast<vfloat*>(row + j);
      x = exp_lanes(x - row_max);
      sum += x;
    }
    const float row_sum = sum_lanes(sum);
    l[i] = row_sum;
    lse[i] = row_max + std::log(row_sum);
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#define ADAPTOK_SHUFFLE_TRANSPOSE 1  // __builtin_shuffle is GCC's
#endif

#ifdef ADAPTOK_SHUFFLE_TRANSPOSE
// Two-source shuffle of stage `bit` of a 16 x 16 transpose: swaps bit `bit`
// of the row index with bit `bit` of the column index in a pair of rows
// (a: that row bit 0, b: 1). Four stages make the transpose.
template <int bit>
inline void swap_bits(vfloat& a, vfloat& b) {
  constexpr int s = 1 << bit;
  vint lo, hi;
  for (int c = 0; c < kLanes; ++c) {
    const int from_b = (c & s) ? kLanes : 0;
    lo[c] = from_b + (c & ~s);
    hi[c] = from_b + (c | s);
  }
  const vfloat x = __builtin_shuffle(a, b, lo);
  b = __builtin_shuffle(a, b, hi);
  a = x;
}

template <int bit>
inline void transpose_stage(vfloat* r) {
  for (int i = 0; i < kLanes; ++i) {
    if (!(i & (1 << bit))) swap_bits<bit>(r[i], r[i | (1 << bit)]);
  }
}

#endif  // ADAPTOK_SHUFFLE_TRANSPOSE

// dst[d * ld + j] = scale * src[j * stride + d] for j < n, d < D: the keys
// of one head, transposed for the score GEMM and pre-scaled so the scores
// come out scaled. Whole 16 x 16 tiles are transposed in registers.
ADAPTOK_CPU_CLONES void transpose_keys(const float* src, int64_t stride, int64_t n,
                                       int64_t D, float scale, float* dst, int64_t ld) {
#ifdef ADAPTOK_SHUFFLE_TRANSPOSE
  const int64_t d16 = D / kLanes * kLanes;
#else
  const int64_t d16 = 0;
#endif
  for (int64_t j0 = 0; j0 < n; j0 += kLanes) {
    const int64_t jn = std::min<int64_t>(kLanes, n - j0);
#ifdef ADAPTOK_SHUFFLE_TRANSPOSE
    for (int64_t d0 = 0; d0 < d16; d0 += kLanes) {
      vfloat r[kLanes];
      for (int64_t j = 0; j < kLanes; ++j) {
        r[j] = j < jn ? *reinterpret_cast<const vfloat*>(src + (j0 + j) * stride + d0) * scale
                      : vfloat{};
      }
      transpose_stage<0>(r);
      transpose_stage<1>(r);
      transpose_stage<2>(r);
      transpose_stage<3>(r);
      for (int64_t d = 0; d < kLanes; ++d) {
        *reinterpret_cast<vfloat*>(dst + (d0 + d) * ld + j0) = r[d];
      }
    }
#endif
    for (int64_t d = d16; d < D; ++d) {
      for (int64_t j = 0; j < jn; ++j) dst[d * ld + j0 + j] = scale * src[(j0 + j) * stride + d];
    }
  }
}

// dst[i] = o[i] / l[i] for rows of D: the output block, normalized.
ADAPTOK_CPU_CLONES void normalize_rows(
    const float* o, int64_t rows, int64_t D, const float* l, float* dst, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    const float inv = 1.0f / l[i];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[i * ld + d] = o[i * D + d] * inv;
  }
}

// Leading dim of a sequence's transposed keys and scores: its length padded
// past a multiple of 16 floats (rows of kt and of the scores then do not map
// to the same cache sets). A function of the length alone, so the GEMM
// kernels oneDNN compiles and caches per shape stay few across batches.
int64_t padded_ld(int64_t n) { return round_lanes(n) + kLanes; }

// Query rows per score block for leading dim ld.
int64_t block_rows(int64_t ld) { return std::clamp<int64_t>(kScoreBlockFloats / ld, kLanes, kMaxBlockM); }

// Per-thread scratch, sized once per call for the longest sequence.
struct Scratch {
  std::vector<float> kt;  // [D, ld]: the task's keys, transposed and scaled
  std::vector<float> scores;  // [block_m, ld]
  std::vector<float> o;  // [block_m, D]
  std::vector<float> l, lse;  // [block_m]
  std::vector<float> qf, kf, vf;  // fp32 copies [N, D] of inputs not read in place

  Scratch(int64_t longest, int64_t D, bool copies) {
    const int64_t ld = padded_ld(longest);
    kt.resize(D * ld);
    // block_rows(ld) * ld is 256 ld up to ld = 512, then at most
    // kScoreBlockFloats until the 16-row floor, then 16 ld: this bounds it
    // for every shorter sequence too.
    scores.resize(std::max(block_rows(ld) * ld, kScoreBlockFloats));
    o.resize(kMaxBlockM * D);
    l.resize(kMaxBlockM);
    lse.resize(kMaxBlockM);
    if (copies) {
      for (auto* buffer : {&qf, &kf, &vf}) buffer->resize(longest * D);
    }
  }
};

// The n rows of x (token stride stride_t) as fp32 [n, D] in dst.
template <typename scalar_t>
void to_float(const scalar_t* x, int64_t stride_t, int64_t n, int64_t D, float* dst) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* r = x + j * stride_t;
    for (int64_t d = 0; d < D; ++d) dst[j * D + d] = static_cast<float>(r[d]);
  }
}

// Whether fp32 q and v can be GEMM operands in place: their token stride is a
// valid leading dim (>= D; a broadcast token dim has stride 0).
template <typename scalar_t>
bool in_place(const VarlenParams& p) {
  return std::is_same_v<scalar_t, float> && p.q_stride_t >= p.head_dim && p.v_stride_t >= p.head_dim;
}

// Head h of sequence b.
template <typename scalar_t>
void attend(const VarlenParams& p, int64_t b, int64_t h, Scratch& w) {
  const int64_t D = p.head_dim, T = p.total;
  const int64_t start = p.cu_seqlens[b];
  const int64_t n = p.cu_seqlens[b + 1] - start;
  const int64_t ld = padded_ld(n), block_m = block_rows(ld);
  const scalar_t* q = static_cast<const scalar_t*>(p.q) + start * p.q_stride_t + h * p.q_stride_h;
  const scalar_t* k = static_cast<const scalar_t*>(p.k) + start * p.k_stride_t + h * p.k_stride_h;
  const scalar_t* v = static_cast<const scalar_t*>(p.v) + start * p.v_stride_t + h * p.v_stride_h;
  scalar_t* out = static_cast<scalar_t*>(p.out) + start * p.o_stride_t + h * p.o_stride_h;

  const float *qf, *kf, *vf;
  int64_t ld_q = D, ld_k = D, ld_v = D;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (in_place<float>(p)) {
      qf = q, kf = k, vf = v;
      ld_q = p.q_stride_t, ld_k = p.k_stride_t, ld_v = p.v_stride_t;
    }
  }
  if (!in_place<scalar_t>(p)) {
    to_float(q, p.q_stride_t, n, D, w.qf.data());
    to_float(k, p.k_stride_t, n, D, w.kf.data());
    to_float(v, p.v_stride_t, n, D, w.vf.data());
    qf = w.qf.data(), kf = w.kf.data(), vf = w.vf.data();
  }
  transpose_keys(kf, ld_k, n, D, p.scale, w.kt.data(), ld);

  float* s = w.scores.data();
  for (int64_t m0 = 0; m0 < n; m0 += block_m) {
    const int64_t bm = std::min(block_m, n - m0);
    // s [bm, n] = q [bm, D] @ kt [D, n]  (already scaled)
    at::native::cpublas::brgemm(bm, n, D, ld_q, ld, ld, false, qf + m0 * ld_q, w.kt.data(), s,
                                false);
    softmax_rows(s, bm, n, ld, w.l.data(), w.lse.data());
    std::copy_n(w.lse.data(), bm, p.lse + h * T + start + m0);
    if (p.cls != nullptr && m0 == 0) {
      const float inv = 1.0f / w.l[0];
      float* cls = p.cls + h * T + start;
      for (int64_t j = 0; j < n; ++j) cls[j] = s[j] * inv;
    }
    // o [bm, D] = exp(s - max) [bm, n] @ v [n, D], normalized per row on store.
    at::native::cpublas::brgemm(bm, D, n, ld, ld_v, D, false, s, vf, w.o.data(), false);
    if constexpr (std::is_same_v<scalar_t, float>) {
      normalize_rows(w.o.data(), bm, D, w.l.data(), out + m0 * p.o_stride_t, p.o_stride_t);
    } else {
      normalize_rows(w.o.data(), bm, D, w.l.data(), w.o.data(), D);
      for (int64_t i = 0; i < bm; ++i) {
        scalar_t* dst = out + (m0 + i) * p.o_stride_t;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(w.o[i * D + d]);
      }
    }
  }
}

template <typename scalar_t>
void varlen_attention_cpu_kernel(const VarlenParams& p) {
  const int64_t B = p.batch, H = p.heads, D = p.head_dim, tasks = B * H;
  const int32_t* cu = p.cu_seqlens;
  // Task t = (b, h) = (t / H, t % H) costs about N_b (N_b + D). Each thread
  // gets one chunk of consecutive tasks of about equal cost.
  int64_t longest = 0;
  std::vector<double> before(tasks + 1, 0.0);  // cost of the tasks before t
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t n = cu[t / H + 1] - cu[t / H];
    longest = std::max(longest, n);
    before[t + 1] = before[t] + static_cast<double>(n) * (n + D);
  }
  const int64_t chunks = std::min<int64_t>(tasks, at::get_num_threads());
  std::vector<int64_t> first(chunks + 1, tasks);
  for (int64_t c = 0; c < chunks; ++c) {
    first[c] = std::lower_bound(before.begin(), before.end() - 1, before.back() * c / chunks) -
               before.begin();
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    Scratch w(longest, D, !in_place<scalar_t>(p));
    for (int64_t t = first[c0]; t < first[c1]; ++t) attend<scalar_t>(p, t / H, t % H, w);
    at::native::cpublas::brgemm_release(false);
  });
}

void varlen_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& cu,
                          int64_t max_seqlen, double scale, const at::Tensor& out,
                          const at::Tensor& lse, const at::Tensor& cls) {
  check_args(q, k, v, cu, max_seqlen, scale, out, lse, cls);
  check_values_cpu(cu, q.size(0), max_seqlen);
  const VarlenParams p = params(q, k, v, cu, max_seqlen, scale, out, lse, cls);
  switch (q.scalar_type()) {
    case at::kFloat:
      return varlen_attention_cpu_kernel<float>(p);
    case at::kHalf:
      return varlen_attention_cpu_kernel<at::Half>(p);
    case at::kBFloat16:
      return varlen_attention_cpu_kernel<at::BFloat16>(p);
    default:
      TORCH_CHECK_TYPE(false, "q must be float16, bfloat16 or float32, got ", q.scalar_type());
  }
}

#endif  // CPUBLAS_BRGEMM_F32F32F32

#ifdef ADAPTOK_WITH_CUDA

void varlen_attention_cuda_op(const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& cu,
                              int64_t max_seqlen, double scale, const at::Tensor& out,
                              const at::Tensor& lse, const at::Tensor& cls) {
  check_args(q, k, v, cu, max_seqlen, scale, out, lse, cls);
  const auto dtype = q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16,
                   "q must be float16 or bfloat16 for the CUDA kernel, got ", dtype);
  TORCH_CHECK_VALUE(cuda_supports_head_dim(q.size(2)),
                    "the CUDA kernel serves head dims 32, 64 and 128; q has head dim ",
                    q.size(2));
  TORCH_CHECK_VALUE(q.size(1) <= 65535, "q must have at most 65535 heads, got ", q.size(1));
  const c10::cuda::CUDAGuard guard(q.device());
  C10_CUDA_CHECK(varlen_attention_fwd_cuda(
      params(q, k, v, cu, max_seqlen, scale, out, lse, cls),
      dtype == at::kHalf ? CudaDType::kHalf : CudaDType::kBFloat16,
      c10::cuda::getCurrentCUDAStream()));
}

#endif  // ADAPTOK_WITH_CUDA

}  // namespace
}  // namespace attention
}  // namespace adaptok

TORCH_LIBRARY_FRAGMENT(adaptok, m) {
  m.def(
      "ext_varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, "
      "int max_seqlen, float scale, Tensor(a!) out, Tensor(b!) lse, "
      "Tensor(c!) cls) -> ()");
}

// The CPU kernel needs ATen's fp32 brgemm; without it (older torch) the op has
// no CPU kernel and the cpu backend reports that the extension lacks it.
#ifdef CPUBLAS_BRGEMM_F32F32F32
TORCH_LIBRARY_IMPL(adaptok, CPU, m) {
  m.impl("ext_varlen_attention", &adaptok::attention::varlen_attention_cpu);
}
#endif

#ifdef ADAPTOK_WITH_CUDA
TORCH_LIBRARY_IMPL(adaptok, CUDA, m) {
  m.impl("ext_varlen_attention", &adaptok::attention::varlen_attention_cuda_op);
}
#endif
