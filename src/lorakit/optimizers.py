"""LoRA+ (Hayou et al., 2024): ``B`` learns ``loraplus_lr_ratio`` times faster than ``A``; at PEFT's module path
(``peft.optimizers.create_loraplus_optimizer``) and with PEFT 0.21.2's parameter groups.

Every trainable parameter lands in one of four groups:

- ``A``: LoRA ``A`` factors and other matrices (modules_to_save copies' weights): ``lr``, ``loraplus_weight_decay``;
- embedding: both factors of an adapted ``nn.Embedding`` (PEFT put them in the other groups until its fix for
  issue 3499): ``loraplus_lr_embedding`` (default 1e-6), ``loraplus_weight_decay``;
- ``B``: LoRA ``B`` factors and other vectors outside layer norms that are not biases: ``lr·ratio``,
  ``loraplus_weight_decay``;
- ``B`` without decay: biases and layer-norm vectors: ``lr·ratio``, no weight decay.
"""

from __future__ import annotations

import numbers
from typing import Any

from torch import nn
from torch.optim import Optimizer

from .layers import Embedding

__all__ = ["create_loraplus_optimizer", "loraplus_groups"]

_EIGHT_BIT = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")


def _decay_rule(model: nn.Module):
    """Whether a parameter (by name) gets weight decay: not inside an ``nn.LayerNorm`` and without "bias" in its name
    (transformers' ``get_parameter_names(model, [nn.LayerNorm])`` minus biases, which PEFT uses)."""
    norms = {n for n, m in model.named_modules(remove_duplicate=False) if n and isinstance(m, nn.LayerNorm)}

    def decays(name: str) -> bool:
        parts = name.split(".")
        return "bias" not in name and not any(".".join(parts[:i]) in norms for i in range(1, len(parts)))

    return decays


def loraplus_groups(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """The trainable parameters of ``model`` by LoRA+ group: ``"A"``, ``"embedding"``, ``"B"``, ``"B_no_decay"``."""
    decays = _decay_rule(model)
    groups: dict[str, dict[str, nn.Parameter]] = {"A": {}, "embedding": {}, "B": {}, "B_no_decay": {}}
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        holder = name.rsplit(".", 2)[0] if name.count(".") >= 2 else ""  # the module above the per-adapter dict
        if isinstance(modules.get(holder), Embedding):
            groups["embedding"][name] = param
        elif "lora_B" in name or param.ndim == 1:
            groups["B" if decays(name) else "B_no_decay"][name] = param
        else:
            groups["A"][name] = param
    return groups


def create_loraplus_optimizer(
    model: nn.Module, optimizer_cls: type[Optimizer], *, lr: float, loraplus_lr_ratio: float, **kwargs: Any
) -> Optimizer:
    """An ``optimizer_cls`` over ``model``'s trainable parameters in LoRA+'s groups (see the module docstring).

    ``loraplus_lr_embedding`` (1e-6) and ``loraplus_weight_decay`` (0.0) are read from ``kwargs``; the rest of
    ``kwargs`` goes to ``optimizer_cls``. For bitsandbytes' 8-bit Adam variants, embeddings keep 32-bit state (as
    in PEFT)."""
    for label, value in (("lr", lr), ("loraplus_lr_ratio", loraplus_lr_ratio)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{label}={value!r} is invalid: expected a positive number")
    decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    groups = loraplus_groups(model)
    if not any(groups.values()):
        raise ValueError("the model has no trainable parameters to optimise")
    param_groups = [
        {"params": list(groups["A"].values()), "weight_decay": decay, "lr": lr},
        {"params": list(groups["embedding"].values()), "weight_decay": decay, "lr": lr_embedding},
        {"params": list(groups["B"].values()), "weight_decay": decay, "lr": lr * loraplus_lr_ratio},
        {"params": list(groups["B_no_decay"].values()), "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]
    optimizer = optimizer_cls(param_groups, lr=lr, **kwargs)
    if optimizer_cls.__name__ in _EIGHT_BIT:
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
