"""``lorakit merge``: fold an adapter into its base model and write a plain transformers model folder.

The folder is written beside its destination under a temporary name and renamed into place when complete, so
an interrupted merge never leaves a half-written model where one is expected.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from lorakit.config import read_config
from lorakit.peft_model import PeftModel

from .loading import load_causal_lm


def merge_to_folder(adapter: str | os.PathLike, out: str | os.PathLike, model: Optional[str] = None,
                    overwrite: bool = False) -> str:
    """Load the base (``model``, else the one the adapter records), apply ``adapter``, merge, save into ``out``.

    Returns a one-line description of the base model. The tokenizer is saved too, so the folder is complete.
    """
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"--out {out} already exists and is not empty: choose another folder or pass --overwrite")
    adapter = Path(adapter)
    if not adapter.is_dir():
        raise FileNotFoundError(f"--adapter {adapter}: no such folder (expected adapter_config.json + "
                                "adapter_model.safetensors)")
    config = read_config(adapter)
    if model is None:
        model = config.base_model_name_or_path
        if not model:
            raise ValueError(f"{adapter}/adapter_config.json records no base model: pass --model")
    loaded = load_causal_lm(model)
    peft_model = PeftModel.from_pretrained(loaded.model, adapter)
    merged = peft_model.merge_and_unload()

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes a private folder; the result is an ordinary one
    try:
        merged.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return loaded.description
