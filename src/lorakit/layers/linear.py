"""``nn.Linear`` and transformers' GPT-2 ``Conv1D``: the layer every LLM adapter targets, with the decode fast path."""

from __future__ import annotations

import functools
from itertools import chain
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import add_dropped_lora, add_lora, add_lora_groups, add_lora_rows
from .base import LoraLayer
from .construction import Factor, add_child
from .init import initialize
from .rows import RowAdapters, WatchedTable

try:  # the global hooks that Module.__call__ checks (see Linear.forward)
    from torch.nn.modules.module import (
        _global_backward_hooks,
        _global_backward_pre_hooks,
        _global_forward_hooks,
        _global_forward_pre_hooks,
    )
except ImportError:  # a torch that keeps them elsewhere: assume there are hooks, always call the module
    _global_forward_hooks = _global_forward_pre_hooks = _global_backward_hooks = _global_backward_pre_hooks = {0: 0}
_LINEAR_FORWARD = nn.Linear.forward

__all__ = ["Linear", "is_conv1d"]


_CONV1D_TYPES: dict[type, bool] = {}  # is_conv1d's answer per class (asked for every module of every model wrapped)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` (weight stored ``in × out``), recognised without importing transformers."""
    cls = type(module)
    answer = _CONV1D_TYPES.get(cls)
    if answer is None:
        answer = _CONV1D_TYPES[cls] = any(
            c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in cls.__mro__)
    return answer


class Linear(LoraLayer):
    """``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (weight stored ``in × out``, detected by class)."""

    supports_dora = True
    supports_lora_bias = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        transpose = is_conv1d(base_layer)
        in_features, out_features = base_layer.weight.shape if transpose else base_layer.weight.shape[::-1]
        vars(self).update(transpose_delta=transpose, in_features=in_features, out_features=out_features)

    @property
    def fan_in_fan_out(self) -> bool:
        return self.transpose_delta

    def _create_factors(self, adapter_name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        modules = self._modules
        add_child(modules["lora_A"], adapter_name, Factor(self.in_features, r, dtype, device))
        add_child(modules["lora_B"], adapter_name, Factor(r, self.out_features, dtype, device))

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights) -> None:
        """As :meth:`LoraLayer.reset_lora_parameters`, plus ``"orthogonal"``, PiSSA and OLoRA
        (:mod:`lorakit.layers.init`)."""
        if isinstance(init_lora_weights, str) and init_lora_weights != "gaussian":
            initialize(self, adapter_name, init_lora_weights)
        else:
            super().reset_lora_parameters(adapter_name, init_lora_weights)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """:meth:`LoraLayer.forward` (mixed batches too), calling the base layer as ``F.linear`` where that is exactly
        what calling it would do: a stock ``nn.Linear`` (not a subclass: quantized and parametrized layers have their
        own forward) with no hooks of its own or global ones, no ``forward`` patched onto the instance or the class
        (accelerate's offloading patches the instance) and its tensors registered as parameters (FSDP swaps in plain
        tensors).

        At batch-1 decode ``Module.__call__`` costs as much as a LoRA matmul, and so does every further Python call
        per layer (the interpreter's code and data are out of cache after each layer's weights stream through), so
        the checks are written out here rather than in a helper. For the same reason a plain adapter at inference
        (no autograd, no active dropout, no ``lora_bias``, float scaling, factors registered as parameters and in
        the input's dtype) is added right here rather than by :meth:`_add_adapter_output`, which serves the rest.
        One row (batch-1 decode) takes ``out.add_(F.linear(F.linear(x, A), B), alpha=s)``: three ops and no views,
        because at that size each op's call costs about as much as its arithmetic (measured on the benchmark's
        decode step: :func:`~lorakit.ops.add_lora`'s five ops, 1–2 % of the step more than these three; the Python
        calls around them, under 1 %). More rows take ``add_lora``'s in-place ``addmm_`` (same bits), which needs
        no temporary as large as the output.
        """
        base = self._modules["base_layer"]
        params = base._parameters
        if (
            args or kwargs or self._dora_live
            or type(base) is not nn.Linear or nn.Linear.forward is not _LINEAR_FORWARD or "forward" in base.__dict__
            or base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks
            or _global_forward_hooks or _global_forward_pre_hooks
            or _global_backward_hooks or _global_backward_pre_hooks
            or "weight" not in params or "bias" not in params
        ):
            return super().forward(x, *args, **kwargs)
        out = F.linear(x, params["weight"], params["bias"])
        if self._rows is not None:
            return self._routed(out, x, self._rows)
        live = self._live
        if not live:
            return out
        grad, one_row = torch.is_grad_enabled(), x.numel() == x.shape[-1]
        factors_A, factors_B = self._modules["lora_A"]._modules, self._modules["lora_B"]._modules
        for name in live:
            A = factors_A[name]._parameters.get("weight")
            B_params = factors_B[name]._parameters
            B, scaling = B_params.get("weight"), self.scaling[name]
            if (
                grad or A is None or B is None or type(scaling) is not float or A.dtype is not x.dtype
                or B.dtype is not out.dtype or B_params.get("bias") is not None or not out.is_contiguous()
                or (self.training and self.dropout_p[name])
            ):
                out = self._add_adapter_output(out, x, name)
            elif one_row:  # batch-1 decode: three ops, no views (each op's call costs as much as its maths)
                out = out.add_(F.linear(F.linear(x, A), B), alpha=scaling)
            else:  # in place (no autograd, contiguous out): no temporary as large as out
                out = add_lora(out, F.linear(x, A), B, scaling)
        return out

    def _add_adapter_output(self, out: Tensor, x: Tensor, adapter_name: str) -> Tensor:
        A, B = self._factor_params(adapter_name)
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        p = self.dropout_p[adapter_name]
        if p and self.training:
            out = add_dropped_lora(out, x, A, B, self.scaling[adapter_name], p)
        else:
            out = add_lora(out, F.linear(x, A), B, self.scaling[adapter_name])
        bias = self._modules["lora_B"]._modules[adapter_name]._parameters.get("bias")
        return out if bias is None else out + (bias * self.scaling[adapter_name]).to(out.dtype)

    def _factor_list(self, names: Sequence[str]) -> list[Tensor]:
        """As the base class's, read without a method call per adapter: a mixed batch reads every
        adapter's factors in every layer at every step. Factor modules hold ``weight`` in ``_parameters`` unless
        something (a parametrization) replaced it; then the general path."""
        A, B = self._modules["lora_A"]._modules, self._modules["lora_B"]._modules
        try:
            return [A[n]._parameters["weight"] for n in names] + [B[n]._parameters["weight"] for n in names]
        except KeyError:
            return super()._factor_list(names)

    def _row_tensors(self, present: Sequence[str]) -> list[Tensor]:
        """The factors, then the ``lora_bias`` terms of the adapters that have one (see :meth:`_stack_extra`)."""
        B = self._modules["lora_B"]._modules
        biases = [B[n]._parameters.get("bias") for n in present]
        return self._factor_list(present) + [b for b in biases if b is not None]

    def _stack_extra(self, names: Sequence[str]) -> Optional[Tensor]:
        """``scaling·b`` of each adapter's ``lora_bias`` as ``(K+1, out)`` (zeros for slot 0 and adapters without
        one); ``None`` when no adapter in ``names`` has one."""
        factors = self._modules["lora_B"]._modules
        biases = [factors[n]._parameters.get("bias") if n in factors else None for n in names]
        if biases.count(None) == len(biases):
            return None
        given = [b for b in biases if b is not None]
        dtype = functools.reduce(torch.promote_types, [b.dtype for b in given])
        zero = given[0].new_zeros(given[0].shape, dtype=dtype)
        return torch.stack([zero] + [zero if b is None else (b * self.scaling[n]).to(dtype)
                                     for n, b in zip(names, biases)])

    def _watched(self, present: Sequence[str]) -> bool:
        """Watched where every factor module's weight is a parameter registered in a watched table (a
        parametrized weight is computed from other tensors at every read: not watched)."""
        A, B = self._modules["lora_A"]._modules, self._modules["lora_B"]._modules
        factors = chain(map(A.__getitem__, present), map(B.__getitem__, present))
        return self._own_tables_watched() and type(A) is WatchedTable and type(B) is WatchedTable and all(
            type(m._parameters) is WatchedTable and "weight" in m._parameters for m in factors)

    def _add_row_outputs(self, out: Tensor, x: Tensor, rows: RowAdapters) -> Tensor:
        index = rows.for_batch(x.shape[0])
        stacks = self._stacked_factors(rows.names)
        if x.dtype != stacks.A.dtype:
            x = x.to(stacks.A.dtype)
        if self.training:
            p = x.new_tensor([0.0] + [self.dropout_p.get(n, 0.0) for n in rows.names])[index]
            if p.any():
                p = p.view(-1, *([1] * (x.dim() - 1)))
                x = x * torch.bernoulli((1 - p).expand_as(x)) / (1 - p)
        n = x.shape[0]
        if rows.in_order and n == len(rows.names):  # row i runs adapter i: the stacks as they are
            out = add_lora_rows(out, x, stacks.A_rows_t, stacks.B_rows_t)
        elif (groups := rows.groups(n)) is not None:  # rows grouped by adapter, base rows left out
            out = add_lora_groups(out, x, groups.take, groups.dest, groups.src, stacks.A[groups.slots],
                                  stacks.B[groups.slots])
        if stacks.extra is None:
            return out
        per_row = rows.rows_of(stacks.extra, n).to(out.dtype)  # lora_bias: each row adds its adapter's s·b
        return out + per_row.view(per_row.shape[0], *([1] * (out.dim() - 2)), out.shape[-1])
