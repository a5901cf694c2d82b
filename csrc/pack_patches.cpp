// Patch packing of the adaptok extension: schema, input checks, the CPU
// kernel and (when built with CUDA) the binding of pack_patches_cuda.cu.
// Semantics: pack_patches.h.
//
//   ext_pack_patches(patches G x [B_g, P_g, C] (any strides), pos G x [P_g, C]
//                    or none, prefix G x [n_g, C] or none, out [T, C])
//
// CPU kernel: the work items are blocks of kTokens patch tokens of one image
// (the first block of an image also copies its prefix rows), run in
// parallel. With a unit (or the smaller) channel stride a block is converted
// and written row by row. When the channel stride is the larger one (a
// convolution's output), reading a row would touch one cache line per
// element; the block is then read in tiles of kTileC channels, each
// channel's tokens as one run into fp32, transposed in registers in 8 x 8
// blocks, and written token by token. Conversions to and from fp16 / bf16
// are branch-free so that every loop vectorizes.
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu_convert.h"
#include "cpu_vec.h"
#include "pack_patches.h"

#ifdef ADAPTOK_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace adaptok {
namespace pack_patches {
namespace {

// Patch tokens per work item, and channels per tile of the transposed read
// (multiples of 8, the transpose's block): the tile's two fp32 copies take
// 16 KiB, leaving L1 room for the lines being read and written.
constexpr int64_t kTokens = 32;
constexpr int64_t kTileC = 64;

// ---------------------------------------------------------------- checks

std::string indexed(const char* name, size_t i) {
  return std::string(name) + "[" + std::to_string(i) + "]";
}

// Checks the per-group tables pos or prefix: none, or one contiguous
// [rows, C] tensor per group in the patches' dtype and device, with rows =
// P_g for pos (rows_are_tokens) and any rows n_g >= 0 for prefix. Called
// after patches[0] is checked.
void check_tables(at::TensorList ts, const char* what, at::TensorList patches, bool rows_are_tokens) {
  const at::Tensor& ref = patches[0];
  const int64_t C = ref.size(2);
  TORCH_CHECK_VALUE(ts.empty() || ts.size() == patches.size(), what, " must be empty or hold one table per group (",
                    patches.size(), "), got ", ts.size());
  for (size_t g = 0; g < ts.size(); ++g) {
    const at::Tensor& t = ts[g];
    const std::string name = indexed(what, g);
    if (rows_are_tokens) {
      TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == patches[g].size(1) && t.size(1) == C, name,
                        " must have shape [P_g, C] = [", patches[g].size(1), ", ", C, "], got ", t.sizes());
    } else {
      TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) == C, name, " must have shape [n_g, C] with C = ", C, ", got ",
                        t.sizes());
    }
    TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of patches (",
                     ref.scalar_type(), "), got ", t.scalar_type());
    check_contiguous(t, name.c_str());
    check_same_device(t, name.c_str(), ref, "patches[0]");
  }
}

// Checks every argument before any work; returns T (the rows out must have).
int64_t check_args(at::TensorList patches, at::TensorList pos, at::TensorList prefix,
                   const at::Tensor& out) {
  TORCH_CHECK_VALUE(!patches.empty(), "patches must hold at least one group");
  const at::Tensor& ref = patches[0];
  TORCH_CHECK_VALUE(ref.dim() == 3, "patches[0] must have shape [B_g, P_g, C], got ", ref.sizes());
  const at::ScalarType dtype = ref.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "patches[0] must be float32, float16 or bfloat16, got ", dtype);
  const int64_t C = ref.size(2);
  check_tables(prefix, "prefix", patches, /*rows_are_tokens=*/false);
  int64_t total = 0;
  for (size_t g = 0; g < patches.size(); ++g) {
    const at::Tensor& p = patches[g];
    const std::string name = indexed("patches", g);
    TORCH_CHECK_VALUE(p.dim() == 3 && p.size(0) >= 1 && p.size(1) >= 1 && p.size(2) >= 1, name,
                      " must have shape [B_g, P_g, C] with every size >= 1, got ", p.sizes());
    TORCH_CHECK_VALUE(p.size(2) == C, name, " must have the C = ", C, " channels of patches[0], got ",
                      p.size(2));
    TORCH_CHECK_TYPE(p.scalar_type() == dtype, name, " must have the dtype of patches[0] (", dtype,
                     "), got ", p.scalar_type());
    check_same_device(p, name.c_str(), ref, "patches[0]");
    total += p.size(0) * ((prefix.empty() ? 0 : prefix[g].size(0)) + p.size(1));
  }
  check_tables(pos, "pos", patches, /*rows_are_tokens=*/true);
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == total && out.size(1) == C,
                    "out must have shape [T, C] = [", total, ", ", C, "], got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == dtype, "out must have the dtype of patches (", dtype, "), got ",
                   out.scalar_type());
  check_contiguous(out, "out");
  check_same_device(out, "out", ref, "patches[0]");
  return total;
}

// The groups' pointers and strides, and where each group's rows start.
std::vector<PatchGroup> groups(at::TensorList patches, at::TensorList pos, at::TensorList prefix) {
  std::vector<PatchGroup> gs(patches.size());
  int64_t row = 0;
  for (size_t g = 0; g < patches.size(); ++g) {
    const at::Tensor& p = patches[g];
    const int64_t n = prefix.empty() ? 0 : prefix[g].size(0);
    gs[g] = {p.data_ptr(), pos.empty() ? nullptr : pos[g].data_ptr(), n > 0 ? prefix[g].data_ptr() : nullptr,
             n, p.size(0), p.size(1), p.stride(0), p.stride(1), p.stride(2), row};
    row += p.size(0) * (n + p.size(1));
  }
  return gs;
}

PackOutput output(const at::Tensor& out) {
  return {out.data_ptr(), out.size(1), out.size(0)};
}

// ------------------------------------------------------------ CPU kernel

// y[c] = x[c * sc] + pos[c] for c < C, in fp32, rounded once (pos null: a
// copy). The unit stride is spelled out so that its loop vectorizes.
template <typename E>
ADAPTOK_CPU_CLONES void add_row(const typename E::Raw* __restrict__ x, int64_t sc,
                                const typename E::Raw* __restrict__ pos,
                                typename E::Raw* __restrict__ y, int64_t C) {
  if (pos == nullptr && sc == 1) {
    std::memcpy(y, x, C * sizeof(typename E::Raw));
  } else if (pos == nullptr) {
    for (int64_t c = 0; c < C; ++c) y[c] = x[c * sc];
  } else if (sc == 1) {
    for (int64_t c = 0; c < C; ++c) y[c] = E::store(E::load(x[c]) + E::load(pos[c]));
  } else {
    for (int64_t c = 0; c < C; ++c) y[c] = E::store(E::load(x[c * sc]) + E::load(pos[c]));
  }
}

// Where image b's patch token j0 goes in out, and where it and its pos row are.
template <typename E>
struct Block {
  const typename E::Raw* x;
  const typename E::Raw* pos;  // null without pos
  typename E::Raw* y;
  Block(const PatchGroup& g, const PackOutput& o, int64_t b, int64_t j0)
      : x(static_cast<const typename E::Raw*>(g.patches) + b * g.stride_b + j0 * g.stride_p),
        pos(g.pos == nullptr ? nullptr : static_cast<const typename E::Raw*>(g.pos) + j0 * o.channels),
        y(static_cast<typename E::Raw*>(o.out) +
          (g.row0 + b * (g.prefix_rows + g.tokens) + g.prefix_rows + j0) * o.channels) {}
};

// Tokens [j0, j0 + count) of image b, read along the channels.
template <typename E>
void pack_rows(const PatchGroup& g, const PackOutput& o, int64_t b, int64_t j0, int64_t count) {
  const Block<E> blk(g, o, b, j0);
  const int64_t C = o.channels;
  for (int64_t j = 0; j < count; ++j) {
    add_row<E>(blk.x + j * g.stride_p, g.stride_c, blk.pos == nullptr ? nullptr : blk.pos + j * C,
               blk.y + j * C, C);
  }
}

// buf[c * kTokens + j] = x[c * sc + j * sp] in fp32, for c < channels and
// j < count: one run of tokens per channel when sp is 1. The same channels'
// next block of tokens is prefetched: with a run per channel, the hardware
// prefetchers lose track of the streams once the stores interleave.
template <typename E>
ADAPTOK_CPU_CLONES void load_columns(const typename E::Raw* __restrict__ x, int64_t sc, int64_t sp,
                                     int64_t channels, int64_t count, float* __restrict__ buf) {
  for (int64_t c = 0; c < channels; ++c) {
    const typename E::Raw* xc = x + c * sc;
    float* bc = buf + c * kTokens;
    if (sp == 1 && count == kTokens) {
      const char* next = reinterpret_cast<const char*>(xc + kTokens);
      for (int64_t l = 0; l < kTokens * static_cast<int64_t>(sizeof(typename E::Raw)) + 63; l += 64) {
        __builtin_prefetch(next + l);
      }
      for (int64_t j = 0; j < kTokens; ++j) bc[j] = E::load(xc[j]);
    } else {
      for (int64_t j = 0; j < count; ++j) bc[j] = E::load(xc[j * sp]);
    }
  }
}

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define ADAPTOK_PACK_SHUFFLE 1
#endif
#endif

#ifdef ADAPTOK_PACK_SHUFFLE
// 8 floats; aligned(4) and may_alias make loads and stores through it
// plain unaligned ones into the float buffers.
typedef float v8float __attribute__((vector_size(32), aligned(4), may_alias));

// In-register transpose of 8 rows of 8: three rounds, round k exchanging
// bit k of the row index with bit k of the column index.
inline void transpose8(v8float* r) {
  for (int i : {0, 2, 4, 6}) {
    const v8float a = r[i], b = r[i + 1];
    r[i] = __builtin_shufflevector(a, b, 0, 8, 2, 10, 4, 12, 6, 14);
    r[i + 1] = __builtin_shufflevector(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
  }
  for (int i : {0, 1, 4, 5}) {
    const v8float a = r[i], b = r[i + 2];
    r[i] = __builtin_shufflevector(a, b, 0, 1, 8, 9, 4, 5, 12, 13);
    r[i + 2] = __builtin_shufflevector(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i : {0, 1, 2, 3}) {
    const v8float a = r[i], b = r[i + 4];
    r[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11);
    r[i + 4] = __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
  }
}
#endif

// rows[j * kTileC + c] = buf[c * kTokens + j] for c < channels, j < count.
// Whole 8 x 8 blocks go through registers; they may read the buffer's
// padding past channels or count (finite: the buffer starts zeroed), whose
// results are never stored.
ADAPTOK_CPU_CLONES void transpose_tile(const float* __restrict__ buf, float* __restrict__ rows,
                                       int64_t channels, int64_t count) {
#ifdef ADAPTOK_PACK_SHUFFLE
  for (int64_t c8 = 0; c8 < channels; c8 += 8) {
    for (int64_t j8 = 0; j8 < count; j8 += 8) {
      v8float r[8];
      for (int k = 0; k < 8; ++k) r[k] = *reinterpret_cast<const v8float*>(buf + (c8 + k) * kTokens + j8);
      transpose8(r);
      for (int k = 0; k < 8; ++k) *reinterpret_cast<v8float*>(rows + (j8 + k) * kTileC + c8) = r[k];
    }
  }
#else
  for (int64_t j = 0; j < count; ++j) {
    for (int64_t c = 0; c < channels; ++c) rows[j * kTileC + c] = buf[c * kTokens + j];
  }
#endif
}

// y[j * C + c] = rows[j * kTileC + c] + pos[j * C + c], rounded once.
template <typename E>
ADAPTOK_CPU_CLONES void store_rows(const float* __restrict__ rows, const typename E::Raw* __restrict__ pos,
                                   int64_t C, int64_t channels, int64_t count,
                                   typename E::Raw* __restrict__ y) {
  for (int64_t j = 0; j < count; ++j) {
    const float* r = rows + j * kTileC;
    typename E::Raw* yj = y + j * C;
    if (pos == nullptr) {
      for (int64_t c = 0; c < channels; ++c) yj[c] = E::store(r[c]);
    } else {
      const typename E::Raw* pj = pos + j * C;
      for (int64_t c = 0; c < channels; ++c) yj[c] = E::store(r[c] + E::load(pj[c]));
    }
  }
}

// Per-thread fp32 tiles of the transposed read.
struct Tiles {
  std::vector<float> columns = std::vector<float>(kTileC * kTokens, 0.0f);  // [kTileC][kTokens]
  std::vector<float> rows = std::vector<float>(kTokens * kTileC, 0.0f);  // [kTokens][kTileC]
};

// The same tokens when the channel stride is the larger one (a convolution's
// output), where reading a row would touch a cache line per element: tiles
// of kTileC channels, each channel's tokens loaded as one run, transposed in
// fp32, and written token by token.
template <typename E>
void pack_tiles(const PatchGroup& g, const PackOutput& o, int64_t b, int64_t j0, int64_t count,
                Tiles& t) {
  const Block<E> blk(g, o, b, j0);
  for (int64_t c0 = 0; c0 < o.channels; c0 += kTileC) {
    const int64_t channels = std::min(kTileC, o.channels - c0);
    load_columns<E>(blk.x + c0 * g.stride_c, g.stride_c, g.stride_p, channels, count, t.columns.data());
    transpose_tile(t.columns.data(), t.rows.data(), channels, count);
    store_rows<E>(t.rows.data(), blk.pos == nullptr ? nullptr : blk.pos + c0, o.channels, channels, count,
                  blk.y + c0);
  }
}

template <typename E>
void pack_patches_cpu_kernel(const std::vector<PatchGroup>& gs, const PackOutput& o) {
  // first[g]: the first work item of group g (an item: kTokens tokens of one image).
  std::vector<int64_t> first(gs.size() + 1, 0);
  for (size_t g = 0; g < gs.size(); ++g) {
    first[g + 1] = first[g] + gs[g].images * ((gs[g].tokens + kTokens - 1) / kTokens);
  }
  const int64_t row_bytes = o.channels * static_cast<int64_t>(sizeof(typename E::Raw));
  // About 64 KiB of output per task: below that, threading costs more than it gains.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (kTokens * row_bytes));
  at::parallel_for(0, first.back(), grain, [&](int64_t i0, int64_t i1) {
    Tiles tiles;
    size_t g = std::upper_bound(first.begin(), first.end(), i0) - first.begin() - 1;
    for (int64_t i = i0; i < i1; ++i) {
      while (first[g + 1] <= i) ++g;
      const PatchGroup& grp = gs[g];
      const int64_t blocks = (grp.tokens + kTokens - 1) / kTokens;
      const int64_t b = (i - first[g]) / blocks;
      const int64_t j0 = (i - first[g]) % blocks * kTokens;
      const int64_t count = std::min(kTokens, grp.tokens - j0);
      if (j0 == 0 && grp.prefix_rows > 0) {
        char* image = static_cast<char*>(o.out) + (grp.row0 + b * (grp.prefix_rows + grp.tokens)) * row_bytes;
        std::memcpy(image, grp.prefix, grp.prefix_rows * row_bytes);
      }
      if (read_transposed(grp)) {
        pack_tiles<E>(grp, o, b, j0, count, tiles);
      } else {
        pack_rows<E>(grp, o, b, j0, count);
      }
    }
  });
}

void pack_patches_cpu(at::TensorList patches, at::TensorList pos, at::TensorList prefix,
                      const at::Tensor& out) {
  check_args(patches, pos, prefix, out);
  const std::vector<PatchGroup> gs = groups(patches, pos, prefix);
  const PackOutput o = output(out);
  switch (out.scalar_type()) {
    case at::kFloat:
      return pack_patches_cpu_kernel<Float32>(gs, o);
    case at::kHalf:
      return pack_patches_cpu_kernel<Float16>(gs, o);
    default:
      return pack_patches_cpu_kernel<BFloat16>(gs, o);
  }
}

// ------------------------------------------------------------ CUDA binding

#ifdef ADAPTOK_WITH_CUDA

void pack_patches_cuda_op(at::TensorList patches, at::TensorList pos, at::TensorList prefix,
                          const at::Tensor& out) {
  check_args(patches, pos, prefix, out);
  const c10::cuda::CUDAGuard guard(out.device());
  const auto dtype = out.scalar_type() == at::kFloat  ? PackDType::kFloat
                     : out.scalar_type() == at::kHalf ? PackDType::kHalf
                                                      : PackDType::kBFloat16;
  const PackOutput o = output(out);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const PatchGroup& g : groups(patches, pos, prefix)) {
    C10_CUDA_CHECK(pack_patches_cuda(g, o, dtype, stream));
  }
}

#endif  // ADAPTOK_WITH_CUDA

}  // namespace
}  // namespace pack_patches
}  // namespace adaptok

TORCH_LIBRARY_FRAGMENT(adaptok, m) {
  m.def("ext_pack_patches(Tensor[] patches, Tensor[] pos, Tensor[] prefix, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(adaptok, CPU, m) {
  m.impl("ext_pack_patches", &adaptok::pack_patches::pack_patches_cpu);
}

#ifdef ADAPTOK_WITH_CUDA
TORCH_LIBRARY_IMPL(adaptok, CUDA, m) {
  m.impl("ext_pack_patches", &adaptok::pack_patches::pack_patches_cuda_op);
}
#endif
