"""The vocabulary of adapter tensor names, in one place: which state-dict keys belong to an adapter.

lorakit's layers hold each adapter's tensors in per-adapter containers named as PEFT names them (``lora_A``,
``lora_B``, ``lora_embedding_A``, ``lora_embedding_B``; ``modules_to_save`` for trained copies), so a key such as
``model.layers.0.q_proj.lora_A.default.weight`` carries the adapter's name right after its container. The model
(:meth:`lorakit.LoraModel.adapter_state`), the file format (:mod:`lorakit.checkpoint`, :mod:`lorakit.convert`)
and the command line all read keys through these functions.
"""

from __future__ import annotations

import re

__all__ = ["PEFT_PREFIX", "PER_ADAPTER", "LORA_PREFIX", "adapter_key_pattern", "is_adapter_key"]

#: every key of a PEFT adapter file starts with this (PeftModel.base_model.model is the user's model)
PEFT_PREFIX = "base_model.model."
#: module names lorakit gives its own parts start with this (PEFT's ``LoraModel.prefix``)
LORA_PREFIX = "lora_"
#: containers that hold one entry per adapter name; the segment after them is the adapter's name
PER_ADAPTER = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "modules_to_save", "trainable_tokens_delta")

_ANY_ADAPTER = re.compile(r"(?:^|\.)(?:lora_\w+|modules_to_save|trainable_tokens_delta)(?:\.|$)")


def adapter_key_pattern(adapter_name: str) -> re.Pattern:
    """Matches the keys (paths in the user's model) of one adapter's tensors: its LoRA factors and its
    modules_to_save copies."""
    containers = "|".join(PER_ADAPTER)
    return re.compile(rf"(?:^|\.)(?:{containers})\.{re.escape(adapter_name)}(?:\.|$)")


def is_adapter_key(key: str) -> bool:
    """Whether ``key`` names a tensor lorakit added (any adapter's factors or modules_to_save copies), as opposed
    to one of the user's model."""
    return _ANY_ADAPTER.search(key) is not None


def check_adapter_names(names, known, where: str = "") -> None:
    """Raise ``ValueError`` naming the entries of ``names`` that are not adapters of the model (``known``), and
    the ones it has; ``where`` says which argument they came from."""
    unknown = [n for n in names if n not in known]
    if unknown:
        label = f"unknown adapter {unknown[0]!r}" if len(unknown) == 1 else f"unknown adapter(s) {unknown}"
        raise ValueError(f"{label}{' in ' + where if where else ''}; this model has {list(known)}")
