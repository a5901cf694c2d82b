"""Triton kernels of CF-ViT's fine-stage sequences; the semantics are those
of ``csrc/fine_tokens.h``.

Layout: ``fine [B, 4 Nc, C]``, ``coarse`` and ``reuse [B, Nc, C]`` with unit
channel stride and any row and image strides; ``score [B, Nc]`` fp32,
``pos [4 Nc, C]``, ``prefix [n, C]``, ``out [B, n + Nc + 3K, C]`` and
``source [B, Nc + 3K]`` int64 contiguous; pos, prefix and reuse may be
absent.

Plan kernel, one program an image: the image's keys (NaN read as -inf) in
registers as one ``[BLOCK]`` vector (``BLOCK = next_power_of_2(Nc)``); each
patch's rank counted against chunks of ``CHUNK`` keys at a time (a
``[BLOCK, CHUNK]`` comparison tile, about 4096 elements); the chosen
patches' slots from one ``tl.cumsum``; source stored. Rows kernel, grid
axis 0 = images x tiles of BLOCK_R rows, axis 1 = tiles of BLOCK_C
channels: each row's source entry picks the fine row (+ pos + reuse in
fp32, rounded once), the coarse row or the prefix row. Offsets are int64;
every load and store is masked.
"""
import triton
import triton.language as tl

from . import on_device


@triton.jit
def _plan_kernel(score, source, Nc, keep, w, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    valid = i < Nc
    s = tl.load(score + b * Nc + i, mask=valid, other=0.0)
    key = tl.where(s != s, float("-inf"), s)
    rank = tl.zeros([BLOCK], dtype=tl.int32)
    for j0 in range(0, Nc, CHUNK):
        j = j0 + tl.arange(0, CHUNK)
        sj = tl.load(score + b * Nc + j, mask=j < Nc, other=0.0)
        kj = tl.where(sj != sj, float("-inf"), sj)
        before = (kj[None, :] > key[:, None]) | ((kj[None, :] == key[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum((before & (j < Nc)[None, :]).to(tl.int32), axis=1)
    chosen = (rank < keep) & valid
    flag = chosen.to(tl.int32)
    m = tl.cumsum(flag, axis=0) - flag  # chosen patches before i
    dst = source + b * (Nc + 3 * keep)
    r, c = i // w, i % w
    top_left = (2 * r) * (2 * w) + 2 * c
    for q in tl.static_range(4):
        tl.store(dst + 4 * m + q, (top_left + (q // 2) * (2 * w) + q % 2).to(tl.int64), mask=chosen)
    tl.store(dst + 4 * keep + (i - m), (4 * Nc + i).to(tl.int64), mask=valid & ~chosen)


@triton.jit
def _rows_kernel(fine, coarse, pos, prefix, reuse, source, out, Nc, keep, w, n, C, row_tiles,
                 fine_sb, fine_sr, coarse_sb, coarse_sr, reuse_sb, reuse_sr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_POS: tl.constexpr, HAS_PREFIX: tl.constexpr,
                 HAS_REUSE: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // row_tiles).to(tl.int64)
    t = (pid % row_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    col_mask = cols < C
    S = Nc + 3 * keep
    placed = (t >= n) & (t < n + S)
    s = tl.load(source + b * S + (t - n).to(tl.int64), mask=placed, other=0)
    is_fine = placed & (s < 4 * Nc)
    is_coarse = placed & (s >= 4 * Nc)
    fm = is_fine[:, None] & col_mask[None, :]
    v = tl.load(fine + b * fine_sb + s[:, None] * fine_sr + cols[None, :], mask=fm, other=0.0).to(tl.float32)
    if HAS_POS:
        v += tl.load(pos + s[:, None] * C + cols[None, :], mask=fm, other=0.0).to(tl.float32)
    if HAS_REUSE:
        parent = (s // (2 * w)) // 2 * w + (s % (2 * w)) // 2
        v += tl.load(reuse + b * reuse_sb + parent[:, None] * reuse_sr + cols[None, :], mask=fm,
                     other=0.0).to(tl.float32)
    v = v.to(out.dtype.element_ty)
    cm = is_coarse[:, None] & col_mask[None, :]
    x = tl.load(coarse + b * coarse_sb + (s - 4 * Nc)[:, None] * coarse_sr + cols[None, :], mask=cm, other=0.0)
    v = tl.where(cm, x, v)
    if HAS_PREFIX:
        pm = (t < n)[:, None] & col_mask[None, :]
        p = tl.load(prefix + t.to(tl.int64)[:, None] * C + cols[None, :], mask=pm, other=0.0)
        v = tl.where(pm, p, v)
    L = n + S
    mask = (t < L)[:, None] & col_mask[None, :]
    tl.store(out + (b * L + t.to(tl.int64))[:, None] * C + cols[None, :], v, mask=mask)


def config(coarse_patches: int, channels: int):
    """(BLOCK, CHUNK, BLOCK_R, BLOCK_C): the plan's vector of keys and its
    comparison chunk (about 4096 compares a step), the rows' tile (up to 128
    channels, about 4096 elements). Not yet tuned on a GPU."""
    block = triton.next_power_of_2(coarse_patches)
    block_c = min(triton.next_power_of_2(max(channels, 1)), 128)
    return block, max(1, 4096 // block), min(64, 4096 // block_c), block_c


def forward(fine, coarse, score, keep, w, pos, prefix, reuse, out, source):
    """Fill ``source [B, Nc + 3 keep]`` and ``out [B, n + Nc + 3 keep, C]``
    (see the module docstring)."""
    B, Nc, C = coarse.shape
    n = 0 if prefix is None else prefix.shape[0]
    block, chunk, block_r, block_c = config(Nc, C)
    with on_device(out):
        _plan_kernel[(B,)](score, source, Nc, keep, w, BLOCK=block, CHUNK=chunk)
        row_tiles = triton.cdiv(out.shape[1], block_r)
        r_sb, r_sr = reuse.stride()[:2] if reuse is not None else (0, 0)
        _rows_kernel[(B * row_tiles, triton.cdiv(C, block_c))](
            fine, coarse, pos, prefix if n else None, reuse, source, out, Nc, keep, w, n, C, row_tiles,
            fine.stride(0), fine.stride(1), coarse.stride(0), coarse.stride(1), r_sb, r_sr,
            BLOCK_R=block_r, BLOCK_C=block_c, HAS_POS=pos is not None, HAS_PREFIX=n > 0,
            HAS_REUSE=reuse is not None, num_warps=4)
