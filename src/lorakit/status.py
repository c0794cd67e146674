"""PEFT's ``get_layer_status`` / ``get_model_status``: which adapters each adapted layer holds, which are active,
merged, training, and where they live; and the same summed over the model, with ``"irregular"`` wherever the layers
disagree (a sign of a model in an inconsistent state)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal, Union

from torch import nn

from .adapter_scales import adapter_weights
from .layers import LoraLayer
from .model import LoraModel
from .modules_to_save import ModulesToSaveWrapper
from .peft_model import PeftModel

__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None
    #: lorakit's addition: each adapter's runtime multiplier (set_adapter weights, set_scale, rescale_adapter_scale)
    adapter_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular = None
    #: lorakit's addition: each adapter's runtime multiplier where the layers agree, else ``"irregular"``
    adapter_weights: dict[str, Union[float, Irregular]] = field(default_factory=dict)


def _all_or_irregular(values: list) -> Union[bool, Irregular]:
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _per_adapter_parameters(module: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The parameters each adapter holds in ``module`` (a LoRA layer's factors, a wrapper's copy)."""
    if isinstance(module, ModulesToSaveWrapper):
        return {name: list(copy.parameters()) for name, copy in module.modules_to_save.items()}
    out: dict[str, list[nn.Parameter]] = defaultdict(list)
    for holder_name in module.adapter_layer_names:
        holder = getattr(module, holder_name)
        for name, item in holder.items():
            out[name] += list(item.parameters()) if isinstance(item, nn.Module) else [item]
    return dict(out)


def _module_type(module: nn.Module) -> str:
    """PEFT's names: ``lora.Linear``, ``lora.Embedding``, ``lora.Conv2d``, ``ModulesToSaveWrapper``."""
    if isinstance(module, ModulesToSaveWrapper):
        return "ModulesToSaveWrapper"
    kind = type(module).__name__
    return f"lora.{type(module.base_layer).__name__}" if kind == "Conv" else f"lora.{kind}"


def _layer_status(name: str, module: nn.Module) -> TunerLayerStatus:
    params = _per_adapter_parameters(module)
    if isinstance(module, ModulesToSaveWrapper):
        active = [module.active_adapter] if module.active_adapter is not None else []
        merged: list[str] = []
    else:
        active, merged = list(module.active_adapters), list(module.merged_adapters)
    return TunerLayerStatus(
        name=name,
        module_type=_module_type(module),
        enabled=not module.disable_adapters,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad={a: _all_or_irregular([p.requires_grad for p in ps]) for a, ps in params.items()},
        available_adapters=sorted(params),
        devices={a: sorted({p.device.type for p in ps}) for a, ps in params.items()},
        adapter_weights=adapter_weights([module]) if isinstance(module, LoraLayer) else {},
    )


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One :class:`TunerLayerStatus` per adapted layer and modules_to_save wrapper of ``model`` (a PeftModel, a
    LoraModel, or any model holding lorakit layers), named as in ``model.base_model`` for a PeftModel (PEFT's
    naming). ``ValueError`` if there is none."""
    root = model.base_model if isinstance(model, PeftModel) else model
    status = [_layer_status(name, module) for name, module in root.named_modules()
              if isinstance(module, (LoraLayer, ModulesToSaveWrapper))]
    if not status:
        raise ValueError(f"{type(model).__name__} holds no adapter layers: give it adapters with get_peft_model or "
                         "inject_adapter_in_model first")
    return status


def _merged(layers: list[TunerLayerStatus]) -> Union[list[str], Irregular]:
    """Adapters merged everywhere they exist; ``"irregular"`` if one is merged in some layers and not in others."""
    merged = set().union(*(s.merged_adapters for s in layers))
    for s in layers:
        if merged & (set(s.available_adapters) - set(s.merged_adapters)):
            return "irregular"
    return sorted(merged)


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """:func:`get_layer_status` summed over the model, with PEFT's fields and ``"irregular"`` rules."""
    layers = get_layer_status(model)
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    if isinstance(model, PeftModel):
        base_type, adapter_type = type(model.get_base_model()).__name__, type(model.base_model).__name__
        peft_types = {name: "LORA" for name in model.peft_config}
    else:
        transformers_like = not isinstance(model, LoraModel) and hasattr(getattr(model, "config", None), "model_type")
        base_type = type(model).__name__ if transformers_like else "other"
        adapter_type, peft_types = "None", {}
    enabled = {s.enabled for s in layers}
    active = {tuple(s.active_adapters) for s in layers}
    grads: dict[str, list] = defaultdict(list)
    devices: dict[str, set] = defaultdict(set)
    for s in layers:
        for adapter, value in s.requires_grad.items():
            grads[adapter].append(value)
        for adapter, kinds in s.devices.items():
            devices[adapter].update(kinds)
    return TunerModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(active.pop()) if len(active) == 1 else "irregular",
        merged_adapters=_merged(layers),
        requires_grad={a: _all_or_irregular(v) for a, v in grads.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={a: sorted(v) for a, v in devices.items()},
        adapter_weights=adapter_weights([m for m in model.modules() if isinstance(m, LoraLayer)]),
    )
