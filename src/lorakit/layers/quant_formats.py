"""The quantized weight formats lorakit adapts, each as four operations on a base layer's weight: take a snapshot
(what restores the layer bit for bit), dequantize a snapshot to the float matrix the layer computes with, quantize
a float matrix back into the layer (as the format's own loader would), and restore a snapshot.

- bitsandbytes ``Linear4bit`` (nf4 and fp4, with or without double quantization, any quant_storage);
- bitsandbytes ``Linear8bitLt`` (LLM.int8(), row-wise absmax);
- ``nn.Linear`` whose weight is a torchao tensor subclass (``Int8Tensor`` can be requantized; any torchao tensor
  with ``dequantize()`` can be dequantized).

Layers are recognised by the names of their classes' modules, so neither bitsandbytes nor torchao is imported
until such a layer is met (``import lorakit`` stays light).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn

__all__ = ["QuantFormat", "format_of"]


def _from_package(cls: type, package: str) -> bool:
    return cls.__module__ == package or cls.__module__.startswith(package + ".")


class QuantFormat:
    """One quantized weight format. ``name`` is what error messages and reports call it."""

    name = "quantized"

    def snapshot(self, layer: nn.Module) -> Any:
        """What :meth:`restore` needs to put the layer's weight back exactly as it is now."""
        return layer.weight

    def restore(self, layer: nn.Module, snapshot: Any) -> None:
        layer._parameters["weight"] = snapshot

    def dequantize(self, snapshot: Any) -> Tensor:
        """The ``out × in`` float matrix the layer computes with (its own dtype)."""
        raise NotImplementedError

    def requantize(self, layer: nn.Module, weight: Tensor) -> None:
        """Quantize the float ``weight`` into ``layer`` as the format's loader quantizes a checkpoint."""
        raise NotImplementedError

    def float_dtype(self, layer: nn.Module) -> Optional[torch.dtype]:
        """The dtype the layer was quantized from (what a dequantized copy is stored in), or None where the
        format does not record it."""
        return None

    def check_requantizable(self, layer: nn.Module) -> None:
        """Raise ``ValueError`` naming what this format cannot quantize again."""

    def __repr__(self) -> str:
        return self.name


class Bnb4bit(QuantFormat):
    """bitsandbytes ``Linear4bit``: blockwise absmax over a 16-value code (nf4 or fp4), packed two to a byte."""

    def __init__(self, layer: nn.Module) -> None:
        self.name = f"bitsandbytes 4-bit ({getattr(layer.weight, 'quant_type', '?')})"

    def restore(self, layer: nn.Module, snapshot: Any) -> None:
        layer._parameters["weight"] = snapshot
        layer.quant_state = snapshot.quant_state

    def dequantize(self, snapshot: Any) -> Tensor:
        import bitsandbytes.functional as bnbF

        state = snapshot.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # After an inference forward on a CPU with AVX512-BF16, bitsandbytes keeps the weight in a kernel layout
            # (absmax rounded to bf16); read it as that kernel does: the layer's response to the unit vectors.
            n_in, rows = state.shape[1], []
            for start in range(0, n_in, 1024):
                unit = torch.zeros(min(1024, n_in - start), n_in, device=snapshot.device)
                unit[:, start:start + unit.shape[0]].fill_diagonal_(1.0)
                rows.append(bnbF.gemv_4bit(unit, snapshot, state=state))
            return torch.cat(rows).T.to(self._original_dtype(state))
        return bnbF.dequantize_4bit(snapshot.data, state).view(state.shape)

    @staticmethod
    def _original_dtype(state) -> torch.dtype:
        return getattr(state, "original_dtype", None) if getattr(state, "packing_format_for_cpu", False) else state.dtype

    def requantize(self, layer: nn.Module, weight: Tensor) -> None:
        import bitsandbytes as bnb

        old = layer.weight
        new = bnb.nn.Params4bit(
            weight.to(self._original_dtype(old.quant_state)).contiguous(), requires_grad=False, blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type, quant_storage=old.quant_storage,
            module=layer,
        )
        layer._parameters["weight"] = new.to(weight.device)  # Params4bit quantizes when it is moved to a device
        layer.quant_state = layer.weight.quant_state

    def float_dtype(self, layer: nn.Module) -> torch.dtype:
        return self._original_dtype(layer.weight.quant_state)


class _Int8Snapshot(NamedTuple):
    weight: nn.Parameter
    CB: Optional[Tensor]
    SCB: Optional[Tensor]
    state_CB: Optional[Tensor]
    state_SCB: Optional[Tensor]


class Bnb8bit(QuantFormat):
    """bitsandbytes ``Linear8bitLt``: int8 rows with one absmax scale per row (``SCB``); the forward moves the
    scales from the weight to the layer's ``state``, so both places are read and restored."""

    name = "bitsandbytes 8-bit"

    def snapshot(self, layer: nn.Module) -> _Int8Snapshot:
        w = layer.weight
        return _Int8Snapshot(w, getattr(w, "CB", None), getattr(w, "SCB", None), layer.state.CB, layer.state.SCB)

    def restore(self, layer: nn.Module, snapshot: _Int8Snapshot) -> None:
        layer._parameters["weight"] = snapshot.weight
        snapshot.weight.CB, snapshot.weight.SCB = snapshot.CB, snapshot.SCB
        layer.state.reset_grads()  # clears CB and SCB too: set them after
        layer.state.CB, layer.state.SCB = snapshot.state_CB, snapshot.state_SCB

    def dequantize(self, snapshot: _Int8Snapshot) -> Tensor:
        import bitsandbytes.functional as bnbF

        data = snapshot.weight.data
        if data.dtype != torch.int8:  # has_fp16_weights: not quantized at all
            return data
        scb = snapshot.SCB if snapshot.SCB is not None else snapshot.state_SCB
        if scb is None:
            raise ValueError("this bitsandbytes 8-bit layer has no row scales (SCB): it was never quantized")
        return bnbF.int8_vectorwise_dequant(data, scb.to(data.device))

    def requantize(self, layer: nn.Module, weight: Tensor) -> None:
        import bitsandbytes as bnb

        device = weight.device
        new = bnb.nn.Int8Params(weight.detach().to("cpu"), requires_grad=False,
                                has_fp16_weights=layer.weight.has_fp16_weights)
        layer._parameters["weight"] = new.to(device)  # Int8Params quantizes when it leaves the CPU copy
        layer.state.reset_grads()  # drops the old CB and SCB: the next forward takes the new ones from the weight

    def float_dtype(self, layer: nn.Module) -> Optional[torch.dtype]:
        bias = layer.bias
        return bias.dtype if bias is not None and bias.dtype.is_floating_point else None


class TorchaoTensor(QuantFormat):
    """A torchao tensor subclass as an ``nn.Linear`` weight. ``Int8Tensor`` (int8 weight-only and int8 dynamic
    activation configs, symmetric, per row / per tensor / per group) is quantized again with its own settings."""

    def __init__(self, layer: nn.Module) -> None:
        self.name = f"torchao {type(layer.weight).__name__}"

    def dequantize(self, snapshot: Any) -> Tensor:
        try:
            return snapshot.dequantize()
        except (NotImplementedError, AttributeError) as exc:
            raise ValueError(f"{self.name} weights cannot be dequantized, so this layer cannot merge") from exc

    def check_requantizable(self, layer: nn.Module) -> None:
        self._granularity(layer.weight)

    def _granularity(self, weight: Any):
        from torchao.quantization import Int8Tensor, PerGroup, PerRow, PerTensor
        from torchao.quantization.utils import get_block_size

        if type(weight) is not Int8Tensor:
            raise ValueError(f"lorakit can requantize torchao Int8Tensor weights only, not {self.name}: merge with "
                             "merge_and_unload(dequantize=True) or keep the adapter unmerged")
        for field in ("act_pre_scale", "act_quant_scale", "act_quant_zero_point"):
            if getattr(weight, field, None) is not None:
                raise ValueError(f"torchao Int8Tensor with {field} (static or smoothed activations) cannot be "
                                 "requantized by lorakit")
        if weight.zero_point is not None and bool(weight.zero_point.any()):
            raise ValueError("torchao Int8Tensor with a non-zero zero_point (asymmetric) cannot be requantized by "
                             "lorakit")
        shape, block = tuple(weight.shape), tuple(weight.block_size)
        for granularity in (PerRow(), PerTensor(), PerGroup(block[-1])):
            if tuple(get_block_size(shape, granularity)) == block:
                return granularity
        raise ValueError(f"torchao Int8Tensor with block_size {list(block)} cannot be requantized by lorakit")

    def requantize(self, layer: nn.Module, weight: Tensor) -> None:
        from torchao.quantization import Int8Tensor

        old = layer.weight
        new = Int8Tensor.from_hp(weight.to(old.dtype), granularity=self._granularity(old),
                                 act_quant_kwargs=old.act_quant_kwargs, reduce_range=old.reduce_range)
        layer._parameters["weight"] = nn.Parameter(new, requires_grad=False)

    def float_dtype(self, layer: nn.Module) -> torch.dtype:
        return layer.weight.dtype


def format_of(module: nn.Module) -> Optional[QuantFormat]:
    """The quantized format of a linear layer, or None for anything else (a float ``nn.Linear`` included).

    Recognised without importing bitsandbytes or torchao: a bitsandbytes layer by its class, a torchao weight by
    the class of the tensor.
    """
    cls = type(module)
    if cls is nn.Linear and type(module._parameters.get("weight")) is nn.Parameter:
        return None  # the common case, answered first: injection asks this of every linear layer
    mro = cls.__mro__
    if any(_from_package(c, "bitsandbytes") for c in mro):
        names = {c.__name__ for c in mro}
        if "Linear4bit" in names:
            return Bnb4bit(module)
        if "Linear8bitLt" in names:
            return Bnb8bit()
        return None
    if isinstance(module, nn.Linear):
        weight = module._parameters.get("weight")
        if weight is not None and any(_from_package(c, "torchao") for c in type(weight).__mro__):
            return TorchaoTensor(module)
    return None
