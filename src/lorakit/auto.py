"""PEFT's ``AutoPeftModel*``: load the base model named in an adapter's config, then the adapter, in one call.

``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` reads ``base_model_name_or_path`` (and ``revision``) from
``adapter_config.json``, loads that base with the matching transformers auto class (a local folder, or a Hub id
found in the local cache; set ``HF_HUB_OFFLINE=1`` to never go online), grows its embeddings if the adapter folder
carries a tokenizer with more tokens, and returns the task's PeftModel. ``AutoPeftModel`` (no task type) takes the
class from the config's ``auto_mapping``, importing only from an allowlist of libraries. transformers is imported
only when one of these is called.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from .config import LoraConfig, read_config
from .io import HUB_KWARGS
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    peft_model_class,
)

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForFeatureExtraction",
    "DEFAULT_IMPORT_ALLOWLIST",
]

#: libraries ``AutoPeftModel`` may import the base model class from (PEFT's default list)
DEFAULT_IMPORT_ALLOWLIST = ("diffusers", "lerobot", "megatron-core", "transformers")


class _AutoPeftModel:
    """``from_pretrained`` only, as in PEFT; the subclasses name the transformers auto class and the PeftModel class."""

    target_class: Optional[str] = None  # a transformers auto class, by name
    peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise EnvironmentError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(path)")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[LoraConfig] = None,
        revision: Optional[str] = None,
        import_allowlist: Optional[Sequence[str]] = None,
        **kwargs: Any,
    ) -> PeftModel:
        """The base model named in the adapter's config, with the adapter loaded (see the module docstring).
        ``kwargs`` go to the base model's ``from_pretrained`` (``torch_dtype``, ``device_map``, ...), the Hub's
        among them to the adapter's files too."""
        hub = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
        peft_config = config or read_config(pretrained_model_name_or_path, revision=revision, **hub)
        target = _target_class(cls, peft_config, import_allowlist or DEFAULT_IMPORT_ALLOWLIST)
        if not peft_config.base_model_name_or_path:
            raise ValueError(f"{pretrained_model_name_or_path}: adapter_config.json has no base_model_name_or_path, "
                             "so the base model is unknown; load it yourself and use PeftModel.from_pretrained")
        model_kwargs = {k: v for k, v in kwargs.items() if k != "repo_type"}  # the adapter's repo, not the model's
        base = target.from_pretrained(peft_config.base_model_name_or_path, revision=peft_config.revision,
                                      **model_kwargs)
        _grow_embeddings(base, pretrained_model_name_or_path)
        return cls.peft_class.from_pretrained(base, pretrained_model_name_or_path, adapter_name=adapter_name,
                                              is_trainable=is_trainable, config=config, revision=revision, **hub)


def _target_class(cls, config: LoraConfig, allowlist: Sequence[str]) -> type:
    """The class that loads the base model: the auto class for a task, or ``auto_mapping``'s for ``AutoPeftModel``."""
    task = config.task_type
    if cls.target_class is None and task is not None:
        raise ValueError(f"the adapter has task_type={task!r}: use the task's class (e.g. AutoPeftModelForCausalLM "
                         "for 'CAUSAL_LM'), not AutoPeftModel")
    if task is not None and peft_model_class(task) is not cls.peft_class:
        raise ValueError(f"the adapter has task_type={task!r}, which loads as {peft_model_class(task).__name__}; "
                         f"{cls.__name__} loads {cls.peft_class.__name__}")
    if cls.target_class is not None:
        import transformers

        return getattr(transformers, cls.target_class)
    mapping = config.auto_mapping or {}
    library, name = mapping.get("parent_library"), mapping.get("base_model_class")
    if not library or not name:
        raise ValueError("the adapter has neither task_type nor auto_mapping, so the base model's class is unknown; "
                         "use the task's AutoPeftModelFor... class or load the base yourself")
    if not any(library == a or library.startswith(a + ".") for a in allowlist):
        raise ValueError(f"auto_mapping asks to import {library!r}, which is not in import_allowlist={list(allowlist)}; "
                         f"pass import_allowlist=[{library!r}] if that library is safe to import")
    return getattr(importlib.import_module(library), name)


def _grow_embeddings(base, adapter_path: str | os.PathLike) -> None:
    """PEFT's rule: a tokenizer saved with the adapter (local folder) that has more tokens than the base's
    embeddings grows them, so that saved embedding rows fit."""
    if not (Path(os.fspath(adapter_path)) / "tokenizer_config.json").is_file():
        return
    if not hasattr(base, "get_input_embeddings"):
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_path)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(_AutoPeftModel):
    target_class = None
    peft_class = PeftModel


class AutoPeftModelForCausalLM(_AutoPeftModel):
    target_class = "AutoModelForCausalLM"
    peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_AutoPeftModel):
    target_class = "AutoModelForSeq2SeqLM"
    peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    target_class = "AutoModelForSequenceClassification"
    peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_AutoPeftModel):
    target_class = "AutoModelForTokenClassification"
    peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_AutoPeftModel):
    target_class = "AutoModelForQuestionAnswering"
    peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_AutoPeftModel):
    target_class = "AutoModel"
    peft_class = PeftModelForFeatureExtraction
