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

from .checkpoint import FileAdapter, LoadResult, check_same_scaling, load_options, read_weights, save_adapters
from .config import LoraConfig, read_config
from .hub import push_to_hub
from .kohya_file import kohya_file, read_kohya
from .mixed_batch import prompt_count
from .model import LoraModel
from .model_card import write_model_card
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
    #: the model card's ``pipeline_tag`` (PEFT sets it for causal LMs only)
    card_pipeline_tag: Optional[str] = None

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False):
        super().__init__()
        config = prepare_config(model, peft_config, self.task_modules_to_save)
        # asked before injecting: the answer is the same, and transformers' check visits every module
        checkpointing = hasattr(model, "enable_input_require_grads") and activation_checkpointing(model)
        self.base_model = LoraModel(model, config, adapter_name, autocast_adapter_dtype)
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
        model = self.get_base_model()
        prompts = None if adapter_names is None else prompt_count(model, args, kwargs)
        with self.base_model.mixed_batch(adapter_names, prompts):
            return model.generate(*args, **kwargs)

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

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add a new adapter (inactive and frozen until :meth:`set_adapter`). ``autocast_adapter_dtype=False``
        keeps its factors in each base layer's dtype (float16/bfloat16 instead of float32 on half-precision
        layers)."""
        config = prepare_config(self.get_base_model(), peft_config, self.task_modules_to_save)
        self.base_model.inject_adapter(config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False, *,
                    weights: Optional[Sequence[float]] = None) -> None:
        """Activate an adapter (or several); it trains unless ``inference_mode``, all others are frozen (PEFT);
        ``weights``: see :meth:`LoraModel.set_adapter`."""
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode, weights=weights)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn training of the named adapters (active or not) on or off."""
        self.base_model.set_requires_grad(adapter_names, requires_grad)

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """Every adapter's ``modules_to_save`` entries together (``None`` if there are none), as PEFT has it."""
        names = {m for config in self.peft_config.values() for m in (config.modules_to_save or ())}
        return names or None

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
        ``default`` at the top of ``save_directory``, others in a subfolder of their name; and a model card
        (``README.md``, merged into one that is there: :mod:`lorakit.model_card`). PEFT's argument order."""
        saved = save_adapters(self, save_directory, selected_adapters, safe_serialization, **kwargs)
        if saved:
            base = self.get_base_model()
            write_model_card(save_directory, saved[0][2].base_model_name_or_path, saved,
                             tags=getattr(base, "model_tags", None) or (), pipeline_tag=self.card_pipeline_tag)

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Save the adapters (and the model card, merged into the repo's own README) and upload them to the Hub
        repo ``repo_id``, creating it if needed; see :func:`lorakit.hub.push_to_hub` for the options."""
        return push_to_hub(self, repo_id, **kwargs)

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
        the config's ``task_type`` when called on ``PeftModel`` itself, as in PEFT. ``model_id`` may also be a kohya
        (A1111/ComfyUI) ``.safetensors`` file, or a folder holding only one (:mod:`lorakit.kohya_file`). On any
        error ``model`` is handed back untouched (unwrapped, flags restored)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, PeftModel):
            raise TypeError("model is a PeftModel already; use its load_adapter() to add another adapter")
        if not isinstance(is_trainable, bool):
            raise TypeError(f"is_trainable must be a bool, got {is_trainable!r}")
        hub, allow_pickle, autocast = load_options(kwargs)
        kohya = kohya_file(model_id, subfolder)
        if kohya is not None:  # an A1111/ComfyUI file: config and keys from its tensors and the model's names
            config, tensors, source = read_kohya(kohya, model, config)
        elif config is None:
            config = read_config(model_id, subfolder, revision, **hub)
        elif not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a lorakit LoraConfig, got {type(config).__name__}")
        else:
            config = copy.deepcopy(config)
        if kohya is None:
            tensors, source = read_weights(model_id, subfolder, revision, allow_pickle, **hub)
        config.inference_mode = not is_trainable
        if cls is PeftModel:
            cls = peft_model_class(config.task_type)
        peft_model = cls(model, config, adapter_name, autocast)  # on error the model is left as it was
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
    ) -> LoadResult:
        """Add the saved adapter as ``adapter_name`` (not activated), frozen unless ``is_trainable``. If
        ``adapter_name`` exists already, its weights are overwritten in place (PEFT's behaviour, which trainers rely
        on), provided the file's ranks and scalings are the adapter's. Any error leaves the model as it was.
        Returns PEFT's load result (``missing_keys``, ``unexpected_keys``: empty, since a file that does not fit
        is refused)."""
        if not isinstance(is_trainable, bool):
            raise TypeError(f"is_trainable must be a bool, got {is_trainable!r}")
        hub, allow_pickle, autocast = load_options(kwargs)
        lora_model = self.base_model
        kohya = kohya_file(model_id, subfolder)
        if kohya is not None:
            config, tensors, source = read_kohya(kohya, self.get_base_model())
        else:
            config = read_config(model_id, subfolder, revision, **hub)
            tensors, source = read_weights(model_id, subfolder, revision, allow_pickle, **hub)
        if adapter_name in lora_model.peft_config:
            check_same_scaling(lora_model.peft_config[adapter_name], config, adapter_name, source)
            fit = FileAdapter(lora_model, adapter_name, tensors, source)
            lora_model.load_adapter_state(adapter_name, fit)  # checks every key and shape before copying
            fit.place()
            return LoadResult([], [])
        config.inference_mode = not is_trainable
        config = prepare_config(self.get_base_model(), config, self.task_modules_to_save)
        fit = FileAdapter(lora_model, adapter_name, tensors, source)
        lora_model.inject_adapter(config, adapter_name, state_dict=fit, autocast_adapter_dtype=autocast)
        try:
            fit.place()
        except BaseException:
            lora_model.delete_adapter(adapter_name)
            raise
        if is_trainable:  # inactive, and trainable all the same (PEFT 0.21)
            lora_model.set_requires_grad(adapter_name, True)
        else:
            self.eval()
        return LoadResult([], [])


class _NamedInputs(PeftModel):
    """Task models name their inputs in ``forward``, as PEFT's do: the transformers Trainer reads that signature
    to keep dataset columns and find label names. Only the arguments given are passed on."""

    def _call(self, adapter_names, named: dict, kwargs: dict):
        kwargs.update({k: v for k, v in named.items() if v is not None})
        return self.base_model(adapter_names=adapter_names, **kwargs)


class PeftModelForCausalLM(_NamedInputs):
    card_pipeline_tag = "text-generation"

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
    card_pipeline_tag = None


class PeftModelForTokenClassification(PeftModelForCausalLM):
    task_modules_to_save = ("classifier", "score")
    card_pipeline_tag = None


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
    cls = peft_model_class(getattr(peft_config, "task_type", None))
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype)
