"""``nn.Conv1d/2d/3d`` (and subclasses with their own forward, through a "twin" A that shares their input handling)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .base import LoraLayer

__all__ = ["Conv"]


class Conv(LoraLayer):
    """``nn.Conv1d/2d/3d`` of any kernel, stride, padding, dilation, padding mode, and their subclasses.

    A is a conv with the base's geometry and ``r`` output channels, B a 1×1 conv (grouped like the base). For a
    subclass with its own ``forward`` (e.g. "same"-padding convs), A is a shallow twin of the base layer with its
    own weight, so the LoRA branch sees exactly the input transformation the base applies.
    """

    supports_lora_bias = True  # B is a 1×1 conv: its bias is applied (and scaled) with it

    def __init__(self, base_layer: nn.modules.conv._ConvNd) -> None:
        super().__init__(base_layer)
        vars(self).update(in_features=base_layer.in_channels, out_features=base_layer.out_channels,
                          _kernel_dims=base_layer.weight.dim() - 2)

    def _create_factors(self, adapter_name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        base = self.base_layer
        groups = base.groups
        if r % groups:
            raise ValueError(
                f"rank r={r} is not divisible by the conv's groups={groups} ({type(base).__name__}); "
                "choose a rank that is a multiple of groups"
            )
        weight = torch.empty(r, base.in_channels, *base.kernel_size, dtype=dtype, device=device)
        conv = _torch_class(base)
        if type(base).forward is not conv.forward:
            self.lora_A[adapter_name] = _conv_twin(base, weight)
        else:
            self.lora_A[adapter_name] = conv(
                base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                bias=False, padding_mode=base.padding_mode, dtype=dtype, device=device,
            )
        ones = (1,) * self._kernel_dims
        conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[self._kernel_dims]
        self.lora_B[adapter_name] = conv_cls(
            r, self.out_features, ones, ones, groups=groups, bias=False, dtype=dtype, device=device
        )

    def check_mergeable(self) -> None:
        if self.base_layer.groups > 1:
            raise ValueError(
                f"cannot merge LoRA into {type(self.base_layer).__name__} with groups={self.base_layer.groups}: the "
                "update is a dense conv and does not fit a grouped weight; keep the adapter unmerged"
            )

    def delta_weight(self, adapter_name: str) -> Tensor:
        self.check_mergeable()
        return super().delta_weight(adapter_name)

    def _add_adapter_output(self, out: Tensor, x: Tensor, adapter_name: str) -> Tensor:
        A = self.lora_A[adapter_name]
        h = A(self.lora_dropout[adapter_name](x.to(A.weight.dtype)))
        y = self.lora_B[adapter_name](h) * self.scaling[adapter_name]
        return out + y.to(out.dtype)


def _torch_class(module: nn.Module) -> type:
    """The torch.nn class ``module``'s class derives from (itself for a stock layer)."""
    return next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn"))


def _conv_twin(base: nn.Module, weight: Tensor) -> nn.Module:
    """A shallow copy of ``base`` (same class, same submodules such as padding) that convolves with ``weight``.

    ``groups`` is 1 and there is no bias: the twin computes ``A``'s dense conv through the subclass's own forward.
    """
    twin = copy.copy(base)
    twin._parameters = {}
    twin._buffers = dict(base._buffers)
    twin._modules = dict(base._modules)
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks"):
        if hasattr(twin, hooks):
            setattr(twin, hooks, type(getattr(base, hooks))())
    twin.weight = nn.Parameter(weight)
    twin.bias = None
    twin.out_channels, twin.groups = weight.shape[0], 1
    return twin
