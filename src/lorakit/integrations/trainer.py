"""The transformers ``Trainer``, taught that a lorakit model is an adapter model.

transformers recognises adapter models by class (``isinstance(model, peft.PeftModel)``), which a lorakit model is
not, so a stock ``Trainer`` treats one as an arbitrary module: it reads the columns and label names off
``PeftModel.forward(*args, **kwargs)`` (and so drops every input column), writes the whole model's state into
each checkpoint as ``model.safetensors``, and reloads that for ``load_best_model_at_end`` and resuming.

:class:`AdapterTrainerMixin` gives lorakit models the treatment transformers gives PEFT's: columns and labels are
those of the base model's ``forward``, a checkpoint is the adapter in PEFT's format (``save_pretrained``), and
the best checkpoint or a resumed one is loaded back into the model's adapters in place. Put it before the
trainer class: ``class MyTrainer(AdapterTrainerMixin, SFTTrainer)``; :class:`AdapterTrainer` is the plain case.
Models that are not lorakit models are handled by the trainer class as before.
"""

from __future__ import annotations

import inspect
import os
from typing import Optional

import torch
from transformers import Trainer
from transformers.utils import can_return_loss, find_labels

from ..checkpoint import FileAdapter, read_weights
from ..distributed import is_sharded
from ..peft_model import PeftModel

#: the file transformers saves the training arguments in (``transformers.trainer.TRAINING_ARGS_NAME``)
TRAINING_ARGS_NAME = "training_args.bin"


class AdapterTrainerMixin:
    """Checkpoints of a lorakit model are its adapters; see the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self._lorakit_model()
        if model is None:
            return
        base = type(model.get_base_model())
        if self.args.label_names is None:
            self.label_names = find_labels(base)
        self.can_return_loss = can_return_loss(base)
        if self.args.label_smoothing_factor != 0:
            # transformers shifts a causal LM's labels for the smoother by the model's class name, which for a
            # lorakit model is lorakit's, so the loss would compare each token with itself.
            raise ValueError(
                "label_smoothing_factor is not supported with a lorakit model in the Trainer (transformers would not "
                "shift a causal LM's labels); set it to 0, or pass compute_loss_func"
            )

    def _lorakit_model(self) -> Optional[PeftModel]:
        model = self.model
        return model if isinstance(model, PeftModel) else None

    def _set_signature_columns_if_needed(self) -> None:
        model = self._lorakit_model()
        if model is None or self._signature_columns is not None:
            return super()._set_signature_columns_if_needed()
        columns = list(inspect.signature(model.get_base_model().forward).parameters)
        self._signature_columns = columns + ["adapter_names"] + list({"label", "label_ids", *self.label_names})

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """The adapter (PEFT's format), the tokenizer or processor, and the training arguments."""
        model = self._lorakit_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # A sharded model gathers its adapter here: every rank that reaches this takes part, rank 0 writes.
        model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        processor = self.processing_class
        if processor is None:
            processor = getattr(self.data_collator, "tokenizer", None)
        if processor is not None:
            processor.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_best_model(self) -> None:
        model = self._lorakit_model()
        if model is None:
            return super()._load_best_model()
        load_adapter_weights(model, self.state.best_model_checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = self.model if model is None else self.accelerator.unwrap_model(model)
        if not isinstance(target, PeftModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter_weights(target, resume_from_checkpoint)


class AdapterTrainer(AdapterTrainerMixin, Trainer):
    """``transformers.Trainer`` whose checkpoints of a lorakit model are its adapters."""


def load_adapter_weights(peft_model: PeftModel, folder: str | os.PathLike) -> None:
    """Overwrite each adapter of ``peft_model`` with the weights saved in ``folder`` (``default`` at the top, the
    others in subfolders of their names), as ``save_pretrained`` wrote them.

    Unlike ``load_adapter``, which adds a new adapter, this loads into the existing ones (what the Trainer needs
    for ``load_best_model_at_end`` and resuming). Every file is read and checked against the model before any
    tensor changes. The model must not be sharded: load before ``fully_shard``.
    """
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"expected a lorakit PeftModel, got {type(peft_model).__name__}")
    if is_sharded(peft_model):
        raise ValueError(
            "cannot load adapter weights into a sharded (FSDP2) model in place; load them before fully_shard, "
            "e.g. with PeftModel.from_pretrained(base, folder, is_trainable=True)"
        )
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a folder; expected a checkpoint written by save_pretrained")
    lora_model = peft_model.base_model
    fitted = []
    for name in lora_model.peft_config:
        tensors, source = read_weights(folder, subfolder=None if name == "default" else name)
        fit = FileAdapter(lora_model, name, tensors, source)
        fitted.append((name, fit, fit(lora_model.adapter_state(name))))  # maps and checks; changes nothing
    for name, fit, state in fitted:
        lora_model.load_adapter_state(name, state)
        fit.place()
