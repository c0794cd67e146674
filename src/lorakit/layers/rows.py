"""Which adapter each batch row uses in a mixed-adapter batch, and a layer's cache of stacked factors for it.

Pure data: the layers read it (:meth:`lorakit.layers.LoraLayer.set_row_adapters`), :mod:`lorakit.mixed_batch`
builds it for the length of one call.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["RowAdapters", "RowGroups", "StackCache", "Stacks", "WatchedTable", "note_data_swap", "table_writes",
           "watched"]


class Stacks(NamedTuple):
    """A layer's factors stacked over a batch's adapters (:meth:`lorakit.layers.LoraLayer._stacked_factors`)."""

    A: Tensor  #: ``(K+1, r, in)``, slot 0 (the base model) zeros
    B: Tensor  #: ``scaling·B``, ``(K+1, out, r)``
    extra: Optional[Tensor]  #: what the layer kind stacks beside them (a Linear's ``lora_bias`` terms), or None
    A_rows_t: Tensor  #: ``A[1:]`` transposed, ``(K, in, r)``: row ``i`` of an in-order batch runs slot ``i+1``
    B_rows_t: Tensor  #: ``B[1:]`` transposed, ``(K, r, out)``


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
        slot_of = {base: 0}
        for n in adapter_names:
            slot_of.setdefault(n, len(slot_of))  # distinct adapters numbered 1, 2, … in order of first use
        names = tuple(n for n in slot_of if n != base)
        slots = tuple(map(slot_of.__getitem__, adapter_names))
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

#: how many writes :class:`WatchedTable` tables have seen, process-wide (a stack cache built at one count is
#: checked at the next step by comparing one integer instead of re-reading every factor)
_TABLE_WRITES = [0]
_DATA_SWAPS = [0]  # see note_data_swap


def table_writes() -> int:
    """The number of writes to watched tables so far (see :class:`WatchedTable`)."""
    return _TABLE_WRITES[0]


def note_data_swap() -> None:
    """Count a change that gives factors new data without a table write or a version bump (``Module._apply``
    sets ``.data`` under ``.to()``/``.half()``): every stack cache is rebuilt at its next check."""
    _DATA_SWAPS[0] += 1


class WatchedTable(dict):
    """A module's table (``_parameters`` of a factor, ``_modules`` of ``lora_A``/``lora_B``, ``_parameters`` of a
    ParameterDict of factors) that counts every write.

    Every way a factor tensor can be replaced ends in such a write: ``module.weight = …`` and
    ``load_state_dict(assign=True)`` (``register_parameter``), ``del``, parametrizations, ``torch.func.
    functional_call`` and ``Module._apply`` with new tensors (direct item writes), ``lora_A[name] = …``
    (``add_module``). A mixed batch's stack cache then checks one counter per step for all of them, plus the
    version counters of the factors for in-place updates (see :class:`StackCache`). Reads are a plain dict's.
    """

    __slots__ = ()

    def __setitem__(self, key, value) -> None:
        _TABLE_WRITES[0] += 1
        dict.__setitem__(self, key, value)

    def __delitem__(self, key) -> None:
        _TABLE_WRITES[0] += 1
        dict.__delitem__(self, key)

    def __ior__(self, other):
        _TABLE_WRITES[0] += 1
        return dict.__ior__(self, other)

    def pop(self, *args):
        _TABLE_WRITES[0] += 1
        return dict.pop(self, *args)

    def popitem(self):
        _TABLE_WRITES[0] += 1
        return dict.popitem(self)

    def clear(self) -> None:
        _TABLE_WRITES[0] += 1
        dict.clear(self)

    def update(self, *args, **kwargs) -> None:
        _TABLE_WRITES[0] += 1
        dict.update(self, *args, **kwargs)

    def setdefault(self, key, default=None):
        _TABLE_WRITES[0] += 1
        return dict.setdefault(self, key, default)


def watched(module: nn.Module, table: str = "_modules") -> nn.Module:
    """``module`` with its ``table`` (``_modules`` or ``_parameters``) made a :class:`WatchedTable` (same contents)."""
    state = vars(module)
    state[table] = WatchedTable(state[table])
    return module


def _no_cache() -> None:
    """What a pickled :class:`StackCache` loads as: nothing (see ``StackCache.__deepcopy__``)."""
    return None


class StackCache:
    """A layer's stacked factors for one list of adapter names, with what they were built from.

    Valid while the names, the scalings and the factor tensors are the same: the same objects at the same version
    counters (an in-place update, such as an optimizer step, a hotswap or ``load_state_dict``, bumps them; holding
    the tensors keeps their ids from being reused). Scalings held as tensors (prepared for compiled hotswap) are
    compared the same way: a hotswap writes them in place.

    Checked at every step, so the check must touch few objects: a mixed batch of 32 adapters holds 64 factor
    tensors per layer, and with the interpreter's data out of cache after every layer's weights streamed through,
    each object touched costs a cache miss (re-reading each factor from its module cost about a microsecond).
    Where the scalings and every table the factors are read through are :class:`WatchedTable` (``watched``), no
    write to any watched table since the last check means no factor or scaling was replaced: one integer compared.
    The version counters are still read at every step (nothing else sees an in-place write), through aliases that
    lie together in memory. Otherwise, or after any counted write, the factors and scalings are re-read and
    compared (``reread``).
    """

    def __init__(self, names: Sequence[str], present: list, scaling: dict, tensors: list, stacks: tuple,
                 watched: bool) -> None:
        self.names, self.present, self.tensors, self.stacks, self.watched = (
            tuple(names), present, tensors, stacks, watched)
        self.scaling_table = scaling
        self.scalings = list(map(scaling.get, self.names))
        self.writes, self.swaps = _TABLE_WRITES[0], _DATA_SWAPS[0]
        # Versions are read through aliases made here (``detach()`` shares the tensor's version counter): their
        # Python and tensor objects lie together in memory, the factors' own are scattered over the heap. About
        # half the time of reading the factors' counters directly.
        self.aliases = [t.detach() for t in tensors]
        self.versions = list(map(_version, self.aliases))
        self.scaling_aliases = [s.detach() for s in self.scalings if isinstance(s, Tensor)]
        self.scaling_versions = list(map(_version, self.scaling_aliases))

    def __deepcopy__(self, memo: dict) -> None:
        """A copy of the layer starts without stacks: the aliases would not share the copied factors' counters."""
        return None

    def __reduce__(self):
        return _no_cache, ()

    def current(self, names: Sequence[str], scaling: dict, reread) -> bool:
        """Whether the stacks are still those of ``names`` with the layer's ``scaling`` table and its factors as
        ``reread(present)`` lists them now (called only when not watched or after a counted write)."""
        if not (
            self.names == names
            and scaling is self.scaling_table
            and self.swaps == _DATA_SWAPS[0]
            and list(map(_version, self.aliases)) == self.versions
            and list(map(_version, self.scaling_aliases)) == self.scaling_versions
        ):
            return False
        if self.watched and self.writes == _TABLE_WRITES[0]:
            return True
        tensors = reread(self.present)
        if (tensors is None or len(tensors) != len(self.tensors) or not all(map(operator.is_, self.tensors, tensors))
                or not all(map(operator.is_, map(scaling.get, self.names), self.scalings))):
            return False  # a scaling set again, even to an equal value, may be a new tensor to follow: rebuild
        self.writes = _TABLE_WRITES[0]  # all the same: no need to re-read them until the next counted write
        return True
