"""Triton kernel for top-k class-attention token selection with
inattentive-token fusion (EViT's token reorganization); the semantics are
those of ``csrc/topk_select.h``.

Layout: ``x [T, C]`` with any row stride (unit column stride), ``cls_attn``
fp32 ``[T]``, ``out [T_out, C]`` contiguous in x's dtype, ``kept_index``
int64 ``[T_out]``. Sequence b is rows ``[s, s + n)`` of x and
``[o, o + n_out)`` of out.

Grid: axis 0 = sequence, axis 1 = blocks of BLOCK_C channels. Every program
ranks its sequence's candidates itself: no communication between programs,
at the price of ``cdiv(C, BLOCK_C)`` rankings of O(N^2) comparisons a
sequence (cheap next to the copy at ViT lengths; BLOCK_C grows for long
sequences). A program walks its sequence in blocks of BLOCK_J tokens j; for
each block:

1. ranks: loop over blocks of BLOCK_I tokens i and count the ``[BLOCK_I,
   BLOCK_J]`` tile of ``key_i > key_j or (key_i == key_j and i < j)`` over
   the candidates i in ``[1, n)``, so no ``[N, N]`` tile is ever formed. Keys
   are integers that order like the scores, with -0 equal to +0 and NaN above
   every number (as a stable descending ``torch.sort``; the CUDA kernel's
   order), so the ranks are a permutation whatever the scores;
2. copy: the CLS row to row ``o``, each kept token (rank < k) to row
   ``o + 1 + rank`` (a permutation: every output row is written once), or,
   when nothing is dropped (k == n - 1), every row to ``o + j``;
   ``kept_index`` by the programs of channel block 0;
3. fuse: the dropped tokens' ``a_j x_j`` summed into an fp32 accumulator
   (and the ``a_j`` into their total, to renormalize), stored after the loop
   at row ``o + 1 + k`` with ``kept_index`` -1.

No host sync. Offsets come from the device unchecked, so they are clamped as
in the CUDA kernel: ``s, e`` into ``[0, T]``, ``n <= max_seqlen``, ``k`` into
``[0, n - 1]``, ``o`` into ``[0, T_out]`` and every output row bounded by
``T_out``; row offsets are int64.
"""

import triton
import triton.language as tl

from . import on_device


@triton.jit
def _keys(cls_attn, s, pos, valid):
    """Integer keys of the scores at ``s + pos`` and the scores themselves.
    Where not ``valid`` (the CLS token, padding) the key is -0x7FFFFFFF,
    below that of every score (-inf's is -0x7F800000), and the score 0."""
    a = tl.load(cls_attn + s + pos, mask=valid, other=0.0)
    u = a.to(tl.int32, bitcast=True)
    mag = u & 0x7FFFFFFF
    key = tl.where(u >= 0, u, -mag)  # -0 and +0 both 0
    key = tl.where(mag > 0x7F800000, 0x7FFFFFFF, key)  # NaN above +inf
    return tl.where(valid, key, -0x7FFFFFFF), a


@triton.jit
def _fwd_kernel(x, out, kept_index, cls_attn, cu_seqlens, cu_seqlens_out, keep, T, T_out, C, max_seqlen, stride_x,
                BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
                FUSE: tl.constexpr, RENORMALIZE: tl.constexpr):
    b = tl.program_id(0)
    pid_c = tl.program_id(1)
    s = tl.minimum(tl.maximum(tl.load(cu_seqlens + b).to(tl.int64), 0), T)
    e = tl.minimum(tl.maximum(tl.load(cu_seqlens + b + 1).to(tl.int64), s), T)
    n = tl.minimum(e - s, max_seqlen).to(tl.int32)
    k = tl.minimum(tl.maximum(tl.load(keep + b), 0), n - 1)
    o = tl.minimum(tl.maximum(tl.load(cu_seqlens_out + b).to(tl.int64), 0), T_out)
    unchanged = k == n - 1  # also when n == 0 (k = -1): nothing is written then
    # Ranks are needed only when something is dropped and something kept;
    # without fusion and with k == 0 only the CLS row is written.
    n_rank = tl.where(unchanged | (k <= 0), 0, n)
    if FUSE:
        n_rows = n
    else:
        n_rows = tl.where(unchanged | (k > 0), n, tl.minimum(n, 1))

    offs_i = tl.arange(0, BLOCK_I)
    offs_j = tl.arange(0, BLOCK_J)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    write_index = pid_c == 0

    acc = tl.zeros([BLOCK_C], tl.float32)
    wsum = tl.zeros([BLOCK_J], tl.float32)
    for j0 in range(0, n_rows, BLOCK_J):
        j = j0 + offs_j
        valid_j = j < n
        key_j, a_j = _keys(cls_attn, s, j, valid_j & (j >= 1))
        rank = tl.zeros([BLOCK_J], tl.int32)
        for i0 in range(0, n_rank, BLOCK_I):
            i = i0 + offs_i
            key_i, _ = _keys(cls_attn, s, i, (i >= 1) & (i < n))
            before = (key_i[:, None] > key_j[None, :]) | ((key_i[:, None] == key_j[None, :]) & (i[:, None] < j[None, :]))
            rank += tl.sum(before.to(tl.int32), 0)

        kept = valid_j & (unchanged | (j == 0) | (rank < k))
        dest = o + tl.where(unchanged | (j == 0), j, 1 + rank)
        store_mask = kept & (dest < T_out)
        tl.store(kept_index + dest, s + j, mask=store_mask & write_index)

        rows_x = (s + j) * stride_x
        if FUSE:
            dropped = valid_j & ~kept & ~unchanged
            load_mask = store_mask | dropped
        else:
            load_mask = store_mask
        xt = tl.load(x + rows_x[:, None] + cols[None, :], mask=load_mask[:, None] & col_mask[None, :], other=0.0)
        tl.store(out + dest[:, None] * C + cols[None, :], xt, mask=store_mask[:, None] & col_mask[None, :])
        if FUSE:
            # tl.where, not a zero weight: a kept row's inf or NaN stays out.
            acc += tl.sum(tl.where(dropped[:, None], a_j[:, None] * xt.to(tl.float32), 0.0), 0)
            if RENORMALIZE:
                wsum += tl.where(dropped, a_j, 0.0)

    if FUSE:
        fo = o + 1 + k
        fmask = ~unchanged & (fo < T_out)
        if RENORMALIZE:
            total = tl.sum(wsum, 0)
            acc = tl.where(total > 0, tl.math.div_rn(acc, tl.where(total > 0, total, 1.0)), 0.0)
        tl.store(out + fo * C + cols, acc.to(out.dtype.element_ty), mask=fmask & col_mask)
        tl.store(kept_index + fo, -1, mask=fmask & write_index)


# ----------------------------------------------------------------------------- host


def config(channels: int, max_seqlen: int):
    """(BLOCK_I, BLOCK_J, BLOCK_C, num_warps): rank tiles of at most 128 x 32
    comparisons and copy tiles of at most 4096 elements; wider channel blocks
    for long sequences, whose ranking each channel block repeats. Not yet
    tuned on a GPU."""
    n = triton.next_power_of_2(max(max_seqlen, 1))
    block_c = min(max(triton.next_power_of_2(max(channels, 1)), 16), 128 if max_seqlen <= 512 else 256)
    block_j = min(max(n, 16), 4096 // block_c, 32)
    block_i = min(max(n, 16), 128)
    return block_i, block_j, block_c, 4


def forward(x, cu_seqlens, cls_attn, keep, cu_seqlens_out, max_seqlen, fuse, renormalize, out, kept_index):
    """Fill ``out [T_out, C]`` and ``kept_index [T_out]`` (see the module
    docstring); ``keep`` and the offsets are read on the device only."""
    T, C = x.shape
    batch = cu_seqlens.shape[0] - 1
    T_out = out.shape[0]
    if batch <= 0 or T_out == 0:
        return
    block_i, block_j, block_c, warps = config(C, max_seqlen)
    with on_device(x):
        _fwd_kernel[(batch, max(1, triton.cdiv(C, block_c)))](
            x, out, kept_index, cls_attn, cu_seqlens, cu_seqlens_out, keep, T, T_out, C, max_seqlen, x.stride(0),
            BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_C=block_c, FUSE=bool(fuse), RENORMALIZE=bool(fuse and renormalize),
            num_warps=warps,
        )
