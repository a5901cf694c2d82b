// CUDA forward of variable-length attention with the class-attention row as a
// side output (see varlen_attention.h for the contract). Kernels and launcher
// only; the torch bindings live in varlen_attention.cpp. It follows the Triton
// forward (kernels/varlen_attention.py, _fwd_kernel): the same flattened grid
// of (sequence, query block) slots, base-2 online softmax, and one extra
// O(N * D) pass over the keys for the CLS row.
//
// Tensor cores through WMMA (16x16x16, fp16/bf16 in, fp32 accumulate). The
// element-to-row mapping of a WMMA accumulator is unspecified, so every
// per-row step (max, exp, sum, the rescale of the output) runs on fp32 tiles
// stored to shared memory with store_matrix_sync, whose layout is defined.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <climits>
#include <cstdint>

#include "cuda_dtype.cuh"
#include "varlen_attention.h"

namespace adaptok {
namespace attention {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kBlockM = 64;  // query rows per CTA
constexpr int kWarps = 4;  // each warp owns 16 query rows
constexpr int kThreads = kWarps * 32;
constexpr int kFrag = 16;  // WMMA tile edge
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kBlockM == kWarps * kFrag, "one 16-row strip per warp");

// Keys per iteration: 32 at D = 128 keeps the CTA at 59 KiB of shared memory
// (64 would take 84 KiB and halve the CTAs per SM).
template <int D>
constexpr int block_n() {
  return D >= 128 ? 32 : 64;
}

// Device code needs sm_80 (bf16 WMMA): below it, an arch list that names an
// older GPU still compiles, to empty kernels that the launcher never starts.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define ADAPTOK_VARLEN_DEVICE 1
#else
#define ADAPTOK_VARLEN_DEVICE 0
#endif

#if ADAPTOK_VARLEN_DEVICE
template <typename T, typename Use, typename Layout>
using Frag = wmma::fragment<Use, 16, 16, 16, T, Layout>;
using BfFragA = Frag<__nv_bfloat16, wmma::matrix_a, wmma::row_major>;
template <typename Layout>
using BfFragB = Frag<__nv_bfloat16, wmma::matrix_b, Layout>;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Loads a 16-bit WMMA fragment from shared memory. nvcc (13.0) emits the
// bf16 loads of mma.hpp with a generic address (LD.E + MOVM per 32 bits)
// where it gives the fp16 ones the .shared state space (ldmatrix), so the
// bf16 overloads issue the same PTX instruction with .shared, filling the
// fragment the way mma.hpp does ((int*)&frag, operands in order).
template <typename F, typename T>
__device__ __forceinline__ void load_frag(F& f, const T* p, unsigned ldm) {
  wmma::load_matrix_sync(f, p, ldm);
}
__device__ __forceinline__ void load_frag(BfFragA& f, const __nv_bfloat16* p,
                                          unsigned ldm) {
  uint32_t* x = reinterpret_cast<uint32_t*>(&f);
  static_assert(sizeof(BfFragA) == 4 * sizeof(uint32_t), "4 x b32");
  asm volatile(
      "wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16 {%0, %1, %2, %3}, "
      "[%4], %5;\n"
      : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3])
      : "r"(smem_addr(p)), "r"(ldm)
      : "memory");
}
__device__ __forceinline__ void load_frag(BfFragB<wmma::col_major>& f,
                                          const __nv_bfloat16* p, unsigned ldm) {
  uint32_t* x = reinterpret_cast<uint32_t*>(&f);
  static_assert(sizeof(BfFragB<wmma::col_major>) == 4 * sizeof(uint32_t), "4 x b32");
  asm volatile(
      "wmma.load.b.sync.aligned.col.m16n16k16.shared.bf16 {%0, %1, %2, %3}, "
      "[%4], %5;\n"
      : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3])
      : "r"(smem_addr(p)), "r"(ldm)
      : "memory");
}
__device__ __forceinline__ void load_frag(BfFragB<wmma::row_major>& f,
                                          const __nv_bfloat16* p, unsigned ldm) {
  uint32_t* x = reinterpret_cast<uint32_t*>(&f);
  static_assert(sizeof(BfFragB<wmma::row_major>) == 4 * sizeof(uint32_t), "4 x b32");
  asm volatile(
      "wmma.load.b.sync.aligned.row.m16n16k16.shared.bf16 {%0, %1, %2, %3}, "
      "[%4], %5;\n"
      : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3])
      : "r"(smem_addr(p)), "r"(ldm)
      : "memory");
}

#endif  // ADAPTOK_VARLEN_DEVICE

// Shared-memory layout of one CTA. Leading dimensions are padded so that rows
// start in different banks; every WMMA pointer below is a multiple of 32 bytes
// from the (128-byte aligned) base and every ldm is a multiple of 16 bytes.
template <int D>
struct Smem {
  static constexpr int kBlockN = block_n<D>();
  static constexpr int kLdKV = D + 8;  // halves, K and V tiles
  static constexpr int kLdQ = D + 8;  // halves, Q staging (aliases O)
  static constexpr int kLdO = D + 4;  // floats, per-warp output accumulator
  static constexpr int kLdS = kBlockN + 4;  // floats, per-warp scores
  static constexpr int kLdP = 2 * kLdS;  // halves: P overwrites S row by row
  static constexpr int kKVBytes = kBlockN * kLdKV * 2;
  static constexpr int kOBytes = kFrag * kLdO * 4;
  static constexpr int kSBytes = kFrag * kLdS * 4;
  static constexpr int kWarpBytes = kOBytes + kSBytes;
  static constexpr int kWarp0 = 2 * kKVBytes;  // after the K and V tiles
  static constexpr int kBytes = kWarp0 + kWarps * kWarpBytes;

  static_assert(D % kFrag == 0 && kBlockN % kFrag == 0, "WMMA tiles");
  static_assert(kLdKV % 8 == 0 && kLdQ % 8 == 0 && kLdP % 8 == 0,
                "16-bit ldm: multiple of 8 elements");
  static_assert(kLdO % 4 == 0 && kLdS % 4 == 0, "fp32 ldm: multiple of 4");
  static_assert(kKVBytes % 32 == 0 && kOBytes % 32 == 0 && kSBytes % 32 == 0,
                "WMMA pointers: 32-byte aligned");
  static_assert(kFrag * kLdQ * 2 <= kOBytes, "Q staging fits in O");
  static_assert(kBlockN * 2 <= kLdS * 4, "a P row fits in its S row");
};

#if ADAPTOK_VARLEN_DEVICE
// Eight consecutive elements of a row as floats (16-byte aligned with kVec).
template <typename T, bool kVec>
__device__ __forceinline__ void load8(const T* __restrict__ src, float* dst) {
  if (kVec) {
    union {
      uint4 u;
      typename Elt<T>::Pair t[4];
    } x;
    x.u = *reinterpret_cast<const uint4*>(src);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 f = Elt<T>::unpack(x.t[e]);
      dst[2 * e] = f.x;
      dst[2 * e + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) dst[e] = Elt<T>::to_f(src[e]);
  }
}

// Copies rows [0, rows) of a [rows, D] tile from global (row r at
// src + r * stride) to shared memory (leading dimension ld), zero-filling rows
// >= valid. Threads tid, tid + nthreads, ... share the work. With kVec the
// caller has checked that every row start is 16-byte aligned.
template <int D, int kRows, int kLd, int kNThreads, bool kVec>
__device__ __forceinline__ void load_tile(uint16_t* __restrict__ dst,
                                          const uint16_t* __restrict__ src,
                                          int64_t stride, int valid, int tid) {
  // A fixed trip count per thread lets the loads of one tile be in flight
  // together.
  constexpr int kWidth = kVec ? 8 : 1;
  constexpr int kChunks = D / kWidth;
  static_assert(kRows * kChunks % kNThreads == 0, "whole trips");
#pragma unroll(kVec ? 16 : 4)
  for (int it = 0; it < kRows * kChunks / kNThreads; ++it) {
    const int i = tid + it * kNThreads;
    const int r = i / kChunks;
    const int c = (i % kChunks) * kWidth;
    if (kVec) {
      uint4 x = make_uint4(0, 0, 0, 0);
      if (r < valid) x = *reinterpret_cast<const uint4*>(src + r * stride + c);
      *reinterpret_cast<uint4*>(dst + r * kLd + c) = x;
    } else {
      dst[r * kLd + c] = r < valid ? src[r * stride + c] : uint16_t{0};
    }
  }
}

#endif  // ADAPTOK_VARLEN_DEVICE

// CTAs per SM to budget registers for: as many as the SM's shared memory
// holds (1 KiB reserved per CTA), capped at 4 so that ptxas keeps 128
// registers for the tensor-core loops. H100: 4, 4, 3 CTAs at D = 32, 64, 128;
// A100 (164 KiB): 4, 3, 2.
template <int D>
constexpr int min_ctas() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 800
  constexpr int kSmemPerSm = 164 * 1024;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kSmemPerSm = 228 * 1024;
#else
  constexpr int kSmemPerSm = 100 * 1024;  // sm_86, sm_89 (PTX JIT)
#endif
  constexpr int kFit = kSmemPerSm / (Smem<D>::kBytes + 128 + 1024);  // + static
  return kFit < 1 ? 1 : kFit < 4 ? kFit : 4;
}

// Grid: x = slot (a flattened (sequence, 64-row query block) pair, see
// _locate in the Triton kernel), y = head. Block: 4 warps, each of which owns
// 16 query rows and keeps their softmax statistics in registers (two lanes
// per row), their scores and output accumulator in its own shared memory.
template <typename T, int D, bool kVec>
__global__ void __launch_bounds__(kThreads, min_ctas<D>())
    varlen_fwd_kernel(VarlenParams p, float qk_scale) {
#if ADAPTOK_VARLEN_DEVICE
  constexpr float kLn2 = 0.6931471805599453f;
  using L = Smem<D>;
  using T2 = typename Elt<T>::Pair;
  using FragA = Frag<T, wmma::matrix_a, wmma::row_major>;
  using FragKt = Frag<T, wmma::matrix_b, wmma::col_major>;
  using FragV = Frag<T, wmma::matrix_b, wmma::row_major>;
  using FragAcc = wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float>;
  constexpr int kBlockN = L::kBlockN;

  // Find the slot's sequence: the last b with S(b) = cu[b] / kBlockM + b <=
  // slot. The interval shrinks every step, so even a malformed (unsorted)
  // cu_seqlens ends the loop within ceil(log2(B)) + 1 steps.
  const int32_t* __restrict__ cu = p.cu_seqlens;
  const int64_t slot = blockIdx.x;
  int64_t lo = 0;
  int64_t hi = p.batch - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (static_cast<int64_t>(cu[mid]) / kBlockM + mid <= slot) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int64_t raw_start = cu[lo];
  const int64_t raw_end = cu[lo + 1];
  const int64_t first = (slot - (raw_start / kBlockM + lo)) * kBlockM;
  // Clamped to [0, T] so that every position in [0, n) is a row in [0, T),
  // whatever cu_seqlens holds. Well-formed offsets pass unchanged.
  const int64_t total = p.total;
  const int64_t start = min(max(raw_start, int64_t{0}), total);
  const int64_t n = min(max(raw_end, start), total) - start;
  if (first < 0 || first >= n) return;  // spare slot (uniform over the CTA)
  // Positions inside a sequence fit in int: n <= INT32_MAX (int32 offsets).
  const int row0 = static_cast<int>(first);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int64_t h = blockIdx.y;
  const int strip0 = row0 + warp * kFrag;  // the warp's first position
  // A warp whose 16 rows all lie past the sequence end still helps to load
  // K and V and meets every __syncthreads, but computes nothing.
  const bool active = strip0 < n;
  const int strip_rows = static_cast<int>(min(n - strip0, int64_t{kFrag}));

  extern __shared__ __align__(128) unsigned char smem[];
  T* k_s = reinterpret_cast<T*>(smem);
  T* v_s = reinterpret_cast<T*>(smem + L::kKVBytes);
  unsigned char* wbase = smem + L::kWarp0 + warp * L::kWarpBytes;
  float* o_s = reinterpret_cast<float*>(wbase);
  float* s_s = reinterpret_cast<float*>(wbase + L::kOBytes);
  T* q_s = reinterpret_cast<T*>(wbase);  // staging only, before O exists
  T* p_s = reinterpret_cast<T*>(s_s);

  const T* q = static_cast<const T*>(p.q) + h * p.q_stride_h;
  const T* k = static_cast<const T*>(p.k) + h * p.k_stride_h + start * p.k_stride_t;
  const T* v = static_cast<const T*>(p.v) + h * p.v_stride_h + start * p.v_stride_t;

  // Q stays in registers as A fragments for the whole key loop.
  FragA q_frag[D / kFrag];
  // Softmax statistics of row r = lane / 2 of the strip, held by both lanes
  // of the pair; lane half `hh` handles columns 4c + 2hh and 4c + 2hh + 1,
  // so that the float2 accesses of a half-warp hit 32 distinct banks.
  const int r = lane / 2;
  const int hh = lane % 2;
  float m_i = -INFINITY;
  float l_i = 0.f;
  if (active) {
    load_tile<D, kFrag, L::kLdQ, 32, kVec>(
        reinterpret_cast<uint16_t*>(q_s),
        reinterpret_cast<const uint16_t*>(q + (start + strip0) * p.q_stride_t),
        p.q_stride_t, strip_rows, lane);
    __syncwarp();
#pragma unroll
    for (int kk = 0; kk < D / kFrag; ++kk)
      load_frag(q_frag[kk], q_s + kk * kFrag, L::kLdQ);
    __syncwarp();  // Q is in registers before O overwrites its staging
#pragma unroll
    for (int c = 0; c < D / 4; ++c)
      *reinterpret_cast<float2*>(o_s + r * L::kLdO + 4 * c + 2 * hh) =
          make_float2(0.f, 0.f);
  }

  for (int64_t n0 = 0; n0 < n; n0 += kBlockN) {
    const int kv_rows = static_cast<int>(min(n - n0, int64_t{kBlockN}));
    __syncthreads();  // every warp is done with the previous K, V, S and P
    load_tile<D, kBlockN, L::kLdKV, kThreads, kVec>(
        reinterpret_cast<uint16_t*>(k_s),
        reinterpret_cast<const uint16_t*>(k + n0 * p.k_stride_t), p.k_stride_t,
        kv_rows, tid);
    load_tile<D, kBlockN, L::kLdKV, kThreads, kVec>(
        reinterpret_cast<uint16_t*>(v_s),
        reinterpret_cast<const uint16_t*>(v + n0 * p.v_stride_t), p.v_stride_t,
        kv_rows, tid);
    __syncthreads();
    if (!active) continue;

    // S = Q K^T: K stored [keys, D] row-major is K^T in column-major.
#pragma unroll
    for (int j = 0; j < kBlockN / kFrag; ++j) {
      FragAcc s_frag;
      wmma::fill_fragment(s_frag, 0.f);
#pragma unroll
      for (int kk = 0; kk < D / kFrag; ++kk) {
        FragKt k_frag;
        load_frag(k_frag, k_s + j * kFrag * L::kLdKV + kk * kFrag, L::kLdKV);
        wmma::mma_sync(s_frag, q_frag[kk], k_frag, s_frag);
      }
      wmma::store_matrix_sync(s_s + j * kFrag, s_frag, L::kLdS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax of row r in base 2. Keys past the end score -inf; the
    // first column of every tile is a key of the sequence (n0 < n), so
    // m_new is finite and no (-inf) - (-inf) arises; the guard only keeps
    // non-finite inputs from adding NaN of our own.
    // Two reads of S from shared memory instead of keeping the row in
    // registers: register pressure, not bandwidth, limits this kernel.
    float m_tile = -INFINITY;
#pragma unroll
    for (int c = 0; c < kBlockN / 4; ++c) {
      const int col = 4 * c + 2 * hh;
      const float2 x = *reinterpret_cast<const float2*>(s_s + r * L::kLdS + col);
      if (col < kv_rows) m_tile = fmaxf(m_tile, x.x * qk_scale);
      if (col + 1 < kv_rows) m_tile = fmaxf(m_tile, x.y * qk_scale);
    }
    m_tile = fmaxf(m_tile, __shfl_xor_sync(0xffffffffu, m_tile, 1));
    const float m_new = fmaxf(m_i, m_tile);
    const float m_ref = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = exp2f(m_i - m_ref);  // 0 on the first tile
    float row_sum = 0.f;
    T2 pk[kBlockN / 4];
#pragma unroll
    for (int c = 0; c < kBlockN / 4; ++c) {
      const int col = 4 * c + 2 * hh;
      const float2 x = *reinterpret_cast<const float2*>(s_s + r * L::kLdS + col);
      // exp2f(-inf) = 0 masks the keys past the end.
      const float a = exp2f(col < kv_rows ? x.x * qk_scale - m_ref : -INFINITY);
      const float b = exp2f(col + 1 < kv_rows ? x.y * qk_scale - m_ref : -INFINITY);
      row_sum += a + b;
      pk[c] = Elt<T>::pack(a, b);
    }
    row_sum += __shfl_xor_sync(0xffffffffu, row_sum, 1);
    l_i = l_i * alpha + row_sum;
    m_i = m_new;
    __syncwarp();  // all of S is read before P overwrites it
#pragma unroll
    for (int c = 0; c < kBlockN / 4; ++c)
      *reinterpret_cast<T2*>(p_s + r * L::kLdP + 4 * c + 2 * hh) = pk[c];
#pragma unroll 8  // not D / 4: ptxas would hold every load in registers
    for (int c = 0; c < D / 4; ++c) {
      float2* o = reinterpret_cast<float2*>(o_s + r * L::kLdO + 4 * c + 2 * hh);
      const float2 x = *o;
      *o = make_float2(x.x * alpha, x.y * alpha);
    }
    __syncwarp();

    // O = alpha O + P V, accumulated in place through the fp32 O tile.
    FragA p_frag[kBlockN / kFrag];
#pragma unroll
    for (int kk = 0; kk < kBlockN / kFrag; ++kk)
      load_frag(p_frag[kk], p_s + kk * kFrag, L::kLdP);
#pragma unroll
    for (int dd = 0; dd < D / kFrag; ++dd) {
      FragAcc o_frag;
      wmma::load_matrix_sync(o_frag, o_s + dd * kFrag, L::kLdO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kBlockN / kFrag; ++kk) {
        FragV v_frag;
        load_frag(v_frag, v_s + kk * kFrag * L::kLdKV + dd * kFrag, L::kLdKV);
        wmma::mma_sync(o_frag, p_frag[kk], v_frag, o_frag);
      }
      wmma::store_matrix_sync(o_s + dd * kFrag, o_frag, L::kLdO, wmma::mem_row_major);
    }
  }

  // l_i >= 1 on every row (its max term is exp2(0)); rows past the end saw
  // zero queries, so they are finite too, and are not stored.
  const float lse2 = m_i + log2f(l_i);
  if (active) {
    __syncwarp();  // the last P V store is visible to every lane
    const float inv_l = 1.f / l_i;
#pragma unroll 8  // not D / 4: ptxas would hold every load in registers
    for (int c = 0; c < D / 4; ++c) {
      float2* o = reinterpret_cast<float2*>(o_s + r * L::kLdO + 4 * c + 2 * hh);
      const float2 x = *o;
      *o = make_float2(x.x * inv_l, x.y * inv_l);
    }
    if (hh == 0 && r < strip_rows)
      p.lse[h * total + start + strip0 + r] = lse2 * kLn2;
    __syncwarp();

    T* out = static_cast<T*>(p.out) + h * p.o_stride_h +
             (start + strip0) * p.o_stride_t;
    if (kVec) {
      constexpr int kChunks = D / 8;
      for (int i = lane; i < strip_rows * kChunks; i += 32) {
        const int row = i / kChunks;
        const int c = (i % kChunks) * 8;
        const float4 a = *reinterpret_cast<const float4*>(o_s + row * L::kLdO + c);
        const float4 b = *reinterpret_cast<const float4*>(o_s + row * L::kLdO + c + 4);
        union {
          uint4 u;
          T2 t[4];
        } pack;
        pack.t[0] = Elt<T>::pack(a.x, a.y);
        pack.t[1] = Elt<T>::pack(a.z, a.w);
        pack.t[2] = Elt<T>::pack(b.x, b.y);
        pack.t[3] = Elt<T>::pack(b.z, b.w);
        *reinterpret_cast<uint4*>(out + row * p.o_stride_t + c) = pack.u;
      }
    } else {
      for (int i = lane; i < strip_rows * D; i += 32) {
        const int row = i / D;
        const int c = i % D;
        out[row * p.o_stride_t + c] = Elt<T>::from_f(o_s[row * L::kLdO + c]);
      }
    }
  }

  // The CLS row: P_0j = exp2(s_0j - m_0) / l_0 for every key j, from row 0's
  // final running max and sum in fp32. Not exp2(s_0j - lse2_0): lse2 is
  // rounded at the logits' magnitude (ulp(3000) = 2.4e-4), which large
  // logits turn into that relative error of P. A group of D / 8 lanes
  // shares a key, 8 elements per lane, so the loads stay coalesced and a lane
  // keeps only its 8 elements of q_0.
  if (p.cls != nullptr && row0 == 0) {
    __shared__ float max_cls, inv_sum_cls;
    if (tid == 0) {  // warp 0, lane 0 holds row 0 (r == 0)
      max_cls = m_i;
      inv_sum_cls = 1.f / l_i;
    }
    __syncthreads();
    constexpr int kGroup = D / 8;
    constexpr int kKeysPerPass = kThreads / kGroup;
    static_assert(32 % kGroup == 0, "groups within a warp");
    const int part = (tid % kGroup) * 8;
    float qv[8];
    load8<T, kVec>(q + start * p.q_stride_t + part, qv);
    const float max_ref = max_cls, inv_sum_ref = inv_sum_cls;
    // n and j0 are uniform, so every lane reaches the shuffles.
    for (int64_t j0 = 0; j0 < n; j0 += kKeysPerPass) {
      const int64_t j = j0 + tid / kGroup;
      float kv[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      if (j < n) load8<T, kVec>(k + j * p.k_stride_t + part, kv);
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) dot = fmaf(kv[e], qv[e], dot);
#pragma unroll
      for (int o = kGroup / 2; o > 0; o /= 2)
        dot += __shfl_xor_sync(0xffffffffu, dot, o);
      if (j < n && part == 0)
        p.cls[h * total + start + j] = exp2f(dot * qk_scale - max_ref) * inv_sum_ref;
    }
  }
#endif  // ADAPTOK_VARLEN_DEVICE
}

template <typename T, int D, bool kVec>
cudaError_t launch(const VarlenParams& p, int64_t slots, cudaStream_t stream) {
  constexpr int kBytes = Smem<D>::kBytes;
  auto* kernel = varlen_fwd_kernel<T, D, kVec>;
  if (kBytes > 48 * 1024) {
    // Per call, as flash-attention does: the attribute is per device, and
    // the call is cheap next to the launch.
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(slots), static_cast<unsigned>(p.heads));
  kernel<<<grid, kThreads, kBytes, stream>>>(p, p.scale * kLog2e);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_aligned(const VarlenParams& p, int64_t slots,
                           cudaStream_t stream) {
  // 16-byte vectors need every row start of q, k, v and out aligned: the
  // base pointers and both strides (in bytes). qkv views of a contiguous
  // [T, 3, H, D] projection pass for every supported D.
  const uint64_t bits =
      reinterpret_cast<uintptr_t>(p.q) | reinterpret_cast<uintptr_t>(p.k) |
      reinterpret_cast<uintptr_t>(p.v) | reinterpret_cast<uintptr_t>(p.out) |
      static_cast<uint64_t>(p.q_stride_t | p.q_stride_h | p.k_stride_t |
                            p.k_stride_h | p.v_stride_t | p.v_stride_h |
                            p.o_stride_t | p.o_stride_h) * sizeof(T);
  if (bits % 16 == 0) return launch<T, D, true>(p, slots, stream);
  return launch<T, D, false>(p, slots, stream);
}

template <typename T>
cudaError_t dispatch_head_dim(const VarlenParams& p, int64_t slots,
                              cudaStream_t stream) {
  switch (p.head_dim) {
    case 32:
      return launch_aligned<T, 32>(p, slots, stream);
    case 64:
      return launch_aligned<T, 64>(p, slots, stream);
    case 128:
      return launch_aligned<T, 128>(p, slots, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t varlen_attention_fwd_cuda(const VarlenParams& p, CudaDType dtype,
                                      cudaStream_t stream) {
  if (!cuda_supports_head_dim(p.head_dim)) return cudaErrorInvalidValue;
  // B = 0 leaves no sequence to attend within (and cu_seqlens[1] unreadable).
  if (p.total == 0 || p.batch == 0 || p.heads == 0) return cudaSuccess;
  if (p.total < 0 || p.batch < 0 || p.heads < 0) return cudaErrorInvalidValue;
  // Sequence b owns slots [S(b), S(b + 1)), S(b) = cu[b] / 64 + b, and
  // S(B) = T / 64 + B needs no read of cu_seqlens.
  const int64_t slots = p.total / kBlockM + p.batch;
  if (slots > INT_MAX || p.heads > 65535) return cudaErrorInvalidConfiguration;
  // The kernels are compiled out below sm_80 (bf16 WMMA); refuse to launch
  // an empty kernel there rather than leave the outputs unwritten.
  int device = 0;
  int major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  if (major < 8) return cudaErrorNoKernelImageForDevice;
  switch (dtype) {
    case CudaDType::kHalf:
      return dispatch_head_dim<__half>(p, slots, stream);
    case CudaDType::kBFloat16:
      return dispatch_head_dim<__nv_bfloat16>(p, slots, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace attention
}  // namespace adaptok

#undef ADAPTOK_VARLEN_DEVICE
