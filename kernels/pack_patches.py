"""Triton kernel for packing patch embeddings into a ragged batch; the
semantics are those of ``csrc/pack_patches.h``.

Layout: group g's ``patches [B_g, P_g, C]`` with any element strides (the
patch convolution's ``[B, C, h, w]`` output seen as ``[B, P, C]`` has channel
stride P and token stride 1), ``pos [P_g, C]`` contiguous or absent,
``prefix [n, C]`` contiguous or absent, ``out [T, C]`` contiguous. Image b
of group g is rows ``[row0 + b (n + P), row0 + (b + 1)(n + P))`` of out: its
n prefix rows, then its patch rows.

One launch per group. Grid: axis 0 = images x tiles of BLOCK_R rows of an
image (image-major), axis 1 = tiles of BLOCK_C channels. A program loads its
``[BLOCK_R, BLOCK_C]`` tile of patches through the strides it is given
(Triton specializes a stride of 1, so the compiler knows which axis is
contiguous and lays the load out along it, transposing through shared
memory for the store when that is the token axis), adds pos in fp32, takes
the prefix rows where ``r < n``, rounds once and stores. Offsets are int64;
every load and store is masked.
"""
import triton
import triton.language as tl

from . import on_device


@triton.jit
def _pack_kernel(patches, pos, prefix, out, tokens, n, C, row0, total, row_tiles,
                 stride_b, stride_p, stride_c,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_POS: tl.constexpr, HAS_PREFIX: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // row_tiles).to(tl.int64)
    rows = (pid % row_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cols64 = cols.to(tl.int64)
    col_mask = cols < C
    j = (rows - n).to(tl.int64)  # patch token of each row (negative: a prefix row)
    is_patch = (rows >= n) & (rows < n + tokens)
    patch_mask = is_patch[:, None] & col_mask[None, :]
    v = tl.load(patches + b * stride_b + j[:, None] * stride_p + cols64[None, :] * stride_c,
                mask=patch_mask, other=0.0).to(tl.float32)
    if HAS_POS:
        v += tl.load(pos + j[:, None] * C + cols64[None, :], mask=patch_mask, other=0.0).to(tl.float32)
    v = v.to(out.dtype.element_ty)
    if HAS_PREFIX:
        prefix_mask = (rows < n)[:, None] & col_mask[None, :]
        p = tl.load(prefix + rows.to(tl.int64)[:, None] * C + cols64[None, :], mask=prefix_mask, other=0.0)
        v = tl.where(prefix_mask, p, v)
    dst = row0 + b * (n + tokens) + rows.to(tl.int64)
    mask = (rows < n + tokens)[:, None] & col_mask[None, :] & (dst < total)[:, None]
    tl.store(out + dst[:, None] * C + cols64[None, :], v, mask=mask)


def config(channels: int):
    """(BLOCK_R, BLOCK_C, num_warps): up to 128 channels and 64 rows a tile,
    about 4096 elements. Not yet tuned on a GPU."""
    block_c = min(triton.next_power_of_2(max(channels, 1)), 128)
    return min(64, 4096 // block_c), block_c, 4


def forward(patches, pos, prefix, out):
    """Fill ``out [T, C]`` from ``patches`` (G tensors ``[B_g, P_g, C]``),
    ``pos`` (empty or G tensors ``[P_g, C]``) and ``prefix`` (empty or G
    tensors ``[n_g, C]``); see the module docstring."""
    T, C = out.shape
    block_r, block_c, warps = config(C)
    row0 = 0
    with on_device(out):
        for g, x in enumerate(patches):
            B, P, _ = x.shape
            n = prefix[g].shape[0] if prefix else 0
            row_tiles = triton.cdiv(n + P, block_r)
            _pack_kernel[(B * row_tiles, triton.cdiv(C, block_c))](
                x, pos[g] if pos else None, prefix[g] if n else None, out, P, n, C, row0, T, row_tiles, *x.stride(),
                BLOCK_R=block_r, BLOCK_C=block_c, HAS_POS=bool(pos), HAS_PREFIX=n > 0, num_warps=warps,
            )
            row0 += B * (n + P)
