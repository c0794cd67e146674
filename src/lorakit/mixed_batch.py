"""Mixed-adapter batches: batch row ``n`` runs adapter ``adapter_names[n]`` (``"__base__"``: no adapter).

:func:`mixed_batch` checks the request, then hands every adapted layer and modules_to_save wrapper a
:class:`~lorakit.layers.RowAdapters` for the length of one call; the layers add all rows' updates in one batched
computation (:mod:`lorakit.layers`). Gradients flow to each row's adapter, so mixed batches also train.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import Tensor

from .keys import check_adapter_names
from .layers import LoraLayer, RowAdapters
from .walk import activation_checkpointing, merged_names

__all__ = ["BASE", "prompt_count", "mixed_batch"]

BASE = "__base__"  # in adapter_names: this row runs the base model alone


def prompt_count(model, args: tuple, kwargs: dict) -> int:
    """How many prompts a ``generate`` call gets, read where ``generate`` reads its input: the first positional
    argument (``inputs``), else ``inputs``, the model's ``main_input_name`` or ``inputs_embeds``."""
    keys = ("inputs", getattr(model, "main_input_name", "input_ids"), "input_ids", "inputs_embeds")
    for value in (*args[:1], *(kwargs.get(k) for k in keys)):
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError(
        f"generate(adapter_names=…) needs the prompts as a tensor (the first argument, or one of {list(keys)}) to "
        "check that there is one adapter name per prompt"
    )


@contextlib.contextmanager
def mixed_batch(lora_model, adapter_names: Optional[Sequence[str]], prompts: Optional[int] = None):
    """Inside the block, batch row ``n`` of ``lora_model`` runs adapter ``adapter_names[n]``; ``None`` does
    nothing. Everything that can be is checked before any layer is touched; the layers are reset on exit, even on
    error.

    Every adapted layer checks that the rows it receives match ``adapter_names`` (one name per row), so a list of
    the wrong length raises whatever the input is called. ``prompts`` (``generate``): the number of prompts, which
    must equal the list's length; the layers may then see each prompt repeated (beams, returned sequences)."""
    if adapter_names is None:
        yield
        return
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise ValueError(f"adapter_names must be a list of adapter names, one per batch row; got {adapter_names!r}")
    if prompts is not None and len(adapter_names) != prompts:
        raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {prompts} prompts; "
                         "expected one adapter name per prompt")
    unique = tuple(dict.fromkeys(n for n in adapter_names if n != BASE))
    check_adapter_names(unique, lora_model.peft_config, f"adapter_names ({BASE!r} runs the base model)")
    modules = list(lora_model.adapter_modules())  # one walk serves the merged check and the assignment
    merged = merged_names(m for m in modules if isinstance(m, LoraLayer))
    if merged:
        raise ValueError(f"adapter(s) {merged} are merged into the weights; unmerge_adapter() before a mixed batch")
    model = lora_model.model
    if torch.is_grad_enabled() and model.training and activation_checkpointing(model):
        raise ValueError(
            "mixed-adapter batches cannot train with gradient checkpointing: the recomputation in backward "
            "runs after the batch's adapter assignment has ended; disable checkpointing or train per adapter"
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    rows = RowAdapters.from_names(adapter_names, BASE, device, copies=prompts is not None)
    for module in modules:
        module.set_row_adapters(rows)
    try:
        yield
    finally:
        for module in modules:
            module.set_row_adapters(None)
