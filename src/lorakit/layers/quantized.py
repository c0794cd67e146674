"""LoRA on a quantized linear layer (QLoRA): bitsandbytes 4-bit and 8-bit, torchao int8 weights.

The base layer stays quantized, frozen and untouched; its sizes are its declared ``in_features``/``out_features``
(a 4-bit weight is stored packed, as ``(out·in/2, 1)`` bytes). The forward is the base layer's own, plus each
adapter computed in the adapter's dtype and added in the output's, as for :class:`~lorakit.layers.Linear`.

Merging cannot be exact on a quantized weight: the sum ``W + s·B@A`` is quantized again, as PEFT does, all
merged adapters at once from the weight as it was before the first merge (so merging adapters one by one rounds
once, not once per adapter). The error of that rounding is measured and kept
(:attr:`QuantizedLinear.requantization_error`) and the model reports it (:func:`warn_requantization`).
Unmerging puts the original quantized weight back bit for bit (it is kept while merged: the cost of being merged
is one quantized copy of the weight). :meth:`QuantizedLinear.dequantize_base` swaps the base for a float
``nn.Linear`` holding the dequantized weight, after which merging is exact (``merge_and_unload(dequantize=True)``).
"""

from __future__ import annotations

import warnings
from typing import Iterable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from ..exact_merge import Scratch
from ..ops import lora_delta
from .base import LoraLayer
from .linear import Linear
from .quant_formats import format_of

__all__ = [
    "QuantizedLinear",
    "RequantizationError",
    "RequantizationWarning",
    "dequantized_linear",
    "dequantize_quantized_layers",
    "float_dtype_of",
    "is_quantized_linear",
    "warn_requantization",
]


#: bitsandbytes ``Linear4bit``'s switch to its bf16 CPU inference kernel (see :class:`QuantizedLinear`)
_BNB_CPU_KERNEL = "support_avx512bf16_for_cpu"


class RequantizationError(NamedTuple):
    """How far a requantized merge is from the exact sum ``W + Σ s·B@A`` (the unmerged layer)."""

    #: the largest change of any output for inputs in [-1, 1]: ``max_i Σ_j |E_ij|`` of the weight error ``E``
    max_output_change: float
    #: the largest change of one weight element
    max_weight_change: float


class RequantizationWarning(UserWarning):
    """Merging into quantized weights rounded the merged weights; ``report`` maps each layer's name to its
    :class:`RequantizationError`."""

    def __init__(self, message: str, report: dict[str, RequantizationError]) -> None:
        super().__init__(message)
        self.report = report


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes 4-/8-bit linear layer, or an ``nn.Linear`` with a torchao quantized weight."""
    return format_of(module) is not None


def dequantized_linear(layer: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Linear:
    """A float ``nn.Linear`` computing what the quantized ``layer`` computes, in the dtype the layer was
    quantized from where its format records it (bitsandbytes 4-bit, torchao), else ``dtype`` (default float32);
    the bias is shared."""
    quant = format_of(layer)
    if quant is None:
        raise ValueError(f"{type(layer).__name__} is not a quantized linear layer lorakit knows")
    with torch.no_grad():
        weight = quant.dequantize(quant.snapshot(layer))
    return _float_linear(layer, weight, quant.float_dtype(layer) or dtype or torch.float32)


def float_dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype of the model's float weights (its first floating-point parameter that is not an adapter's)."""
    for name, p in model.named_parameters():
        if p.dtype.is_floating_point and ".lora_" not in name:
            return p.dtype
    return torch.float32


def _float_linear(layer: nn.Module, weight: Tensor, dtype: torch.dtype) -> nn.Linear:
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().to(dtype).reshape(layer.out_features, layer.in_features),
                                 requires_grad=False)
    if layer.bias is not None:
        linear.bias = layer.bias
    return linear.train(layer.training)


class QuantizedLinear(Linear):
    """LoRA on a quantized linear layer; see the module docstring.

    bitsandbytes 4-bit on a CPU with AVX512-BF16 switches a layer, at its first inference forward, to a kernel
    that computes in bf16 from a repacked weight; that kernel has no backward (training after it silently drops
    the gradient through the base: bitsandbytes 0.50 warns "an autograd kernel was not registered"), saving
    the model repacks the weight back and changes its outputs, and PEFT's merge reads the repacked bytes as if
    they were not. A wrapped layer therefore always runs bitsandbytes' float path (switched off for the length
    of each call: the bare layer behaves as before); a weight repacked before wrapping is put back into
    bitsandbytes' stored layout, as its own ``state_dict()`` does.
    """

    supports_dora = False  # DoRA's norms would need the dequantized weight at every step: not implemented

    def __init__(self, base_layer: nn.Module) -> None:
        LoraLayer.__init__(self, base_layer)
        quant = format_of(base_layer)
        if quant is None:
            raise ValueError(f"{type(base_layer).__name__} is not a quantized linear layer lorakit knows")
        if getattr(getattr(base_layer.weight, "quant_state", None), "packing_format_for_cpu", False):
            base_layer.state_dict()  # bitsandbytes unpacks the CPU kernel's layout when it writes a state dict
        vars(self).update(
            transpose_delta=False, in_features=base_layer.in_features, out_features=base_layer.out_features,
            quantization=quant,  # None once dequantize_base() made the base a float nn.Linear
            requantization_error=None,  # RequantizationError of the last merge
            _before_merge=None,  # the quantized weight as it was before the first merge (unmerge restores it)
            _irreversible=False,  # merged with reversible=False: the weight before merging is gone
        )

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        flags = vars(self._modules["base_layer"])
        if not flags.get(_BNB_CPU_KERNEL):
            return super().forward(x, *args, **kwargs)
        flags[_BNB_CPU_KERNEL] = False  # see the class docstring
        try:
            return super().forward(x, *args, **kwargs)
        finally:
            flags[_BNB_CPU_KERNEL] = True

    def delta_weight(self, adapter_name: str) -> Tensor:
        A, B = self.factors(adapter_name)
        return lora_delta(A, B, self.scaling[adapter_name], (self.out_features, self.in_features))

    def dequantized_weight(self) -> Tensor:
        """The float ``out × in`` weight the base computes with now (merged adapters included, as rounded)."""
        if self.quantization is None:
            return self.base_layer.weight.detach()
        return self.quantization.dequantize(self.quantization.snapshot(self.base_layer))

    def exact_sum(self, adapter_names: Sequence[str] = ()) -> Tensor:
        """In float32, the weight before any merge plus the updates of the merged adapters and of
        ``adapter_names``: what the unmerged layer computes with all of them active. (After a merge with
        ``reversible=False`` the weight before it is gone: the merged weight stands in for it.)"""
        names = list(adapter_names)
        if self._before_merge is not None:
            snapshot, names = self._before_merge, list(self.merged_adapters) + names
        else:
            snapshot = self.quantization.snapshot(self.base_layer)
        total = self.quantization.dequantize(snapshot).float()
        for name in names:
            total = total + self.delta_weight(name)
        return total

    # -- merging --------------------------------------------------------------------------------------------------
    def check_mergeable(self) -> None:
        if self.quantization is not None:
            self.quantization.check_requantizable(self.base_layer)

    def check_finite_merge(self, adapter_names: Sequence[str]) -> None:
        if self.quantization is None:
            return super().check_finite_merge(adapter_names)
        if not torch.isfinite(self.exact_sum(adapter_names)).all():
            raise ValueError(f"merging adapter(s) {list(adapter_names)} would put non-finite values into "
                             f"{self.quantization}'s weight; nothing was merged")

    def merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False, own_weight: bool = False,
              scratch: Optional[Scratch] = None, reversible: bool = True):
        """Dequantize, add every merged adapter, quantize again (see the module docstring). ``reversible=False``
        lets go of the original weight (``merge_and_unload``); otherwise unmerging restores it exactly."""
        if self.quantization is None:
            return super().merge(adapter_names, safe_merge, own_weight, scratch, reversible)
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        names = [n for n in names if n in self.r and n not in self.merged_adapters]
        if not names:
            return
        self.check_mergeable()
        if safe_merge:
            self.check_finite_merge(names)
        with torch.no_grad():
            if self._before_merge is None and not self.merged_adapters:
                self._before_merge = self.quantization.snapshot(self.base_layer)
            target = self.exact_sum(names)
            self.quantization.requantize(self.base_layer, target)
            error = (self.dequantized_weight().float() - target).abs()
        self.requantization_error = RequantizationError(float(error.sum(1).max()), float(error.max()))
        if not reversible:
            self._before_merge, self._irreversible = None, True
        self.merged_adapters.extend(names)
        self._refresh()

    def unmerge(self, scratch: Optional[Scratch] = None) -> None:
        """Put the quantized weight from before the first merge back, bit for bit."""
        if self.quantization is None:
            return super().unmerge(scratch)
        if not self.merged_adapters:
            return
        if self._irreversible:
            raise ValueError(f"adapter(s) {self.merged_adapters} were merged into {self.quantization} weights with "
                             "reversible=False (for unloading); they cannot be unmerged")
        self.quantization.restore(self.base_layer, self._before_merge)
        self._before_merge = None
        self.requantization_error = None
        self.merged_adapters.clear()
        self._refresh()

    def dequantize_base(self, dtype: Optional[torch.dtype] = None) -> None:
        """Replace the quantized base by a float ``nn.Linear`` holding its weight as it was before any merge
        (dequantized, in the dtype it was quantized from, or ``dtype`` where the format does not record that);
        adapters merged so far are merged again, exactly."""
        if self.quantization is None:
            return
        if self._irreversible:
            raise ValueError(f"adapter(s) {self.merged_adapters} were merged into {self.quantization} weights with "
                             "reversible=False; the weight before merging is gone, so it cannot be dequantized")
        merged = list(self.merged_adapters)
        snapshot = self.quantization.snapshot(self.base_layer) if self._before_merge is None else self._before_merge
        with torch.no_grad():
            weight = self.quantization.dequantize(snapshot)
        dtype = self.quantization.float_dtype(self.base_layer) or dtype or torch.float32
        self._modules["base_layer"] = _float_linear(self.base_layer, weight, dtype)
        vars(self).update(quantization=None, requantization_error=None, _before_merge=None)
        self.merged_adapters.clear()
        self._refresh()
        if merged:
            self.merge(merged)

    def extra_repr(self) -> str:
        kind = "float (dequantized)" if self.quantization is None else str(self.quantization)
        return f"{kind}, {super().extra_repr()}"


def warn_requantization(layers: Iterable[tuple[str, LoraLayer]], stacklevel: int = 3) -> None:
    """One :class:`RequantizationWarning` for the quantized layers among ``layers`` that a merge rounded, naming
    the one whose outputs moved most."""
    report = {name: layer.requantization_error for name, layer in layers
              if isinstance(layer, QuantizedLinear) and layer.requantization_error is not None}
    if not report:
        return
    worst = max(report, key=lambda n: report[n].max_output_change)
    warnings.warn(RequantizationWarning(
        f"merging into quantized weights rounded {len(report)} layer(s); the largest change is in {worst!r}: an "
        f"output moves by up to {report[worst].max_output_change:.3g} for inputs in [-1, 1] (weights by up to "
        f"{report[worst].max_weight_change:.3g}). Use merge_and_unload(dequantize=True) for an exact float model; "
        "the warning's .report has every layer", report), stacklevel=stacklevel)


def dequantize_quantized_layers(model: nn.Module) -> int:
    """Make ``model`` a float model: every adapted quantized layer gets a float base
    (:meth:`QuantizedLinear.dequantize_base`), every other quantized linear layer becomes its float ``nn.Linear``
    (in the model's float dtype where the format does not record one), and the model forgets its quantization
    settings (transformers' ``hf_quantizer``, ``config.quantization_config`` and flags) so that it saves as a float
    model. Returns how many layers were dequantized."""
    dtype, replaced = float_dtype_of(model), 0
    stack = [model]
    while stack:  # every module, not entering lorakit's layers (their base layers are theirs to replace)
        parent = stack.pop()
        for child_name, module in list(parent._modules.items()):
            if isinstance(module, QuantizedLinear) and module.quantization is not None:
                module.dequantize_base(dtype)
            elif not isinstance(module, LoraLayer) and module is not None and format_of(module) is not None:
                parent._modules[child_name] = dequantized_linear(module, dtype)
            else:
                if module is not None and not isinstance(module, LoraLayer):
                    stack.append(module)
                continue
            replaced += 1
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    for holder, attr in ((model, "hf_quantizer"), (model, "quantization_method"),
                         (getattr(model, "config", None), "quantization_config")):
        if holder is not None and hasattr(holder, attr):
            try:
                delattr(holder, attr)
            except AttributeError:
                setattr(holder, attr, None)
    return replaced
