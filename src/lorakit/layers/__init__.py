"""The adapted layers: one base class holding per-adapter A/B (:mod:`.base`), one small module per kind of base
layer (:mod:`.linear`, :mod:`.embedding`, :mod:`.conv`; :mod:`.parameter` for bare parameters such as MoE experts;
quantized linears in :mod:`.quantized`, their storage formats in :mod:`.quant_formats`), the registry that picks
the class for a module (:mod:`.registry`), row routing for mixed batches (:mod:`.rows`) and the construction
shortcut (:mod:`.construction`). A new kind of layer is a new module here plus one ``register_lora_layer`` line.
"""

from .base import LoraLayer
from .conv import Conv
from .embedding import Embedding
from .linear import Linear, is_conv1d
from .multihead import MultiheadAttention
from .parameter import ParamWrapper
from .quantized import QuantizedLinear, RequantizationWarning, is_quantized_linear
from .registry import is_linear, lora_layer_for, register_lora_layer
from .rows import RowAdapters

__all__ = [
    "LoraLayer",
    "Linear",
    "QuantizedLinear",
    "RequantizationWarning",
    "is_quantized_linear",
    "Embedding",
    "Conv",
    "ParamWrapper",
    "MultiheadAttention",
    "RowAdapters",
    "is_conv1d",
    "is_linear",
    "lora_layer_for",
    "register_lora_layer",
]
