"""LoraModel: puts adapted layers into a model and manages its adapters (add, switch, disable, delete, merge).

Every operation that changes the model first checks everything it can, then changes; where a failure can only
show up while changing (a layer that refuses its rank), what was done is rolled back. So an error never leaves a
half-adapted or half-merged model.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections import Counter
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .config import LoraConfig
from .exact_merge import Scratch
from .layers import LoraLayer, RowAdapters, lora_layer_for
from .modules_to_save import ModulesToSaveWrapper
from .targeting import inside_any, list_entry_matches, select_targets


BASE = "__base__"  # in adapter_names: this row runs the base model alone


def activation_checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model recomputes activations in backward (gradient checkpointing)."""
    flag = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5; older ones use the old name
    if flag is None:
        flag = getattr(model, "is_gradient_checkpointing", False)
    return bool(flag)


def _batch_size(args: tuple, kwargs: dict) -> Optional[int]:
    """Rows in the call's main input (input_ids, inputs_embeds, pixel_values, … or the first tensor argument)."""
    for value in (*(kwargs.get(k) for k in ("input_ids", "inputs_embeds", "pixel_values", "sample", "x")), *args):
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` that does not enter lorakit's own layers: their insides (one A, B, dropout per adapter)
    are ours, and skipping them keeps every walk's cost independent of how many adapters exist."""
    seen = set()
    stack = [(prefix, module)]
    while stack:
        name, m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        yield name, m
        if not isinstance(m, (LoraLayer, ModulesToSaveWrapper)):
            children = [(f"{name}.{k}" if name else k, c) for k, c in m._modules.items() if c is not None]
            stack.extend(reversed(children))


def _named_parameters(module: nn.Module, prefix: str) -> Iterable[tuple[str, nn.Parameter]]:
    """``module.named_parameters(prefix)``; a leaf's are read off its table (a base layer, usually: the generators
    behind ``named_parameters`` cost more than the rest of marking a layer trainable)."""
    if module._modules:
        return module.named_parameters(prefix)
    return [(f"{prefix}.{k}", p) for k, p in module._parameters.items() if p is not None]


def _merged_names(layers: Iterable[LoraLayer]) -> list[str]:
    """The adapters merged into any of ``layers``, each once, in the order first met."""
    return list(dict.fromkeys(name for layer in layers for name in layer.merged_adapters))


def _parent_and_child(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def _head_names(model: nn.Module, task_type: Optional[str], named: Sequence[tuple[str, nn.Module]]) -> set[str]:
    """Output heads that "all-linear" must leave alone: the LM head, or a classifier head for SEQ_CLS.

    ``named`` is ``_walk(model)`` (the caller's walk, reused)."""
    heads = []
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads.append(out)
    elif task_type == "SEQ_CLS":
        heads += [getattr(model, n) for n in ("classifier", "score") if isinstance(getattr(model, n, None), nn.Module)]
    return {name for name, m in named for h in heads if m is h or _base_of(m) is h}


class LoraModel(nn.Module):
    """The user's model (``self.model``) with LoRA layers injected; PEFT's ``LoraModel``."""

    prefix = "lora_"

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        self.training = model.training
        self.peft_config: dict[str, LoraConfig] = {}
        self._requires_grad_before: dict[str, bool] = {n: p.requires_grad for n, p in model.named_parameters()}
        self.active_adapters: list[str] = [adapter_name]
        self.inject_adapter(config, adapter_name)

    # -- pass-through ---------------------------------------------------------------------------------------------
    def forward(self, *args, adapter_names: Optional[Sequence[str]] = None, **kwargs):
        with self.mixed_batch(adapter_names, _batch_size(args, kwargs)):
            return self.model(*args, **kwargs)

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: Optional[Sequence[str]], batch_size: Optional[int] = None):
        """Inside the block, batch row ``n`` runs adapter ``adapter_names[n]`` (``"__base__"``: no adapter).

        Every adapted layer adds all rows' updates in one batched computation; modules_to_save run per row
        too. Gradients flow to each row's adapter, so mixed batches also train. ``None`` does nothing.
        """
        if adapter_names is None:
            yield
            return
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise ValueError(f"adapter_names must be a list of adapter names, one per batch row; got {adapter_names!r}")
        if batch_size is not None and len(adapter_names) != batch_size:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {batch_size} rows")
        unique = tuple(dict.fromkeys(n for n in adapter_names if n != BASE))
        unknown = [n for n in unique if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown} in adapter_names; this model has "
                             f"{list(self.peft_config)} (and {BASE!r} for none)")
        modules = list(self._adapter_modules())  # one walk serves the merged check and the assignment
        merged = _merged_names(m for m in modules if isinstance(m, LoraLayer))
        if merged:
            raise ValueError(f"adapter(s) {merged} are merged into the weights; unmerge_adapter() before a mixed batch")
        if torch.is_grad_enabled() and self.model.training and activation_checkpointing(self.model):
            raise ValueError(
                "mixed-adapter batches cannot train with gradient checkpointing: the recomputation in backward "
                "runs after the batch's adapter assignment has ended; disable checkpointing or train per adapter"
            )
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        rows = RowAdapters.from_names(adapter_names, BASE, device)
        for module in modules:
            module._rows = rows
        try:
            yield
        finally:
            for module in modules:
                module._rows = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not yet set: don't recurse
                raise
            return getattr(self.model, name)

    # -- what is in the model -------------------------------------------------------------------------------------
    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        for name, module in _walk(self.model):
            if isinstance(module, LoraLayer):
                yield name, module

    def _adapter_modules(self) -> Iterator[nn.Module]:
        for _, module in _walk(self.model):
            if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
                yield module

    @property
    def active_adapter(self) -> str | list[str]:
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    # -- adding adapters --------------------------------------------------------------------------------------------
    def inject_adapter(
        self, config: LoraConfig, adapter_name: str, state_dict: Optional[dict[str, Tensor]] = None
    ) -> None:
        """Add ``adapter_name`` to every module ``config`` targets; on any error the model is left as it was.

        ``state_dict`` (keys as :meth:`adapter_state` gives them) fills the new adapter's tensors; it must match
        them exactly (no missing or unexpected keys, same shapes), else ``ValueError`` and nothing changes.
        It may also be a callable that gets the adapter's expected tensors ``{key: tensor}`` and returns that dict:
        file formats (lorakit.convert) can only map their keys once the adapter's layers exist.
        """
        if not isinstance(config, LoraConfig):
            raise TypeError(f"expected a lorakit LoraConfig, got {type(config).__name__}")
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name={adapter_name!r} is invalid: expected a non-empty name without '.'")
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it first or pick another name")
        if adapter_name == BASE or adapter_name.startswith(self.prefix) or hasattr(nn.ModuleDict(), adapter_name):
            raise ValueError(
                f"adapter_name={adapter_name!r} is reserved (it is {BASE!r}, starts with {self.prefix!r}, or is an "
                "nn.Module attribute such as 'double' or 'to'); pick another name"
            )

        # One walk over the model: names, and which are linear (for "all-linear"), not entering our own layers.
        named = list(_walk(self.model))
        names, linear, kinds = [], [], {}
        for name, module in named:
            names.append(name)
            base = _base_of(module)
            kind = lora_layer_for(base) if not isinstance(module, ModulesToSaveWrapper) else None
            kinds[name] = (module, kind)
            if kind is not None and (isinstance(base, nn.Linear) or type(base).__name__ == "Conv1D"):
                linear.append(name)
        targets = select_targets(config, names, linear, _head_names(self.model, config.task_type, named))
        unsupported = [t.name for t in targets if kinds[t.name][1] is None]
        if unsupported:
            examples = ", ".join(f"{n} ({type(kinds[n][0]).__name__})" for n in unsupported[:5])
            raise ValueError(
                f"target modules of unsupported type: {examples}. lorakit adapts nn.Linear, nn.Embedding, "
                "nn.Conv1d/2d/3d and transformers' Conv1D; register others with lorakit.register_lora_layer"
            )
        save_names = self._modules_to_save_names(config, names)

        created: list[tuple[str, nn.Module]] = []  # (name, original module) of layers wrapped now
        updated: list[nn.Module] = []  # existing LoRA layers / wrappers that got this adapter
        try:
            for t in targets:
                module, kind = kinds[t.name]
                if not isinstance(module, LoraLayer):
                    layer = kind(module)
                    layer.active_adapters = list(self.active_adapters)
                    parent_name, _, child = t.name.rpartition(".")
                    setattr(kinds[parent_name][0], child, layer)  # "" names the root
                    created.append((t.name, module))
                    module = layer
                else:
                    updated.append(module)
                module.update_layer(  # trainable only if active: the cost does not grow with the adapter count
                    adapter_name, t.r, t.alpha, config.lora_dropout, config.init_lora_weights, config.use_rslora
                )
            for name in save_names:
                module = self.model.get_submodule(name)
                if isinstance(module, ModulesToSaveWrapper):
                    updated.append(module)
                    module.update(adapter_name, trainable=adapter_name in self.active_adapters)
                else:
                    wrapper = ModulesToSaveWrapper(module, adapter_name)
                    parent, child = _parent_and_child(self.model, name)
                    setattr(parent, child, wrapper)
                    created.append((name, module))
                    module = wrapper
                module.set_adapter(self.active_adapters)
            self.peft_config[adapter_name] = config
            if state_dict is not None:
                self._load_adapter_state(adapter_name, state_dict)
        except Exception:
            self.peft_config.pop(adapter_name, None)
            for module in updated:
                module.delete_adapter(adapter_name)
            for name, original in reversed(created):
                parent, child = _parent_and_child(self.model, name)
                setattr(parent, child, original)
            raise
        if adapter_name in self.active_adapters:
            self._mark_trainable()  # the first adapter: freeze the base, apply the bias choice

    _ADAPTER_KEY = r"(?:^|\.)(?:lora_A|lora_B|lora_embedding_A|lora_embedding_B|modules_to_save)\.{}(?:\.|$)"

    def adapter_state(self, adapter_name: str) -> dict[str, Tensor]:
        """The tensors that make up one adapter, keyed by their path in ``self.model`` (adapter name included):
        its LoRA factors, its modules_to_save copies, and the biases its ``bias`` setting trains."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; this model has {list(self.peft_config)}")
        mine = re.compile(self._ADAPTER_KEY.format(re.escape(adapter_name)))
        state = {k: v for k, v in self.model.state_dict(keep_vars=True).items() if mine.search(k)}
        bias = self.peft_config[adapter_name].bias
        if bias == "all":
            state.update({
                n: p for n, p in self.model.named_parameters()
                if n.endswith("bias") and ".modules_to_save." not in n and "original_module" not in n
                and not re.search(r"(?:^|\.)lora_", n)
            })
        elif bias == "lora_only":
            for name, layer in self.lora_layers():
                if adapter_name in layer.r and getattr(layer.base_layer, "bias", None) is not None:
                    state[f"{name}.base_layer.bias"] = layer.base_layer.bias
        return {k: v.detach() for k, v in state.items()}

    def _load_adapter_state(self, adapter_name: str, state_dict: dict[str, Tensor]) -> None:
        """Copy ``state_dict`` into the adapter's tensors after checking every key and shape (nothing is copied
        if anything is off)."""
        own = self.adapter_state(adapter_name)
        if callable(state_dict):
            state_dict = state_dict(own)
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"adapter {adapter_name!r} does not fit this model: "
                + (f"missing keys {missing[:5]}{' …' if len(missing) > 5 else ''}" if missing else "")
                + ("; " if missing and unexpected else "")
                + (f"unexpected keys {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}" if unexpected else "")
            )
        for key, tensor in own.items():
            if tuple(state_dict[key].shape) != tuple(tensor.shape):
                raise ValueError(
                    f"adapter tensor {key!r} has shape {tuple(state_dict[key].shape)}, the model expects "
                    f"{tuple(tensor.shape)}"
                )
        backup = {k: own[k].clone() for k in own if not re.search(self._ADAPTER_KEY.format(re.escape(adapter_name)), k)}
        try:
            with torch.no_grad():
                for key, tensor in own.items():
                    tensor.copy_(state_dict[key])
        except Exception:
            with torch.no_grad():
                for key, value in backup.items():  # biases belong to the base model: put them back
                    own[key].copy_(value)
            raise

    def _modules_to_save_names(self, config: LoraConfig, names: Sequence[str]) -> list[str]:
        """Outermost modules named by ``config.modules_to_save`` (list rule); warns for user entries that match
        nothing (task defaults like "score" are expected to miss)."""
        entries = config.modules_to_save or []
        chosen, used = [], set()
        for name in names:
            hits = [e for e in entries if name and list_entry_matches(name, e)]
            if not hits or inside_any(name.rpartition(".")[0], chosen):
                continue
            used.update(hits)
            chosen.append(name)
        task_defaults = {"classifier", "score", "qa_outputs"} if config.task_type else set()
        missing = [e for e in entries if e not in used and e not in task_defaults]
        if missing:
            warnings.warn(f"modules_to_save entries matched no module and were ignored: {missing}", stacklevel=4)
        return chosen

    def _base_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``self.model.named_parameters()`` less what lorakit added (adapter factors, modules_to_save copies): one
        walk that does not enter lorakit's layers, so its cost does not grow with the number of adapters."""
        for name, module in _walk(self.model):
            if isinstance(module, LoraLayer):
                yield from _named_parameters(module.base_layer, f"{name}.base_layer")
            elif isinstance(module, ModulesToSaveWrapper):
                yield from _named_parameters(module.original_module, f"{name}.original_module")
            else:  # the walk visits its children
                yield from ((f"{name}.{k}" if name else k, p) for k, p in module._parameters.items() if p is not None)

    def _mark_trainable(self) -> None:
        """Only the active adapters (and the bias choice, and modules_to_save copies) train."""
        for name, p in self._base_parameters():
            if self.prefix not in name and ".modules_to_save." not in f".{name}":
                p.requires_grad_(False)
        for module in self._adapter_modules():
            module.set_adapter(self.active_adapters)
        for adapter in self.active_adapters:
            config = self.peft_config[adapter]
            if config.inference_mode:
                for module in self._adapter_modules():
                    for n, p in module.named_parameters():
                        if f".{adapter}." in f".{n}." and "original_module" not in n:
                            p.requires_grad_(False)
            if config.bias == "all":
                for n, p in self.model.named_parameters():
                    if "bias" in n and "original_module" not in n:
                        p.requires_grad_(True)
            elif config.bias == "lora_only":
                for _, layer in self.lora_layers():
                    if adapter in layer.r and getattr(layer.base_layer, "bias", None) is not None:
                        layer.base_layer.bias.requires_grad_(True)

    # -- switching ----------------------------------------------------------------------------------------------------
    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Activate one adapter (or several, whose updates add up); only active adapters train."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(self.peft_config)}")
        self.active_adapters = names
        self._mark_trainable()

    def _set_adapters_enabled(self, enabled: bool) -> None:
        for module in self._adapter_modules():
            module.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        self._set_adapters_enabled(True)

    def disable_adapter_layers(self) -> None:
        self._set_adapters_enabled(False)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the bare base model inside the block; the previous state (merged adapters too) comes back after,
        even when the block raises."""
        merged = self.merged_adapter_names()
        if merged:
            self.unmerge_adapter()
        was_disabled = [(m, m.disable_adapters) for m in self._adapter_modules()]
        self._set_adapters_enabled(False)
        try:
            yield
        finally:
            for module, flag in was_disabled:
                module.enable_adapters(not flag)
            if merged:
                self.merge_adapter(merged)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer; if it was active, the remaining active ones (or the first left)
        take over."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; this model has {list(self.peft_config)}")
        if adapter_name in self.merged_adapter_names():
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge_adapter() before deleting it")
        for module in self._adapter_modules():
            module.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        active = [a for a in self.active_adapters if a != adapter_name]
        if not active and self.peft_config:
            active = [next(iter(self.peft_config))]
            warnings.warn(f"deleted the active adapter {adapter_name!r}; {active[0]!r} is now active", stacklevel=2)
        self.active_adapters = active
        self._mark_trainable()

    # -- merging --------------------------------------------------------------------------------------------------
    def merged_adapter_names(self) -> list[str]:
        return _merged_names(layer for _, layer in self.lora_layers())

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False,
                      reversible: bool = True) -> None:
        """Fold adapters (default: the active ones) into the base weights, exactly reversibly.

        Everything is checked before any weight changes: layers that cannot merge, unknown names, and with
        ``safe_merge`` non-finite results. Merging an adapter that is already merged warns and does nothing.
        Weights shared with another module (tied embeddings) are merged into a private copy, so the other
        module keeps computing what it computed before. ``reversible=False`` gives the same weights several
        times faster but keeps nothing to unmerge with (``merge_and_unload`` uses it).
        """
        names = list(self.active_adapters if adapter_names is None else (
            [adapter_names] if isinstance(adapter_names, str) else adapter_names))
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(self.peft_config)}")
        already = [n for n in names if n in self.merged_adapter_names()]
        if already:
            warnings.warn(f"adapter(s) {already} are already merged; merging them again does nothing", stacklevel=2)
            names = [n for n in names if n not in already]
        layers = [layer for _, layer in self.lora_layers() if any(n in layer.r for n in names)]
        for layer in layers:
            layer.check_mergeable()
        if safe_merge:
            for layer in layers:
                layer.check_finite_merge([n for n in names if n in layer.r])
        shared = self._shared_weights()
        scratch = Scratch()  # work buffers shared by all layers
        for layer in layers:
            layer.merge(names, own_weight=id(layer.base_layer.weight) in shared, scratch=scratch,
                        reversible=reversible)

    def _shared_weights(self) -> set[int]:
        counts = Counter(id(p) for _, p in self.model.named_parameters(remove_duplicate=False))
        return {pid for pid, n in counts.items() if n > 1}

    def unmerge_adapter(self) -> None:
        """Take every merged adapter back out; the base weights come back bit for bit."""
        scratch = Scratch()  # work buffers shared by all layers
        for _, layer in self.lora_layers():
            layer.unmerge(scratch)

    def _unwrap(self, merge: bool, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        if merge:
            self.merge_adapter(adapter_names, safe_merge=safe_merge, reversible=False)  # the layers go away
        untied = False
        for name, module in list(self.model.named_modules()):
            if isinstance(module, LoraLayer):
                if not merge and module.merged:
                    module.unmerge()
                untied |= module._own_weight_of is not None
                replacement = module.base_layer
            elif isinstance(module, ModulesToSaveWrapper):
                replacement = module.active_module if merge else module.original_module
            else:
                continue
            parent, child = _parent_and_child(self.model, name)
            setattr(parent, child, replacement)
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad_before.get(n, True))
        model_config = getattr(self.model, "config", None)
        if untied and getattr(model_config, "tie_word_embeddings", False):
            model_config.tie_word_embeddings = False  # the merged weights differ now; don't let a reload re-tie them
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """Merge the adapters and return the bare base model (original module classes, no trace of lorakit)."""
        return self._unwrap(True, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; return the base model as it was before lorakit."""
        return self._unwrap(False)


    # -- combination (maths in lorakit.combine) ----------------------------------------------------------------------
    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", **kwargs) -> None:
        """A new adapter combining existing ones; see :func:`lorakit.combine.add_weighted_adapter`."""
        from .combine import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, **kwargs)
