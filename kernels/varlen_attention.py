"""Triton kernels for variable-length attention with the class-attention row
as a side output (forward and backward).

Layout: ``q, k, v`` are ``[T, H, D]`` with any token and head strides (the
last dimension contiguous), so views of a packed ``qkv [T, 3, H, D]`` are read
in place. ``lse``, ``cls`` (the CLS row of every sequence's attention
probabilities, one row per head) and ``delta`` are fp32 ``[H, T]``.

Grid: axis 0 runs over *slots*, a flattened list of (sequence, block) pairs
derived inside the kernel from ``cu_seqlens`` alone: sequence b owns the slots
``[S(b), S(b + 1))`` with ``S(b) = cu[b] // BLOCK + b``. That range always
holds the ``ceil(N_b / BLOCK)`` blocks the sequence needs plus at most one
spare, and ``S(B) = T // BLOCK + B`` follows from shapes, so there is no host
sync and at most B programs of the grid are idle (a ``(B, max_blocks)`` grid
idles ``B * max_blocks - sum(blocks)``; 384 of 1024 for 256 images of 50 and
197 tokens at BLOCK = 64, against 110 of 750 here). A program finds its
sequence by binary search over ``S``. Axis 1 runs over heads.

Every row index is also bounded by ``T``, so malformed ``cu_seqlens`` (not
checked on the GPU, where checking would sync) cannot reach memory outside
the tensors.

Scores are kept in base 2 (``qk_scale = scale * log2(e)``); ``lse`` is stored
in natural log.
"""
import math

import torch
import triton
import triton.language as tl

from . import on_device

LOG2E = 1.4426950408889634


@triton.jit
def _locate(cu_seqlens, batch, search_steps, pid, BLOCK: tl.constexpr):
    """(start, length, first row of the block) of slot ``pid``; the block is
    empty (row0 >= length) for spare slots."""
    lo = pid * 0
    hi = batch - 1
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        go = tl.load(cu_seqlens + mid) // BLOCK + mid <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    start = tl.load(cu_seqlens + lo)
    length = tl.load(cu_seqlens + lo + 1) - start
    row0 = (pid - (start // BLOCK + lo)) * BLOCK
    return start.to(tl.int64), length, row0


@triton.jit
def _rows(base, rows, stride_t, offs_d, row_mask, D):
    """Load ``[len(rows), BLOCK_D]``; masked rows and columns >= D read 0."""
    return tl.load(base + rows[:, None] * stride_t + offs_d[None, :],
                   mask=row_mask[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _store_rows(base, rows, stride_t, offs_d, row_mask, D, x):
    tl.store(base + rows[:, None] * stride_t + offs_d[None, :], x.to(base.dtype.element_ty),
             mask=row_mask[:, None] & (offs_d[None, :] < D))


@triton.jit
def _span(start, b0, offs, n, T):
    """Packed rows ``start + b0 + offs`` and their mask (inside the sequence
    and the tensor)."""
    rows = start + b0 + offs
    return rows, (b0 + offs < n) & (rows < T)


@triton.jit
def _kv(k, v, rows, mask, sk_t, sv_t, offs_d, D):
    return _rows(k, rows, sk_t, offs_d, mask, D), _rows(v, rows, sv_t, offs_d, mask, D)


@triton.jit
def _query_side(q, dout, lse, delta, rows, mask, sq_t, sdo_t, offs_d, D):
    """q, dO, lse (base 2) and delta of a query block, for the backward."""
    qt = _rows(q, rows, sq_t, offs_d, mask, D)
    dot = _rows(dout, rows, sdo_t, offs_d, mask, D)
    lse2 = tl.load(lse + rows, mask=mask, other=0.0) * 1.4426950408889634
    return qt, dot, lse2, tl.load(delta + rows, mask=mask, other=0.0)


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr):
    """``a @ b`` in b's dtype with fp32 accumulation (``a`` is cast, so fp32
    probabilities meet fp16/bf16 values on the tensor cores)."""
    return tl.dot(a.to(b.dtype), b, input_precision=PRECISION)


@triton.jit
def _fwd_kernel(q, k, v, out, lse, cls, cu_seqlens, batch, search_steps, T, D, qk_scale,
                sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                STORE_CLS: tl.constexpr, PRECISION: tl.constexpr):
    start, n, m0 = _locate(cu_seqlens, batch, search_steps, tl.program_id(0), BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    q += h * sq_h
    k += h * sk_h
    v += h * sv_h
    if m0 < n:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        rows_m = start + offs_m
        mask_m = (offs_m < n) & (rows_m < T)
        qt = _rows(q, rows_m, sq_t, offs_d, mask_m, D)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(0, n, BLOCK_N):
            rows_n, mask_n = _span(start, n0, offs_n, n, T)
            kt, vt = _kv(k, v, rows_n, mask_n, sk_t, sv_t, offs_d, D)
            s = tl.where(mask_n[None, :], _mm(qt, tl.trans(kt), PRECISION) * qk_scale, float("-inf"))
            if STORE_CLS:
                if m0 == 0:
                    # Park row 0's scores (the very values this softmax uses)
                    # in cls until its final max and sum are known; picking
                    # the row costs a BLOCK_M x BLOCK_N select and sum.
                    tl.store(cls + h * T + rows_n, tl.sum(tl.where((offs_m == 0)[:, None], s, 0.0), 0),
                             mask=mask_n)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _mm(p, vt, PRECISION)
            m_i = m_new

        _store_rows(out + h * so_h, rows_m, so_t, offs_d, mask_m, D, acc / l_i[:, None])
        lse2 = m_i + tl.log2(l_i)
        tl.store(lse + h * T + rows_m, lse2 / 1.4426950408889634, mask=mask_m)

        if STORE_CLS:
            if m0 == 0:
                # The CLS row of the probabilities: exp2(s - m) / l from the
                # parked scores and row 0's final max and sum, O(N) more work.
                # Not exp2(s - lse2): lse2 is rounded at the magnitude of the
                # scores (ulp(3000) ~ 2.4e-4), and so would be the result.
                m_cls = tl.sum(tl.where(offs_m == 0, m_i, 0.0), 0)
                l_cls = tl.sum(tl.where(offs_m == 0, l_i, 0.0), 0)
                # The scores were stored in the layout of s and are read back in
                # another: other threads of the program may hold them.
                tl.debug_barrier()
                for n0 in range(0, n, BLOCK_N):
                    rows_n, mask_n = _span(start, n0, offs_n, n, T)
                    s_cls = tl.load(cls + h * T + rows_n, mask=mask_n, other=float("-inf"))
                    tl.store(cls + h * T + rows_n, tl.exp2(s_cls - m_cls) / l_cls, mask=mask_n)


@triton.jit
def _bwd_preprocess_kernel(out, dout, dlse, cls, dcls, delta, cu_seqlens, batch, search_steps, T, D,
                           so_t, so_h, sdo_t, sdo_h,
                           BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr,
                           HAS_DCLS: tl.constexpr):
    # delta_i = <dO_i, O_i> - dlse_i; the CLS row also adds sum_j P_0j dcls_j.
    start, n, m0 = _locate(cu_seqlens, batch, search_steps, tl.program_id(0), BLOCK)
    h = tl.program_id(1).to(tl.int64)
    if m0 < n:
        offs_m = m0 + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        rows = start + offs_m
        mask = (offs_m < n) & (rows < T)
        o = _rows(out + h * so_h, rows, so_t, offs_d, mask, D).to(tl.float32)
        do = _rows(dout + h * sdo_h, rows, sdo_t, offs_d, mask, D).to(tl.float32)
        d = tl.sum(o * do, 1)
        if HAS_DLSE:
            d -= tl.load(dlse + h * T + rows, mask=mask, other=0.0)
        if HAS_DCLS:
            if m0 == 0:
                acc = tl.zeros([BLOCK], tl.float32)
                for n0 in range(0, n, BLOCK):
                    cols = start + n0 + tl.arange(0, BLOCK)
                    cmask = (n0 + tl.arange(0, BLOCK) < n) & (cols < T)
                    acc += (tl.load(cls + h * T + cols, mask=cmask, other=0.0)
                            * tl.load(dcls + h * T + cols, mask=cmask, other=0.0))
                d += tl.where(offs_m == 0, tl.sum(acc, 0), 0.0)
        tl.store(delta + h * T + rows, d, mask=mask)


@triton.jit
def _bwd_kernel(q, k, v, dout, lse, delta, dcls, dq, dk, dv, cu_seqlens, batch, search_steps, n_slots, T, D,
                qk_scale, scale,
                sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sg_t, sg_h,
                BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DCLS: tl.constexpr, PRECISION: tl.constexpr):
    # dS = P * (dP - delta) with dP = dO V^T, plus dcls on each CLS row.
    # Programs [0, n_slots) own a key block and accumulate dK, dV over the
    # query blocks; programs [n_slots, 2 n_slots) own a query block and
    # accumulate dQ over the key blocks (no atomics, deterministic).
    # dq, dk, dv share the strides (sg_t, sg_h).
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    q += h * sq_h
    k += h * sk_h
    v += h * sv_h
    dout += h * sdo_h
    lse += h * T
    delta += h * T
    dcls += h * T
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    if pid < n_slots:
        start, n, j0 = _locate(cu_seqlens, batch, search_steps, pid, BLOCK)
        if j0 < n:
            rows_n, mask_n = _span(start, j0, offs, n, T)
            kt, vt = _kv(k, v, rows_n, mask_n, sk_t, sv_t, offs_d, D)
            dk_acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
            dv_acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
            for i0 in range(0, n, BLOCK):
                rows_m, mask_m = _span(start, i0, offs, n, T)
                qt, dot, lse2, d_i = _query_side(q, dout, lse, delta, rows_m, mask_m, sq_t, sdo_t, offs_d, D)
                # Transposed tiles: [keys, queries].
                st = _mm(kt, tl.trans(qt), PRECISION)
                pt = tl.where(mask_m[None, :], tl.exp2(st * qk_scale - lse2[None, :]), 0.0)
                dv_acc += _mm(pt, dot, PRECISION)
                dpt = _mm(vt, tl.trans(dot), PRECISION)
                if HAS_DCLS:
                    if i0 == 0:
                        g_cls = tl.load(dcls + rows_n, mask=mask_n, other=0.0)
                        dpt += tl.where((offs == 0)[None, :], g_cls[:, None], 0.0)
                dk_acc += _mm(pt * (dpt - d_i[None, :]), qt, PRECISION)
            _store_rows(dk + h * sg_h, rows_n, sg_t, offs_d, mask_n, D, dk_acc * scale)
            _store_rows(dv + h * sg_h, rows_n, sg_t, offs_d, mask_n, D, dv_acc)
    else:
        start, n, i0 = _locate(cu_seqlens, batch, search_steps, pid - n_slots, BLOCK)
        if i0 < n:
            rows_m, mask_m = _span(start, i0, offs, n, T)
            qt, dot, lse2, d_i = _query_side(q, dout, lse, delta, rows_m, mask_m, sq_t, sdo_t, offs_d, D)
            dq_acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
            for j0 in range(0, n, BLOCK):
                rows_n, mask_n = _span(start, j0, offs, n, T)
                kt, vt = _kv(k, v, rows_n, mask_n, sk_t, sv_t, offs_d, D)
                s = _mm(qt, tl.trans(kt), PRECISION)
                p = tl.where(mask_n[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
                dp = _mm(dot, tl.trans(vt), PRECISION)
                if HAS_DCLS:
                    if i0 == 0:
                        g_cls = tl.load(dcls + rows_n, mask=mask_n, other=0.0)
                        dp += tl.where((offs == 0)[:, None], g_cls[None, :], 0.0)
                dq_acc += _mm(p * (dp - d_i[:, None]), kt, PRECISION)
            _store_rows(dq + h * sg_h, rows_m, sg_t, offs_d, mask_m, D, dq_acc * scale)


# ----------------------------------------------------------------------------- host

MAX_HEAD_DIM = 128


def slots(total: int, batch: int, block: int) -> int:
    """Programs along grid axis 0: ``S(B) = T // block + B``."""
    return total // block + batch


def _search_steps(batch: int) -> int:
    return math.ceil(math.log2(batch)) + 1 if batch > 1 else 0


def fwd_config(head_dim: int, max_seqlen: int):
    """(BLOCK_M, BLOCK_N, num_warps) of the forward: small tiles for ViT
    lengths (N <= ~256). Not yet tuned on a GPU."""
    block_m = 64 if max_seqlen > 32 else 32
    block_n = 64 if head_dim <= 64 else 32
    return block_m, block_n, 4


def bwd_config(head_dim: int):
    """(BLOCK, num_warps) of the backward (query and key blocks alike)."""
    return (64, 4) if head_dim <= 64 else (32, 4)


def _precision(dtype) -> str:
    # fp32 inputs follow torch's TF32 switch for matmuls (off by default);
    # fp16/bf16 ignore it.
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def forward(q, k, v, cu_seqlens, max_seqlen, scale, out, lse, cls):
    """Fill ``out [T, H, D]``, ``lse [H, T]`` and, unless ``cls`` is None,
    ``cls [H, T]``."""
    T, H, D = q.shape
    batch = cu_seqlens.shape[0] - 1
    block_m, block_n, warps = fwd_config(D, max_seqlen)
    with on_device(q):
        _fwd_kernel[(slots(T, batch, block_m), H)](
            q, k, v, out, lse, cls if cls is not None else lse, cu_seqlens, batch, _search_steps(batch), T, D,
            scale * LOG2E, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D), STORE_CLS=cls is not None,
            PRECISION=_precision(q.dtype), num_warps=warps,
        )


def backward(dout, q, k, v, out, lse, cls, dlse, dcls, cu_seqlens, scale, dq, dk, dv, delta):
    """Fill ``dq, dk, dv`` (``[T, H, D]``, sharing strides); ``delta [H, T]``
    is fp32 scratch. ``dlse`` and ``dcls`` (fp32 ``[H, T]``, contiguous) may
    be None; ``cls`` is needed with ``dcls``."""
    T, H, D = q.shape
    batch = cu_seqlens.shape[0] - 1
    block, warps = bwd_config(D)
    n_slots = slots(T, batch, block)
    steps = _search_steps(batch)
    has_dcls = dcls is not None
    with on_device(q):
        _bwd_preprocess_kernel[(n_slots, H)](
            out, dout, dlse if dlse is not None else lse, cls if has_dcls else lse, dcls if has_dcls else lse,
            delta, cu_seqlens, batch, steps, T, D, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
            BLOCK=block, BLOCK_D=_block_d(D), HAS_DLSE=dlse is not None, HAS_DCLS=has_dcls, num_warps=warps,
        )
        _bwd_kernel[(2 * n_slots, H)](
            q, k, v, dout, lse, delta, dcls if has_dcls else lse, dq, dk, dv, cu_seqlens, batch, steps, n_slots,
            T, D, scale * LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
            BLOCK=block, BLOCK_D=_block_d(D), HAS_DCLS=has_dcls, PRECISION=_precision(q.dtype), num_warps=warps,
        )
