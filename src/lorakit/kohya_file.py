"""Reading a kohya LoRA file (A1111 / ComfyUI / sd-scripts) for ``PeftModel.from_pretrained`` / ``load_adapter``.

A kohya file carries no ``adapter_config.json``: it is one ``.safetensors`` file, named directly or found alone in
a local folder that has no ``adapter_config.json``. Its ranks and alphas come from its tensors, its module names
from the model it is loaded onto (:mod:`lorakit.convert_kohya`); the result is PEFT's config and keys, which
:class:`lorakit.checkpoint.FileAdapter` fits onto the adapter as for any PEFT file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from torch import Tensor, nn

from .config import CONFIG_NAME, LoraConfig
from .convert_kohya import is_kohya_state, kohya_for_model

__all__ = ["kohya_file", "read_safetensors", "read_kohya"]


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors (on CPU) and metadata of a safetensors file; an unreadable file is a ``ValueError`` naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # SafetensorError, OSError: both mean the file is unusable
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception:
        return []


def kohya_file(model_id, subfolder: Optional[str] = None) -> Optional[Path]:
    """The kohya file ``model_id`` names, if it names one: a local ``.safetensors`` file of kohya keys, or a local
    folder without ``adapter_config.json`` whose only ``.safetensors`` file holds kohya keys. None otherwise (a
    PEFT folder, a Hub id: read as PEFT's format)."""
    try:
        path = Path(os.fspath(model_id))
    except TypeError:
        return None
    if subfolder:
        path = path / subfolder
    if path.is_file():
        candidates = [path] if path.suffix == ".safetensors" else []
    elif path.is_dir() and not (path / CONFIG_NAME).is_file():
        candidates = sorted(path.glob("*.safetensors"))
    else:
        return None
    if len(candidates) != 1:
        return None
    keys = _keys(candidates[0])
    return candidates[0] if keys and is_kohya_state(dict.fromkeys(keys)) else None


def read_kohya(path: Path, model: nn.Module, config: Optional[LoraConfig] = None) -> tuple[LoraConfig, dict, str]:
    """``(config, tensors with PEFT's keys, source)`` of the part of a kohya file that fits ``model``."""
    if config is not None:
        raise ValueError(f"{path} is a kohya LoRA file: its ranks and alphas are in its tensors, so config= cannot "
                         "be used with it")
    tensors, _ = read_safetensors(path)
    adapter = kohya_for_model(tensors, model, str(path))
    return adapter.config, adapter.state_dict, str(path)
