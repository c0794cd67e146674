"""Mixed-batch routing inside an adapted layer: each batch row gets its own adapter's output.

A mixin of :class:`~lorakit.layers.LoraLayer` (it reads the layer's ``r``, ``scaling`` and factors): the general
per-adapter path, and the stacked factors (zero-padded to one rank, cached while no gradient is recorded) that the
batched paths of Linear and Embedding multiply with. The request itself is checked in :mod:`lorakit.mixed_batch`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .rows import RowAdapters, StackCache, Stacks, WatchedTable, note_data_swap

__all__ = ["RowRouting"]


class RowRouting:
    """The mixed-batch part of an adapted layer (see the module docstring)."""

    def set_row_adapters(self, rows: Optional[RowAdapters]) -> None:
        """Route batch rows to adapters (:mod:`lorakit.mixed_batch` sets this for one call, then ``None``).

        A plain attribute written into the instance dict: ``Module.__setattr__`` is Python code that checks the value
        against parameters and modules, twice per adapted layer per mixed-batch call."""
        vars(self)["_rows"] = rows

    def _routed(self, out: Tensor, x: Tensor, rows: RowAdapters) -> Tensor:
        """The base layer's output ``out`` plus each row's own adapter's output (the forward of a mixed batch)."""
        rows.for_batch(x.shape[0])  # every layer checks the rows it receives, even where it adds nothing
        if self.disable_adapters or not any(n in self.r for n in rows.names):
            return out
        magnitudes = self._modules["lora_magnitude_vector"]._modules
        if magnitudes and any(n in magnitudes for n in rows.names):  # DoRA rows: adapter by adapter
            return RowRouting._add_row_outputs(self, out, x, rows)
        return self._add_row_outputs(out, x, rows)

    def _add_row_outputs(self, out: Tensor, x: Tensor, rows: RowAdapters) -> Tensor:
        """Each row gets its own adapter's output. This general version runs each adapter on its rows; layer
        kinds with a batched path (Linear, Embedding) override it."""
        index = rows.for_batch(x.shape[0])
        for i, name in enumerate(rows.names, start=1):
            if name not in self.r:
                continue
            picked = (index == i).nonzero().squeeze(1)
            if picked.numel():
                out = out.index_copy(0, picked, self._adapter_output(out[picked], x[picked], name))
        return out

    def _stacked_factors(self, names: Sequence[str]) -> Stacks:
        """``A`` of every adapter in ``names`` as ``(K+1, r_max, in)`` and ``scaling·B`` as ``(K+1, out, r_max)``;
        slot 0 (the base model) and adapters this layer lacks are zeros, smaller ranks are zero-padded; what the
        layer kind stacks beside them (:meth:`_stack_extra`), and the views an in-order batch multiplies with
        (:class:`~lorakit.layers.rows.Stacks`).

        Cached while no gradient is recorded (see :class:`~lorakit.layers.rows.StackCache`).
        """
        grad = torch.is_grad_enabled() or torch.compiler.is_compiling()  # a compiled graph builds its own stacks
        cache = self._stack_cache
        if not grad and cache is not None and cache.current(names, self.scaling, self._row_tensors):
            return cache.stacks
        present = [n for n in names if n in self.r]
        tensors = self._row_tensors(present)
        k = len(present)
        pairs = dict(zip(present, zip(tensors[:k], tensors[k:2 * k])))
        any_A, any_B = tensors[0], tensors[k]
        r_max = max(self.r[n] for n in present)
        As = [any_A.new_zeros(r_max, *any_A.shape[1:])]
        Bs = [any_B.new_zeros(any_B.shape[0], r_max)]
        for name in names:
            if name not in pairs:
                As.append(As[0])
                Bs.append(Bs[0])
            else:
                A, B = pairs[name]
                As.append(F.pad(A, (0, 0, 0, r_max - A.shape[0])))
                Bs.append(F.pad(B, (0, r_max - B.shape[1])) * self.scaling[name])
        A_stack, B_stack = torch.stack(As), torch.stack(Bs)
        stacks = Stacks(A_stack, B_stack, self._stack_extra(names), A_stack[1:].transpose(1, 2),
                        B_stack[1:].transpose(1, 2))
        if not grad:
            self._stack_cache = StackCache(names, present, self.scaling, tensors, stacks, self._watched(present))
        return stacks

    def _factor_list(self, names: Sequence[str]) -> list[Tensor]:
        """``[A₁, A₂, …, B₁, B₂, …]`` (:meth:`factors`) of the adapters ``names``, all present in this layer."""
        pairs = [self.factors(n) for n in names]
        return [A for A, _ in pairs] + [B for _, B in pairs]

    # -- what a layer kind tells the stack cache (the defaults: nothing beside the factors, nothing watched) ------
    def _row_tensors(self, present: Sequence[str]) -> list[Tensor]:
        """Every tensor the stacks are built from: :meth:`_factor_list` first, then those of :meth:`_stack_extra`."""
        return self._factor_list(present)

    def _stack_extra(self, names: Sequence[str]) -> Optional[Tensor]:
        """A further per-adapter stack built with the factors (slot 0 first), or ``None``."""
        return None

    def _watched(self, present: Sequence[str]) -> bool:
        """Whether replacing any factor of ``present`` or any scaling writes a
        :class:`~lorakit.layers.rows.WatchedTable`: this layer's own tables and scalings, and (per layer kind) every
        table its factors are read through. The default: not known, re-read the factors at every step."""
        return False

    def _own_tables_watched(self) -> bool:
        return type(self._modules) is WatchedTable and type(self.scaling) is WatchedTable

    def _apply(self, fn, recurse: bool = True):
        """``Module._apply`` (``.to()``, ``.half()``, ``.cuda()``) may give the factors new data through ``.data``,
        which neither a table write nor a version counter shows: every stack cache is rebuilt."""
        result = super()._apply(fn, recurse)
        note_data_swap()
        return result
