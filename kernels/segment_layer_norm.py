"""Triton kernel for the segment layer norm (LayerNorm with one affine pair
per sequence group, optional fused residual add); the semantics are those of
``csrc/segment_layer_norm.h``.

Layout: ``x [T, C]`` and ``residual [T, C]`` with any row stride (unit
column stride); ``weight``, ``bias`` ``[G, C]`` contiguous in x's dtype;
``y``, ``h_out`` ``[T, C]`` contiguous; ``mean``, ``rstd`` fp32 ``[T]``.
Sequence b is rows ``[cu_seqlens[b], cu_seqlens[b + 1])`` with group
``group[b]``.

Grid: axis 0 = blocks of BLOCK_T rows. Each row finds its sequence itself by
a binary search of ``cu_seqlens`` (the last b with ``cu_seqlens[b] <= t``;
``search_steps = ceil(log2(B)) + 1``), so programs never depend on the
batch layout and the load is even whatever the lengths. The statistics are
fp32:

* ``C <= BLOCK_C`` (one tile, BLOCK_C = next_pow2(C) up to MAX_BLOCK_C): the
  ``[BLOCK_T, BLOCK_C]`` tile of ``h = x + residual`` is read once, its mean
  and then the mean of its squared deviations taken (two-pass, no
  cancellation), and ``y`` stored;
* wider rows: a first loop over blocks of BLOCK_C channels takes each
  block's mean and sum of squared deviations (two-pass in the block) and
  merges them (Chan et al.) and stores ``h_out``; a second loop reloads
  ``x`` (and ``residual``) and stores ``y``.

``y`` and ``h_out`` are rounded once to x's dtype from the fp32 ``h``;
``rstd = 1 / sqrt(var + eps)`` with IEEE sqrt and division, NaN when the
variance overflows fp32 (so the row is NaN, as in ``F.layer_norm``). No host sync.
Offsets and groups come from the device unchecked, so every access is
bounded: the search only reads ``cu_seqlens[0, B)``, the group is clamped
into ``[0, G - 1]``, rows past T are masked; row offsets are int64. A row
outside every sequence (malformed offsets) is normalized with the group of
the sequence the search lands on.
"""

import triton
import triton.language as tl

from . import on_device

MAX_BLOCK_C = 4096


@triton.jit
def _locate_rows(cu_seqlens, batch, search_steps, rows):
    """Per row: the last b in ``[0, batch)`` with ``cu_seqlens[b] <= row``
    (0 when there is none); reads only ``cu_seqlens[0, batch)``."""
    lo = rows * 0
    hi = lo + batch - 1
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        go = tl.load(cu_seqlens + mid) <= rows
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    return lo


@triton.jit
def _load_h(x, residual, h_out, rows_x, rows_r, rows_o, cols, mask, HAS_RESIDUAL: tl.constexpr,
            STORE_H: tl.constexpr):
    """fp32 ``[BLOCK_T, BLOCK_C]`` tile of h (0 where masked); stores h_out
    when STORE_H."""
    h = tl.load(x + rows_x[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(residual + rows_r[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if STORE_H:
            tl.store(h_out + rows_o[:, None] + cols[None, :], h.to(h_out.dtype.element_ty), mask=mask)
    return h


@triton.jit
def _rstd(var, eps):
    """``1 / sqrt(var + eps)``, NaN where the variance overflowed fp32
    (|h| >~ 1e18): rstd = 0 would turn every row into its bias."""
    return tl.where(var == float("inf"), float("nan"), tl.math.div_rn(1.0, tl.sqrt_rn(var + eps)))


@triton.jit
def _store_y(y, weight, bias, h, mean, rstd, rows_o, w_rows, cols, mask, HAS_WEIGHT: tl.constexpr,
             HAS_BIAS: tl.constexpr):
    out = (h - mean[:, None]) * rstd[:, None]
    if HAS_WEIGHT:
        out *= tl.load(weight + w_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(bias + w_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y + rows_o[:, None] + cols[None, :], out.to(y.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_kernel(x, residual, weight, bias, cu_seqlens, group, y, h_out, mean, rstd,
                T, C, batch, groups, search_steps, stride_x, stride_r, eps,
                BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_TILE: tl.constexpr,
                HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    rows_x = rows64 * stride_x
    rows_r = rows64 * stride_r
    rows_o = rows64 * C
    if HAS_WEIGHT or HAS_BIAS:
        b = _locate_rows(cu_seqlens, batch, search_steps, rows)
        g = tl.minimum(tl.maximum(tl.load(group + b), 0), groups - 1)
        w_rows = g.to(tl.int64) * C
    else:
        w_rows = rows_o  # unused
    offs_c = tl.arange(0, BLOCK_C)

    if SINGLE_TILE:
        mask = row_mask[:, None] & (offs_c < C)[None, :]
        h = _load_h(x, residual, h_out, rows_x, rows_r, rows_o, offs_c, mask, HAS_RESIDUAL, True)
        m = tl.sum(h, 1) / C
        d = tl.where(mask, h - m[:, None], 0.0)
        var = tl.sum(d * d, 1) / C
        r = _rstd(var, eps)
        tl.store(mean + rows64, m, mask=row_mask)
        tl.store(rstd + rows64, r, mask=row_mask)
        _store_y(y, weight, bias, h, m, r, rows_o, w_rows, offs_c, mask, HAS_WEIGHT, HAS_BIAS)
    else:
        # Pass 1: per-block mean and M2 (sum of squared deviations), merged.
        m = tl.zeros([BLOCK_T], tl.float32)
        m2 = tl.zeros([BLOCK_T], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs_c
            mask = row_mask[:, None] & (cols < C)[None, :]
            h = _load_h(x, residual, h_out, rows_x, rows_r, rows_o, cols, mask, HAS_RESIDUAL, True)
            n_a = c0 * 1.0
            n_b = tl.minimum(C - c0, BLOCK_C) * 1.0
            n = n_a + n_b
            m_b = tl.sum(h, 1) / n_b
            d = tl.where(mask, h - m_b[:, None], 0.0)
            delta = m_b - m
            m += delta * (n_b / n)
            m2 += tl.sum(d * d, 1) + delta * delta * (n_a * n_b / n)
        var = m2 / C
        r = _rstd(var, eps)
        tl.store(mean + rows64, m, mask=row_mask)
        tl.store(rstd + rows64, r, mask=row_mask)
        # Pass 2: reload h (unrounded) and normalize.
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs_c
            mask = row_mask[:, None] & (cols < C)[None, :]
            h = _load_h(x, residual, h_out, rows_x, rows_r, rows_o, cols, mask, HAS_RESIDUAL, False)
            _store_y(y, weight, bias, h, m, r, rows_o, w_rows, cols, mask, HAS_WEIGHT, HAS_BIAS)


# ----------------------------------------------------------------------------- host


def config(channels: int):
    """(BLOCK_T, BLOCK_C, num_warps): one tile of the whole row up to
    MAX_BLOCK_C channels, else blocks of MAX_BLOCK_C; about 4096 elements a
    tile. Not yet tuned on a GPU."""
    block_c = min(max(triton.next_power_of_2(max(channels, 1)), 16), MAX_BLOCK_C)
    block_t = max(1, min(16, 4096 // block_c))
    return block_t, block_c, 8 if block_c >= 2048 else 4


def search_steps(batch: int) -> int:
    """Binary-search steps for ``batch`` sequences: ceil(log2(batch)) + 1."""
    return max(batch - 1, 0).bit_length() + 1


def forward(x, residual, weight, bias, cu_seqlens, group, eps, y, h_out, mean, rstd):
    """Fill ``y``, ``h_out`` (with a residual), ``mean`` and ``rstd`` (see the
    module docstring); offsets and groups are read on the device only."""
    T, C = x.shape
    batch = cu_seqlens.shape[0] - 1
    if T == 0 or C == 0 or batch <= 0:
        return
    assert (residual is None) == (h_out is None), "h_out is given iff residual is"
    p = weight if weight is not None else bias
    groups = p.shape[0] if p is not None else 1
    block_t, block_c, warps = config(C)
    with on_device(x):
        _fwd_kernel[(triton.cdiv(T, block_t),)](
            x, residual, weight, bias, cu_seqlens, group, y, h_out, mean, rstd,
            T, C, batch, groups, search_steps(batch), x.stride(0),
            residual.stride(0) if residual is not None else 0, float(eps),
            BLOCK_T=block_t, BLOCK_C=block_c, SINGLE_TILE=block_c >= C,
            HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            num_warps=warps,
        )
