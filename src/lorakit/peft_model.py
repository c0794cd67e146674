"""PeftModel: what ``get_peft_model`` returns; PEFT's user-facing wrapper with its names and behaviour.

``PeftModel.base_model`` is the :class:`~lorakit.model.LoraModel` and ``base_model.model`` the user's model, as
in PEFT, so parameter names (``base_model.model.…``), Trainer integration and attribute access line up.
Attributes PeftModel does not have are looked up on the LoraModel, then on the user's model.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Any, Optional, Sequence

from torch import nn

from .checkpoint import FileAdapter, check_same_scaling, load_options, read_weights, save_adapters
from .config import LoraConfig, read_config
from .mixed_batch import batch_size
from .model import LoraModel
from .walk import activation_checkpointing


def prepare_config(model: nn.Module, config: LoraConfig, task_modules_to_save: Sequence[str] = ()) -> LoraConfig:
    """A private copy of the user's config with what lorakit derives from the model filled in: the task's extra
    ``modules_to_save`` and ``base_model_name_or_path``. The user's object is never modified."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"peft_config must be a lorakit LoraConfig, got {type(config).__name__}")
    config = copy.deepcopy(config)
    if task_modules_to_save:
        extra = [m for m in task_modules_to_save if m not in (config.modules_to_save or [])]
        config.modules_to_save = list(config.modules_to_save or []) + extra
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    return config


class PeftModel(nn.Module):
    """A model with LoRA adapters. Build one with :func:`get_peft_model` or :meth:`PeftModel.from_pretrained`."""

    #: modules a task type trains in full besides the adapters (PEFT's choice per task)
    task_modules_to_save: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", **kwargs: Any):
        super().__init__()
        config = prepare_config(model, peft_config, self.task_modules_to_save)
        # asked before injecting: the answer is the same, and transformers' check visits every module
        checkpointing = hasattr(model, "enable_input_require_grads") and activation_checkpointing(model)
        self.base_model = LoraModel(model, config, adapter_name)
        self.training = model.training
        if checkpointing:
            # Reentrant checkpointing gives a block no gradient unless its input needs one; the frozen embeddings'
            # output does not, so the adapters inside would get none (PEFT does the same).
            model.enable_input_require_grads()

    # -- pass-through --------------------------------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any):
        """The base model's forward; ``adapter_names`` (one per batch row, ``"__base__"`` for none) runs a mixed
        batch."""
        return self.base_model(*args, adapter_names=adapter_names, **kwargs)

    def generate(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any):
        """The base model's ``generate``; with ``adapter_names`` each prompt keeps its adapter through every step
        (beams and returned sequences inherit their prompt's adapter)."""
        with self.base_model.mixed_batch(adapter_names, batch_size(args, kwargs)):
            return self.get_base_model().generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":  # during __init__: don't recurse
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    # -- adapters ----------------------------------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return list(self.base_model.active_adapters)

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add a new adapter (inactive until :meth:`set_adapter`)."""
        config = prepare_config(self.get_base_model(), peft_config, self.task_modules_to_save)
        self.base_model.inject_adapter(config, adapter_name)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self):
        """``with model.disable_adapter():`` runs the base model alone; the previous state returns afterwards."""
        with self.base_model.disable_adapter():
            yield

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False,
                      reversible: bool = True) -> None:
        self.base_model.merge_adapter(adapter_names, safe_merge=safe_merge, reversible=reversible)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None,
                         dequantize: bool = False) -> nn.Module:
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names, dequantize=dequantize)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", **kwargs) -> None:
        self.base_model.add_weighted_adapter(adapters, weights, adapter_name, combination_type, **kwargs)

    # -- counting ------------------------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts of the whole adapted model, shared tensors counted once (PEFT's
        numbers: a bitsandbytes 4-bit weight counts the weights it packs, two per byte of storage)."""
        trainable = total = 0
        for p in self.parameters():
            n = p.numel() * 2 * p.element_size() if type(p).__name__ == "Params4bit" else p.numel()
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    # -- persistence (see lorakit.checkpoint) ---------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: Optional[Sequence[str]] = None,
        **kwargs: Any,
    ) -> None:
        """Write each selected adapter (default: all) as PEFT's adapter_config.json + adapter_model.safetensors;
        ``default`` at the top of ``save_directory``, others in a subfolder of their name. PEFT's argument order."""
        save_adapters(self, save_directory, selected_adapters, safe_serialization, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[LoraConfig] = None,
        subfolder: Optional[str] = None,
        revision: Optional[str] = None,
        **kwargs: Any,
    ) -> "PeftModel":
        """Wrap ``model`` with the saved adapter; frozen and in eval mode unless ``is_trainable``. The class follows
        the config's ``task_type`` when called on ``PeftModel`` itself, as in PEFT. On any error ``model`` is handed
        back untouched (unwrapped, flags restored)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, PeftModel):
            raise TypeError("model is a PeftModel already; use its load_adapter() to add another adapter")
        if not isinstance(is_trainable, bool):
            raise TypeError(f"is_trainable must be a bool, got {is_trainable!r}")
        hub, allow_pickle = load_options(kwargs)
        if config is None:
            config = read_config(model_id, subfolder, revision, **hub)
        elif not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a lorakit LoraConfig, got {type(config).__name__}")
        else:
            config = copy.deepcopy(config)
        tensors, source = read_weights(model_id, subfolder, revision, allow_pickle, **hub)
        config.inference_mode = not is_trainable
        if cls is PeftModel:
            cls = peft_model_class(config.task_type)
        peft_model = cls(model, config, adapter_name)  # on error the model is left as it was
        fit = FileAdapter(peft_model.base_model, adapter_name, tensors, source)
        try:
            peft_model.base_model.load_adapter_state(adapter_name, fit)
            fit.place()
        except BaseException:
            peft_model.unload()
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        subfolder: Optional[str] = None,
        revision: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        """Add the saved adapter as ``adapter_name`` (not activated), frozen unless ``is_trainable``. If
        ``adapter_name`` exists already, its weights are overwritten in place (PEFT's behaviour, which trainers rely
        on), provided the file's ranks and scalings are the adapter's. Any error leaves the model as it was."""
        if not isinstance(is_trainable, bool):
            raise TypeError(f"is_trainable must be a bool, got {is_trainable!r}")
        hub, allow_pickle = load_options(kwargs)
        lora_model = self.base_model
        config = read_config(model_id, subfolder, revision, **hub)
        tensors, source = read_weights(model_id, subfolder, revision, allow_pickle, **hub)
        if adapter_name in lora_model.peft_config:
            check_same_scaling(lora_model.peft_config[adapter_name], config, adapter_name, source)
            fit = FileAdapter(lora_model, adapter_name, tensors, source)
            lora_model.load_adapter_state(adapter_name, fit)  # checks every key and shape before copying
            fit.place()
            return
        config.inference_mode = not is_trainable
        config = prepare_config(self.get_base_model(), config, self.task_modules_to_save)
        fit = FileAdapter(lora_model, adapter_name, tensors, source)
        lora_model.inject_adapter(config, adapter_name, state_dict=fit)
        try:
            fit.place()
        except BaseException:
            lora_model.delete_adapter(adapter_name)
            raise
        lora_model.set_adapter(lora_model.active_adapters)
        if not is_trainable:
            self.eval()


class _NamedInputs(PeftModel):
    """Task models name their inputs in ``forward``, as PEFT's do: the transformers Trainer reads that signature
    to keep dataset columns and find label names. Only the arguments given are passed on."""

    def _call(self, adapter_names, named: dict, kwargs: dict):
        kwargs.update({k: v for k, v in named.items() if v is not None})
        return self.base_model(adapter_names=adapter_names, **kwargs)


class PeftModelForCausalLM(_NamedInputs):
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, adapter_names=None, **kwargs):
        return self._call(adapter_names, dict(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict,
        ), kwargs)


class PeftModelForSeq2SeqLM(_NamedInputs):
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, adapter_names=None, **kwargs):
        return self._call(adapter_names, dict(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
            decoder_inputs_embeds=decoder_inputs_embeds, labels=labels, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=return_dict,
        ), kwargs)


class PeftModelForFeatureExtraction(_NamedInputs):
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, adapter_names=None, **kwargs):
        return self._call(adapter_names, dict(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict,
        ), kwargs)


class PeftModelForSequenceClassification(PeftModelForCausalLM):
    task_modules_to_save = ("classifier", "score")


class PeftModelForTokenClassification(PeftModelForCausalLM):
    task_modules_to_save = ("classifier", "score")


class PeftModelForQuestionAnswering(_NamedInputs):
    task_modules_to_save = ("qa_outputs",)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, start_positions=None,
                end_positions=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                adapter_names=None, **kwargs):
        return self._call(adapter_names, dict(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            start_positions=start_positions, end_positions=end_positions, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=return_dict,
        ), kwargs)


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    "CAUSAL_LM": PeftModelForCausalLM,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
    "SEQ_CLS": PeftModelForSequenceClassification,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
}


def peft_model_class(task_type: Optional[str]) -> type[PeftModel]:
    return MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task_type, PeftModel) if task_type else PeftModel


def get_peft_model(
    model: nn.Module,
    peft_config: LoraConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: Optional[str] = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap ``model`` with a LoRA adapter named ``adapter_name``; only the adapter's parameters train.

    The user's config object is not modified (lorakit works on a copy). The returned class follows
    ``peft_config.task_type`` as in PEFT (e.g. SEQ_CLS also trains ``classifier``/``score`` in full).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mixed:
        raise ValueError("mixed=True (PEFT's mixed adapter types) is not supported: lorakit implements LoRA only")
    return peft_model_class(getattr(peft_config, "task_type", None))(model, peft_config, adapter_name)
