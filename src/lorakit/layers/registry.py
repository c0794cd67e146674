"""Which layer class adapts which module: the registry behind ``register_lora_layer``."""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from .base import LoraLayer
from .conv import Conv
from .embedding import Embedding
from .linear import Linear, is_conv1d
from .multihead import MultiheadAttention
from .quantized import QuantizedLinear, is_quantized_linear

__all__ = ["register_lora_layer", "lora_layer_for", "is_linear"]


_REGISTRY: dict[type, Callable[[nn.Module], LoraLayer]] = {
    nn.Linear: Linear,
    nn.Embedding: Embedding,
    nn.Conv1d: Conv,
    nn.Conv2d: Conv,
    nn.Conv3d: Conv,
    nn.MultiheadAttention: MultiheadAttention,
}


def register_lora_layer(module_type: type, layer_cls: type[LoraLayer]) -> None:
    """Teach lorakit to adapt ``module_type`` (and its subclasses) with ``layer_cls``.

    ``layer_cls`` subclasses :class:`LoraLayer` and implements ``_create_factors``, ``_add_adapter_output`` and,
    if its tensors are not ``lora_A[name].weight``/``lora_B[name].weight``, ``_factor_params``. Its base module
    must have a ``weight`` that ``lora_delta`` can reshape the update into, if it is to be merged.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not (isinstance(layer_cls, type) and issubclass(layer_cls, LoraLayer)):
        raise TypeError(f"layer_cls must be a LoraLayer subclass, got {layer_cls!r}")
    _REGISTRY[module_type] = layer_cls


def lora_layer_for(module: nn.Module) -> Optional[Callable[[nn.Module], LoraLayer]]:
    """The layer class that adapts ``module`` (most specific registered base class wins), or None.

    Quantized linear layers (bitsandbytes ``Linear4bit``/``Linear8bitLt`` subclass ``nn.Linear``; a torchao layer
    is an ``nn.Linear`` with a quantized weight) get :class:`QuantizedLinear` unless a class more specific than
    ``nn.Linear`` was registered for them."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            kind = _REGISTRY[cls]
            if kind is Linear and is_quantized_linear(module):
                return QuantizedLinear
            return kind
    if is_conv1d(module):
        return Linear
    return None


def is_linear(module: nn.Module) -> bool:
    """A linear layer for ``"all-linear"``: ``nn.Linear`` (and subclasses) or transformers' GPT-2 ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)
