"""Fold a low-rank delta into a weight so that it can be taken out again bit for bit.

Adding ``Δ = left @ right`` to a weight rounds, so ``(W + Δ) − Δ`` is not always ``W`` again (PEFT's drift
after a merge → unmerge cycle, large in bf16/fp16). :func:`merge_exact` adds ``Δ`` exactly as PEFT's ``W += Δ``
does (computed in the wider of the two dtypes, rounded once to the weight's dtype), finds the elements that the
subtraction would not bring back, and returns a small :class:`MergeRecord` of them; :func:`unmerge_exact`
subtracts the same ``Δ`` and applies the record.

Both compute ``Δ`` by one and the same matrix product (so they see the same bits, and the same as PEFT's
``B @ A``), then work through the weight a block of rows at a time (``_CHUNK`` elements), so that the work
buffers of a block stay in the CPU cache between the several passes over it.

What is recorded per element is ``k``: the original bit pattern minus the subtracted one, as integers (exact,
wrapping; mostly ±1, sometimes ±2 or ±3 units in the last place). In up to three layers:

- sparse, for the non-zero ``k`` (few, as with trained adapters): ``k`` as one byte, and the position as a
  16-bit offset inside its block of 65536 elements plus one count per block: 3 bytes per element;
- where more than 1 element in 12 fails that costs more than a dense layer underneath: ``k + 1`` in 2 bits
  for every element (a quarter byte each; it covers ``k`` in -1..2), the sparse layer then holding only what
  those 2 bits leave over;
- escapes, where the sparse byte does not fit (``|W| ≪ |Δ|``; rare): position and original bits.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor

__all__ = ["MergeRecord", "Scratch", "merge_exact", "unmerge_exact"]

_CHUNK = 1 << 18  # elements per block of rows worked on at a time (1 MiB per float32 buffer)
_BLOCK = 1 << 16  # sparse positions are 16-bit offsets inside blocks of this many elements
_PAD = 64  # work buffers are padded to a multiple of this many elements (the largest fold in _nonzero)
_SAMPLE = 61  # the failure rate is estimated from every this-many-th element
_DENSE_RATE = 1 / 12  # above this failure rate 2 bits per element beat 3 bytes per failing element
_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-size integer view of each float


@dataclass(frozen=True)
class MergeRecord:
    """The elements of a weight that ``(W + Δ) − Δ`` does not bring back, and how to fix each (see the module
    docstring). Unmerging adds the dense layer (if any), then the sparse one, then writes the escapes."""

    counts: Tensor  #: sparse: int32, per block of 65536 elements, how many of ``offsets`` fall into it
    offsets: Tensor  #: sparse: int16, position inside the block minus 32768, ascending
    steps: Tensor  #: sparse: int8, ``k`` (minus what the dense layer adds)
    codes: Tensor  #: dense (or empty): uint8, per chunk ``k + 1`` of elements ``i, i+q, i+2q, i+3q`` in bits 0-1, 2-3, …
    escape_index: Tensor  #: int64 flat positions whose ``k`` does not fit the sparse byte
    escape_bits: Tensor  #: their original bit patterns (the weight's same-size integer type)

    @property
    def nbytes(self) -> int:
        """Bytes held: what being merged costs in memory on top of the merged weight."""
        return sum(getattr(self, f.name).nbytes for f in fields(self))

    def flat_index(self) -> Tensor:
        """The int64 flat positions of ``steps``."""
        blocks = torch.arange(self.counts.numel(), device=self.counts.device).repeat_interleave(self.counts)
        return blocks * _BLOCK + (self.offsets.long() + _BLOCK // 2)


class Scratch:
    """Work buffers reused across blocks and weights (fresh ones cost page faults on every use)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, Tensor] = {}

    def get(self, slot: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat buffer of ``numel`` elements for ``slot`` (contents undefined)."""
        key = (slot, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


def merge_exact(weight: Tensor, left: Tensor, right: Tensor, scale: float = 1.0,
                scratch: Optional[Scratch] = None) -> MergeRecord:
    """``weight += (left @ right) · scale`` in place, rounded as PEFT rounds it; returns what
    :func:`unmerge_exact` needs.

    ``weight`` is read as a ``left.shape[0] × right.shape[1]`` matrix (row-major); the product is computed in
    the factors' dtype.
    """
    matrix = _as_matrix(weight, left, right)
    scratch = scratch or Scratch()
    ints = _INT[weight.element_size()]
    dense: Optional[bool] = None
    codes, index, steps, escape_index, escape_bits = [], [], [], [], []
    with torch.no_grad():
        full_delta = _delta(left, right, scale, scratch)
        for start, rows in _blocks(matrix):
            w, delta = matrix[start : start + rows], full_delta[start : start + rows]
            merged, k = _merged_and_k(w, delta, scratch)
            if dense is None:  # decided once per weight, from its first block
                dense = _sampled_rate(k) > _DENSE_RATE
            if dense:
                codes.append(_dense_codes(k, scratch))
            at = _nonzero(k, _sampled_rate(k), scratch)
            values = k.index_select(0, at)
            if _beyond_byte(values):
                beyond = (values < -128) | (values > 127)
                escape_index.append(at[beyond] + start * w.shape[1])
                escape_bits.append(w.view(ints).reshape(-1).index_select(0, at[beyond]))
                at, values = at[~beyond], values[~beyond]
            index.append(at + start * w.shape[1])
            steps.append(values.to(torch.int8))
            w.copy_(merged)
        if matrix.data_ptr() != weight.data_ptr():
            weight.copy_(matrix.view(weight.shape))
    return _record(_cat(index, torch.int64, weight), _cat(steps, torch.int8, weight), weight.numel(),
                   _cat(codes, torch.uint8, weight), _cat(escape_index, torch.int64, weight),
                   _cat(escape_bits, ints, weight))


def _merged_and_k(w: Tensor, delta: Tensor, scratch: Scratch) -> tuple[Tensor, Tensor]:
    """``w + delta`` as the weight's dtype rounds it, and ``k``: ``w``'s bits minus those of ``(w + delta) − delta``
    as integers, flat and padded with zeros to a multiple of ``_PAD`` (both in scratch)."""
    n, ints = w.numel(), _INT[w.element_size()]
    merged = torch.add(w, delta, out=scratch.get("merged", n, w.dtype, w.device).view(w.shape))
    k = scratch.get("k", -(-n // _PAD) * _PAD, ints, w.device)
    back = k[:n].view(w.dtype).view(w.shape)
    torch.sub(merged, delta, out=back)
    torch.sub(w.view(ints), back.view(ints), out=back.view(ints))
    k[n:].zero_()
    return merged, k


def unmerge_exact(weight: Tensor, left: Tensor, right: Tensor, scale: float, record: MergeRecord,
                  scratch: Optional[Scratch] = None) -> None:
    """Undo :func:`merge_exact` in place (same factors and scale): subtract, then add back every ``k``."""
    matrix = _as_matrix(weight, left, right)
    scratch = scratch or Scratch()
    ints = _INT[weight.element_size()]
    codes = record.codes
    with torch.no_grad():
        delta = _delta(left, right, scale, scratch)
        for start, rows in _blocks(matrix):
            w = matrix[start : start + rows]
            w.sub_(delta[start : start + rows])
            if codes.numel():
                q = -(-w.numel() // _PAD) * _PAD // 4
                _add_codes(w.view(ints).view(-1), codes[:q])
                codes = codes[q:]
        bits = matrix.view(ints).view(-1)
        if record.steps.numel():
            bits.index_add_(0, record.flat_index(), record.steps.to(ints))
        bits.index_copy_(0, record.escape_index, record.escape_bits)
        if matrix.data_ptr() != weight.data_ptr():
            weight.copy_(matrix.view(weight.shape))


def _as_matrix(weight: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``weight`` as the ``rows × cols`` matrix the product fills (a contiguous copy if it cannot be a view)."""
    if not weight.dtype.is_floating_point:
        raise ValueError(f"cannot merge into a weight of dtype {weight.dtype}: only floating-point weights")
    if weight.device.type == "meta":
        raise ValueError("cannot merge into a weight on the meta device: it holds no values")
    if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0] or (
            weight.numel() != left.shape[0] * right.shape[1]):
        raise ValueError(f"the product of factors {tuple(left.shape)} and {tuple(right.shape)} does not fit a "
                         f"weight of shape {tuple(weight.shape)}")
    return weight.contiguous().view(left.shape[0], right.shape[1])


def _blocks(matrix: Tensor) -> list[tuple[int, int]]:
    """``(first row, number of rows)`` of each block of about ``_CHUNK`` elements (at least one row)."""
    rows, cols = matrix.shape
    step = max(1, _CHUNK // max(cols, 1))
    return [(start, min(step, rows - start)) for start in range(0, rows, step)]


def _delta(left: Tensor, right: Tensor, scale: float, scratch: Scratch) -> Tensor:
    """``(left @ right) · scale`` into scratch; merge and unmerge both get their delta here. One product for the
    whole weight: a matrix product of fewer rows may sum in another order (e.g. one row goes to a vector kernel)."""
    rows, cols = left.shape[0], right.shape[1]
    delta = torch.mm(left, right, out=scratch.get("delta", rows * cols, left.dtype, left.device).view(rows, cols))
    return delta.mul_(scale) if scale != 1 else delta


def _beyond_byte(values: Tensor) -> bool:
    """Whether any of ``values`` falls outside int8 (one pass for the usual answer, no)."""
    return bool(values.numel()) and (int(values.min()) < -128 or int(values.max()) > 127)


def _cat(parts: list[Tensor], dtype: torch.dtype, like: Tensor) -> Tensor:
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=like.device)


def _record(index: Tensor, steps: Tensor, numel: int, codes: Tensor, escape_index: Tensor,
            escape_bits: Tensor) -> MergeRecord:
    """Pack the ascending flat ``index`` as per-block counts and 16-bit offsets."""
    bounds = torch.arange(0, numel + _BLOCK, _BLOCK, device=index.device)
    counts = torch.searchsorted(index, bounds).diff().to(torch.int32)
    offsets = ((index & (_BLOCK - 1)) - _BLOCK // 2).to(torch.int16)
    return MergeRecord(counts, offsets, steps, codes, escape_index, escape_bits)


def _dense_codes(k: Tensor, scratch: Scratch) -> Tensor:
    """``k + 1`` in 2 bits for every entry of ``k`` (1-d, padded with zeros to ``_PAD``); what they do not cover
    (a multiple of 4) is left in ``k``."""
    k += 1  # 0..3 for the usual k in -1..2
    quarters = k.view(4, -1)
    codes = torch.bitwise_and(quarters[0], 3, out=torch.empty(quarters.shape[1], dtype=torch.uint8, device=k.device))
    part = scratch.get("codes", quarters.shape[1], torch.uint8, k.device)
    for j in (1, 2, 3):
        torch.bitwise_and(quarters[j], 3, out=part)
        codes |= part.bitwise_left_shift_(2 * j)
    k &= -4  # k - (decoded k)
    return codes


def _add_codes(bits: Tensor, codes: Tensor) -> None:
    """``bits += k`` for every element of one block, ``k + 1`` read from its dense 2-bit ``codes``."""
    q = codes.numel()
    for j in range(4):
        part = bits[j * q : (j + 1) * q]
        part += codes[: part.numel()].bitwise_right_shift(2 * j).bitwise_and_(3).view(torch.int8).sub_(1)


def _sampled_rate(values: Tensor) -> float:
    """The fraction of non-zero entries, estimated from a sample (at least one is assumed)."""
    sample = values[::_SAMPLE]
    return max(int(torch.count_nonzero(sample)), 1) / max(sample.numel(), 1)


def _nonzero(values: Tensor, rate: float, scratch: Scratch) -> Tensor:
    """Ascending flat positions of the non-zero entries of ``values`` (1-d integers, length a multiple of
    ``_PAD``, about ``rate`` of them non-zero); faster than ``nonzero`` where they are sparse.

    ``nonzero`` costs a few ns per element it scans, a vectorised OR a fraction of one. So where they are
    sparse, ``F`` equal slices of length ``L`` are ORed together (halving ``log2 F`` times), ``nonzero`` scans
    only that, and each hit ``p``
    is checked at ``p, p + L, …, p + (F-1)L``. ``F ≈ 1/sqrt(4·rate)`` balances the two scans; below 4 it saves
    nothing. Taking the candidates slice by slice keeps them ascending.
    """
    fold = 1
    while fold < _PAD and (2 * fold) ** 2 * rate * 4 <= 1:
        fold *= 2
    if fold < 4:
        return values.nonzero().squeeze(1)
    length = values.numel() // fold
    half = values.numel() // 2
    folded = torch.bitwise_or(values[:half], values[half:], out=scratch.get("fold", half, values.dtype, values.device))
    while half > length:  # OR the halves together until `fold` slices lie on each other
        half //= 2
        folded[:half] |= folded[half : 2 * half]
    folded = folded[:length]
    hits = folded.nonzero().squeeze(1)
    candidates = (torch.arange(fold, device=values.device).unsqueeze(1) * length + hits).view(-1)
    return candidates.index_select(0, values.index_select(0, candidates).nonzero().squeeze(1))
