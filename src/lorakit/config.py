"""LoraConfig: the fields, defaults and meaning of PEFT's LoRA config, validated when it is built.

Validation happens once, at construction, so that a bad value fails where the user typed it and not deep inside
injection. The config is never mutated by lorakit after that: anything derived from the model (the expanded
"all-linear" target list, the GPT-2 ``fan_in_fan_out`` flag, a task's extra ``modules_to_save``) lives on a copy
or on the layers themselves.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from .config_fields import (
    check_file_fields,
    check_init_lora_weights,
    check_unknown_fields,
    check_unsupported_fields,
)

CONFIG_NAME = "adapter_config.json"

# Task types PEFT knows; lorakit gives the listed ones their PEFT behaviour and passes the rest through.
TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)


class TaskType(str, enum.Enum):
    """PEFT's task type names; members compare equal to their strings (``TaskType.CAUSAL_LM == "CAUSAL_LM"``)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


_BIAS_CHOICES = ("none", "all", "lora_only")


def _bad(field_name: str, value: Any, allowed: str, kind: type = ValueError) -> Exception:
    return kind(f"LoraConfig.{field_name}={value!r} is invalid: expected {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_names(field_name: str, value: Any, *, allow_str: bool) -> Any:
    """Module-name selectors are a regex string or a collection of names; sets become sorted lists."""
    if value is None:
        return None
    if isinstance(value, str):
        if not allow_str:
            raise _bad(field_name, value, "a list of module names", TypeError)
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        if not all(isinstance(v, str) for v in value):
            raise _bad(field_name, value, "module names as strings", TypeError)
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise _bad(field_name, value, "a str (regex) or a list of module names", TypeError)


def _check_pattern_dict(field_name: str, value: Any, check) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(field_name, value, "a dict {pattern: value}", TypeError)
    for key, v in value.items():
        if not isinstance(key, str):
            raise _bad(field_name, value, "string patterns as keys", TypeError)
        check(f"{field_name}[{key!r}]", v)
    return dict(value)


def _check_token_indices(value: Any) -> Any:
    """``trainable_token_indices``: a list of token ids (the input embedding) or ``{module name: [ids]}``."""
    if value is None:
        return None
    lists = value.values() if isinstance(value, dict) else [value]
    if not all(isinstance(v, (list, tuple)) and v and all(_is_int(i) and i >= 0 for i in v) for v in lists) or (
            isinstance(value, dict) and not all(isinstance(k, str) for k in value)):
        raise _bad("trainable_token_indices", value, "a non-empty list of token ids, or {module name: [token ids]}",
                   TypeError)
    return {k: [int(i) for i in v] for k, v in value.items()} if isinstance(value, dict) else [int(i) for i in value]


def _check_rank(field_name: str, value: Any) -> None:
    if not _is_int(value):
        raise _bad(field_name, value, "a positive int", TypeError)
    if value <= 0:
        raise _bad(field_name, value, "a positive int")


def _check_alpha(field_name: str, value: Any) -> None:
    if not _is_number(value):
        raise _bad(field_name, value, "a real number", TypeError)


class PeftConfig:
    """PEFT's base config class. lorakit implements LoRA only, so ``PeftConfig.from_pretrained`` reads an
    ``adapter_config.json`` as a :class:`LoraConfig` (any other ``peft_type`` is refused), and
    ``isinstance(config, PeftConfig)`` holds for every LoraConfig."""

    is_prompt_learning = False
    is_adaption_prompt = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: Optional[str] = None,
                        **kwargs: Any) -> "LoraConfig":
        """The config in ``adapter_config.json`` of a folder (or a Hub repo id, through huggingface_hub)."""
        return read_config(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike) -> dict[str, Any]:
        """The JSON object in ``path_json_file`` as a dict (PEFT's method of the same name)."""
        with open(path_json_file, encoding="utf-8") as f:
            return json.load(f)


@dataclass
class LoraConfig(PeftConfig):
    """Configuration of one LoRA adapter; PEFT's field names, defaults and meanings (see SPEC.md)."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: Optional[list[str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: Optional[dict] = field(default_factory=dict)
    alpha_pattern: Optional[dict] = field(default_factory=dict)
    init_lora_weights: Union[bool, str] = True
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    task_type: Optional[str] = None
    inference_mode: bool = False
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    peft_type: str = "LORA"
    # PEFT 0.21.2's other fields, same names and defaults; lorakit.config_fields says which values are refused.
    megatron_config: Optional[dict] = None
    megatron_core: Optional[str] = "megatron.core"
    trainable_token_indices: Optional[Union[list[int], dict]] = None
    loftq_config: Union[dict, Any] = field(default_factory=dict)
    eva_config: Optional[dict] = None
    corda_config: Optional[dict] = None
    lora_ga_config: Optional[dict] = None
    use_dora: bool = False
    velora_config: Optional[dict] = None
    alora_invocation_tokens: Optional[list[int]] = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Optional[dict] = None
    layer_replication: Optional[list[tuple[int, int]]] = None
    runtime_config: Optional[dict] = field(default_factory=lambda: {"ephemeral_gpu_offload": False})
    lora_bias: bool = False
    target_parameters: Optional[list[str]] = None
    use_bdlora: Optional[dict] = None
    arrow_config: Optional[dict] = None
    kasa_config: Optional[dict] = None
    ensure_weight_tying: bool = False
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        _check_alpha("lora_alpha", self.lora_alpha)
        if not _is_number(self.lora_dropout):
            raise _bad("lora_dropout", self.lora_dropout, "a float in [0, 1)", TypeError)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise _bad("lora_dropout", self.lora_dropout, "a float in [0, 1)")
        if self.bias not in _BIAS_CHOICES:
            raise _bad("bias", self.bias, f"one of {_BIAS_CHOICES}")
        check_init_lora_weights(self.init_lora_weights)
        for name in ("fan_in_fan_out", "use_rslora", "inference_mode", "lora_bias"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "a bool", TypeError)
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise _bad("lora_bias", self.lora_bias, f"False with init_lora_weights={self.init_lora_weights!r} "
                       "(PEFT allows lora_bias=True only with init_lora_weights True or False)")
        if self.peft_type != "LORA":
            raise _bad("peft_type", self.peft_type, "'LORA' (lorakit implements LoRA only)")
        if self.task_type is not None:
            task = getattr(self.task_type, "value", self.task_type)  # PEFT's or our TaskType enum, or a str
            if task not in TASK_TYPES:
                raise _bad("task_type", self.task_type, f"None or one of {TASK_TYPES}")
            self.task_type = str(task)

        for name, value in list(vars(self).items()):  # PEFT's sub-config objects (LoftQConfig, ...) as their JSON dicts
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                setattr(self, name, dataclasses.asdict(value))
        check_unsupported_fields(vars(self))

        self.target_modules = _check_names("target_modules", self.target_modules, allow_str=True)
        self.exclude_modules = _check_names("exclude_modules", self.exclude_modules, allow_str=True)
        self.modules_to_save = _check_names("modules_to_save", self.modules_to_save, allow_str=False)
        self.target_parameters = _check_names("target_parameters", self.target_parameters, allow_str=False)
        self.trainable_token_indices = _check_token_indices(self.trainable_token_indices)
        self.rank_pattern = _check_pattern_dict("rank_pattern", self.rank_pattern, _check_rank)
        self.alpha_pattern = _check_pattern_dict("alpha_pattern", self.alpha_pattern, _check_alpha)

        layers = self.layers_to_transform
        if layers is not None:
            if _is_int(layers):
                if layers < 0:
                    raise _bad("layers_to_transform", layers, "a non-negative int or a list of them")
            elif isinstance(layers, (list, tuple)) and all(_is_int(i) for i in layers):
                if any(i < 0 for i in layers):
                    raise _bad("layers_to_transform", layers, "non-negative layer indices")
                self.layers_to_transform = list(layers)
            else:
                raise _bad("layers_to_transform", layers, "a non-negative int or a list of them", TypeError)
        if self.layers_pattern is not None:
            if not (isinstance(self.layers_pattern, str) or (
                isinstance(self.layers_pattern, (list, tuple)) and all(isinstance(p, str) for p in self.layers_pattern)
            )):
                raise _bad("layers_pattern", self.layers_pattern, "a str or a list of str", TypeError)
            if isinstance(self.layers_pattern, tuple):
                self.layers_pattern = list(self.layers_pattern)
            if self.layers_to_transform is None:
                raise ValueError(
                    f"LoraConfig.layers_pattern={self.layers_pattern!r} needs layers_to_transform: the pattern only "
                    "names the layer list whose indices layers_to_transform selects"
                )
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ValueError(
                f"LoraConfig.layers_to_transform={self.layers_to_transform!r} needs a list target_modules, got the "
                f"regex {self.target_modules!r}: put the layer indices into the regex instead"
            )

    # -- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """All fields, JSON-ready, in PEFT's adapter_config.json shape."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out.pop("runtime_config")  # describes a run, not the adapter: PEFT leaves it out of the file too
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Build from an adapter_config.json dict. Every field of PEFT 0.21.2 is known; a value lorakit cannot honour
        is refused naming the field (:mod:`lorakit.config_fields`), never dropped. Fields from a newer PEFT pass
        only when empty (``None``, ``False``, ``{}``); file metadata (versions) is kept or dropped quietly."""
        data = dict(data)
        peft_type = data.pop("peft_type", "LORA")
        if peft_type not in ("LORA", None):
            raise ValueError(f"adapter config has peft_type={peft_type!r}; lorakit loads only 'LORA' adapters")
        known = {f.name for f in dataclasses.fields(cls)}
        check_unknown_fields({k: v for k, v in data.items() if k not in known})
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, save_directory: str | os.PathLike, **extra: Any) -> None:
        """Write ``adapter_config.json`` atomically into ``save_directory`` (created if missing)."""
        from .io import atomic_write_text

        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), config_json(self, **extra))


def config_json(config: LoraConfig, **extra: Any) -> str:
    """The text of ``adapter_config.json``: every field of ``config``, then ``extra`` (file-level facts such as
    ``peft_type``). The one writer of the file's content."""
    data = config.to_dict()
    data.update(extra)
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def read_config(model_id, subfolder: Optional[str] = None, revision: Optional[str] = None, **hub: Any) -> LoraConfig:
    """An adapter's ``adapter_config.json`` (a local folder, or a Hub repo id through huggingface_hub) as a
    LoraConfig; bad JSON or invalid values raise naming the file. The one reader of the file."""
    from .io import resolve_file

    path = resolve_file(model_id, CONFIG_NAME, subfolder=subfolder, revision=revision, **hub)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    try:
        check_file_fields(data, written_by_lorakit=_written_by_lorakit(path, data))
        return LoraConfig.from_dict(data)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{path}: {e}") from None


def _written_by_lorakit(config_path: str | os.PathLike, data: dict[str, Any]) -> bool:
    """Whether lorakit wrote this adapter: its version is in the weights file's metadata beside the config (older
    lorakit files had it in the config itself)."""
    from .io import written_by_lorakit

    weights = os.path.join(os.path.dirname(os.fspath(config_path)), "adapter_model.safetensors")
    return "lorakit_version" in data or written_by_lorakit(weights)
