"""Export a lorakit adapter on a diffusers model (a UNet, say) to the file diffusers loads.

diffusers reads LoRA weights with ``pipeline.load_lora_weights(folder)`` or ``unet.load_lora_adapter(folder,
prefix="unet", weight_name="pytorch_lora_weights.safetensors")`` (given only a folder, ``load_lora_adapter`` looks
for a pickled ``.bin``): one ``pytorch_lora_weights.safetensors`` whose keys are
``<component>.<module path>.lora_A.weight`` and ``….lora_B.weight`` (PEFT's orientation), plus, in the file's
metadata under ``lora_adapter_metadata``, the LoRA config as ``<component>.<field>`` entries. A reader without
that metadata (diffusers given a state dict in memory, say) infers each module's rank from the shapes and takes its
scale as 1 (``alpha = r``). So the export folds each layer's scale ``lora_alpha / r`` (or ``/ sqrt(r)``) into its
``B`` and writes a config whose alpha equals the rank everywhere: the file means the same update with or without
the metadata.

Only what diffusers can represent is exported: LoRA on ``nn.Linear`` and stock convolutions. An adapter with
``modules_to_save`` copies or trained biases, or on an embedding or a conv subclass with its own ``forward``
(diffusers' PEFT layers would not see its padding), is refused with a ``ValueError`` rather than exported lossily.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..io import atomic_write
from ..keys import check_adapter_names
from ..layers import Conv, Linear, LoraLayer
from ..model import LoraModel

__all__ = ["DIFFUSERS_WEIGHT_NAME", "to_diffusers", "save_diffusers_lora"]

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_METADATA_KEY = "lora_adapter_metadata"


def _lora_model(model: nn.Module):
    """The LoraModel inside a PeftModel (or the LoraModel itself)."""
    inner = getattr(model, "base_model", None) if not isinstance(model, LoraModel) else model
    if not isinstance(inner, LoraModel):
        raise TypeError(
            f"expected a lorakit PeftModel or LoraModel (from get_peft_model), got {type(model).__name__}"
        )
    return inner


def _check_exportable(name: str, layer: LoraLayer) -> None:
    base = layer.base_layer
    if isinstance(layer, Conv):
        stock = next(c for c in type(base).__mro__ if c.__module__.startswith("torch.nn"))
        if type(base).forward is not stock.forward:
            raise ValueError(
                f"{name} is a {type(base).__name__} with its own forward; diffusers' LoRA layers would not apply its "
                "input transformation (e.g. padding) to the LoRA branch, so it cannot be exported"
            )
        if base.groups > 1:
            raise ValueError(f"{name} is a grouped conv (groups={base.groups}); diffusers cannot load its LoRA")
    elif not isinstance(layer, Linear) or layer.transpose_delta:
        raise ValueError(
            f"{name} ({type(base).__name__}) cannot be exported: diffusers loads LoRA on nn.Linear and nn.Conv layers"
        )


def to_diffusers(
    model: nn.Module, adapter_name: str = "default", prefix: str = "unet"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The adapter ``adapter_name`` of ``model`` as diffusers' tensors and LoRA config (before prefixing the config).

    Returns ``(tensors, config)``: ``tensors`` keyed ``<prefix>.<module>.lora_A.weight`` / ``.lora_B.weight`` with
    each module's scale folded into ``lora_B``; ``config`` the keyword arguments of a PEFT ``LoraConfig`` that
    rebuilds exactly these layers at scale 1 (``r``, ``lora_alpha``, ``target_modules``, ``rank_pattern``,
    ``alpha_pattern``). ``prefix`` names the pipeline component (``"unet"``, ``"transformer"``); ``""`` for none.
    """
    lora_model = _lora_model(model)
    check_adapter_names([adapter_name], lora_model.peft_config)
    config = lora_model.peft_config[adapter_name]
    if config.modules_to_save:
        raise ValueError(
            f"adapter {adapter_name!r} has modules_to_save {list(config.modules_to_save)}; diffusers' LoRA files "
            "cannot carry fully trained modules"
        )
    if getattr(config, "use_dora", False):
        raise ValueError(f"adapter {adapter_name!r} is a DoRA adapter (use_dora=True); this export writes plain "
                         "LoRA factors and cannot carry its magnitude vectors")
    if config.bias != "none":
        raise ValueError(f"adapter {adapter_name!r} trains biases (bias={config.bias!r}); diffusers cannot load them")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str (the pipeline component, e.g. 'unet'), got {type(prefix).__name__}")

    head = f"{prefix}." if prefix else ""
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for name, layer in lora_model.lora_layers():
        if adapter_name not in layer.r:
            continue
        _check_exportable(name, layer)
        A, B = layer.factors(adapter_name)
        with torch.no_grad():
            scaled_B = (B.to(torch.promote_types(B.dtype, torch.float32)) * layer.scaling[adapter_name]).to(B.dtype)
        tensors[f"{head}{name}.lora_A.weight"] = A.detach().clone().contiguous()
        tensors[f"{head}{name}.lora_B.weight"] = scaled_B.contiguous()
        ranks[name] = layer.r[adapter_name]
    if not ranks:
        raise ValueError(f"adapter {adapter_name!r} has no LoRA layers in this model; nothing to export")

    r = Counter(ranks.values()).most_common(1)[0][0]
    # Patterns are regexes matched against a module's full name (or a "."-suffix): escape the names so they
    # match only themselves.
    others = {re.escape(name): rank for name, rank in ranks.items() if rank != r}
    lora_config = {
        "r": r,
        "lora_alpha": r,
        "target_modules": sorted(ranks),
        "rank_pattern": others,
        "alpha_pattern": dict(others),
    }
    return tensors, lora_config


def save_diffusers_lora(
    model: nn.Module,
    save_directory: str | os.PathLike,
    adapter_name: str = "default",
    prefix: str = "unet",
    weight_name: str = DIFFUSERS_WEIGHT_NAME,
) -> Path:
    """Write ``adapter_name`` as ``<save_directory>/<weight_name>`` for ``pipeline.load_lora_weights(folder)`` or
    ``component.load_lora_adapter(folder, prefix=prefix, weight_name=weight_name)``. The file is written
    atomically; returns its path."""
    from safetensors.torch import save_file

    tensors, lora_config = to_diffusers(model, adapter_name, prefix)
    head = f"{prefix}." if prefix else ""
    metadata = {
        "format": "pt",
        _METADATA_KEY: json.dumps({f"{head}{k}": v for k, v in lora_config.items()}, indent=2, sort_keys=True),
    }
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; expected a folder to write {weight_name} into")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / weight_name
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path
