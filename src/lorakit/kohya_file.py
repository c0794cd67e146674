"""kohya LoRA files (A1111 / ComfyUI / sd-scripts): read for ``PeftModel.from_pretrained`` / ``load_adapter``,
written by :func:`save_kohya`.

A kohya file carries no ``adapter_config.json``: it is one ``.safetensors`` file, named directly or found alone in
a local folder that has no ``adapter_config.json``. Its ranks and alphas come from its tensors, its module names
from the model it is loaded onto (:mod:`lorakit.convert_kohya`); the result is PEFT's config and keys, which
:class:`lorakit.checkpoint.FileAdapter` fits onto the adapter as for any PEFT file.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .config import CONFIG_NAME, LoraConfig
from .convert_kohya import is_kohya_state, kohya_for_model, to_kohya
from .io import atomic_write

__all__ = ["kohya_file", "read_safetensors", "read_kohya", "kohya_metadata", "save_kohya"]


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


def kohya_metadata(tensors: dict[str, Tensor]) -> dict[str, str]:
    """The safetensors metadata sd-scripts writes that A1111 / ComfyUI show: network module, common rank and alpha."""
    ranks = Counter(t.shape[0] for k, t in tensors.items() if k.endswith(".lora_down.weight"))
    alphas = Counter(float(t) for k, t in tensors.items() if k.endswith(".alpha"))
    metadata = {"format": "pt", "ss_network_module": "networks.lora"}
    if ranks:
        metadata["ss_network_dim"] = str(ranks.most_common(1)[0][0])
    if alphas:
        metadata["ss_network_alpha"] = f"{alphas.most_common(1)[0][0]:g}"
    return metadata


def save_kohya(
    path: str | os.PathLike,
    model: Optional[nn.Module] = None,
    adapter_name: str = "default",
    *,
    unet: Optional[nn.Module] = None,
    text_encoder: Optional[nn.Module] = None,
    text_encoder_2: Optional[nn.Module] = None,
    dtype: Optional[torch.dtype] = None,
) -> Path:
    """Write PeftModels' adapter as one kohya ``.safetensors`` file (atomically) for A1111, ComfyUI, sd-scripts or
    ``pipeline.load_lora_weights``; the arguments are :func:`lorakit.convert.to_kohya`'s. Returns the path."""
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a kohya LoRA file is a .safetensors file")
    tensors = to_kohya(model, adapter_name, unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                       dtype=dtype)
    data = save(tensors, metadata=kohya_metadata(tensors))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return path
