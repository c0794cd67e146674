"""Which parameters train: PEFT's rules, as functions of the model's adapters (``LoraModel`` calls them).

- ``set_adapter`` (and the first adapter): the active adapters train unless ``inference_mode``, with the biases
  their ``bias`` setting names; every other adapter and the rest of the model are frozen (:func:`mark_trainable`).
- ``set_requires_grad``: the named adapters' parts train or not, active or not.
- Disabling the adapters freezes them; enabling gives back exactly what trained before (:class:`DisabledGrads`;
  PEFT makes the active adapters trainable instead, even ones loaded for inference).
- Only one adapter may train the base model's biases, which all adapters share (:func:`check_bias_owner`).
"""

from __future__ import annotations

from typing import Collection, Iterable, Iterator, Optional, Sequence

from torch import nn

from .config import LoraConfig
from .keys import is_adapter_key
from .layers import LoraLayer
from .modules_to_save import ModulesToSaveWrapper
from .walk import leaf_parameters, walk

__all__ = ["base_parameters", "mark_trainable", "check_bias_owner", "DisabledGrads"]


def base_parameters(model: nn.Module, adapter_modules: Optional[list] = None) -> Iterator[tuple[str, nn.Parameter]]:
    """``model.named_parameters()`` less what lorakit added (adapter factors, modules_to_save copies): one walk that
    does not enter lorakit's layers, so its cost does not grow with the number of adapters. ``adapter_modules``:
    a list that gets the adapted layers and modules_to_save wrappers met on the way (``LoraModel.adapter_modules``)."""
    for name, module in walk(model):
        if isinstance(module, LoraLayer):
            if adapter_modules is not None:
                adapter_modules.append(module)
            yield from leaf_parameters(module._modules["base_layer"], f"{name}.base_layer")
        elif isinstance(module, ModulesToSaveWrapper):
            if adapter_modules is not None:
                adapter_modules.append(module)
            yield from leaf_parameters(module.original_module, f"{name}.original_module")
        else:  # the walk visits its children
            yield from ((f"{name}.{k}" if name else k, p) for k, p in module._parameters.items() if p is not None)


def mark_trainable(lora_model, inference_mode: bool = False, settled: Collection[nn.Module] = ()) -> None:
    """PEFT's ``set_adapter`` rule for ``lora_model.active_adapters`` (see the module docstring).

    ``settled``: adapted layers already in the state the rule gives them (layers the first adapter's injection has
    just created, whose only adapter ``update_layer`` made trainable and active), which are not visited again.
    """
    modules: list[nn.Module] = []  # LoraModel.adapter_modules(), found by the same walk
    for name, p in base_parameters(lora_model.model, modules):
        if not is_adapter_key(name):
            p.requires_grad_(False)
    settled = set(settled)
    for module in modules:
        if module not in settled:
            module.set_adapter(lora_model.active_adapters, inference_mode=inference_mode)
    for adapter in [] if inference_mode else lora_model.active_adapters:
        bias = lora_model.peft_config[adapter].bias
        if bias == "all":
            for n, p in lora_model.model.named_parameters():
                if "bias" in n and "original_module" not in n:
                    p.requires_grad_(True)
        elif bias == "lora_only":
            for _, layer in lora_model.lora_layers():
                if adapter in layer.r and getattr(layer.base_layer, "bias", None) is not None:
                    layer.base_layer.bias.requires_grad_(True)


def check_bias_owner(peft_config: dict[str, LoraConfig], config: LoraConfig, adapter_name: str,
                     shares_biases_with: Sequence[str] = ()) -> None:
    """``ValueError`` if ``config`` trains biases while another adapter does (PEFT's rule): the biases are the base
    model's, shared by all adapters. ``shares_biases_with``: adapters whose trained biases the new one takes over
    (``add_weighted_adapter``'s sources), which do not count."""
    others = [n for n, c in peft_config.items() if c.bias != "none" and n not in shares_biases_with]
    if config.bias != "none" and others:
        raise ValueError(
            f"adapter {adapter_name!r} has bias={config.bias!r}, and adapter {others[0]!r} trains biases already: "
            "the base model's biases are shared, so only one adapter may train them (as in PEFT); give the new "
            "adapter bias='none'"
        )


class DisabledGrads:
    """The adapter parameters that trained when the adapters were disabled, frozen until they are enabled again."""

    def __init__(self) -> None:
        self.frozen: Optional[list[nn.Parameter]] = None

    @property
    def active(self) -> bool:
        return self.frozen is not None

    def freeze(self, modules: Iterable[nn.Module]) -> None:
        """Freeze every trainable adapter parameter of ``modules`` (adapted layers, modules_to_save wrappers),
        remembering them; a second call before :meth:`thaw` does nothing."""
        if self.frozen is not None:
            return
        self.frozen = [
            p for module in modules for n, p in module.named_parameters()
            if p.requires_grad and not n.startswith(("base_layer.", "original_module."))
        ]
        for p in self.frozen:
            p.requires_grad_(False)

    def thaw(self) -> None:
        for p in self.frozen or ():
            p.requires_grad_(True)
        self.frozen = None
