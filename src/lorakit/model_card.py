"""The model card (``README.md``) that ``save_pretrained`` writes beside the adapter, as PEFT does.

Its metadata is PEFT's (``library_name: peft``, the ``lora`` tag, ``base_model``, ``pipeline_tag`` for causal LMs),
so the Hub shows and loads the folder as a PEFT adapter; its text names the base model and lists every saved
adapter's settings. A README that is already there is never replaced: its text is kept, the metadata above is
merged into its front matter (the user's tags kept, no value of the user's overwritten except ``library_name``,
as PEFT does), and lorakit's section, between two marker comments, is added once and rewritten on later saves.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .config import LoraConfig
from .io import atomic_write_text
from .version import __version__

__all__ = ["CARD_NAME", "write_model_card", "card_section"]

CARD_NAME = "README.md"
BEGIN = "<!-- lorakit: adapter settings (rewritten by save_pretrained) -->"
END = "<!-- lorakit: end of adapter settings -->"
_FRONT_MATTER = re.compile(r"\A---\r?\n(.*?)^---[ \t]*\r?\n?", re.S | re.M)


def card_section(base_model: Optional[str], adapters: Sequence[tuple[str, str, LoraConfig]]) -> str:
    """lorakit's part of the card: the base model and a table of ``(name, folder, config)`` per saved adapter."""
    def names(value) -> str:
        if not value:
            return "–"
        return f"`{value}`" if isinstance(value, str) else ", ".join(f"`{v}`" for v in value)

    rows = [
        f"| {name} | `{folder}` | {c.r} | {c.lora_alpha} | {c.lora_dropout} | {names(c.target_modules)} | "
        f"{names(c.modules_to_save)} | {c.bias} | {'yes' if c.use_rslora else 'no'} | {c.task_type or '–'} |"
        for name, folder, c in adapters
    ]
    where = f"`{base_model}`" if base_model else "a base model whose name was not recorded"
    return "\n".join([
        BEGIN,
        "## Adapter settings",
        "",
        f"Low-rank adapter(s) for {where}, saved in PEFT's format (`adapter_config.json` + "
        "`adapter_model.safetensors`): load with `peft.PeftModel.from_pretrained(base, path)` or "
        "`lorakit.PeftModel.from_pretrained(base, path)`; an adapter in a subfolder with `subfolder=<name>`.",
        "",
        "| adapter | folder | r | lora_alpha | lora_dropout | target_modules | modules_to_save | bias | rsLoRA "
        "| task_type |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "### Framework versions",
        "",
        f"- lorakit {__version__}",
        END,
    ])


def _merged_metadata(front: Optional[str], base_model: Optional[str], tags: Iterable[str],
                     pipeline_tag: Optional[str]) -> Optional[str]:
    """The front matter with PEFT's metadata merged in; ``None`` to keep it as it is (no YAML parser, or YAML
    that is not a mapping: a user's file is never rewritten blind)."""
    try:
        import yaml
    except ImportError:
        return front if front is not None else _plain_metadata(base_model, tags, pipeline_tag)
    try:
        data = {} if front is None else yaml.safe_load(front)
    except yaml.YAMLError:
        return front
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return front
    data["library_name"] = "peft"
    if base_model and not data.get("base_model"):
        data["base_model"] = base_model
    own = data.get("tags") or []
    own = [own] if isinstance(own, str) else list(own)
    data["tags"] = own + [t for t in tags if t not in own]
    if pipeline_tag and not data.get("pipeline_tag"):
        data["pipeline_tag"] = pipeline_tag
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _plain_metadata(base_model: Optional[str], tags: Iterable[str], pipeline_tag: Optional[str]) -> str:
    lines = ([f"base_model: {base_model}"] if base_model else []) + ["library_name: peft", "tags:"]
    lines += [f"- {t}" for t in tags] + ([f"pipeline_tag: {pipeline_tag}"] if pipeline_tag else [])
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | os.PathLike, base_model: Optional[str],
                     adapters: Sequence[tuple[str, str, LoraConfig]], tags: Iterable[str] = (),
                     pipeline_tag: Optional[str] = None) -> Path:
    """Write (or merge into) ``folder/README.md``; see the module docstring. Returns the card's path. A README
    that is not UTF-8 text is left alone (with a warning); front matter that is not a YAML mapping is kept as
    it is."""
    path = Path(folder) / CARD_NAME
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else None
    except UnicodeDecodeError:
        warnings.warn(f"{path} is not UTF-8 text; left as it is (no model card written)", stacklevel=3)
        return path
    front, body = None, ""
    if text is not None:
        match = _FRONT_MATTER.match(text)
        front, body = (match.group(1), text[match.end():]) if match else (None, text)
    tags = list(dict.fromkeys(["lora", *tags]))
    metadata = _merged_metadata(front, base_model, tags, pipeline_tag)
    section = card_section(base_model, adapters)
    start, end = body.find(BEGIN), body.find(END)
    if 0 <= start < end:
        body = body[:start] + section + body[end + len(END):]
    elif text is None:
        title = f"# LoRA adapter for {base_model}" if base_model else "# LoRA adapter"
        body = f"\n{title}\n\n{section}\n"
    else:
        body = body.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_text(path, (f"---\n{metadata}---\n" if metadata is not None else "") + body)
    return path
