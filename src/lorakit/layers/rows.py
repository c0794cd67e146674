"""Which adapter each batch row uses in a mixed-adapter batch, and a layer's cache of stacked factors for it.

Pure data: the layers read it (:meth:`lorakit.layers.LoraLayer.set_row_adapters`), :mod:`lorakit.mixed_batch`
builds it for the length of one call.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["RowAdapters", "StackCache"]


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

    @classmethod
    def from_names(cls, adapter_names: Sequence[str], base: str, device: torch.device,
                   copies: bool = False) -> "RowAdapters":
        names = tuple(dict.fromkeys(n for n in adapter_names if n != base))
        index = torch.tensor([0 if n == base else names.index(n) + 1 for n in adapter_names], device=device)
        return cls(names, index, in_order=list(adapter_names) == list(names), copies=copies)

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
