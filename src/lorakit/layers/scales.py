"""PEFT's per-layer scale controls (``set_scale``, ``scale_layer``, ``unscale_layer``) and the writing of one
adapter's scaling, as a part :class:`~lorakit.layers.LoraLayer` is made of.

An adapter's ``scaling[name]`` is what its update is multiplied by in the forward: ``lora_alpha / r`` (rsLoRA:
``lora_alpha / sqrt(r)``, :func:`lorakit.ops.lora_scaling`) times any runtime multiplier set here. It is a Python
float, or a 0-dim tensor once :func:`lorakit.hotswap.prepare_model_for_compiled_hotswap` has made it one (so that
a compiled graph reads it as an input and a new value needs no recompile); a tensor is always written in place.

Changing the scaling of an adapter that is merged into the base weight is refused: the merged weight would not
follow, and unmerging would subtract a different update than the one that was added.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..ops import lora_scaling

__all__ = ["AdapterScales"]

Number = Union[int, float]


def check_factor(value, what: str) -> float:
    """``value`` as a float: a finite real number (``bool`` is refused, it is almost always a mistake)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise ValueError(f"{what} must be a finite real number, got {value!r}")
    return float(value)


class AdapterScales:
    """The scale controls of an adapted layer (mixed into :class:`~lorakit.layers.LoraLayer`)."""

    scaling: dict
    lora_alpha: dict
    r: dict
    use_rslora: dict
    merged_adapters: list
    active_adapters: list

    #: whether the layer's update is a scaled low-rank product; a layer holding rows of values (trainable tokens)
    #: says ``False`` and has no scale to set
    scalable: bool = True

    def base_scaling(self, adapter: str) -> float:
        """The adapter's scaling at multiplier 1: ``lora_alpha / r`` (rsLoRA: ``/ sqrt(r)``)."""
        return lora_scaling(self.lora_alpha[adapter], self.r[adapter], self.use_rslora.get(adapter, False))

    def scale_multiplier(self, adapter: str) -> float:
        """The runtime multiplier on the adapter's update: ``scaling / base_scaling`` (1.0 unless changed)."""
        base = self.base_scaling(adapter)
        value = float(self.scaling[adapter])
        return value / base if base else 1.0

    def set_scaling(self, adapter: str, value: float) -> None:
        """Write the adapter's scaling: in place if it is a tensor (compiled graphs keep reading the same one)."""
        current = self.scaling[adapter]
        if not self.scalable and float(current) != value:
            raise ValueError(f"{type(self).__name__} holds values, not a scaled low-rank update: it has no scale to set")
        if adapter in self.merged_adapters and float(current) != value:
            raise ValueError(
                f"adapter {adapter!r} is merged into {type(self).__name__}'s weight; unmerge_adapter() before "
                "changing its scale (the merged weight would not follow)"
            )
        if isinstance(current, Tensor):
            with torch.no_grad():
                current.fill_(value)
        else:
            self.scaling[adapter] = float(value)

    def set_scale(self, adapter: str, scale: Number) -> None:
        """PEFT's ``set_scale``: the adapter's scaling becomes ``scale`` times its base scaling (rsLoRA included).
        A layer without ``adapter`` is left alone, as in PEFT (callers set a scale on every layer of a model)."""
        scale = check_factor(scale, "scale")
        if adapter in self.scaling:
            self.set_scaling(adapter, scale * self.base_scaling(adapter))

    def scale_layer(self, scale: Number) -> None:
        """PEFT's ``scale_layer``: multiply the current scaling of every active adapter by ``scale``."""
        scale = check_factor(scale, "scale")
        if scale != 1:
            self.set_scalings({a: float(self.scaling[a]) * scale for a in self.active_adapters if a in self.scaling})

    def unscale_layer(self, scale: Optional[Number] = None) -> None:
        """PEFT's ``unscale_layer``: divide the current scaling of every active adapter by ``scale``; ``None``
        restores the base scaling."""
        if scale is not None:
            scale = check_factor(scale, "scale")
            if scale == 0:
                raise ValueError("unscale_layer(0) would divide by zero; pass None to restore the base scaling")
        names = [a for a in self.active_adapters if a in self.scaling]
        self.set_scalings({a: self.base_scaling(a) if scale is None else float(self.scaling[a]) / scale for a in names})

    def set_scalings(self, values: dict) -> None:
        """:meth:`set_scaling` for several adapters, all or none (a merged adapter whose value would change is
        refused before anything is written)."""
        merged = self.merged_changes(values)
        if merged:
            raise ValueError(
                f"adapter(s) {merged} are merged into {type(self).__name__}'s weight; unmerge_adapter() before "
                "changing their scale (the merged weight would not follow)"
            )
        for adapter, value in values.items():
            self.set_scaling(adapter, value)

    def merged_changes(self, values: dict) -> list[str]:
        """The adapters of ``{adapter: new scaling}`` that are merged here and whose scaling would change."""
        return [a for a, v in values.items() if a in self.merged_adapters and float(self.scaling[a]) != v]
