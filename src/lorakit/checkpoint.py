"""Saving and loading adapters in PEFT's on-disk format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Saving: every file is staged beside its target and renamed into place only once all of an adapter's files are
fully written (:mod:`lorakit.io`), so a failed save leaves the previous adapter whole. Nothing is pickled unless
``safe_serialization=False`` asks for PEFT's ``adapter_model.bin``.

Loading: the files are read and parsed first (:func:`read_weights`, :func:`lorakit.config.read_config`); then
:class:`FileAdapter` fits the file's tensors onto the adapter's, and every key and shape is checked before any
tensor of the model changes (:meth:`lorakit.LoraModel.inject_adapter`). ``PeftModel.from_pretrained`` and
``load_adapter`` (:mod:`lorakit.peft_model`) drive these steps; this module never imports it. A
failure of any kind leaves the model as it was: ``load_adapter`` removes nothing that was there, and
``from_pretrained`` hands the user's model back unwrapped. A pickled ``.bin`` is read only with
``allow_pickle=True``, because unpickling can run code.

Key names are translated by :mod:`lorakit.convert`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from .convert import from_peft, strip_peft_prefix, to_peft, to_peft_key
from .distributed import gather_full, is_sharded, rank
from .config import CONFIG_NAME, LoraConfig, config_json
from .io import HUB_KWARGS, atomic_write_many, resolve_file
from .keys import PEFT_PREFIX, is_adapter_key
from .pissa import converted_config, converted_state
from .layers import Linear as LoraLinear
from .layers import LoraLayer
from .layers.multihead import doubled_from_file, halved_for_file, out_proj_b_keys
from .version import __version__

SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

#: PEFT's names for embedding layers: targeting one makes ``save_embedding_layers="auto"`` save the base weights
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")

# Keyword arguments of from_pretrained / load_adapter besides the Hub's: ours, and PEFT's. torch_device and
# device_map change nothing here: every adapter tensor is made on its base layer's device, which is where PEFT's
# device_map puts it for a model that is not offloaded.
_LOAD_OPTIONS = {"allow_pickle": False, "low_cpu_mem_usage": None, "torch_device": None, "autocast_adapter_dtype": True,
                 "device_map": None}


# ----------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------
def save_adapters(
    peft_model,
    save_directory: str | os.PathLike,
    selected_adapters: Optional[Sequence[str]] = None,
    safe_serialization: bool = True,
    *,
    save_embedding_layers: bool | str = "auto",
    is_main_process: bool = True,
    state_dict: Optional[Mapping[str, Tensor]] = None,
    path_initial_model_for_weight_conversion: Optional[str | os.PathLike] = None,
    **kwargs: Any,
) -> list[tuple[str, str, LoraConfig]]:
    """Write each selected adapter (default: all) in PEFT's format: ``default`` into ``save_directory``, any
    other adapter into ``save_directory/<name>/``. Returns ``(name, folder relative to save_directory, config)``
    of each adapter this process wrote (none on a process that does not write).

    ``save_embedding_layers`` (PEFT's option): ``"auto"`` also stores the base weights of a targeted embedding
    layer (``embed_tokens``/``lm_head``) or of embeddings whose vocabulary was resized since the base model's
    ``config.json`` (found locally or in the Hub cache; lorakit does not go online to check). ``is_main_process``
    False writes nothing (distributed training). ``state_dict`` (PEFT's option): the model's whole state, keyed as
    ``peft_model.state_dict()``, to take the tensors from instead of the model (what accelerate gathered from an
    FSDP model, say). A model sharded by FSDP2's ``fully_shard`` is gathered here instead: a collective, so every
    rank must call ``save_pretrained``; rank 0 writes (:mod:`lorakit.distributed`).
    ``path_initial_model_for_weight_conversion`` (PEFT's option): write each PiSSA/OLoRA adapter as the equivalent
    plain LoRA of rank ``2r`` for the untouched base model (:mod:`lorakit.pissa`; lorakit keeps the initial factors,
    so that folder is neither read nor written).
    """
    if kwargs:
        raise TypeError(
            f"save_pretrained() got unexpected keyword arguments {sorted(kwargs)}; accepted: selected_adapters, "
            "safe_serialization, save_embedding_layers, is_main_process, state_dict, "
            "path_initial_model_for_weight_conversion"
        )
    if state_dict is not None and not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a dict of tensors keyed as model.state_dict(), got {type(state_dict).__name__}"
        )
    if not isinstance(safe_serialization, bool):
        raise TypeError(f"safe_serialization must be a bool, got {safe_serialization!r}")
    if save_embedding_layers not in ("auto", True, False):
        raise ValueError(f"save_embedding_layers={save_embedding_layers!r} is invalid: expected 'auto', True or False")
    lora_model = peft_model.base_model
    names = _selected_adapters(lora_model, selected_adapters)
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_directory {str(folder)!r} is a file; expected a folder (created if missing)")
    sharded = state_dict is None and is_sharded(peft_model)
    if path_initial_model_for_weight_conversion is not None and (state_dict is not None or sharded):
        raise ValueError("path_initial_model_for_weight_conversion needs the adapter's own tensors: it cannot be "
                         "combined with state_dict= or an FSDP-sharded model")
    if not is_main_process and not sharded:
        return []

    # Everything is gathered before the first byte is written. Keys: as in peft_model.state_dict().
    found = []
    for name in names:
        config = lora_model.peft_config[name]
        state = lora_model.adapter_state(name)
        if path_initial_model_for_weight_conversion is not None:
            state, config = converted_state(lora_model, name, state), converted_config(config)
        tensors = {PEFT_PREFIX + k: v for k, v in state.items()}
        tensors.update(_embedding_tensors(lora_model, config, name, save_embedding_layers))
        found.append((name, config, tensors))
    if sharded:  # every rank is here; the whole tensors land on rank 0
        state_dict = gather_full(peft_model, [k for *_, tensors in found for k in tensors])
        if rank() != 0 or not is_main_process:
            return []
    jobs = []
    for name, config, tensors in found:
        if state_dict is not None:
            tensors = _taken_from(state_dict, tensors)
        tensors = halved_for_file(tensors, out_proj_b_keys(lora_model, name), PEFT_PREFIX)  # PEFT's meaning
        peft_keyed = to_peft(strip_peft_prefix(tensors), name)
        out = folder if name == "default" else folder / name
        jobs.append((out, _for_disk(peft_keyed), _config_json(lora_model, config, name), _layout_note(lora_model, name)))

    for out, tensors, config_text, note in jobs:
        out.mkdir(parents=True, exist_ok=True)
        weights, stale = (SAFETENSORS_NAME, PICKLE_NAME) if safe_serialization else (PICKLE_NAME, SAFETENSORS_NAME)
        atomic_write_many({
            out / weights: _safetensors_writer(tensors, note) if safe_serialization else _pickle_writer(tensors),
            out / CONFIG_NAME: lambda tmp, text=config_text: Path(tmp).write_text(text, encoding="utf-8"),
        })
        # A weights file of the other format would be an older adapter, and loaders prefer safetensors.
        (out / stale).unlink(missing_ok=True)
    return [(name, "." if name == "default" else name, config) for name, config, _ in found]


def adapter_file_tensors(lora_model, adapter_name: str, save_embedding_layers: bool | str = "auto",
                         state_dict: Optional[Mapping[str, Tensor]] = None) -> dict[str, Tensor]:
    """One adapter's tensors keyed as its PEFT file keys them (``base_model.model.`` + PEFT key): what
    ``save_pretrained`` writes for it, and what :func:`lorakit.get_peft_model_state_dict` returns. ``state_dict``
    (keyed as ``PeftModel.state_dict()``): take the values from there (shapes checked)."""
    if save_embedding_layers not in ("auto", True, False):
        raise ValueError(f"save_embedding_layers={save_embedding_layers!r} is invalid: expected 'auto', True or False")
    config = lora_model.peft_config[adapter_name]
    tensors = {PEFT_PREFIX + k: v for k, v in lora_model.adapter_state(adapter_name).items()}
    tensors.update(_embedding_tensors(lora_model, config, adapter_name, save_embedding_layers))
    if state_dict is not None:
        tensors = _taken_from(state_dict, tensors)
    return to_peft(strip_peft_prefix(tensors), adapter_name)


def _taken_from(state_dict: Mapping[str, Tensor], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries of ``state_dict`` named like ``tensors``, each checked for shape."""
    missing = [k for k in tensors if k not in state_dict]
    if missing:
        raise KeyError(f"state_dict lacks {len(missing)} tensor(s) of the adapter, e.g. {missing[:5]}; expected the "
                       "whole model's state keyed as model.state_dict()")
    out = {}
    for key, own in tensors.items():
        given = state_dict[key]
        if not isinstance(given, Tensor) or tuple(given.shape) != tuple(own.shape):
            raise ValueError(f"state_dict[{key!r}] is {_describe(given)}; the model's tensor has shape "
                             f"{tuple(own.shape)}")
        out[key] = given
    return out


def _describe(value: Any) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else f"a {type(value).__name__}"


def _selected_adapters(lora_model, selected: Optional[Sequence[str]]) -> list[str]:
    if selected is None:
        return list(lora_model.peft_config)
    if isinstance(selected, str):
        selected = [selected]
    if not isinstance(selected, (list, tuple)) or not all(isinstance(n, str) for n in selected):
        raise TypeError(f"selected_adapters must be a list of adapter names, got {selected!r}")
    unknown = [n for n in selected if n not in lora_model.peft_config]
    if unknown:
        raise ValueError(
            f"selected_adapters {unknown} are not adapters of this model; it has {list(lora_model.peft_config)}"
        )
    return list(dict.fromkeys(selected))


def _config_json(lora_model, config: LoraConfig, adapter_name: str) -> str:
    """The config as saved: every field, in inference mode, with the GPT-2 flag PEFT would set. (lorakit's version
    goes into the weights file's metadata: PEFT warns about any config field it does not know.)"""
    extra = {"peft_type": "LORA", "inference_mode": True}
    if config.task_type is None:  # PEFT's AutoPeftModel finds the base model's class here
        base = type(lora_model.model)
        extra["auto_mapping"] = {"base_model_class": base.__name__, "parent_library": base.__module__}
    # lorakit detects GPT-2's Conv1D by class; PEFT readers expect the flag in the file.
    if any(isinstance(layer, LoraLinear) and layer.transpose_delta and adapter_name in layer.r
           for _, layer in lora_model.lora_layers()):
        extra["fan_in_fan_out"] = True
    return config_json(config, **extra)


def _for_disk(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous, and no two entries sharing memory (safetensors refuses aliasing; tied embeddings alias)."""
    out, seen = {}, set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in seen:
            tensor = tensor.clone()
        seen.add(storage)
        out[key] = tensor
    return out


#: how the factors of a 3-D (MoE experts) parameter are laid out; PEFT changed this between releases, so files
#: that hold such factors say which layout they use (in the safetensors header, which PEFT ignores)
EXPERT_FACTOR_LAYOUT = ("lora_A (r*E, in): expert e in rows e*r..e*r+r-1; lora_B (out, r*E): expert e in columns "
                        "e, e+E, e+2E, ... (rank-major); weights (E, out, in), or (E, in, out) for is_transposed "
                        "modules; as PEFT 0.21.2")


def _layout_note(lora_model, adapter_name: str) -> dict[str, str]:
    """Extra safetensors metadata for one adapter: the expert factor layout where the adapter has 3-D factors."""
    experts = any(getattr(layer, "num_experts", 1) > 1 and adapter_name in layer.r for _, layer in lora_model.lora_layers())
    return {"lorakit_expert_factor_layout": EXPERT_FACTOR_LAYOUT} if experts else {}


def _safetensors_writer(tensors: dict[str, Tensor], note: Optional[dict[str, str]] = None):
    """Serialise in memory, write with Python: a short write is an ``OSError`` (ENOSPC, EFBIG) like any other, and
    the only temporary file is ours (adapters are small; the bytes are the file's size)."""
    from safetensors.torch import save

    data = save(tensors, metadata={"format": "pt", "lorakit_version": __version__, **(note or {})})
    return lambda tmp: Path(tmp).write_bytes(data)


def _pickle_writer(tensors: dict[str, Tensor]):
    return lambda tmp: torch.save(tensors, tmp)


def _embedding_tensors(lora_model, config: LoraConfig, adapter_name: str, setting) -> dict[str, Tensor]:
    """Base weights of the input/output embeddings, saved as PEFT saves them (``save_embedding_layers``)."""
    model = lora_model.model
    targeted = _embedding_targeted(config, model)
    if setting == "auto":
        setting = targeted or _vocab_resized(model, config)
    if not setting:
        return {}
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not callable(get_in):
        raise ValueError(
            f"save_embedding_layers is on for adapter {adapter_name!r}, but the model has no get_input_embeddings() "
            "to find its embedding layers (a transformers model has); pass save_embedding_layers=False"
        )
    layers = [get_in(), get_out() if callable(get_out) else None]
    module_names = {id(m): n for n, m in model.named_modules()}
    state = model.state_dict(keep_vars=True)
    out: dict[str, Tensor] = {}
    for layer in layers:
        if layer is None or id(layer) not in module_names or (targeted and not isinstance(layer, LoraLayer)):
            continue
        if isinstance(layer, LoraLayer) and layer.merged:
            raise ValueError(
                f"cannot save the embedding weights of {module_names[id(layer)]!r} while adapters are merged into "
                "them (they would be saved with the update in them); call unmerge_adapter() first"
            )
        prefix = module_names[id(layer)] + (".base_layer." if targeted else ".")
        for key, tensor in state.items():
            # adapter tensors of this adapter are in adapter_state already; other adapters' do not belong here
            if key.startswith(prefix) and not is_adapter_key(key[len(prefix):]):
                out[PEFT_PREFIX + key] = tensor
    return out


def _embedding_targeted(config: LoraConfig, model: nn.Module) -> bool:
    """PEFT's rule: an entry of a target list is literally a name in EMBEDDING_LAYER_NAMES, or a target regex
    matches a module whose name ends in one of them."""
    targets = config.target_modules
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return False
        return any(
            re.fullmatch(targets, name)
            for name, _ in model.named_modules()
            if any(re.match(rf"(.*\.)?{e}$", name) for e in EMBEDDING_LAYER_NAMES)
        )
    return any(e in (targets or ()) for e in EMBEDDING_LAYER_NAMES)


def _vocab_resized(model: nn.Module, config: LoraConfig) -> bool:
    """Whether the model's vocab_size differs from its base's ``config.json`` (local folder or Hub cache only)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    source = config.base_model_name_or_path
    if not vocab or not source:
        return False
    path = Path(source) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json", revision=config.revision)
        except Exception:  # not a repo id, or no huggingface_hub: nothing to compare with
            return False
        if not isinstance(cached, str):
            return False
        path = Path(cached)
    try:
        original = json.loads(path.read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return False
    if original is not None and original != vocab:
        warnings.warn(
            f"the vocabulary was resized ({original} -> {vocab}); saving the embedding weights with the adapter",
            stacklevel=4,
        )
        return True
    return False


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def load_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], bool, bool]:
    """``(Hub keyword arguments, allow_pickle, autocast_adapter_dtype)`` of a from_pretrained/load_adapter call."""
    unknown = sorted(set(kwargs) - set(HUB_KWARGS) - set(_LOAD_OPTIONS))
    if unknown:
        raise TypeError(
            f"unexpected keyword arguments {unknown}; accepted: {sorted(_LOAD_OPTIONS)} and the Hub's "
            f"{list(HUB_KWARGS)}"
        )
    flags = {k: kwargs.get(k, _LOAD_OPTIONS[k]) for k in ("allow_pickle", "autocast_adapter_dtype")}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    device_map = kwargs.get("device_map")
    if device_map is not None and not isinstance(device_map, (str, int, dict, torch.device)):
        raise TypeError(f"device_map must be a str, int, torch.device or dict, got {type(device_map).__name__}")
    hub = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
    return hub, flags["allow_pickle"], flags["autocast_adapter_dtype"]


def read_weights(
    model_id, subfolder: Optional[str] = None, revision: Optional[str] = None, allow_pickle: bool = False, **hub: Any
) -> tuple[dict[str, Tensor], str]:
    """The adapter's tensors (PEFT keys) and the file they came from; safetensors, or a pickle if allowed."""
    try:
        path = resolve_file(model_id, SAFETENSORS_NAME, subfolder=subfolder, revision=revision, **hub)
    except FileNotFoundError as no_safetensors:
        local = Path(os.fspath(model_id)).is_dir()
        pickle_path = None
        if local or allow_pickle:  # on the Hub, looking for the pickle means downloading it
            try:
                pickle_path = resolve_file(model_id, PICKLE_NAME, subfolder=subfolder, revision=revision, **hub)
            except FileNotFoundError:
                pass
        if pickle_path is None:
            hint = f" (an adapter stored only as {PICKLE_NAME} needs allow_pickle=True)"
            hint = "" if local or allow_pickle else hint
            raise FileNotFoundError(f"{no_safetensors}{hint}") from None
        if not allow_pickle:
            raise ValueError(
                f"{pickle_path} is a pickle (PEFT's legacy format) and there is no {SAFETENSORS_NAME}; unpickling can "
                "run code from the file, so lorakit reads it only with allow_pickle=True. Only pass that for files "
                "you trust (or re-save the adapter with safe_serialization=True)"
            )
        try:
            tensors = torch.load(pickle_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"{pickle_path} could not be read as a PyTorch weights file (truncated or corrupt?): {e}"
            ) from None
        return _check_tensors(tensors, pickle_path), pickle_path
    from safetensors.torch import load_file

    try:
        tensors = load_file(path, device="cpu")
    except Exception as e:  # SafetensorError, OSError: both mean the file is unusable
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return _check_tensors(tensors, path), path


def _check_tensors(tensors: Any, source: str) -> dict[str, Tensor]:
    if not isinstance(tensors, dict):
        raise ValueError(f"{source} holds a {type(tensors).__name__}; expected a dict of tensors")
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise ValueError(f"{source}: entry {key!r} is not a named tensor")
        # integers too: modules_to_save copies carry buffers such as BatchNorm's num_batches_tracked (int64)
        if not (value.is_floating_point() or value.dtype in (torch.int64, torch.int32)):
            raise ValueError(
                f"{source}: tensor {key!r} has dtype {value.dtype}; adapter tensors are floating point (or integer "
                "buffers)"
            )
    if not tensors:
        raise ValueError(f"{source} holds no tensors")
    return tensors


class LoadResult(NamedTuple):
    """What ``load_adapter`` returns, as PEFT's (torch's ``load_state_dict`` result): lorakit refuses a file with a
    missing or unexpected adapter key instead of loading part of it, so both lists are empty when it returns."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class FileAdapter:
    """Fits one adapter file onto a model: maps its keys onto the adapter's tensors once the adapter's layers
    exist (``__call__``, the callable ``inject_adapter`` takes), checks the rest (base-model tensors PEFT saves,
    e.g. embedding weights) and, after the adapter is in, copies those into the model (:meth:`place`)."""

    def __init__(self, lora_model, adapter_name: str, tensors: dict[str, Tensor], source: str) -> None:
        self.lora_model, self.adapter_name, self.tensors, self.source = lora_model, adapter_name, tensors, source
        self.base: list[tuple[Tensor, Tensor]] = []  # (model tensor, file tensor)

    def __call__(self, own: dict[str, Tensor]) -> dict[str, Tensor]:
        state, rest = from_peft(self.tensors, own, self.adapter_name, self.source)
        for key, tensor in state.items():
            self._check_shape(to_peft_key(key, self.adapter_name), tensor, own[key])
        state = doubled_from_file(state, out_proj_b_keys(self.lora_model, self.adapter_name))  # PEFT's meaning
        self.base = self._base_tensors(rest)
        return state

    def _check_shape(self, peft_key: str, found: Tensor, expected: Tensor) -> None:
        if tuple(found.shape) != tuple(expected.shape):
            raise ValueError(
                f"{self.source}: tensor {PEFT_PREFIX + peft_key!r} has shape {tuple(found.shape)}, the model "
                f"expects {tuple(expected.shape)} (different r, rank_pattern or base model?)"
            )

    def _base_tensors(self, rest: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Model tensors for the file's remaining keys; a key naming nothing in the model is unexpected."""
        model_state = self.lora_model.model.state_dict(keep_vars=True)
        found, unexpected = [], []
        for key, tensor in rest.items():
            parent, _, leaf = key.rpartition(".")
            wrapped = f"{parent}.base_layer.{leaf}" if parent else f"base_layer.{leaf}"
            target = None
            if not is_adapter_key(key):
                target = model_state.get(key, model_state.get(wrapped))
            if target is None:
                unexpected.append(PEFT_PREFIX + key)
                continue
            self._check_shape(key, tensor, target)
            found.append((target, tensor))
        if unexpected:
            raise ValueError(
                f"{self.source} has {len(unexpected)} tensor(s) that fit nothing in this model or adapter config, e.g. "
                f"{unexpected[:5]} (was it saved from a different model or config?)"
            )
        return found

    def place(self) -> None:
        """Copy the base-model tensors in (as PEFT does); all or nothing."""
        done: list[tuple[Tensor, Tensor]] = []
        with torch.no_grad():
            try:
                for target, tensor in self.base:
                    done.append((target, target.detach().clone()))
                    target.copy_(tensor)
            except BaseException:
                for target, old in reversed(done):
                    target.copy_(old)
                raise


def check_same_scaling(current: LoraConfig, saved: LoraConfig, adapter_name: str, source) -> None:
    """Overwriting an adapter's weights keeps its scalings: refuse a file whose settings would give others."""
    fields = ("r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")
    differ = [f for f in fields if getattr(current, f) != getattr(saved, f)]
    if differ:
        raise ValueError(
            f"{source} cannot overwrite adapter {adapter_name!r}: its {differ} differ from the adapter's "
            f"({', '.join(f'{f}={getattr(saved, f)!r} vs {getattr(current, f)!r}' for f in differ)}); "
            "load it under a new adapter_name"
        )
