"""LoRA on a named ``nn.Parameter`` of a module (PEFT's ``target_parameters``): MoE expert stacks, routers.

Transformers 5 stores the experts of Mixtral, Qwen3-MoE, DeepSeek and gpt-oss as 3-D parameters
(``experts.gate_up_proj`` of shape ``(E, 2·inter, hidden)``, ``experts.down_proj`` ``(E, hidden, inter)``) that
the experts module uses in its own maths. :class:`ParamWrapper` wraps the module that holds the parameter, as
PEFT's ``lora.ParamWrapper`` does, with PEFT's tensors and keys:

- one wrapper per parameter; several parameters of one module nest (the first registered innermost), so the
  keys are ``experts.lora_A.weight`` (outer, e.g. ``down_proj``) and ``experts.base_layer.lora_A.weight``;
- for ``E`` experts, ``lora_A`` is ``(r·E, in)`` with expert ``e``'s rows at ``e·r … e·r+r−1`` and ``lora_B`` is
  ``(out, r·E)`` with expert ``e``'s columns at ``e, e+E, e+2E, …`` (rank-major: PEFT reshapes B as
  ``(out, r, E)``); a 2-D parameter is ``E = 1``, an ordinary ``out × in`` LoRA;
- a 3-D parameter is read as ``(E, out, in)`` (``F.linear`` layout) unless its module says ``is_transposed``
  (gpt-oss: ``(E, in, out)``).

In the forward the module is handed a :class:`~lorakit.factored.FactoredWeight` in place of the parameter, so
the update is applied per expert in factored form and ``W + ΔW`` is never built (PEFT builds it for every expert
in every forward). Merging adds each expert's update exactly reversibly.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..exact_merge import Scratch, merge_exact, unmerge_exact
from ..factored import FactoredWeight, Term
from ..ops import lora_delta, lora_factors
from .base import LoraLayer
from .construction import Factor

__all__ = ["ParamWrapper", "param_owner"]


def param_owner(module: nn.Module) -> nn.Module:
    """The user's module under any number of nested :class:`ParamWrapper`."""
    while isinstance(module, ParamWrapper):
        module = module.base_layer
    return module


class ParamWrapper(LoraLayer):
    """LoRA on ``base_layer``'s parameter ``parameter_name`` (2-D or 3-D); PEFT's ``lora.ParamWrapper``."""

    combinable = False  # factors stacked per expert: concatenating ranks would break the layout

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        owner = param_owner(base_layer)
        param = owner._parameters.get(parameter_name)
        if param is None:
            raise ValueError(f"{type(owner).__name__} has no parameter {parameter_name!r} to adapt")
        if param.dim() not in (2, 3):
            raise ValueError(
                f"target_parameters: {type(owner).__name__}.{parameter_name} has {param.dim()} dimensions "
                f"{tuple(param.shape)}; only 2-D and 3-D parameters can be adapted"
            )
        super().__init__(base_layer)
        if param.dim() == 2:
            experts, (out_features, in_features), swapped = 1, param.shape, True
        else:
            experts, first, second = param.shape
            swapped = not getattr(owner, "is_transposed", False)  # (E, out, in) unless the module says otherwise
            in_features, out_features = (second, first) if swapped else (first, second)
        vars(self).update(parameter_name=parameter_name, num_experts=experts, in_features=in_features,
                          out_features=out_features, _swapped=swapped)

    # -- the parameter ------------------------------------------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The adapted parameter (without the update)."""
        return param_owner(self.base_layer)._parameters[self.parameter_name]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "_modules"):
                raise
            return getattr(self._modules["base_layer"], name)  # the experts module's own attributes

    # -- construction -------------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights=True, use_rslora: bool = False, lora_bias: bool = False) -> None:
        if lora_bias:
            raise ValueError(f"lora_bias=True cannot be used with target_parameters ({self.parameter_name}); PEFT "
                             "refuses it too")
        if lora_dropout:
            raise ValueError(
                f"lora_dropout={lora_dropout} cannot be used with target_parameters "
                f"({self.parameter_name}): the update is folded into the parameter, so the input the dropout would "
                "act on is the module's own business (PEFT refuses it too); use lora_dropout=0"
            )
        super().update_layer(adapter_name, r, lora_alpha, 0.0, init_lora_weights, use_rslora)

    def _create_factors(self, adapter_name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        self.lora_A[adapter_name] = Factor(self.in_features, r * self.num_experts, dtype, device)
        self.lora_B[adapter_name] = Factor(r * self.num_experts, self.out_features, dtype, device)

    # -- the maths ----------------------------------------------------------------------------------------------------
    def expert_factors(self, adapter_name: str) -> tuple[Tensor, Tensor]:
        """``(A, B)`` per expert: ``A`` is ``(E, r, in)``, ``B`` ``(E, out, r)`` (views of the stored factors)."""
        A, B = self._factor_params(adapter_name)
        E = self.num_experts
        return A.view(E, -1, A.shape[-1]), B.view(B.shape[0], -1, E).permute(2, 0, 1)

    def _term(self, adapter_name: str) -> Term:
        """The update as ``s · L @ R`` in the parameter's own layout."""
        A, B = self.expert_factors(adapter_name)
        if self.weight.dim() == 2:
            A, B = A[0], B[0]
        L, R = (B, A) if self._swapped else (A.mT, B.mT)
        return L, R, self.scaling[adapter_name]

    def delta_weight(self, adapter_name: str) -> Tensor:
        """``s·B_e@A_e`` for every expert, shaped like the parameter, in at least float32."""
        if self.weight.dim() == 2:
            A, B = self.factors(adapter_name)
            return lora_delta(A, B, self.scaling[adapter_name], self.weight.shape)
        L, R, s = self._term(adapter_name)
        dtype = torch.promote_types(L.dtype, torch.float32)
        return torch.bmm(L.to(dtype), R.to(dtype)).mul_(s)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self._rows is not None and not self.r.keys().isdisjoint(self._rows.names):
            raise NotImplementedError(
                f"mixed-adapter batches (adapter_names=...) are not supported on target_parameters layers "
                f"({self.parameter_name}); run one adapter at a time"
            )
        if not self._live:
            return self._modules["base_layer"](x, *args, **kwargs)
        owner = param_owner(self.base_layer)
        param = owner._parameters[self.parameter_name]
        owner._parameters[self.parameter_name] = FactoredWeight.of(param, [self._term(n) for n in self._live])
        try:
            return self._modules["base_layer"](x, *args, **kwargs)
        finally:
            owner._parameters[self.parameter_name] = param

    # -- merging: expert by expert, exactly reversibly ----------------------------------------------------------------
    def _expert_factors_for_merge(self, adapter_name: str) -> list[tuple[Tensor, Tensor, float]]:
        A, B = self.expert_factors(adapter_name)
        with torch.no_grad():
            return [lora_factors(A[e].detach(), B[e].detach(), self.scaling[adapter_name], not self._swapped)
                    for e in range(self.num_experts)]

    def _merge_one(self, adapter_name: str, scratch: Scratch, reversible: bool):
        weight = self.weight.data
        if weight.dim() == 2:
            return super()._merge_one(adapter_name, scratch, reversible)
        records = [merge_exact(weight[e], *f, scratch, record=reversible)
                   for e, f in enumerate(self._expert_factors_for_merge(adapter_name))]
        return tuple(records) if reversible else None

    def _unmerge_one(self, adapter_name: str, record, scratch: Scratch) -> None:
        weight = self.weight.data
        if weight.dim() == 2:
            return super()._unmerge_one(adapter_name, record, scratch)
        for e, factors in enumerate(self._expert_factors_for_merge(adapter_name)):
            unmerge_exact(weight[e], *factors, record[e], scratch)

    def merge(self, adapter_names: Optional[list] = None, safe_merge: bool = False, own_weight: bool = False,
              scratch: Optional[Scratch] = None, reversible: bool = True):
        if own_weight:
            raise ValueError(f"cannot merge into {self.parameter_name}: the parameter is shared with another module")
        super().merge(adapter_names, safe_merge, False, scratch, reversible)

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, num_experts={self.num_experts}, " + super().extra_repr()


def direct_parameters(named) -> list[tuple[str, int]]:
    """``("<module>.<parameter>", ndim)`` of every parameter registered directly on a user module; ``named`` is
    :func:`lorakit.walk.walk` of the model. A module wrapped by :class:`ParamWrapper` s is listed under its own
    name (the wrappers' ``base_layer`` segments are not part of it, as in PEFT), other adapted layers not at all."""
    out, inner = [], set()
    for name, module in named:
        if id(module) in inner or (isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper)):
            continue
        if isinstance(module, ParamWrapper):
            m = module.base_layer
            while isinstance(m, ParamWrapper):
                inner.add(id(m))
                m = m.base_layer
            module = m
        if isinstance(module, LoraLayer):
            continue
        out += [(f"{name}.{k}" if name else k, p.dim()) for k, p in module._parameters.items() if p is not None]
    return out


def find_or_wrap(holder: nn.Module, parameter_name: str) -> tuple[ParamWrapper, bool]:
    """The :class:`ParamWrapper` of ``parameter_name`` in the chain ``holder`` (a user module or the outermost
    wrapper of one), or a new one around ``holder`` (outermost, as PEFT nests); ``True`` when it is new."""
    if isinstance(holder, LoraLayer) and not isinstance(holder, ParamWrapper):
        raise ValueError(
            f"cannot adapt parameter {parameter_name!r} of a {type(holder.base_layer).__name__} that target_modules "
            "adapts already; target it one way only (target_modules=[] leaves it to target_parameters)"
        )
    m = holder
    while isinstance(m, ParamWrapper):
        if m.parameter_name == parameter_name:
            return m, False
        m = m.base_layer
    return ParamWrapper(holder, parameter_name), True
