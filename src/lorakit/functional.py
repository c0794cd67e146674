"""PEFT's functional API (``peft.functional`` / ``peft.utils``): adapters on a plain model without a PeftModel.

- :func:`inject_adapter_in_model` puts LoRA layers into the user's model in place and returns it (with a
  ``peft_config`` dict on it, as PEFT does): what diffusers and transformers integrations call.
- :func:`get_peft_model_state_dict` gives one adapter's tensors keyed as its file keys them (adapter name removed);
  :func:`set_peft_model_state_dict` puts such a dict back into an adapter, under any adapter name.

They work on a :class:`~lorakit.PeftModel` (keys start with ``base_model.model.``), a
:class:`~lorakit.LoraModel` (``model.``) and a plain model given adapters by :func:`inject_adapter_in_model` (no
prefix). Unlike PEFT, setting a state dict that does not fit the adapter (missing or unexpected keys, other shapes)
raises ``ValueError`` and changes nothing, rather than loading part of it.
"""

from __future__ import annotations

import re
from collections import namedtuple
from typing import Mapping, Optional

from torch import Tensor, nn

from .checkpoint import FileAdapter, adapter_file_tensors
from .config import LoraConfig
from .keys import PEFT_PREFIX, check_adapter_names
from .model import LoraModel
from .peft_model import PeftModel, prepare_config

__all__ = [
    "IncompatibleKeys",
    "inject_adapter_in_model",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "lora_model_of",
]

#: what :func:`set_peft_model_state_dict` returns (PEFT returns torch's ``_IncompatibleKeys``, same fields)
IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])

# The LoraModel managing a plain model's injected adapters, kept as a plain attribute (not a submodule: it is not
# part of the model's state) so that later functional calls can reach it.
_TUNER_ATTRIBUTE = "_lorakit_lora_model"
_FACTOR_KEY = re.compile(r"^(?P<module>.+?)\.(?:lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.|$)")


def lora_model_of(model: nn.Module) -> tuple[LoraModel, str]:
    """The :class:`LoraModel` holding ``model``'s adapters, and the prefix of ``model``'s state-dict keys before the
    user's module paths (``"base_model.model."``, ``"model."`` or ``""``)."""
    if isinstance(model, PeftModel):
        return model.base_model, PEFT_PREFIX
    if isinstance(model, LoraModel):
        return model, "model."
    tuner = model.__dict__.get(_TUNER_ATTRIBUTE) if isinstance(model, nn.Module) else None
    if tuner is None:
        raise TypeError(
            f"{type(model).__name__} has no lorakit adapters: expected a PeftModel (get_peft_model), a LoraModel or "
            "a model given adapters by lorakit.inject_adapter_in_model"
        )
    return tuner, ""


def inject_adapter_in_model(
    peft_config: LoraConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: Optional[Mapping[str, Tensor]] = None,
) -> nn.Module:
    """Put the LoRA layers ``peft_config`` describes into ``model`` in place and return ``model``; the new adapter is
    the active one and only adapter tensors train. ``state_dict`` (PEFT's option): adapt exactly the modules its
    LoRA keys name (its values are not used; load them with :func:`set_peft_model_state_dict`).
    ``low_cpu_mem_usage`` is accepted and changes nothing (adapters are small; they are created on the base
    layer's device). On error the model is left as it was."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, (PeftModel, LoraModel)):
        raise TypeError(f"model is a {type(model).__name__} already; use its add_adapter()")
    config = prepare_config(model, peft_config)
    if state_dict is not None:
        config.target_modules = _modules_in(state_dict)
    tuner = model.__dict__.get(_TUNER_ATTRIBUTE)
    if tuner is None:
        tuner = LoraModel(model, config, adapter_name)
        vars(model)[_TUNER_ATTRIBUTE] = tuner
        vars(model)["peft_config"] = tuner.peft_config  # PEFT leaves this dict on the model; integrations read it
    else:
        tuner.inject_adapter(config, adapter_name)
        tuner.set_adapter(adapter_name)
    return model


def _modules_in(state_dict: Mapping[str, Tensor]) -> list[str]:
    """The module paths a PEFT state dict holds LoRA factors for (prefix removed)."""
    names = []
    for key in state_dict:
        match = _FACTOR_KEY.match(key.removeprefix(PEFT_PREFIX))
        if match:
            names.append(match["module"])
    if not names:
        raise ValueError("state_dict holds no LoRA factors (keys with lora_A/lora_B/lora_embedding_A/B) to target")
    return sorted(set(names))


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: Optional[Mapping[str, Tensor]] = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, Tensor]:
    """One adapter's tensors (LoRA factors, trained biases, modules_to_save copies, and with
    ``save_embedding_layers`` the embedding weights) keyed as ``model``'s state dict keys them but without the
    adapter's name: exactly what ``save_pretrained`` writes (a plain model's keys have no ``base_model.model.``).
    ``state_dict``: the model's whole state (keyed as ``model.state_dict()``) to take the values from."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    tuner, prefix = lora_model_of(model)
    check_adapter_names([adapter_name], tuner.peft_config, "adapter_name")
    if state_dict is not None:
        state_dict = {PEFT_PREFIX + k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    tensors = adapter_file_tensors(tuner, adapter_name, save_embedding_layers, state_dict)
    return {prefix + k[len(PEFT_PREFIX):]: v for k, v in tensors.items()}


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: Mapping[str, Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> IncompatibleKeys:
    """Copy an adapter's tensors (as :func:`get_peft_model_state_dict` or a PEFT file gives them, with or without
    ``base_model.model.``) into the existing adapter ``adapter_name``. Every key and shape is checked first: a dict
    that does not fit raises ``ValueError`` naming the keys, and nothing changes. Returns empty
    ``missing_keys``/``unexpected_keys`` (a partial load is never done)."""
    if ignore_mismatched_sizes:
        raise ValueError(
            "ignore_mismatched_sizes=True is not supported: it would leave mismatched adapter tensors at their "
            "initial values; lorakit loads an adapter whole or not at all"
        )
    tuner, prefix = lora_model_of(model)
    check_adapter_names([adapter_name], tuner.peft_config, "adapter_name")
    tensors = {k.removeprefix(prefix) if prefix and not k.startswith(PEFT_PREFIX) else k: v
               for k, v in peft_model_state_dict.items()}
    fit = FileAdapter(tuner, adapter_name, tensors, "state dict")
    tuner.load_adapter_state(adapter_name, fit)
    fit.place()
    return IncompatibleKeys([], [])

