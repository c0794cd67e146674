"""Fold a low-rank delta into a weight so that it can be taken out again bit for bit.

Adding ``Δ = left @ right`` to a weight rounds, so ``(W + Δ) − Δ`` is not always ``W`` again (PEFT's drift
after a merge → unmerge cycle, large in bf16/fp16). :func:`merge_exact` adds ``Δ`` exactly as PEFT's ``W += Δ``
does (computed in the wider of the two dtypes, rounded once to the weight's dtype), finds the elements that the
subtraction would not bring back, and returns a small :class:`MergeRecord` of them; :func:`unmerge_exact`
subtracts the same ``Δ`` and applies the record. Both compute ``Δ`` by one and the same matrix product, so they
see the same bits (and PEFT's).

What is recorded per such element is ``k``: the original bit pattern minus the subtracted one, as integers
(exact, wrapping; almost always ±1 to ±3 units in the last place), as one byte, with its position as a 16-bit
offset inside its block of 65536 elements (plus one count per block): 3 bytes per element, against 6 (bf16) or
8 (fp32) for a plain index and value. Where ``k`` does not fit a byte (``|W| ≪ |Δ|``, rare) the position and
the original bits are kept instead ("escapes"). How many elements need a record grows with ``|Δ|/|W|``.

With numba installed (``lorakit[fast]``), float32/bfloat16/float16 weights on the CPU are merged and unmerged by
one compiled pass each (:mod:`lorakit.merge_kernel`); otherwise, and for every other case, by eager PyTorch
passes. Both give the same merged bits and the same record; :func:`compiled` switches the compiled path off.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Iterator, Optional

import torch
from torch import Tensor

from .merge_kernel import merge as compiled_merge, supports as compiled_supports, unmerge as compiled_unmerge

__all__ = ["MergeRecord", "Scratch", "compiled", "merge_exact", "unmerge_exact", "restore_record", "apply_record"]

_BLOCK = 1 << 16  # positions are 16-bit offsets inside blocks of this many elements
_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-size integer view of each float
_USE_COMPILED = [True]


@contextmanager
def compiled(enabled: bool) -> Iterator[None]:
    """Inside the block, merge and unmerge use the compiled pass where it applies (``True``, the default outside)
    or only the eager PyTorch passes (``False``); both give the same bits."""
    before = _USE_COMPILED[0]
    _USE_COMPILED[0] = enabled
    try:
        yield
    finally:
        _USE_COMPILED[0] = before


@dataclass(frozen=True)
class MergeRecord:
    """The elements of a weight that ``(W + Δ) − Δ`` does not bring back, and how to fix each (see the module
    docstring). Unmerging adds ``steps`` at their positions, then writes the escapes."""

    counts: Tensor  #: int32, per block of 65536 elements, how many of ``offsets`` fall into it
    offsets: Tensor  #: int16, position inside the block minus 32768, ascending
    steps: Tensor  #: int8, ``k``
    escape_index: Tensor  #: int64 flat positions whose ``k`` does not fit a byte
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
    """Work buffers reused across the weights of one merge or unmerge call (fresh tensors the size of a weight
    cost page faults on every use)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, Tensor] = {}
        self._matrices: dict[tuple, Tensor] = {}  # views of the buffers, dropped when a buffer is replaced

    def get(self, slot: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat buffer of ``numel`` elements for ``slot`` (contents undefined)."""
        key = (slot, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
            self._matrices.clear()
        return buf[:numel]

    def matrix(self, slot: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """:meth:`get` as a ``rows × cols`` matrix; the same view again for the same shape (a model's layers come
        in a few shapes, and each view costs a microsecond)."""
        key = (slot, rows, cols, dtype, device)
        view = self._matrices.get(key)
        if view is None:
            view = self.get(slot, rows * cols, dtype, device).view(rows, cols)
            self._matrices[key] = view
        return view


def merge_exact(weight: Tensor, left: Tensor, right: Tensor, scale: float = 1.0,
                scratch: Optional[Scratch] = None, record: bool = True) -> Optional[MergeRecord]:
    """``weight += (left @ right) · scale`` in place, rounded as PEFT rounds it; returns what
    :func:`unmerge_exact` needs.

    ``weight`` is read as a ``left.shape[0] × right.shape[1]`` matrix (row-major); the product is computed in
    the factors' dtype. ``record=False`` (the weights will not be unmerged: ``merge_and_unload``) adds the same
    bits in one pass and returns ``None``.
    """
    matrix = _as_matrix(weight, left, right)
    scratch = scratch or Scratch()
    kept = None
    with torch.no_grad():
        if not record:
            matrix.add_(_scaled(_product(left, right, scratch), scale))
        else:
            product = _product(left, right, scratch)
            kept = _merge_compiled(matrix, product, scale) or _merge_eager(matrix, product, scale, scratch)
        if matrix.data_ptr() != weight.data_ptr():
            weight.copy_(matrix.view(weight.shape))
    return kept


def _merge_compiled(matrix: Tensor, product: Tensor, scale: float) -> Optional[MergeRecord]:
    """:func:`merge_exact` in one compiled pass; ``None`` (nothing changed, ``product`` included) where it does
    not apply. Asked of the product, not the factors: a transposed factor (Conv1D) is not contiguous, the product
    in scratch always is."""
    if not (_USE_COMPILED[0] and compiled_supports(matrix, product)):
        return None
    found = compiled_merge(matrix, product, scale)
    return None if found is None else MergeRecord(*found)


def _merge_eager(matrix: Tensor, product: Tensor, scale: float, scratch: Scratch) -> MergeRecord:
    """:func:`merge_exact` in eager PyTorch passes (scales ``product`` in place)."""
    delta = _scaled(product, scale)
    n, ints = matrix.numel(), _INT[matrix.element_size()]
    merged = torch.add(matrix, delta, out=scratch.get("merged", n, matrix.dtype, matrix.device).view(matrix.shape))
    k = scratch.get("k", n, ints, matrix.device)
    back = k.view(matrix.dtype).view(matrix.shape)
    torch.sub(merged, delta, out=back)  # what a plain unmerge would give
    original = matrix.view(ints).view(-1)
    torch.sub(original, k, out=k)
    record = _record_of_steps(k, original)
    matrix.copy_(merged)
    return record


def unmerge_exact(weight: Tensor, left: Tensor, right: Tensor, scale: float, record: MergeRecord,
                  scratch: Optional[Scratch] = None) -> None:
    """Undo :func:`merge_exact` in place (same factors and scale): subtract, then add back every ``k``."""
    matrix = _as_matrix(weight, left, right)
    scratch = scratch or Scratch()
    with torch.no_grad():
        product = _product(left, right, scratch)
        done = (_USE_COMPILED[0] and compiled_supports(matrix, product) and compiled_unmerge(
            matrix, product, scale, record.counts, record.offsets, record.steps, record.escape_index,
            record.escape_bits))
        if not done:
            matrix.sub_(_scaled(product, scale))
            bits = matrix.view(_INT[weight.element_size()]).view(-1)
            if record.steps.numel():
                bits.index_add_(0, record.flat_index(), record.steps.to(bits.dtype))
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
    shape = (left.shape[0], right.shape[1])
    if weight.shape == shape and weight.is_contiguous():
        return weight  # most weights (a view costs a microsecond, per layer)
    return weight.contiguous().view(shape)


def _product(left: Tensor, right: Tensor, scratch: Scratch) -> Tensor:
    """``left @ right`` into scratch; merge and unmerge both get their delta from here. One product for the whole
    weight: a matrix product of fewer rows may sum in another order (e.g. one row goes to a vector kernel)."""
    return torch.mm(left, right, out=scratch.matrix("delta", left.shape[0], right.shape[1], left.dtype, left.device))


def _scaled(product: Tensor, scale: float) -> Tensor:
    """``product · scale`` in place (PyTorch's rounding: the scale as the product's dtype)."""
    return product.mul_(scale) if scale != 1 else product


def _record_of_steps(k: Tensor, original_bits: Tensor) -> MergeRecord:
    """The record of ``k`` (flat: original bits minus the bits a plain undo gives, as wrapping integers): a
    one-byte step where ``k`` fits one, else an escape keeping the original bits."""
    index = k.nonzero().squeeze(1)
    steps = k.index_select(0, index)
    escape_index = index[:0]
    if steps.numel() and (int(steps.min()) < -128 or int(steps.max()) > 127):
        fits = (steps >= -128) & (steps <= 127)
        escape_index, index, steps = index[~fits], index[fits], steps[fits]
    return _record(index, steps.to(torch.int8), k.numel(), escape_index, original_bits.index_select(0, escape_index))


def _record(index: Tensor, steps: Tensor, numel: int, escape_index: Tensor, escape_bits: Tensor) -> MergeRecord:
    """Pack the ascending flat ``index`` as per-block counts and 16-bit offsets."""
    bounds = torch.arange(0, numel + _BLOCK, _BLOCK, device=index.device)
    counts = torch.searchsorted(index, bounds).diff().to(torch.int32)
    offsets = ((index & (_BLOCK - 1)) - _BLOCK // 2).to(torch.int16)
    return MergeRecord(counts, offsets, steps, escape_index, escape_bits)


def restore_record(original: Tensor, restored: Tensor) -> MergeRecord:
    """The record that turns ``restored`` back into ``original`` bit for bit (same number of elements and dtype),
    in :class:`MergeRecord`'s format: for merges that are not a plain added product, such as DoRA's row rescale
    (:mod:`lorakit.layers.dora`), whose undoing is computed first and then corrected with :func:`apply_record`."""
    if original.dtype != restored.dtype or original.numel() != restored.numel():
        raise ValueError(f"restore_record needs tensors of one dtype and size, got {original.dtype} "
                         f"{tuple(original.shape)} and {restored.dtype} {tuple(restored.shape)}")
    ints = _INT[original.element_size()]
    with torch.no_grad():
        bits = original.contiguous().view(ints).reshape(-1)
        k = bits - restored.contiguous().view(ints).reshape(-1)  # wrapping integer difference
        return _record_of_steps(k, bits)


def apply_record(weight: Tensor, record: MergeRecord) -> None:
    """Correct ``weight`` (contiguous) in place with a :func:`restore_record`: afterwards it is the original."""
    if not weight.is_contiguous():
        raise ValueError("apply_record needs a contiguous weight")
    with torch.no_grad():
        bits = weight.view(_INT[weight.element_size()]).view(-1)
        if record.steps.numel():
            bits.index_add_(0, record.flat_index(), record.steps.to(bits.dtype))
        bits.index_copy_(0, record.escape_index, record.escape_bits)
