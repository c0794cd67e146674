"""A PiSSA/OLoRA adapter as the plain LoRA it amounts to on the untouched base model.

PiSSA and OLoRA train on the residual ``W_res = W − s·B0@A0`` (:mod:`lorakit.layers.init`). After training the model
computes ``W_res + s·B@A = W + s·(B@A − B0@A0) = W + s·[B, −B0] @ [A; A0]``: a rank-``2r`` LoRA on the original
``W``. Its config doubles ``r`` and every ``rank_pattern`` entry, and scales every alpha so the scaling stays ``s``
(×2, or ×√2 under rsLoRA, ``alpha_pattern`` included). lorakit keeps each layer's initial factors, so no file of the
initial adapter is needed (PEFT reads one from ``path_initial_model_for_weight_conversion``). Modules of the adapter
whose base was not rewritten (embeddings, which PiSSA leaves alone) get zero padding up to rank ``2r``.
"""

from __future__ import annotations

import copy
import math
import re

import torch
from torch import Tensor

from .config import LoraConfig
from .config_fields import rewrites_base

__all__ = ["converted_config", "converted_state"]


def converted_config(config: LoraConfig) -> LoraConfig:
    """The plain-LoRA config of the converted adapter: ``init_lora_weights=True``, ranks doubled, same scalings."""
    factor = math.sqrt(2) if config.use_rslora else 2
    out = copy.deepcopy(config)
    out.init_lora_weights = True
    out.r = 2 * config.r
    out.lora_alpha = config.lora_alpha * factor
    out.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    out.alpha_pattern = {k: v * factor for k, v in config.alpha_pattern.items()}
    return out


def converted_state(lora_model, adapter_name: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` (the adapter's tensors as :meth:`lorakit.LoraModel.adapter_state` keys them) with every factor pair
    replaced by the rank-``2r`` pair ``[A; A0]``, ``[B, −B0]`` (zeros where the layer's base was not rewritten).

    Raises ``ValueError`` if the adapter was not initialised with PiSSA/OLoRA: it has nothing to convert."""
    config = lora_model.peft_config[adapter_name]
    if not rewrites_base(config.init_lora_weights):
        raise ValueError(
            f"path_initial_model_for_weight_conversion converts PiSSA/OLoRA adapters; adapter {adapter_name!r} has "
            f"init_lora_weights={config.init_lora_weights!r} and already is a plain LoRA of the base model"
        )
    out = dict(state)
    for name, layer in lora_model.lora_layers():
        if adapter_name not in layer.r:
            continue
        A_name, B_name = layer.adapter_layer_names
        A_key, B_key = _key(state, name, A_name, adapter_name), _key(state, name, B_name, adapter_name)
        A, B = state[A_key], state[B_key]
        rewrite = layer.base_rewrite
        if rewrite is not None and rewrite.adapter_name == adapter_name:
            A0, B0 = rewrite.A0.to(A.dtype), rewrite.B0.to(B.dtype)
        else:
            A0, B0 = torch.zeros_like(A), torch.zeros_like(B)
        out[A_key] = torch.cat([A, A0.to(A.device)], dim=0)
        out[B_key] = torch.cat([B, -B0.to(B.device)], dim=1)
    return out


def _key(state: dict[str, Tensor], module: str, holder: str, adapter_name: str) -> str:
    """The key of one factor of ``module`` in ``state`` (``…lora_A.<adapter>.weight`` or ``…lora_embedding_A.<adapter>``)."""
    pattern = re.compile(rf"{re.escape(module)}\.{holder}\.{re.escape(adapter_name)}(\.weight)?")
    found = [k for k in state if pattern.fullmatch(k)]
    if len(found) != 1:
        raise KeyError(f"expected one {holder} tensor of adapter {adapter_name!r} in {module!r}, found {found}")
    return found[0]
