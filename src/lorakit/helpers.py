"""PEFT's ``peft.helpers`` for LoRA at inference: :func:`rescale_adapter_scale`, a context that multiplies every
adapter's scaling (wise-ft when the multiplier is in [0, 1]) and puts the exact previous values back on exit."""

from __future__ import annotations

import contextlib
from typing import Iterator, Union

from torch import nn

from .layers import LoraLayer
from .layers.scales import check_factor

__all__ = ["rescale_adapter_scale"]


@contextlib.contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: Union[float, int]) -> Iterator[None]:
    """Inside the block every adapter of every LoRA layer in ``model`` has its scaling multiplied by
    ``multiplier`` (rsLoRA adapters too: the scaling, whatever its formula, is what is multiplied; trainable tokens,
    which are values rather than a scaled update, stay as they are, as in PEFT); on exit the
    previous scalings come back bit for bit, even when the block raises.

    ``TypeError`` for a multiplier that is not a number (PEFT's check), ``ValueError`` for a model without LoRA
    layers or one with a merged adapter (the merged weight would not follow the scale) — before anything changes.
    """
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)):
        raise TypeError(f"multiplier should be a float or an int, got {type(multiplier).__name__}")
    multiplier = check_factor(multiplier, "multiplier")
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers: rescale_adapter_scale needs a model with adapters")
    # layers holding values rather than a scaled update (trainable tokens) are left as they are, as in PEFT
    saved = [(layer, {a: float(s) for a, s in layer.scaling.items()}) for layer in layers if layer.scalable]
    plans = [(layer, {a: s * multiplier for a, s in values.items()}) for layer, values in saved]
    for layer, values in plans:
        merged = layer.merged_changes(values)
        if merged:
            raise ValueError(
                f"adapter(s) {merged} are merged into the weights; unmerge_adapter() before rescaling them"
            )
    try:
        for layer, values in plans:
            layer.set_scalings(values)
        yield
    finally:
        for layer, values in saved:
            for adapter, value in values.items():
                if adapter in layer.scaling:  # the block may have deleted it
                    layer.set_scaling(adapter, value)
