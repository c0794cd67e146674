"""Adapter scales at the model level: weighted active adapters (``set_adapter(names, weights=[…])``) and the
model-wide view of every adapter's runtime multiplier (what :func:`lorakit.get_model_status` shows).

A weight is diffusers' ``set_adapters`` semantics: adapter ``a``'s update is multiplied by ``w`` in every layer,
i.e. its scaling becomes ``w · lora_alpha / r`` (rsLoRA: ``/ sqrt(r)``), PEFT's ``set_scale(a, w)`` on every layer.
Weights are a runtime setting: they are kept in the layers' ``scaling`` and saved nowhere (a saved adapter keeps
its ``lora_alpha``). They also apply in mixed-adapter batches, where each row's adapter comes with its weight.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

from .layers import LoraLayer
from .layers.scales import check_factor
from .modules_to_save import ModulesToSaveWrapper

__all__ = ["set_adapter_weights", "adapter_weights"]


def set_adapter_weights(lora_model, names: Sequence[str], weights: Sequence[float]) -> None:
    """Give adapter ``names[i]`` the weight ``weights[i]`` in every layer of ``lora_model`` (a
    :class:`~lorakit.LoraModel`); everything is checked before any layer changes."""
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise ValueError(f"weights must be a list of numbers, one per adapter in {list(names)}; got {weights!r}")
    if len(weights) != len(names):
        raise ValueError(f"weights has {len(weights)} entries for {len(names)} adapter(s) {list(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names {list(names)} repeat; give each adapter one weight")
    target = {n: check_factor(w, f"weight of adapter {n!r}") for n, w in zip(names, weights)}
    modules = list(lora_model.adapter_modules())
    for module in modules:
        if isinstance(module, ModulesToSaveWrapper):
            whole = [n for n, w in target.items() if w != 1 and n in module.modules_to_save]
            if whole:
                raise ValueError(
                    f"adapter(s) {whole} train whole modules (modules_to_save), which cannot be weighted: a weight "
                    "scales a low-rank update; use weight 1.0 for them"
                )
    layers = [m for m in modules if isinstance(m, LoraLayer)]
    fixed = sorted({n for m in layers if not m.scalable for n, w in target.items() if w != 1 and n in m.r})
    if fixed:
        raise ValueError(f"adapter(s) {fixed} hold trainable tokens (rows of values), which cannot be weighted; use "
                         "weight 1.0 for them")
    layers = [m for m in layers if m.scalable]
    plans = [(layer, {n: w * layer.base_scaling(n) for n, w in target.items() if n in layer.scaling})
             for layer in layers]
    for layer, values in plans:
        merged = layer.merged_changes(values)
        if merged:
            raise ValueError(f"adapter(s) {merged} are merged into the weights; unmerge_adapter() before weighting them")
    for layer, values in plans:
        layer.set_scalings(values)


def adapter_weights(layers: Sequence[LoraLayer]) -> dict[str, Union[float, str]]:
    """Per adapter, its runtime multiplier (weight, ``set_scale``, ``rescale_adapter_scale``) over ``layers``:
    one number where the layers agree, ``"irregular"`` where they differ (a ``set_scale`` on some layers only)."""
    seen: dict[str, list[float]] = {}
    for layer in layers:
        if not layer.scalable:
            continue
        for name in layer.scaling:
            seen.setdefault(name, []).append(layer.scale_multiplier(name))
    out: dict[str, Union[float, str]] = {}
    for name, values in sorted(seen.items()):
        first = values[0]
        same = all(math.isclose(v, first, rel_tol=1e-9, abs_tol=1e-12) for v in values)
        out[name] = round(first, 12) if same else "irregular"
    return out
