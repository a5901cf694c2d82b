// CUDA forward of top-k class-attention token selection with inattentive-token
// fusion (see topk_select.h for the contract). Kernels and launcher only; the
// torch bindings live in topk_select.cpp.
//
// One CTA per sequence (grid x), optionally several per sequence along grid y,
// each owning a chunk of the channels (small batches, so that more SMs copy).
//   Phase 1: the sequence's scores are staged in shared memory as order-
//     preserving integer keys; every candidate counts the candidates ranked
//     before it (O(N^2 / threads) comparisons, shared-memory broadcasts). A
//     kept token writes its index to perm[rank]; the dropped ones are
//     compacted, in index order, into perm[k ..] by a block-wide ballot scan.
//     Every y-CTA of a sequence repeats this phase (it is cheap next to the
//     copy for ViT lengths, and needs no inter-CTA communication).
//   Phase 2: no barrier. The fused row first (each thread owns a pair of
//     channels and walks the dropped tokens in increasing index, so the fp32
//     sum has the CPU kernel's order and rounding: multiply and add are not
//     contracted), then the copies of the kept rows (flattened over rows and
//     16-byte vectors of the chunk) and kept_index.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "cuda_dtype.cuh"
#include "topk_select.h"

namespace adaptok {
namespace topk {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCopyUnroll = 4;  // copy items in flight per thread
constexpr int kFuseUnroll = 8;  // dropped rows in flight per thread
// Smallest channel chunk of a y-CTA, in bytes of a row.
constexpr int64_t kMinChunkBytes = 128;
// Chunks are multiples of 8 elements, so a chunk of a 16-byte aligned row
// starts 16-byte aligned for every dtype.
constexpr int64_t kChunkAlign = 8;

// An unsigned key that orders like the score: a_i > a_j iff key_i > key_j and
// a_i == a_j iff key_i == key_j (-0 is mapped to +0 first). Every NaN maps to
// the largest key, 0xffffffff, so NaN scores rank first, among themselves by
// index, as in a stable descending torch.sort, and the ranks stay a
// permutation whatever the scores. The smallest key of a score is that of
// -inf, 0x007fffff, so 0 is free to mark the CLS slot and the padding: it
// never ranks before a candidate.
// Integer tests only, so flush-to-zero builds order denormals the same.
__device__ __forceinline__ uint32_t score_key(float a) {
  uint32_t u = __float_as_uint(a);
  const uint32_t mag = u & 0x7fffffffu;
  if (mag > 0x7f800000u) return 0xffffffffu;  // NaN
  if (mag == 0) u = 0;  // -0 -> +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The score back from its key (the weight of a dropped token). -0 comes back
// as +0 and NaN as the canonical NaN, neither of which changes the fused sum.
__device__ __forceinline__ float key_score(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Counts 1 per key of v that ranks before candidate j (key kj), for keys at
// positions i0 .. i0 + 3.
__device__ __forceinline__ int count_before(uint4 v, int i0, uint32_t kj, int j) {
  return (v.x > kj || (v.x == kj && i0 < j)) + (v.y > kj || (v.y == kj && i0 + 1 < j)) +
         (v.z > kj || (v.z == kj && i0 + 2 < j)) + (v.w > kj || (v.w == kj && i0 + 3 < j));
}

// Grid: x = sequence, y = chunk of `chunk` channels. Block: kThreads.
// Dynamic shared memory: keys[round_up(max_seqlen, 4)] then perm[max_seqlen]
// (p.max_seqlen is the launcher's cap, <= T, not the caller's value).
//
// kVec: x, out, x_stride and C (in bytes) are multiples of 16, so rows are
// copied in 16-byte vectors and the fused row read and written in pairs.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    topk_select_kernel(const TopkParams p, const int64_t chunk) {
  using E = Elt<T>;
  using Raw = typename E::Raw;
  using V = std::conditional_t<kVec, uint4, Raw>;
  constexpr int kV = static_cast<int>(sizeof(V) / sizeof(T));  // elements per copy item
  constexpr int kU = kVec ? 2 : 1;  // channels per fused-row unit
  static_assert(sizeof(Raw) == sizeof(T), "raw storage");

  extern __shared__ __align__(16) uint32_t smem[];
  __shared__ int warp_count[kWarps];

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int64_t b = blockIdx.x;

  // Clamp every offset to the tensors (well-formed values pass unchanged):
  // x rows [s, s + n) within [0, T), n within the shared arrays, k within
  // [0, n - 1], out rows from o checked against total_out one by one. The
  // values are the same for every thread, so all branches on them below are
  // uniform over the CTA.
  const int64_t total = p.total;
  const int64_t total_out = p.total_out;
  const int64_t s = min(max(static_cast<int64_t>(p.cu_seqlens[b]), int64_t{0}), total);
  const int64_t e = min(max(static_cast<int64_t>(p.cu_seqlens[b + 1]), s), total);
  const int n = static_cast<int>(min(e - s, p.max_seqlen));
  if (n == 0) return;  // uniform, before any barrier
  const int k = min(max(p.keep[b], 0), n - 1);
  const int64_t o =
      min(max(static_cast<int64_t>(p.cu_seqlens_out[b]), int64_t{0}), total_out);
  const bool unchanged = k == n - 1;
  const bool fused = !unchanged && p.fuse;

  const int n_pad = (n + 3) & ~3;
  uint32_t* keys = smem;
  int* perm = reinterpret_cast<int*>(smem + ((p.max_seqlen + 3) & ~int64_t{3}));

  // ------------------------------------------------ phase 1: ranks
  // Not needed when nothing is dropped, nor for the CLS row alone.
  if (!unchanged && (k > 0 || fused)) {
    for (int i = tid; i < n_pad; i += kThreads)
      keys[i] = (i >= 1 && i < n) ? score_key(p.cls_attn[s + i]) : 0u;
    __syncthreads();
    const uint4* keys4 = reinterpret_cast<const uint4*>(keys);
    const int nq = n_pad / 4;
    int dropped_before = 0;  // dropped candidates in earlier passes
    // One candidate per thread and pass; base is uniform, so every thread
    // meets the barriers of every pass.
    for (int base = 1; base < n; base += kThreads) {
      const int j = base + tid;
      const bool valid = j < n;
      bool kept = false;
      const int jw = base + warp * 32;  // the warp's first candidate
      if (k > 0 && jw < n) {  // warp-uniform: no divergence in the loops
        const uint32_t kj = valid ? keys[j] : 0xffffffffu;
        // Blocks of 4 keys: below lo every i < jw <= j (ties count), from hi
        // on every i >= jw + 32 > j (ties do not), in between compare fully.
        const int lo = jw / 4;
        const int hi = min((jw + 32 + 3) / 4, nq);
        int rank = 0;
#pragma unroll 4
        for (int q = 0; q < lo; ++q) {
          const uint4 v = keys4[q];
          rank += (v.x >= kj) + (v.y >= kj) + (v.z >= kj) + (v.w >= kj);
        }
        for (int q = lo; q < hi; ++q) rank += count_before(keys4[q], 4 * q, kj, j);
#pragma unroll 4
        for (int q = hi; q < nq; ++q) {
          const uint4 v = keys4[q];
          rank += (v.x > kj) + (v.y > kj) + (v.z > kj) + (v.w > kj);
        }
        kept = valid && rank < k;
        if (kept) perm[rank] = j;  // rank < k <= n - 1
      }
      if (fused) {
        // Ordered compaction of the dropped candidates of this pass.
        const bool dropped = valid && !kept;
        const unsigned ballot = __ballot_sync(0xffffffffu, dropped);
        if (lane == 0) warp_count[warp] = __popc(ballot);
        __syncthreads();
        int before = 0;
        int pass_total = 0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          const int c = warp_count[w];
          before += w < warp ? c : 0;
          pass_total += c;
        }
        const int slot = k + dropped_before + before + __popc(ballot & ((1u << lane) - 1u));
        if (dropped && slot < n - 1) perm[slot] = j;  // the bound holds by counting
        dropped_before += pass_total;
        __syncthreads();  // warp_count is rewritten by the next pass
      }
    }
    __syncthreads();  // perm complete (also without fusion)
  }

  // The source position of output row r (0 <= r < rows). perm holds a
  // permutation of 1 .. n-1 by construction; the clamp only keeps an
  // unforeseen hole from reaching outside the sequence.
  const auto source = [&](int r) -> int {
    if (unchanged || r == 0) return r;
    return min(max(perm[r - 1], 0), n - 1);
  };

  const int64_t C = p.channels;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const int width = static_cast<int>(max(min(C - c0, chunk), int64_t{0}));
  const T* __restrict__ x = static_cast<const T*>(p.x);
  T* __restrict__ out = static_cast<T*>(p.out);

  // ------------------------------------------------ phase 2a: fused row
  if (fused) {
    const int64_t fo = o + 1 + k;
    if (fo < total_out) {
      const int nd = n - 1 - k;  // >= 1
      const int* drop = perm + k;
      const int units = width / kU;
      for (int u = tid; u < units; u += kThreads) {
        const int64_t c = c0 + static_cast<int64_t>(u) * kU;
        const T* xs = x + s * p.x_stride + c;
        float acc[kU];
#pragma unroll
        for (int q = 0; q < kU; ++q) acc[q] = 0.f;
        float wsum = 0.f;
        const auto load = [&](int j, float* v) {
          if constexpr (kVec) {
            const float2 f = E::unpack(*reinterpret_cast<const typename E::Pair*>(
                xs + static_cast<int64_t>(j) * p.x_stride));
            v[0] = f.x;
            v[kU - 1] = f.y;
          } else {
            v[0] = E::to_f(xs[static_cast<int64_t>(j) * p.x_stride]);
          }
        };
        // Fixed order: increasing j, one rounding per multiply and per add,
        // as the CPU kernel's acc[c] += a_j * x_j[c].
        const auto accumulate = [&](float w, const float* v) {
          wsum += w;
#pragma unroll
          for (int q = 0; q < kU; ++q) acc[q] = __fadd_rn(acc[q], __fmul_rn(w, v[q]));
        };
        int m = 0;
        for (; m + kFuseUnroll <= nd; m += kFuseUnroll) {
          float w[kFuseUnroll];
          float v[kFuseUnroll][kU];
#pragma unroll
          for (int f = 0; f < kFuseUnroll; ++f) {
            const int j = min(max(drop[m + f], 1), n - 1);
            w[f] = key_score(keys[j]);
            load(j, v[f]);
          }
#pragma unroll
          for (int f = 0; f < kFuseUnroll; ++f) accumulate(w[f], v[f]);
        }
        for (; m < nd; ++m) {
          const int j = min(max(drop[m], 1), n - 1);
          float v[kU];
          load(j, v);
          accumulate(key_score(keys[j]), v);
        }
        // Renormalized: divided by the weight sum (a sum that is not
        // positive gives a zero token), as the other backends.
        const auto fused = [&](float a) {
          return !p.renormalize ? a : wsum > 0.f ? __fdiv_rn(a, wsum) : 0.f;
        };
        T* dst = out + fo * C + c;
        if constexpr (kVec) {
          *reinterpret_cast<typename E::Pair*>(dst) = E::pack(fused(acc[0]), fused(acc[kU - 1]));
        } else {
          *dst = E::from_f(fused(acc[0]));
        }
      }
      if (blockIdx.y == 0 && tid == 0) p.kept_index[fo] = -1;
    }
  }

  // ------------------------------------------------ phase 2b: copies
  const int rows = unchanged ? n : 1 + k;
  {
    // Items are (row, vector) pairs of the chunk; rows * row_items <=
    // max_seqlen * chunk <= 2^30 (launcher), so int arithmetic cannot overflow.
    const int row_items = width / kV;
    const int items = rows * row_items;
    const int64_t x_stride = p.x_stride / kV;
    const int64_t o_stride = C / kV;
    const V* __restrict__ xv = reinterpret_cast<const V*>(x + c0);
    V* __restrict__ ov = reinterpret_cast<V*>(out + c0);
    for (int it0 = tid; it0 < items; it0 += kThreads * kCopyUnroll) {
      V buf[kCopyUnroll];
      int64_t dst[kCopyUnroll];
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) {
        const int it = it0 + u * kThreads;
        const int r = it / row_items;
        const int c = it - r * row_items;
        dst[u] = -1;
        if (it < items && o + r < total_out) {
          buf[u] = xv[(s + source(r)) * x_stride + c];
          dst[u] = (o + r) * o_stride + c;
        }
      }
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u)
        if (dst[u] >= 0) ov[dst[u]] = buf[u];
    }
  }
  if (blockIdx.y == 0) {
    for (int r = tid; r < rows; r += kThreads)
      if (o + r < total_out) p.kept_index[o + r] = s + source(r);
  }
}

template <typename T, bool kVec>
cudaError_t launch(const TopkParams& p, dim3 grid, size_t smem_bytes, int64_t chunk,
                   cudaStream_t stream) {
  auto* kernel = topk_select_kernel<T, kVec>;
  if (smem_bytes > 48 * 1024) {
    // Per call (the attribute is per device); cheap next to the launch.
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, kThreads, smem_bytes, stream>>>(p, chunk);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_aligned(const TopkParams& p, dim3 grid, size_t smem_bytes, int64_t chunk,
                           cudaStream_t stream) {
  // 16-byte vectors need every row start of x and out aligned: both base
  // pointers, x's row stride and C (in bytes). Chunks start at multiples of
  // 8 elements, 16-byte aligned then too.
  const uint64_t bits = reinterpret_cast<uintptr_t>(p.x) | reinterpret_cast<uintptr_t>(p.out) |
                        static_cast<uint64_t>(p.x_stride | p.channels) * sizeof(T);
  if (bits % 16 == 0) return launch<T, true>(p, grid, smem_bytes, chunk, stream);
  return launch<T, false>(p, grid, smem_bytes, chunk, stream);
}

}  // namespace

cudaError_t topk_select_cuda(const TopkParams& p, TopkDType dtype, cudaStream_t stream) {
  if (p.batch < 0 || p.total < 0 || p.total_out < 0 || p.channels < 0 || p.x_stride < 0 ||
      p.max_seqlen < 1)
    return cudaErrorInvalidValue;
  // Nothing to write (B = 0 also leaves cu_seqlens[1] unreadable), or no
  // token to select from (every n clamps to 0).
  if (p.batch == 0 || p.total_out == 0 || p.total == 0) return cudaSuccess;
  if (p.batch > INT_MAX) return cudaErrorInvalidConfiguration;
  const int64_t elt = dtype == TopkDType::kFloat ? 4 : 2;

  // Shared memory for the longest sequence, n <= T: keys padded to blocks of
  // 4, then perm.
  const int64_t n_cap = p.max_seqlen < p.total ? p.max_seqlen : p.total;
  int device = 0;
  int sms = 0;
  int smem_optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  const int64_t smem_bytes = 4 * (((n_cap + 3) & ~int64_t{3}) + n_cap);
  // warp_count (static) and the 1 KiB the runtime reserves are outside optin.
  if (smem_bytes + static_cast<int64_t>(kWarps * sizeof(int)) > smem_optin)
    return cudaErrorInvalidValue;

  // Channel chunks (grid y): enough CTAs for about two per SM when the batch
  // is small, each chunk at least kMinChunkBytes of a row, a multiple of
  // kChunkAlign elements, and small enough that max_seqlen * chunk <= 2^30.
  const int64_t C = p.channels;
  int64_t ny = 1;
  const int64_t target = 2 * static_cast<int64_t>(sms);
  if (p.batch < target) ny = (target + p.batch - 1) / p.batch;
  const int64_t max_ny = C * elt / kMinChunkBytes;
  if (ny > max_ny) ny = max_ny;
  if (ny < 1) ny = 1;
  int64_t chunk = (C + ny - 1) / ny;
  chunk = (chunk + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
  const int64_t max_chunk = (int64_t{1} << 30) / n_cap / kChunkAlign * kChunkAlign;  // >= 8
  if (chunk > max_chunk) chunk = max_chunk;
  ny = C == 0 ? 1 : (C + chunk - 1) / chunk;
  if (ny > 65535) return cudaErrorInvalidConfiguration;

  TopkParams q = p;
  q.max_seqlen = n_cap;
  const dim3 grid(static_cast<unsigned>(p.batch), static_cast<unsigned>(ny));
  const size_t bytes = static_cast<size_t>(smem_bytes);
  switch (dtype) {
    case TopkDType::kFloat:
      return launch_aligned<float>(q, grid, bytes, chunk, stream);
    case TopkDType::kHalf:
      return launch_aligned<__half>(q, grid, bytes, chunk, stream);
    case TopkDType::kBFloat16:
      return launch_aligned<__nv_bfloat16>(q, grid, bytes, chunk, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace topk
}  // namespace adaptok
