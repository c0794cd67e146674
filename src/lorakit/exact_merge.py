"""Fold a delta into a weight so that it can be taken out again bit for bit.

Adding ``Δ`` to a weight rounds, so ``(W + Δ) − Δ`` is not always ``W`` again (PEFT's drift after a merge →
unmerge cycle, large in bf16/fp16). :func:`merge_exact` adds ``Δ`` exactly as PEFT's ``W += Δ`` does (computed in
the wider of the two dtypes, rounded once to the weight's dtype), finds the elements that the subtraction would
not bring back, and returns a small :class:`MergeRecord` of them; :func:`unmerge_exact` subtracts ``Δ`` and
applies the record. The caller passes the same ``Δ``, bit for bit, to both.

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
    codes: Tensor  #: dense (or empty): uint8, ``k + 1`` of elements ``i, i+q, i+2q, i+3q`` in bits 0-1, 2-3, 4-5, 6-7
    escape_index: Tensor  #: int64 flat positions whose ``k`` does not fit the encoding
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
    """Work buffers reused across the weights of one merge or unmerge call.

    Fresh tensors the size of a weight cost page faults on every use; one set, grown to the largest weight,
    does not. Drop the object to free them.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, Tensor] = {}

    def get(self, slot: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat buffer of ``numel`` elements for ``slot`` (contents undefined)."""
        key = (slot, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


def merge_exact(weight: Tensor, delta: Tensor, scratch: Optional[Scratch] = None) -> MergeRecord:
    """``weight += delta`` in place, rounded as PEFT rounds it, and the record :func:`unmerge_exact` needs.

    ``delta`` may live in ``scratch`` under the slot ``"delta"`` (the slots used here are others).
    """
    _check(weight, delta)
    scratch = scratch or Scratch()
    n, ints = weight.numel(), _INT[weight.element_size()]
    with torch.no_grad():
        merged = torch.add(weight, delta, out=scratch.get("merged", n, weight.dtype, weight.device).view(weight.shape))
        padded = scratch.get("diff", -(-n // _PAD) * _PAD, ints, weight.device)
        back = padded[:n].view(weight.dtype).view(weight.shape)
        torch.sub(merged, delta, out=back)
        torch.sub(weight.view(ints), back.view(ints), out=back.view(ints))  # k, for every element
        padded[n:].zero_()
        codes = _dense_codes(padded, scratch) if _sampled_rate(padded) > _DENSE_RATE else padded[:0].byte()
        record = _sparse(padded, codes, weight.view(ints).reshape(-1), scratch)
        weight.copy_(merged)
    return record


def unmerge_exact(weight: Tensor, delta: Tensor, record: MergeRecord, scratch: Optional[Scratch] = None) -> None:
    """Undo :func:`merge_exact` in place: ``weight -= delta``, then every recorded ``k`` is added back."""
    _check(weight, delta)
    with torch.no_grad():
        target = weight if weight.is_contiguous() else (scratch or Scratch()).get(
            "merged", weight.numel(), weight.dtype, weight.device).view(weight.shape)
        torch.sub(weight, delta, out=target)
        bits = target.view(_INT[weight.element_size()]).view(-1)
        if record.codes.numel():
            _add_codes(bits, record.codes)
        if record.steps.numel():
            index = record.flat_index()
            bits[index] = bits[index] + record.steps
        bits[record.escape_index] = record.escape_bits
        if target is not weight:
            weight.copy_(target)


def _check(weight: Tensor, delta: Tensor) -> None:
    if not weight.dtype.is_floating_point:
        raise ValueError(f"cannot merge into a weight of dtype {weight.dtype}: only floating-point weights")
    if weight.device.type == "meta":
        raise ValueError("cannot merge into a weight on the meta device: it holds no values")
    if delta.shape != weight.shape:
        raise ValueError(f"delta of shape {tuple(delta.shape)} does not fit the weight's {tuple(weight.shape)}")


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


def _sparse(k: Tensor, codes: Tensor, original: Tensor, scratch: Scratch) -> MergeRecord:
    """The record: ``codes``, plus positions and one-byte values of the non-zero entries of ``k`` (1-d, padded
    with zeros to ``_PAD``), plus the original bits where a value does not fit a byte."""
    index = _nonzero(k, _sampled_rate(k), scratch)
    steps = k[index]
    escape_index = index[:0]
    if steps.numel() and (steps.min() < -128 or steps.max() > 127):
        fits = (steps >= -128) & (steps <= 127)
        escape_index, index, steps = index[~fits], index[fits], steps[fits]
    bounds = torch.arange(0, original.numel() + _BLOCK, _BLOCK, device=index.device)
    counts = torch.searchsorted(index, bounds).diff().to(torch.int32)
    offsets = ((index & (_BLOCK - 1)) - _BLOCK // 2).to(torch.int16)
    return MergeRecord(counts, offsets, steps.to(torch.int8), codes, escape_index, original[escape_index])


def _add_codes(bits: Tensor, codes: Tensor) -> None:
    """``bits += k`` for every element, ``k + 1`` read from the dense 2-bit ``codes``."""
    q = codes.numel()
    for j in range(4):
        part = bits[j * q : (j + 1) * q]
        k = codes[: part.numel()].bitwise_right_shift(2 * j).bitwise_and_(3).view(torch.int8).sub_(1)
        part += k


def _sampled_rate(values: Tensor) -> float:
    """The fraction of non-zero entries, estimated from a sample (at least one is assumed)."""
    sample = values[::_SAMPLE]
    return max(int(torch.count_nonzero(sample)), 1) / max(sample.numel(), 1)


def _nonzero(values: Tensor, rate: float, scratch: Scratch) -> Tensor:
    """Ascending flat positions of the non-zero entries of ``values`` (1-d integers, length a multiple of
    ``_PAD``, about ``rate`` of them non-zero); faster than ``nonzero`` where they are sparse.

    ``nonzero`` costs a few ns per element it scans, a vectorised OR a fraction of one. So where they are sparse,
    ``F`` equal slices of length ``L`` are ORed together, ``nonzero`` scans only that, and each hit ``p`` is
    checked at ``p, p + L, …, p + (F-1)L``. ``F ≈ 1/sqrt(4·rate)`` balances the two scans; below 4 it saves
    nothing. Taking the candidates slice by slice keeps them ascending.
    """
    fold = 1
    while fold < _PAD and (2 * fold) ** 2 * rate * 4 <= 1:
        fold *= 2
    if fold < 4:
        return values.nonzero().squeeze(1)
    length = values.numel() // fold
    slices = values.view(fold, length)
    folded = torch.bitwise_or(slices[0], slices[1], out=scratch.get("fold", length, values.dtype, values.device))
    for part in slices[2:]:
        folded |= part
    hits = folded.nonzero().squeeze(1)
    candidates = (torch.arange(fold, device=values.device).unsqueeze(1) * length + hits).view(-1)
    return candidates[values[candidates].nonzero().squeeze(1)]
