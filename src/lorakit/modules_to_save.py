"""Fully trained copies of whole modules (a new classifier head, say), one per adapter.

The original module stays untouched in ``original_module``; each adapter gets its own deep copy in
``modules_to_save[adapter]`` (PEFT's names, so state dicts and saved files line up). Forward runs the active
adapter's copy, or the original when adapters are disabled or the active adapter has no copy. At most one active
adapter may have a copy in one wrapper.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn


class ModulesToSaveWrapper(nn.Module):
    def __init__(self, module_to_save: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.disable_adapters = False
        self._rows = None  # set by lorakit.mixed_batch for one call
        self.update(adapter_name)

    def set_row_adapters(self, rows) -> None:
        """Route batch rows to adapters' copies (a :class:`lorakit.layers.RowAdapters`, or ``None``); a plain
        attribute, written without ``Module.__setattr__``'s checks (see ``LoraLayer.set_row_adapters``)."""
        vars(self)["_rows"] = rows

    def update(self, adapter_name: str, trainable: bool = True) -> None:
        """Give ``adapter_name`` its own copy of the original module (trainable or frozen)."""
        module = copy.deepcopy(self.original_module)
        module.requires_grad_(trainable)
        self.modules_to_save[adapter_name] = module
        self.original_module.requires_grad_(False)

    @property
    def active_module(self) -> nn.Module:
        name = self.active_adapter
        if self.disable_adapters or name is None or name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[name]

    @property
    def unloaded_module(self) -> nn.Module:
        """What stays in the model when lorakit is removed (PEFT's choice, for ``unload`` and ``merge_and_unload``
        alike): the active adapter's trained copy, or the original where no active adapter has one."""
        name = self.active_adapter
        return self.modules_to_save[name] if name in self.modules_to_save else self.original_module

    def check_active(self, adapter_names) -> None:
        """Raise ``ValueError`` if more than one of ``adapter_names`` has a copy here: the module runs one copy,
        and which adapter's would be arbitrary (PEFT raises too)."""
        mine = [n for n in adapter_names if n in self.modules_to_save]
        if len(mine) > 1:
            raise ValueError(
                f"adapters {mine} each have their own trained copy of modules_to_save module "
                f"{type(self.original_module).__name__}, so they cannot be active together; activate one of them "
                "(a mixed batch, adapter_names=[…], can still run each on its own rows)"
            )

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        """Activate the copy of the one adapter in ``adapter_names`` that has one here: it trains unless
        ``inference_mode``; every other copy is frozen (PEFT's rule)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.check_active(names)
        chosen = next((n for n in names if n in self.modules_to_save), None)
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == chosen and not inference_mode)
        self.active_adapter = chosen

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        """Turn training of the named adapters' copies on or off, active or not."""
        for name in adapter_names:
            if name in self.modules_to_save:
                self.modules_to_save[name].requires_grad_(requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        self.disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def forward(self, *args, **kwargs):
        if self._rows is not None:
            if not (args and torch.is_tensor(args[0])):
                raise ValueError(
                    f"a mixed batch (adapter_names=…) needs the input of modules_to_save module "
                    f"{type(self.original_module).__name__} as its first positional argument, to route its rows"
                )
            return self._forward_rows(*args, **kwargs)
        return self.active_module(*args, **kwargs)

    def _forward_rows(self, x, *args, **kwargs):
        """Mixed batch: each group of rows through its adapter's copy (or the original), then back in order; the
        original for every row while adapters are disabled."""
        index = self._rows.for_batch(x.shape[0])
        if self.disable_adapters:
            return self.original_module(x, *args, **kwargs)
        pieces, order = [], []
        for i, name in enumerate((None, *self._rows.names)):
            picked = (index == i).nonzero().squeeze(1)
            if picked.numel():
                module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
                pieces.append(module(x[picked], *args, **kwargs))
                order.append(picked)
        return torch.cat(pieces)[torch.argsort(torch.cat(order))]

    def __getattr__(self, name: str):
        """Attributes of the wrapped module (``weight``, ``out_features``, …) read through to the active copy."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module, name)
