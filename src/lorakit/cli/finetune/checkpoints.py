"""Checkpoints of a ``lorakit finetune`` run: written atomically during training, read back by ``--resume``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Collection, Mapping, Optional

import torch
from torch import nn

from lorakit.io import atomic_write_text

from .settings import Settings

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.pt"
RECIPE_FILE = "recipe.yaml"  # the run's resolved settings, beside the adapter; ``-c`` reads it back


def latest_checkpoint(out: Path) -> Optional[Path]:
    pointer = out / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    folder = out / CHECKPOINTS / pointer.read_text(encoding="utf-8").strip()
    return folder if (folder / STATE_FILE).is_file() else None


def save_checkpoint(out: Path, model: nn.Module, state: dict[str, Any]) -> Path:
    """Write adapter + training state into a fresh folder, then point ``latest`` at it and drop older ones.

    Until the pointer moves, ``latest`` names the previous complete checkpoint, so a crash at any moment leaves
    one to resume from.
    """
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:06d}"
    staging = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    model.save_pretrained(staging)
    torch.save(state, staging / STATE_FILE)
    with open(staging / STATE_FILE, "rb") as f:
        os.fsync(f.fileno())
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)
    atomic_write_text(root / LATEST, name + "\n")
    for old in root.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def write_recipe(out: Path, settings: Settings) -> Path:
    """Save ``settings``' recipe keys as ``out/recipe.yaml``, a file ``lorakit finetune -c`` reads."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    path = out / RECIPE_FILE
    header = f"# lorakit finetune recipe: the settings of the run in {out}; repeat it with lorakit finetune -c {path}\n"
    atomic_write_text(path, header + yaml.safe_dump(settings.recipe(), sort_keys=False))
    return path


def resume_state(settings: Settings, out: Path,
                 explicit: Optional[Collection[str]]) -> tuple[Optional[Path], Optional[dict]]:
    """The checkpoint to continue from (with ``--resume``), after taking the run's settings from it.

    Settings the user did not give (not in ``explicit``; ``None``: all were given) come from the checkpoint; one
    given with another value is an error naming it (and, when ``explicit`` maps names to where they came from,
    the recipe file or command line that gave it), since the continued run would no longer be the one that was started.
    """
    checkpoint = latest_checkpoint(out)
    if not settings.resume:
        if checkpoint is not None and not settings.overwrite:
            raise FileExistsError(f"{out} already holds a run; pass --resume to continue it, --overwrite to start "
                                  "over, or another --out")
        if settings.overwrite:
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        return None, None
    if checkpoint is None:
        raise FileNotFoundError(f"--resume: {out} holds no checkpoint to continue from (no {out / CHECKPOINTS / LATEST})")
    saved = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    differ = []
    origin = explicit if isinstance(explicit, Mapping) else {}
    for key, value in saved["settings"].items():
        if explicit is not None and key not in explicit:
            setattr(settings, key, value)
        elif getattr(settings, key) != value:
            where = f" (from {origin[key]})" if key in origin else ""
            differ.append(f"--{key.replace('_', '-')} was {value!r}, now {getattr(settings, key)!r}{where}")
    if differ:
        raise ValueError(f"--resume: the run in {out} was started with other settings ({'; '.join(differ)}); "
                         "resume with the same settings, or start a new run with another --out")
    settings.check()
    return checkpoint, saved


def check_resumed_dtype(saved: Optional[dict], dtype: str, out: Path) -> None:
    """A resumed run's base model must be in the dtype it trained in (``--dtype auto`` may resolve to another
    one on another device)."""
    if saved is not None and saved.get("dtype", dtype) != dtype:
        raise ValueError(f"--resume: the run in {out} trained its base model in {saved['dtype']}, here it would be "
                         f"{dtype}: pass --dtype {saved['dtype']}")
