"""RaggedBatch: token sequences of different lengths, packed without padding."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .ops import common
from .ops import ragged as ops
from .ops.topk_select import select_tokens

IntSeq = Union[Sequence[int], Tensor]


def _host_lengths(lengths, name: str) -> Optional[tuple]:
    """``lengths`` as a tuple of ints if it lives on the host, else None."""
    if type(lengths) in (tuple, list) and all(type(n) is int and abs(n) <= common.INT32_MAX for n in lengths):
        return tuple(lengths)  # the common case, checked at once
    if isinstance(lengths, Tensor):
        if lengths.device.type != "cpu":
            return None
        if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-D integer tensor, got {lengths.dtype} of shape {tuple(lengths.shape)}")
        lengths = lengths.tolist()
    if isinstance(lengths, (str, bytes)) or not hasattr(lengths, "__len__"):
        raise TypeError(f"{name} must be ints or a 1-D integer tensor, got {type(lengths).__name__}")
    out = []
    for i, n in enumerate(lengths):
        try:
            out.append(common.host_int(n, f"{name}[{i}]", -common.INT32_MAX))
        except TypeError:
            raise TypeError(f"{name} must hold ints, got {n!r} at index {i}") from None
    return tuple(out)


def _grid_tags(grid, batch: int, device: torch.device) -> Optional[Tensor]:
    """``grid`` (ints >= 1, or an integer tensor) as int32 ``[batch]`` tags on
    ``device``; floats, bools and tags < 1 are refused, naming ``grid``."""
    if grid is None:
        return None
    if isinstance(grid, Tensor):
        if grid.dtype.is_floating_point or grid.dtype.is_complex or grid.dtype == torch.bool:
            raise TypeError(f"grid must hold integer tags (token grid sides), got a {grid.dtype} tensor")
        if grid.shape != (batch,):
            raise ValueError(f"grid must have one entry per sequence ({batch}), got shape {tuple(grid.shape)}")
        if common.check_values_now(grid) and not torch.compiler.is_compiling() and batch and int(grid.min()) < 1:
            raise ValueError(f"grid tags must be >= 1 (token grid sides), got {int(grid.min())}")
        return grid.to(device=device, dtype=torch.int32)
    tags = _host_lengths(grid, "grid")
    if len(tags) != batch:
        raise ValueError(f"grid must have one entry per sequence ({batch}), got {len(tags)}")
    bad = [t for t in tags if t < 1]
    if bad:
        raise ValueError(f"grid tags must be >= 1 (token grid sides), got {bad[0]}")
    return torch.tensor(tags, dtype=torch.int32).to(device, non_blocking=True)


class RaggedBatch:
    """A batch of ``B`` token sequences of lengths ``N_b >= 1``, packed.

    Fields:
        values: ``[T, C]`` (or ``[T, *F]``), ``T = sum(N_b)``: the sequences,
            one after another.
        cu_seqlens: int32 ``[B + 1]`` on ``values.device``: ``values[cu[b]:cu[b+1]]``
            is sequence b.
        max_seqlen: the longest ``N_b``, a host int (kernels size their grids
            with it, so reading it never syncs).
        grid: optional int32 ``[B]`` per-sequence tag, e.g. the token grid side
            (7, 10, 14) each sequence came from.

    Every sequence holds at least one token (its CLS or first token) and a
    batch holds at least one sequence; empty sequences and empty batches are
    rejected with a ``ValueError``.

    Example::

        >>> rb = RaggedBatch.from_list([torch.randn(50, 384), torch.randn(197, 384)], grid=[7, 14])
        >>> rb.values.shape, rb.cu_seqlens.tolist(), rb.max_seqlen
        (torch.Size([247, 384]), [0, 50, 247], 197)
        >>> rb.to_padded().shape
        torch.Size([2, 197, 384])
    """

    __slots__ = ("values", "cu_seqlens", "max_seqlen", "grid", "_lengths")

    def __init__(self, values: Tensor, cu_seqlens: Tensor, max_seqlen: int, grid: Optional[IntSeq] = None,
                 *, lengths: Optional[Sequence[int]] = None):
        common.check_tensor(values, "values")
        if values.dim() < 1:
            raise ValueError("values must have shape [T, C], got a 0-d tensor")
        common.check_cu_seqlens(cu_seqlens, values, "values")
        if not isinstance(max_seqlen, int) or max_seqlen < 1:
            raise ValueError(f"max_seqlen must be a host int >= 1, got {max_seqlen!r}")
        batch = cu_seqlens.shape[0] - 1
        if common.check_values_now(cu_seqlens) and not torch.compiler.is_compiling():
            common.check_cu_seqlens_values(cu_seqlens, values.shape[0], total_name="values.shape[0]")
            actual = tuple(cu_seqlens.diff().tolist())
            if max(actual) > max_seqlen:
                raise ValueError(f"max_seqlen = {max_seqlen} is smaller than the longest sequence ({max(actual)} tokens)")
            if lengths is not None and tuple(lengths) != actual:
                raise ValueError(f"lengths {tuple(lengths)} do not match cu_seqlens (lengths {actual})")
        grid = _grid_tags(grid, batch, values.device)
        self.values = values
        self.cu_seqlens = cu_seqlens
        self.max_seqlen = max_seqlen
        self.grid = grid
        self._lengths = tuple(lengths) if lengths is not None else None

    @classmethod
    def _unchecked(cls, values: Tensor, lengths: Sequence[int], grid: Optional[Tensor] = None,
                   cu_seqlens: Optional[Tensor] = None) -> "RaggedBatch":
        """A batch over ``values`` with host ``lengths`` (and their
        ``cu_seqlens``, built from them unless given), without checks: for
        callers that derived the lengths from shapes."""
        out = cls.__new__(cls)
        cu = cu_seqlens if cu_seqlens is not None else common.cu_seqlens(lengths, values.device)
        out.values, out.cu_seqlens, out.max_seqlen, out.grid, out._lengths = (
            values, cu, max(lengths), grid, tuple(lengths))
        return out

    # ------------------------------------------------------------ constructors

    @classmethod
    def from_lengths(cls, values: Tensor, lengths: Sequence[int], grid: Optional[IntSeq] = None) -> "RaggedBatch":
        """The batch over packed ``values [T, C]`` whose sequences have the
        host ``lengths`` (ints >= 1 summing to T): ``cu_seqlens`` is built
        from them without a device sync and nothing is read back."""
        common.check_tensor(values, "values")
        if values.dim() < 1:
            raise ValueError("values must have shape [T, C], got a 0-d tensor")
        host = _host_lengths(lengths, "lengths")
        if host is None:
            raise TypeError("lengths must be host ints (a list, tuple or CPU tensor); for device lengths build "
                            "cu_seqlens and call RaggedBatch(values, cu_seqlens, max_seqlen)")
        if not host:
            raise ValueError("lengths must hold at least one sequence")
        bad = [n for n in host if n < 1]
        if bad:
            raise ValueError(f"lengths must be >= 1 (every sequence holds a token), got {bad[0]}")
        if sum(host) != values.shape[0]:
            raise ValueError(f"lengths must sum to values.shape[0] = {values.shape[0]}, got {sum(host)}")
        return cls._unchecked(values, host, _grid_tags(grid, len(host), values.device))

    @classmethod
    def from_list(cls, xs: Sequence[Tensor], grid: Optional[IntSeq] = None) -> "RaggedBatch":
        """Pack sequences ``xs[b]: [N_b, C]`` (same C, dtype and device)."""
        if len(xs) == 0:
            raise ValueError("xs must hold at least one sequence")
        for i, x in enumerate(xs):
            common.check_tensor(x, f"xs[{i}]")
            if x.dim() < 1 or x.shape[0] < 1:
                raise ValueError(f"xs[{i}] must have shape [N, C] with N >= 1, got {tuple(x.shape)}")
            if x.shape[1:] != xs[0].shape[1:] or x.dtype != xs[0].dtype or x.device != xs[0].device:
                raise ValueError(
                    f"xs[{i}] ({tuple(x.shape)}, {x.dtype}, {x.device}) does not match xs[0] "
                    f"({tuple(xs[0].shape)}, {xs[0].dtype}, {xs[0].device}) in feature shape, dtype or device"
                )
        lengths = tuple(x.shape[0] for x in xs)
        values = torch.cat(list(xs))
        return cls(values, common.cu_seqlens(lengths, values.device), max(lengths), grid, lengths=lengths)

    @classmethod
    def from_padded(cls, x: Tensor, lengths: IntSeq, grid: Optional[IntSeq] = None) -> "RaggedBatch":
        """Pack ``x: [B, N, C]`` where sequence b is ``x[b, :lengths[b]]``.

        ``lengths`` as a list (or CPU tensor) needs no device sync; as a device
        tensor it costs one sync to learn ``T`` and ``max_seqlen``.
        """
        common.check_tensor(x, "x")
        if x.dim() < 2:
            raise ValueError(f"x must have shape [B, N, C], got {tuple(x.shape)}")
        host = _host_lengths(lengths, "lengths")
        if host is not None:
            if len(host) != x.shape[0]:
                raise ValueError(f"lengths must have one entry per sequence of x ({x.shape[0]}), got {len(host)}")
            bad = [n for n in host if not 1 <= n <= x.shape[1]]
            if bad:
                raise ValueError(f"lengths must lie in [1, x.shape[1] = {x.shape[1]}], got {bad[0]}")
            cu = common.cu_seqlens(host, x.device)
            total, longest = sum(host), max(host)
        else:
            common.check_same_device(lengths, "lengths", x, "x")
            if lengths.shape != (x.shape[0],):
                raise ValueError(f"lengths must have shape [{x.shape[0]}], got {tuple(lengths.shape)}")
            cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            total, longest, shortest = torch.stack([cu[-1].long(), lengths.max().long(), lengths.min().long()]).tolist()  # the one sync
            if shortest < 1 or longest > x.shape[1]:
                raise ValueError(f"lengths must lie in [1, x.shape[1] = {x.shape[1]}], got {shortest if shortest < 1 else longest}")
        values = ops.pack(x, cu, total)
        return cls(values, cu, longest, grid, lengths=host)

    # ------------------------------------------------------------- properties

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def total_tokens(self) -> int:
        return self.values.shape[0]

    @property
    def lengths(self) -> tuple:
        """Sequence lengths as host ints (one device sync the first time if
        the batch was built from device data)."""
        if self._lengths is None:
            self._lengths = tuple(self.cu_seqlens.diff().tolist())
        return self._lengths

    @property
    def is_uniform(self) -> bool:
        """Whether every sequence has ``max_seqlen`` tokens, i.e. ``values``
        is a ``[B, max_seqlen, *F]`` batch seen flat (known from shapes, no sync)."""
        return self.batch_size * self.max_seqlen == self.total_tokens

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def __len__(self) -> int:
        return self.batch_size

    def __repr__(self) -> str:
        return (f"RaggedBatch(B={self.batch_size}, T={self.total_tokens}, max_seqlen={self.max_seqlen}, "
                f"features={tuple(self.values.shape[1:])}, dtype={self.dtype}, device={self.device}"
                f"{', grid' if self.grid is not None else ''})")

    # ----------------------------------------------------------------- views

    def with_values(self, values: Tensor) -> "RaggedBatch":
        """The same sequences layout over new ``values: [T, *F']``."""
        if values.shape[0] != self.total_tokens:
            raise ValueError(f"values must have T = {self.total_tokens} rows, got {values.shape[0]}")
        out = RaggedBatch.__new__(RaggedBatch)
        out.values, out.cu_seqlens, out.max_seqlen, out.grid, out._lengths = (
            values, self.cu_seqlens, self.max_seqlen, self.grid, self._lengths)
        return out

    def to_list(self) -> list:
        """The sequences as a list of ``[N_b, C]`` views of ``values``."""
        return list(self.values.split(self.lengths))

    def to_padded(self, pad_value: float = 0.0, length: Optional[int] = None) -> Tensor:
        """``[B, L, C]`` with ``L = length or max_seqlen``, padded with ``pad_value``."""
        length = self.max_seqlen if length is None else length
        if length < self.max_seqlen:
            raise ValueError(f"length must be at least max_seqlen = {self.max_seqlen}, got {length}")
        return ops.unpack(self.values, self.cu_seqlens, length, pad_value)

    def cls_tokens(self) -> Tensor:
        """``[B, C]``: the first token of every sequence."""
        return ops.cls_tokens(self.values, self.cu_seqlens)

    def index_select(self, seq_idx: Union[IntSeq, Tensor]) -> "RaggedBatch":
        """The sequences ``seq_idx`` (int indices, repeats allowed, or a bool
        mask over the batch), still packed. Host indices on a batch with known
        lengths need no device sync; device indices cost one."""
        batch = self.batch_size
        if isinstance(seq_idx, Tensor) and seq_idx.dtype == torch.bool:
            if seq_idx.shape != (batch,):
                raise ValueError(f"a bool seq_idx must have shape [{batch}], got {tuple(seq_idx.shape)}")
            seq_idx = seq_idx.nonzero().squeeze(1)
        host_idx = _host_lengths(seq_idx, "seq_idx")
        if host_idx is not None and (self._lengths is not None or self.device.type == "cpu"):
            if len(host_idx) == 0:
                raise ValueError("seq_idx must select at least one sequence")
            bad = [i for i in host_idx if not -batch <= i < batch]
            if bad:
                raise ValueError(f"seq_idx {bad[0]} is out of range for a batch of {batch} sequences")
            host_idx = tuple(i % batch for i in host_idx)
            lengths = tuple(self.lengths[i] for i in host_idx)
            idx = torch.tensor(host_idx, dtype=torch.int64).to(self.device, non_blocking=True)
            cu_out = common.cu_seqlens(lengths, self.device)
            total, longest = sum(lengths), max(lengths)
        else:
            idx = torch.as_tensor(seq_idx, dtype=torch.int64, device=self.device)
            if idx.dim() != 1 or idx.shape[0] == 0:
                raise ValueError(f"seq_idx must be 1-D and select at least one sequence, got shape {tuple(idx.shape)}")
            idx = torch.where(idx < 0, idx + batch, idx)
            lengths_dev = self.cu_seqlens.diff()[idx.clamp(0, batch - 1)]
            cu_out = torch.nn.functional.pad(lengths_dev.cumsum(0), (1, 0)).to(torch.int32)
            # The one sync: sizes for the output, and the index range check.
            total, longest, lo, hi = torch.stack([cu_out[-1].long(), lengths_dev.max().long(), idx.min(), idx.max()]).tolist()
            if lo < 0 or hi >= batch:
                raise ValueError(f"seq_idx holds an index out of range for a batch of {batch} sequences "
                                 f"(valid: -{batch} to {batch - 1})")
            lengths = None
        values = ops.select_sequences(self.values, self.cu_seqlens, idx, cu_out, total)
        grid = self.grid[idx] if self.grid is not None else None
        return RaggedBatch(values, cu_out, longest, grid, lengths=lengths)

    def topk_select(self, cls_attn: Tensor, *, keep_rate: Optional[float] = None,
                    keep: Union[Tensor, Sequence[int], None] = None, fuse: bool = True,
                    renormalize: bool = False) -> tuple["RaggedBatch", Tensor]:
        """EViT token selection on every sequence (:func:`adaptok.topk_select`).

        Returns the reduced batch (its lengths known on the host, so nothing
        syncs with the device when this batch's lengths are) and
        ``kept_index [T_out]``, the row of ``values`` each output row copies
        (-1 for fused rows). ``grid`` carries over.
        """
        # Host lengths of a batch are checked against its cu_seqlens when it is
        # built (or derived from shapes), so the op need not read them again.
        values, cu_out, lengths, kept_index = select_tokens(
            self.values, self.cu_seqlens, self.max_seqlen, cls_attn, keep_rate, keep, fuse, renormalize, self.lengths,
            lengths_checked=True)
        return RaggedBatch._unchecked(values, lengths, self.grid, cu_out), kept_index

    def to(self, *args, **kwargs) -> "RaggedBatch":
        """Move or cast ``values`` (``cu_seqlens`` and ``grid`` follow its device)."""
        values = self.values.to(*args, **kwargs)
        cu = self.cu_seqlens.to(values.device)
        grid = self.grid.to(values.device) if self.grid is not None else None
        return RaggedBatch(values, cu, self.max_seqlen, grid, lengths=self._lengths)
