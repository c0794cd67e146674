"""Which adapter each batch row uses in a mixed-adapter batch, and a layer's cache of stacked factors for it.

Pure data: the layers read it (:meth:`lorakit.layers.LoraLayer.set_row_adapters`), :mod:`lorakit.mixed_batch`
builds it for the length of one call.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["RowAdapters", "RowGroups", "StackCache"]


@dataclass(frozen=True)
class RowGroups:
    """A batch's rows sorted by adapter, for batched matmuls over adapters rather than over rows.

    ``take`` lists the rows of ``G = len(slots)`` groups of ``size`` rows each, group ``g`` being the rows of
    adapter slot ``slots[g]`` (a slice of the stack when the slots are consecutive, so the factors are a view);
    a group with fewer rows repeats its last row. Result row ``src[j]`` (all of them when ``src`` is ``None``)
    belongs to batch row ``dest[j]``; base rows (slot 0) are in no group and get nothing.
    """

    slots: "slice | Tensor"
    size: int
    take: Tensor
    dest: Tensor
    src: Optional[Tensor]

    @classmethod
    def of(cls, per_row: Sequence[int], device: torch.device) -> Optional["RowGroups"]:
        """The grouping of rows whose adapter slots are ``per_row``; ``None`` when every row is a base row."""
        buckets: dict[int, list[int]] = {}
        for n, slot in enumerate(per_row):
            if slot:
                buckets.setdefault(slot, []).append(n)
        if not buckets:
            return None
        slots = sorted(buckets)
        size = max(map(len, buckets.values()))
        take, src = [], []
        for g, slot in enumerate(slots):
            rows = buckets[slot]
            take += rows + rows[-1:] * (size - len(rows))
            src += range(g * size, g * size + len(rows))
        padded = len(src) != len(take)
        dest = [take[j] for j in src] if padded else take
        consecutive = slots == list(range(slots[0], slots[-1] + 1))
        as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        return cls(slice(slots[0], slots[-1] + 1) if consecutive else as_tensor(slots), size, as_tensor(take),
                   as_tensor(dest), as_tensor(src) if padded else None)


@dataclass(frozen=True)
class RowAdapters:
    """Which adapter each batch row uses in a mixed batch: ``index[n] = i`` means ``names[i-1]``; 0 is the base.

    Every layer checks the rows it actually receives against the list (:meth:`for_batch`), so a list of the wrong
    length is an error whatever the input is called. With ``copies`` (``generate``, after checking the prompts'
    count), a layer that sees ``k`` times as many rows (beam search, ``num_return_sequences``) gives each prompt's
    adapter to its ``k`` consecutive copies.
    """

    names: tuple[str, ...]
    index: Tensor
    #: row ``n`` uses the ``n``-th distinct adapter (a typical multi-tenant decode batch): the stacked factors
    #: are then already in row order and need no per-row gather
    in_order: bool = False
    #: layers may see each row repeated ``k`` times in a row (``generate``'s beams and returned sequences)
    copies: bool = False
    #: each row's adapter slot as Python ints (the grouping is worked out from them without reading the device)
    slots: tuple[int, ...] = ()
    groupings: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_names(cls, adapter_names: Sequence[str], base: str, device: torch.device,
                   copies: bool = False) -> "RowAdapters":
        names = tuple(dict.fromkeys(n for n in adapter_names if n != base))
        slots = tuple(0 if n == base else names.index(n) + 1 for n in adapter_names)
        index = torch.tensor(slots, device=device)
        return cls(names, index, in_order=list(adapter_names) == list(names), copies=copies, slots=slots)

    def groups(self, n: int) -> Optional[RowGroups]:
        """The rows of a batch of ``n`` grouped by adapter (:class:`RowGroups`), worked out once per batch size
        and shared by every layer; ``None`` when all rows are base rows."""
        if n not in self.groupings:
            self.for_batch(n)  # the same check as everywhere
            slots = self.slots or tuple(self.index.tolist())
            per_row = [s for s in slots for _ in range(n // len(slots))]
            self.groupings[n] = RowGroups.of(per_row, self.index.device)
        return self.groupings[n]

    def rows_of(self, stack: Tensor, n: int) -> Tensor:
        """``stack[index]`` for a batch of ``n`` rows; a view of ``stack``, not a copy, when rows are in order."""
        if self.in_order and n == self.index.shape[0]:
            return stack[1:]
        return stack[self.for_batch(n)]

    def for_batch(self, n: int) -> Tensor:
        """Each of a layer's ``n`` input rows' adapter index; ``ValueError`` if ``n`` does not fit the list."""
        rows = self.index.shape[0]
        if n == rows:
            return self.index
        if self.copies and n % rows == 0:
            return self.index.repeat_interleave(n // rows)
        raise ValueError(
            f"adapter_names has {rows} entries for a batch of {n} rows (as an adapted layer received it); expected one "
            "adapter name per batch row"
        )


_version = operator.attrgetter("_version")


class StackCache:
    """A layer's stacked factors for one list of adapter names, with what they were built from.

    Valid while the names, the scalings and the factor tensors are the same: the same objects (holding them keeps
    their ids from being reused; a replaced parameter is a new object) at the same version counters (an in-place
    update, such as an optimizer step or ``load_state_dict``, bumps them). Scalings held as tensors (prepared for
    compiled hotswap) are compared the same way: a hotswap writes them in place. The checks run in C loops: a mixed
    batch of 32 adapters checks 64 tensors per layer per step.
    """

    def __init__(self, names: Sequence[str], scalings: list, tensors: list, stacks: tuple[Tensor, Tensor]) -> None:
        self.names, self.scalings, self.tensors, self.stacks = tuple(names), scalings, tensors, stacks
        self.versions = list(map(_version, tensors))
        self.scaling_versions = [getattr(s, "_version", None) for s in scalings]

    def matches(self, names: Sequence[str], scalings: list, tensors: list) -> bool:
        return (
            self.names == tuple(names)
            and self.scalings == scalings
            and len(self.tensors) == len(tensors)
            and all(map(operator.is_, self.tensors, tensors))
            and self.versions == list(map(_version, tensors))
            and self.scaling_versions == [getattr(s, "_version", None) for s in scalings]
        )
