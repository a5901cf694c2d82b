"""Triton kernels for the ragged-batch ops (pack, unpack, cls_tokens,
select_sequences).

Every op is a set of per-sequence row copies. Grid: axis 0 = sequence, axis 1
= blocks of BLOCK_R rows, grid-strided so any axis-1 size is correct; each
program copies [BLOCK_R, BLOCK_W] tiles of rows W elements wide. Tensors are
addressed as 2-D row-major [rows, W]; offsets are int64.
"""
import triton
import triton.language as tl

from . import on_device


@triton.jit
def _copy_segment(src, dst, src_row0, dst_row0, copy_rows, write_rows, src_rows, dst_rows, W, pad_value,
                  BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    # Rows [0, copy_rows) of the segment come from src; rows
    # [copy_rows, write_rows) receive pad_value. src_rows/dst_rows bound every
    # access, so malformed cu_seqlens (unchecked on the GPU) stay in bounds.
    src_row0 = src_row0.to(tl.int64)
    dst_row0 = dst_row0.to(tl.int64)
    first = tl.maximum(-dst_row0, 0)
    last = tl.minimum(write_rows, dst_rows - dst_row0)
    step = tl.num_programs(1) * BLOCK_R
    for r0 in range(first + tl.program_id(1) * BLOCK_R, last, step):
        rows = r0 + tl.arange(0, BLOCK_R)
        src_r = src_row0 + rows
        copy_mask = (rows < copy_rows) & (src_r >= 0) & (src_r < src_rows)
        write_mask = rows < last
        for c0 in range(0, W, BLOCK_W):
            cols = c0 + tl.arange(0, BLOCK_W)
            col_mask = cols < W
            v = tl.load(src + src_r[:, None] * W + cols[None, :],
                        mask=copy_mask[:, None] & col_mask[None, :], other=pad_value)
            tl.store(dst + (dst_row0 + rows)[:, None] * W + cols[None, :], v,
                     mask=write_mask[:, None] & col_mask[None, :])


@triton.jit
def pack_kernel(x, out, cu_seqlens, N, src_rows, dst_rows, W, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    # x [B, N, W] -> out [T, W]
    b = tl.program_id(0)
    start = tl.load(cu_seqlens + b)
    n = tl.load(cu_seqlens + b + 1) - start
    _copy_segment(x, out, b.to(tl.int64) * N, start, n, n, src_rows, dst_rows, W, 0.0, BLOCK_R, BLOCK_W)


@triton.jit
def unpack_kernel(values, out, cu_seqlens, L, pad_value, src_rows, dst_rows, W,
                  BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    # values [T, W] -> out [B, L, W], rows past each sequence's length padded
    b = tl.program_id(0)
    start = tl.load(cu_seqlens + b)
    n = tl.minimum(tl.load(cu_seqlens + b + 1) - start, L)
    _copy_segment(values, out, start, b.to(tl.int64) * L, n, L, src_rows, dst_rows, W, pad_value, BLOCK_R, BLOCK_W)


@triton.jit
def cls_tokens_kernel(values, out, cu_seqlens, src_rows, dst_rows, W, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    # values [T, W] -> out [B, W], first row of each sequence
    b = tl.program_id(0)
    _copy_segment(values, out, tl.load(cu_seqlens + b), b, 1, 1, src_rows, dst_rows, W, 0.0, BLOCK_R, BLOCK_W)


@triton.jit
def select_sequences_kernel(values, out, cu_seqlens, seq_idx, cu_seqlens_out, batch, src_rows, dst_rows, W,
                            BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    # values [T, W] -> out [T', W], output sequence b = input sequence
    # seq_idx[b]; an out-of-range index writes nothing
    b = tl.program_id(0)
    i = tl.load(seq_idx + b)
    valid = (i >= 0) & (i < batch)
    i = tl.where(valid, i, 0)
    src = tl.load(cu_seqlens + i)
    dst = tl.load(cu_seqlens_out + b)
    n = tl.minimum(tl.load(cu_seqlens_out + b + 1) - dst, tl.load(cu_seqlens + i + 1) - src)
    n = tl.where(valid, n, 0)
    _copy_segment(values, out, src, dst, n, n, src_rows, dst_rows, W, 0.0, BLOCK_R, BLOCK_W)


def _blocks(W: int, rows: int):
    block_w = min(triton.next_power_of_2(W), 256)
    block_r = max(1, min(16, 4096 // block_w, triton.next_power_of_2(rows)))
    grid_r = max(1, min(triton.cdiv(rows, block_r), 65535))
    return block_r, block_w, grid_r


def _launch(kernel, grid_b, rows, out, W, *args):
    """Launch on out's device (Triton uses the current device and stream)."""
    if W == 0 or out.numel() == 0:
        return
    block_r, block_w, grid_r = _blocks(W, rows)
    with on_device(out):
        kernel[(grid_b, grid_r)](*args, W, BLOCK_R=block_r, BLOCK_W=block_w)


def pack(x, cu_seqlens, out, W):
    _launch(pack_kernel, x.shape[0], x.shape[1], out, W, x, out, cu_seqlens, x.shape[1], x.shape[0] * x.shape[1], out.shape[0])


def unpack(values, cu_seqlens, pad_value, out, W):
    B, L = out.shape[0], out.shape[1]
    _launch(unpack_kernel, B, L, out, W, values, out, cu_seqlens, L, pad_value, values.shape[0], B * L)


def cls_tokens(values, cu_seqlens, out, W):
    _launch(cls_tokens_kernel, out.shape[0], 1, out, W, values, out, cu_seqlens, values.shape[0], out.shape[0])


def select_sequences(values, cu_seqlens, seq_idx, cu_seqlens_out, out, W):
    B_out = seq_idx.shape[0]
    _launch(select_sequences_kernel, B_out, out.shape[0] // B_out, out, W, values, out, cu_seqlens, seq_idx,
            cu_seqlens_out, cu_seqlens.shape[0] - 1, values.shape[0], out.shape[0])
