"""``lorakit convert SRC DST --to peft|kohya|diffusers [--base PATH]``: one adapter, another file format.

Formats read (found by looking at SRC):

- **peft**: a folder with ``adapter_config.json`` + ``adapter_model.safetensors``; or a folder with one such
  subfolder per pipeline component (``unet/``, ``text_encoder/``, ``text_encoder_2/``), as this command writes a
  several-component adapter;
- **kohya** (sd-scripts, A1111, ComfyUI): a ``.safetensors`` file of ``lora_unet_…`` / ``lora_te…_`` keys, or a
  folder holding only that file. Its underscored module names are resolved against the base model, so it needs
  ``--base``: a diffusers pipeline folder (``model_index.json``) or one component's folder (``config.json``). Only
  the configs are read; the models are built on the meta device, no weights are loaded;
- **diffusers**: ``pytorch_lora_weights.safetensors`` (or a folder holding it) with ``unet.…lora_A.weight`` keys.

Formats written: **peft** (a folder; a subfolder per component when there are several), **kohya** (one
``.safetensors`` file, every module with its ``.alpha``) and **diffusers** (a folder with
``pytorch_lora_weights.safetensors``, each module's scale folded into ``lora_B`` and the config in the metadata, as
:mod:`lorakit.integrations.diffusers_export` writes it). The output is written atomically; one line reports
what was converted.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from lorakit.checkpoint import SAFETENSORS_NAME, read_weights
from lorakit.config import CONFIG_NAME, LoraConfig, config_json, read_config
from lorakit.config_fields import rewrites_base
from lorakit.convert import from_kohya, peft_to_kohya, strip_peft_prefix
from lorakit.convert_kohya import KOHYA_PREFIXES
from lorakit.io import atomic_write_many
from lorakit.keys import PEFT_PREFIX
from lorakit.kohya_file import kohya_file, kohya_metadata, read_safetensors
from lorakit.targeting import pattern_value

from ..integrations.diffusers_export import DIFFUSERS_WEIGHT_NAME

FORMATS = ("peft", "kohya", "diffusers")
COMPONENTS = tuple(KOHYA_PREFIXES)
_DIFFUSERS_METADATA = "lora_adapter_metadata"
_DIFFUSERS_KEY = re.compile(rf"^({'|'.join(COMPONENTS)})\.(.+)\.lora_([AB])\.weight$")


@dataclass
class Part:
    """One pipeline component's adapter: PEFT's config and (prefixed) keys; ``read`` counts the source's keys it
    came from (a kohya file's ``.alpha`` entries included)."""

    component: str
    config: LoraConfig
    state: dict[str, Tensor]
    read: int = 0


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------
def read_source(src: Path, base: Optional[str], component: Optional[str]) -> tuple[str, list[Part]]:
    """``(format, parts)`` of ``src``."""
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    if src.is_dir() and (src / CONFIG_NAME).is_file():
        return "peft", [_peft_part(src, component)]
    if src.is_dir() and any((src / c / CONFIG_NAME).is_file() for c in COMPONENTS):
        return "peft", [_peft_part(src / c, c) for c in COMPONENTS if (src / c / CONFIG_NAME).is_file()]
    kohya = kohya_file(src)
    if kohya is not None:
        if base is None:
            raise ValueError(f"{kohya} is a kohya file: its module names (underscored) are resolved against the base "
                             "model, so pass --base (a diffusers pipeline folder or a UNet / text encoder folder)")
        tensors, _ = read_safetensors(kohya)
        parts = from_kohya(tensors, **load_structure(base), source=str(kohya))
        names = {c: f"{p}_" for c, p in KOHYA_PREFIXES.items()}
        names["text_encoder"] = ("lora_te_", "lora_te1_")
        return "kohya", [Part(c, p.config, p.state_dict, sum(k.startswith(names[c]) for k in tensors))
                         for c, p in parts.items()]
    weights = src / DIFFUSERS_WEIGHT_NAME if src.is_dir() else src
    if weights.is_file() and weights.suffix == ".safetensors":
        return "diffusers", _diffusers_parts(weights)
    raise ValueError(f"{src} is neither a PEFT adapter folder (adapter_config.json), a kohya .safetensors file nor a "
                     f"diffusers {DIFFUSERS_WEIGHT_NAME}")


def _guess_component(state: dict[str, Tensor]) -> str:
    names = strip_peft_prefix(state)
    return "text_encoder" if any(re.search(r"(^|\.)(text_model|encoder\.layers)\.", k) for k in names) else "unet"


def _peft_part(folder: Path, component: Optional[str]) -> Part:
    config = read_config(folder)
    tensors, _ = read_weights(folder)
    return Part(component or _guess_component(tensors), config, tensors)


def _diffusers_parts(path: Path) -> list[Part]:
    tensors, metadata = read_safetensors(path)
    grouped: dict[str, dict[str, Tensor]] = {}
    odd = []
    for key, tensor in tensors.items():
        m = _DIFFUSERS_KEY.match(key)
        if not m:
            odd.append(key)
            continue
        grouped.setdefault(m.group(1), {})[f"{PEFT_PREFIX}{m.group(2)}.lora_{m.group(3)}.weight"] = tensor
    if odd:
        raise ValueError(f"{path}: keys {odd[:5]} are not diffusers' PEFT-style LoRA keys (<component>.<module>."
                         "lora_A.weight / .lora_B.weight)")
    saved = json.loads(metadata.get(_DIFFUSERS_METADATA, "{}"))
    return [Part(c, _diffusers_config(c, state, saved), state) for c, state in grouped.items()]


def _diffusers_config(component: str, state: dict[str, Tensor], saved: dict) -> LoraConfig:
    """The config in the file's metadata; without one, what diffusers assumes: ranks from the shapes, scale 1."""
    fields = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora")
    given = {f: saved[f"{component}.{f}"] for f in fields if f"{component}.{f}" in saved}
    if given:
        return LoraConfig(**given)
    ranks = {k[len(PEFT_PREFIX):-len(".lora_A.weight")]: t.shape[0] for k, t in state.items() if ".lora_A." in k}
    r = Counter(ranks.values()).most_common(1)[0][0]
    others = {re.escape(n): v for n, v in ranks.items() if v != r}
    return LoraConfig(r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=others, alpha_pattern=others)


def load_structure(base: str) -> dict[str, nn.Module]:
    """The pipeline components of ``base`` (a pipeline folder or one component's folder), built from their configs
    on the meta device: their module names, types and shapes, no weights."""
    folder = Path(base)
    if not folder.is_dir():
        raise FileNotFoundError(f"--base {base}: no such folder (expected a diffusers pipeline or model folder)")
    if (folder / "model_index.json").is_file():
        found = {c: _build(folder / c) for c in COMPONENTS if (folder / c / "config.json").is_file()}
        if not found:
            raise ValueError(f"--base {base}: the pipeline has none of {list(COMPONENTS)} with a config.json")
        return found
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--base {base}: no model_index.json or config.json in it")
    model = _build(folder)
    kind = type(model).__name__
    component = "text_encoder_2" if kind == "CLIPTextModelWithProjection" else (
        "text_encoder" if kind.startswith("CLIPText") else "unet")
    return {component: model}


def _build(folder: Path) -> nn.Module:
    data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    with torch.device("meta"):
        if "_class_name" in data:
            import diffusers

            cls = getattr(diffusers, data["_class_name"], None)
            if cls is None:
                raise ValueError(f"{folder}/config.json names {data['_class_name']!r}, not a diffusers model class")
            return cls.from_config(cls.load_config(folder))
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder)
        architecture = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, architecture or "", None)
        return cls(config) if cls is not None else transformers.AutoModel.from_config(config)


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------
def _safetensors(tensors: dict[str, Tensor], metadata: dict[str, str]):
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    return lambda tmp: Path(tmp).write_bytes(data)


def peft_files(parts: list[Part], dst: Path, base: Optional[str]) -> dict:
    files = {}
    for part in parts:
        folder = dst if len(parts) == 1 else dst / part.component
        config = part.config
        if base and not config.base_model_name_or_path:
            config = LoraConfig.from_dict({**config.to_dict(), "base_model_name_or_path": base})
        files[folder / CONFIG_NAME] = lambda tmp, text=config_json(config, inference_mode=True): Path(tmp).write_text(
            text, encoding="utf-8")
        files[folder / SAFETENSORS_NAME] = _safetensors(part.state, {"format": "pt"})
    return files


def kohya_files(parts: list[Part], dst: Path) -> dict:
    if dst.suffix != ".safetensors":
        raise ValueError(f"DST {dst} must be a .safetensors file for --to kohya")
    prefixes = dict(KOHYA_PREFIXES)
    if any(p.component == "text_encoder_2" for p in parts):
        prefixes["text_encoder"] = "lora_te1"
    tensors: dict[str, Tensor] = {}
    for part in parts:
        tensors.update(peft_to_kohya(part.state, part.config, prefixes[part.component], source=part.component))
    return {dst: _safetensors(tensors, kohya_metadata(tensors))}


def diffusers_files(parts: list[Part], dst: Path) -> dict:
    tensors: dict[str, Tensor] = {}
    saved: dict[str, object] = {}
    for part in parts:
        _check_plain(part)
        config, ranks = part.config, {}
        for key, A in strip_peft_prefix(part.state).items():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key[: -len(".lora_A.weight")]
            B, r = part.state[f"{PEFT_PREFIX}{name}.lora_B.weight"], A.shape[0]
            alpha = pattern_value(name, config.alpha_pattern or {}, config.lora_alpha)
            scale = alpha / (math.sqrt(r) if config.use_rslora else r)
            tensors[f"{part.component}.{name}.lora_A.weight"] = A
            tensors[f"{part.component}.{name}.lora_B.weight"] = (B.to(torch.promote_types(B.dtype, torch.float32))
                                                                 * scale).to(B.dtype)
            ranks[name] = r
        r = Counter(ranks.values()).most_common(1)[0][0]
        others = {re.escape(n): v for n, v in ranks.items() if v != r}
        fields = {"r": r, "lora_alpha": r, "target_modules": sorted(ranks), "rank_pattern": others,
                  "alpha_pattern": dict(others)}
        saved.update({f"{part.component}.{k}": v for k, v in fields.items()})
    metadata = {"format": "pt", _DIFFUSERS_METADATA: json.dumps(saved, indent=2, sort_keys=True)}
    return {dst / DIFFUSERS_WEIGHT_NAME: _safetensors(tensors, metadata)}


def _check_plain(part: Part) -> None:
    """Only LoRA factors of Linear/Conv layers travel to diffusers' and kohya's files."""
    other = [k for k in part.state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if other or part.config.modules_to_save or part.config.bias != "none":
        raise ValueError(f"the {part.component} adapter carries {other[:5] or 'modules_to_save or biases'}, which "
                         "diffusers' LoRA files cannot hold")
    if rewrites_base(part.config.init_lora_weights) or part.config.fan_in_fan_out:
        raise ValueError(f"the {part.component} adapter is not a plain LoRA of Linear/Conv layers "
                         f"(init_lora_weights={part.config.init_lora_weights!r}, fan_in_fan_out="
                         f"{part.config.fan_in_fan_out}); diffusers' LoRA files cannot hold it")


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------
def convert(src: str, dst: str, to: str, base: Optional[str] = None, component: Optional[str] = None,
            overwrite: bool = False) -> str:
    """Convert ``src`` into ``dst`` in the format ``to``; returns the one-line report."""
    if to not in FORMATS:
        raise ValueError(f"--to {to!r}: expected one of {list(FORMATS)}")
    if component is not None and component not in COMPONENTS:
        raise ValueError(f"--component {component!r}: expected one of {list(COMPONENTS)}")
    src_path, dst_path = Path(src), Path(dst)
    kind, parts = read_source(src_path, base, component)
    parts.sort(key=lambda part: COMPONENTS.index(part.component))
    files = {"peft": lambda: peft_files(parts, dst_path, base), "kohya": lambda: kohya_files(parts, dst_path),
             "diffusers": lambda: diffusers_files(parts, dst_path)}[to]()
    clobbered = [str(p) for p in files if Path(p).exists()]
    if clobbered and not overwrite:
        raise FileExistsError(f"{clobbered[0]} exists: choose another DST or pass --overwrite")
    for path in files:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_many(files)
    return report(kind, src, to, dst, parts)


def report(kind: str, src: str, to: str, dst: str, parts: list[Part]) -> str:
    ranks, alphas, keys = [], [], 0
    modules = []
    for part in parts:
        config, names = part.config, [k for k in strip_peft_prefix(part.state) if k.endswith(".lora_A.weight")]
        keys += part.read or len(part.state)
        modules.append(f"{part.component} {len(names)} modules")
        for key in names:
            name = key[: -len(".lora_A.weight")]
            ranks.append(part.state[f"{PEFT_PREFIX}{name}.lora_A.weight"].shape[0])
            alphas.append(pattern_value(name, config.alpha_pattern or {}, config.lora_alpha))

    def span(values):
        low, high = min(values), max(values)
        return f"{low:g}" if low == high else f"{low:g}-{high:g}"

    return (f"converted {src} ({kind}) -> {dst} ({to}): {', '.join(modules)}; rank {span(ranks)}, "
            f"alpha {span(alphas)}; {keys} keys mapped")
