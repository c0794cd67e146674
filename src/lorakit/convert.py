"""Adapter tensors in other libraries' formats: pure functions between dicts of tensors, no files, no modules.

lorakit's own naming is :meth:`lorakit.LoraModel.adapter_state`: each tensor keyed by its path in the user's
model with the adapter name in it (``model.layers.0.self_attn.q_proj.lora_A.default.weight``). A format is a pair
of functions, one from that naming to the format's, one back; the way back gets the keys the model expects (the
adapter's layers exist by then), so it never has to guess which module a key belongs to. Everything in a file
that is not one of those keys is handed back as "rest" for the caller to place (PEFT files may carry base-model
tensors such as embedding weights). kohya's format (A1111, ComfyUI) is in :mod:`lorakit.convert_kohya`; its public
functions are importable from here too.

PEFT's format (``adapter_model.safetensors``), which lorakit writes too:

- every key starts with ``base_model.model.``; the adapter's name is not in the keys;
- ``<module>.lora_A.weight`` / ``.lora_B.weight`` (Linear, Conv, GPT-2 Conv1D);
  ``<module>.lora_embedding_A`` / ``.lora_embedding_B`` (Embedding);
- ``modules_to_save`` copies as the module's own parameters: ``classifier.weight``, not
  ``classifier.modules_to_save.default.weight``;
- trained biases under their path: ``<module>.base_layer.bias`` for adapted layers, ``<module>.bias`` otherwise.

Two oddities of PEFT files are read (never written): with ``bias="all"`` PEFT also stores a modules_to_save
copy's bias as ``<module>.modules_to_save.bias`` (beside ``<module>.bias``), and a bias of a layer that another
adapter wraps may appear without its ``base_layer.`` segment. Both are accepted as aliases of the real key.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch
from torch import Tensor

from .convert_kohya import KohyaAdapter, from_kohya, is_kohya_state, peft_to_kohya, to_kohya
from .keys import PEFT_PREFIX, PER_ADAPTER

__all__ = ["PEFT_PREFIX", "to_peft_key", "peft_key_aliases", "to_peft", "from_peft", "strip_peft_prefix",
           "KohyaAdapter", "from_kohya", "to_kohya", "peft_to_kohya", "is_kohya_state"]


def _drop_adapter_name(key: str, adapter_name: str, keep_container: bool) -> str:
    """Remove ``.<container>.<adapter_name>`` (or only ``.<adapter_name>`` with ``keep_container``) from a key.

    ``modules_to_save`` goes with its name (PEFT stores the copy's parameters under the module's own path); the
    LoRA containers stay.
    """
    parts = key.split(".")
    out: list[str] = []
    i = 0
    while i < len(parts):
        part = parts[i]
        if part in PER_ADAPTER and i + 1 < len(parts) and parts[i + 1] == adapter_name:
            if part != "modules_to_save" or keep_container:
                out.append(part)
            i += 2
            continue
        out.append(part)
        i += 1
    return ".".join(out)


def to_peft_key(key: str, adapter_name: str) -> str:
    """PEFT's name (without the ``base_model.model.`` prefix) of a lorakit adapter key."""
    return _drop_adapter_name(key, adapter_name, keep_container=False)


def peft_key_aliases(key: str, adapter_name: str) -> list[str]:
    """Names a lorakit adapter key may have in a PEFT file, the canonical one first (see the module docstring)."""
    names = [to_peft_key(key, adapter_name)]
    if f".modules_to_save.{adapter_name}." in f".{key}":
        names.append(_drop_adapter_name(key, adapter_name, keep_container=True))
    if not re.search(r"(?:^|\.)lora_", key):
        names += [re.sub(r"(?:^|\.)base_layer(?=\.)", "", n, count=1).lstrip(".") for n in names if "base_layer." in n]
    return list(dict.fromkeys(names))


def to_peft(state: Mapping[str, Tensor], adapter_name: str) -> dict[str, Tensor]:
    """lorakit adapter state -> PEFT's on-disk dict (prefixed keys, no adapter name)."""
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        name = PEFT_PREFIX + to_peft_key(key, adapter_name)
        if name in out:
            raise ValueError(f"two adapter tensors map to the same PEFT key {name!r}; cannot write this adapter")
        out[name] = tensor
    return out


def strip_peft_prefix(state: Mapping[str, Tensor], source: str = "adapter file") -> dict[str, Tensor]:
    """Keys without PEFT's ``base_model.model.`` prefix; a dict without any prefix (PEFT's transformers and
    diffusers integrations write those) is taken as it is, a mix is an error."""
    prefixed = [k for k in state if k.startswith(PEFT_PREFIX)]
    if not prefixed:
        return dict(state)
    if len(prefixed) != len(state):
        odd = sorted(k for k in state if not k.startswith(PEFT_PREFIX))[:5]
        raise ValueError(f"{source}: keys {odd} lack the {PEFT_PREFIX!r} prefix that the other keys have")
    return {k[len(PEFT_PREFIX):]: v for k, v in state.items()}


def from_peft(
    peft_state: Mapping[str, Tensor], expected: Iterable[str], adapter_name: str, source: str = "adapter file"
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """PEFT's dict -> ``(state, rest)``: ``state`` keyed like ``expected`` (lorakit keys of the adapter as the
    model has it), ``rest`` the file's other entries (unprefixed PEFT keys), for the caller to place or reject.

    Raises ``ValueError`` naming the PEFT key of every expected tensor the file lacks, and when two aliases of one
    tensor in the file disagree.
    """
    peft = strip_peft_prefix(peft_state, source)
    state: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for key in expected:
        found = [n for n in peft_key_aliases(key, adapter_name) if n in peft]
        if not found:
            missing.append(to_peft_key(key, adapter_name))
            continue
        first = peft[found[0]]
        for other in found[1:]:
            if peft[other].shape != first.shape or not torch.equal(peft[other], first):
                raise ValueError(f"{source}: {found[0]!r} and {other!r} hold the same tensor but differ")
        state[key] = first
        used.update(found)
    if missing:
        raise ValueError(
            f"{source} lacks {len(missing)} tensor(s) the adapter needs in this model, e.g. "
            f"{[PEFT_PREFIX + k for k in missing[:5]]} (was it saved from a different model or config?)"
        )
    rest = {k: v for k, v in peft.items() if k not in used}
    return state, rest
