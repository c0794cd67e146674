"""LoraModel: puts adapted layers into a model and manages its adapters (add, switch, disable, delete, merge).

Every operation that changes the model first checks everything it can, then changes; where a failure can only
show up while changing (a layer that refuses its rank), what was done is rolled back. So an error never leaves a
half-adapted or half-merged model.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .adapter_scales import set_adapter_weights
from .config import LoraConfig
from .exact_merge import Scratch
from .keys import LORA_PREFIX, adapter_key_pattern, check_adapter_names, is_adapter_key
from .layers import LoraLayer, is_linear, lora_layer_for
from .layers.construction import replace_child
from .layers.multihead import check_targets, uncalled_children
from .layers.parameter import direct_parameters, find_or_wrap
from .layers.quantized import dequantize_quantized_layers, warn_requantization
from .mixed_batch import BASE, mixed_batch
from .modules_to_save import ModulesToSaveWrapper
from .targeting import modules_to_save_names, select_parameters, select_targets, unadapted_expert_parameters
from .trainability import DisabledGrads, check_bias_owner, mark_trainable
from .trainable_tokens import TrainableTokensWrapper, inject_tokens
from .walk import base_of, head_names, merged_names, parent_and_child, shared_parameters, walk, walk_modules

__all__ = ["LoraModel"]


def _state_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The ``(name, tensor)`` pairs of ``model.state_dict(keep_vars=True)`` that parameters and persistent buffers
    make, read without calling the modules' ``_save_to_state_dict``: bitsandbytes 4-bit layers rewrite their weight
    there (from the CPU kernel's layout back to the stored one, which changes their outputs), and reading an
    adapter must not touch the base model."""
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, p in module._parameters.items():
            if p is not None:
                yield dot + name, p
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                yield dot + name, b


def _settled_layers(config: LoraConfig, fresh: Sequence[LoraLayer], param_targets: Sequence) -> list[LoraLayer]:
    """The layers the first adapter's injection created that :func:`mark_trainable` need not visit: ``update_layer``
    made their one adapter active and trainable, which is what ``LoraLayer.set_adapter`` would do again. Not so
    with ``inference_mode`` (it freezes them), for a layer with its own ``set_adapter``, or where the later steps
    (target_parameters, trainable tokens) may touch created layers: those are all visited."""
    if config.inference_mode or param_targets or config.trainable_token_indices is not None:
        return []
    return [layer for layer in fresh if type(layer).set_adapter is LoraLayer.set_adapter]


class LoraModel(nn.Module):
    """The user's model (``self.model``) with LoRA layers injected; PEFT's ``LoraModel``."""

    prefix = LORA_PREFIX

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        self.model = model
        self.training = model.training
        self.peft_config: dict[str, LoraConfig] = {}
        self._requires_grad_before: dict[str, bool] = {n: p.requires_grad for n, p in model.named_parameters()}
        self.active_adapters: list[str] = [adapter_name]
        self._disabled_grads = DisabledGrads()  # what trained before the adapters were disabled
        self.inject_adapter(config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    # -- pass-through ---------------------------------------------------------------------------------------------
    def forward(self, *args, adapter_names: Optional[Sequence[str]] = None, **kwargs):
        with mixed_batch(self, adapter_names):
            return self.model(*args, **kwargs)

    def mixed_batch(self, adapter_names: Optional[Sequence[str]], prompts: Optional[int] = None):
        """Context: batch row ``n`` runs adapter ``adapter_names[n]`` (see :mod:`lorakit.mixed_batch`)."""
        return mixed_batch(self, adapter_names, prompts)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not yet set: don't recurse
                raise
            return getattr(self.model, name)

    # -- what is in the model -------------------------------------------------------------------------------------
    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        for name, module in walk(self.model):
            if isinstance(module, LoraLayer):
                yield name, module

    def adapter_modules(self) -> Iterator[nn.Module]:
        """Every adapted layer and modules_to_save wrapper, in model order."""
        for module in walk_modules(self.model):
            if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
                yield module

    @property
    def active_adapter(self) -> str | list[str]:
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    # -- adding adapters --------------------------------------------------------------------------------------------
    def inject_adapter(
        self, config: LoraConfig, adapter_name: str, state_dict: Optional[dict[str, Tensor]] = None,
        autocast_adapter_dtype: bool = True, *, shares_biases_with: Sequence[str] = (),
    ) -> None:
        """Add ``adapter_name`` to every module ``config`` targets; on any error the model is left as it was.

        ``state_dict`` (keys as :meth:`adapter_state` gives them) fills the new adapter's tensors; it must match
        them exactly (no missing or unexpected keys, same shapes), else ``ValueError`` and nothing changes.
        It may also be a callable that gets the adapter's expected tensors ``{key: tensor}`` and returns that dict:
        file formats (lorakit.convert) can only map their keys once the adapter's layers exist.
        ``autocast_adapter_dtype`` (PEFT's): True keeps the factors of half-precision layers in float32; False
        stores them in each base layer's dtype. Only one adapter may train the base model's (shared) biases, as in
        PEFT; ``shares_biases_with`` names adapters whose trained biases this one takes over rather than trains
        anew (``add_weighted_adapter``'s sources).
        """
        if not isinstance(autocast_adapter_dtype, bool):
            raise TypeError(f"autocast_adapter_dtype must be a bool, got {autocast_adapter_dtype!r}")
        if not isinstance(config, LoraConfig):
            raise TypeError(f"expected a lorakit LoraConfig, got {type(config).__name__}")
        _check_new_adapter_name(adapter_name, self.peft_config)
        check_bias_owner(self.peft_config, config, adapter_name, shares_biases_with)
        # One walk over the model: names, and which are linear (for "all-linear"), not entering our own layers.
        named = list(walk(self.model))
        names, linear, kinds = [], [], {}
        for name, module in named:
            names.append(name)
            base = base_of(module)
            kind = lora_layer_for(base) if not isinstance(module, ModulesToSaveWrapper) else None
            kinds[name] = (module, kind)
            if kind is not None and is_linear(base):
                linear.append(name)
        targets = select_targets(config, names, linear, head_names(self.model, config.task_type, named))
        all_linear = str(config.target_modules).lower() == "all-linear"
        targets = check_targets(targets, uncalled_children(named), all_linear)
        unsupported = [t.name for t in targets if kinds[t.name][1] is None]
        if unsupported:
            examples = ", ".join(f"{n} ({type(kinds[n][0]).__name__})" for n in unsupported[:5])
            raise ValueError(
                f"target modules of unsupported type: {examples}. lorakit adapts nn.Linear, nn.Embedding, "
                "nn.Conv1d/2d/3d, nn.MultiheadAttention and transformers' Conv1D; register others with lorakit.register_lora_layer"
            )
        parameters = direct_parameters(named)
        param_targets = select_parameters(config, [n for n, _ in parameters])
        _warn_unreached_experts(unadapted_expert_parameters(config, parameters))
        save_names = modules_to_save_names(config, names)

        created: list[tuple[str, nn.Module]] = []  # (name, original module) of layers wrapped now
        updated: list[nn.Module] = []  # existing LoRA layers / wrappers that got this adapter
        fresh: list[LoraLayer] = []  # the layers created now
        try:
            for t in targets:
                module, kind = kinds[t.name]
                if not isinstance(module, LoraLayer):
                    layer = kind(module)
                    vars(layer)["active_adapters"] = list(self.active_adapters)  # a plain attribute (see _refresh)
                    parent_name, _, child = t.name.rpartition(".")
                    replace_child(kinds[parent_name][0], child, layer)  # "" names the root
                    created.append((t.name, module))
                    fresh.append(layer)
                    module = layer
                else:
                    updated.append(module)
                module.update_layer(  # trainable only if active: the cost does not grow with the adapter count
                    adapter_name, t.r, t.alpha, config.lora_dropout, config.init_lora_weights, config.use_rslora,
                    lora_bias=config.lora_bias, use_dora=config.use_dora,
                )
                if not autocast_adapter_dtype:
                    module.keep_base_dtype(adapter_name)
            for t in param_targets:
                _adapt_parameter(self, t, adapter_name, config, created, updated)
            if config.trainable_token_indices is not None:
                inject_tokens(self.model, config, adapter_name, self.active_adapters, names, created, updated)
            active = adapter_name in self.active_adapters  # the first adapter; later ones start inactive, frozen
            for name in save_names:
                module = self.model.get_submodule(name)
                if isinstance(module, ModulesToSaveWrapper):
                    updated.append(module)
                    module.update(adapter_name, trainable=active)  # the other adapters' copies stay as they are
                else:
                    wrapper = ModulesToSaveWrapper(module, adapter_name)
                    parent, child = parent_and_child(self.model, name)
                    setattr(parent, child, wrapper)
                    created.append((name, module))
                    wrapper.set_adapter([adapter_name] if active else [])
            self.peft_config[adapter_name] = config
            if state_dict is not None:
                self.load_adapter_state(adapter_name, state_dict)
        except Exception:
            self.peft_config.pop(adapter_name, None)
            for module in updated:
                module.delete_adapter(adapter_name)
            for name, original in reversed(created):
                parent, child = parent_and_child(self.model, name)
                layer = getattr(parent, child)
                if isinstance(layer, LoraLayer) and adapter_name in layer.r:
                    layer.delete_adapter(adapter_name)  # gives back a base weight PiSSA/OLoRA rewrote
                setattr(parent, child, original)
            raise
        if adapter_name in self.active_adapters:  # the first adapter: freeze the base, apply the bias choice
            mark_trainable(self, config.inference_mode, settled=_settled_layers(config, fresh, param_targets))

    def adapter_state(self, adapter_name: str) -> dict[str, Tensor]:
        """The tensors that make up one adapter, keyed by their path in ``self.model`` (adapter name included):
        its LoRA factors, its modules_to_save copies, and the biases its ``bias`` setting trains."""
        check_adapter_names([adapter_name], self.peft_config)
        mine = adapter_key_pattern(adapter_name)
        state = {k: v for k, v in _state_tensors(self.model) if mine.search(k)}
        bias = self.peft_config[adapter_name].bias
        if bias == "all":
            state.update({
                n: p for n, p in self.model.named_parameters()
                if n.endswith("bias") and not is_adapter_key(n) and "original_module" not in n
            })
        elif bias == "lora_only":
            for name, layer in self.lora_layers():
                if adapter_name in layer.r and getattr(layer.base_layer, "bias", None) is not None:
                    state[f"{name}.base_layer.bias"] = layer.base_layer.bias
        return {k: v.detach() for k, v in state.items()}

    def load_adapter_state(self, adapter_name: str, state_dict: dict[str, Tensor]) -> None:
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
        mine = adapter_key_pattern(adapter_name)
        backup = {k: own[k].clone() for k in own if not mine.search(k)}
        try:
            with torch.no_grad():
                for key, tensor in own.items():
                    tensor.copy_(state_dict[key])
        except Exception:
            with torch.no_grad():
                for key, value in backup.items():  # biases belong to the base model: put them back
                    own[key].copy_(value)
            raise

    # -- switching ----------------------------------------------------------------------------------------------------
    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False, *,
                    weights: Optional[Sequence[float]] = None) -> None:
        """Activate one adapter (or several, whose updates add up). As in PEFT, the active adapters become
        trainable unless ``inference_mode``, and all others frozen. ``weights`` (one per adapter, lorakit's addition
        with diffusers' meaning) multiplies each one's update until set again; without it scales stay as they are
        (see :mod:`lorakit.adapter_scales`)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        check_adapter_names(names, self.peft_config)
        for module in self.adapter_modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.check_active(names)  # before anything changes
        if weights is not None:
            set_adapter_weights(self, names, weights)
        self.active_adapters = names
        mark_trainable(self, inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn training of the named adapters (active or not) on or off: their LoRA factors and modules_to_save
        copies (PEFT's ``set_requires_grad``)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        check_adapter_names(names, self.peft_config)
        if not isinstance(requires_grad, bool):
            raise TypeError(f"requires_grad must be a bool, got {requires_grad!r}")
        for module in self.adapter_modules():
            module.set_requires_grad(names, requires_grad)

    def _set_adapters_enabled(self, enabled: bool) -> None:
        for module in self.adapter_modules():
            module.enable_adapters(enabled)
        if enabled:
            self._disabled_grads.thaw()
        else:  # PEFT freezes the adapters while they are disabled; lorakit gives back exactly what trained before
            self._disabled_grads.freeze(self.adapter_modules())

    def enable_adapter_layers(self) -> None:
        self._set_adapters_enabled(True)

    def disable_adapter_layers(self) -> None:
        """Run the base model alone until :meth:`enable_adapter_layers`; the adapters do not train meanwhile."""
        self._set_adapters_enabled(False)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the bare base model inside the block, with the adapters frozen; the previous state (merged adapters,
        which adapters trained) comes back after, even when the block raises."""
        merged = self.merged_adapter_names()
        if merged:
            self.unmerge_adapter()
        was_disabled = [(m, m.disable_adapters) for m in self.adapter_modules()]
        was_frozen = self._disabled_grads.active
        self._set_adapters_enabled(False)
        try:
            yield
        finally:
            if not was_frozen:
                self._set_adapters_enabled(True)
            for module, flag in was_disabled:
                module.enable_adapters(not flag)
            if merged:
                self.merge_adapter(merged)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer; if it was active, the remaining active ones (or the first left)
        take over."""
        check_adapter_names([adapter_name], self.peft_config)
        if adapter_name in self.merged_adapter_names():
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge_adapter() before deleting it")
        for module in self.adapter_modules():
            module.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        active = [a for a in self.active_adapters if a != adapter_name]
        if not active and self.peft_config:
            active = [next(iter(self.peft_config))]
            warnings.warn(f"deleted the active adapter {adapter_name!r}; {active[0]!r} is now active", stacklevel=2)
        was_active = adapter_name in self.active_adapters
        self.active_adapters = active
        if was_active:  # PEFT's rule: the adapters that take over train (an inactive one's going changes nothing)
            mark_trainable(self)

    # -- merging --------------------------------------------------------------------------------------------------
    def merged_adapter_names(self) -> list[str]:
        return merged_names(layer for _, layer in self.lora_layers())

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
        check_adapter_names(names, self.peft_config)
        every = list(self.lora_layers())  # one walk for both uses
        merged = set(merged_names(layer for _, layer in every))
        already = [n for n in names if n in merged]
        if already:
            warnings.warn(f"adapter(s) {already} are already merged; merging them again does nothing", stacklevel=2)
            names = [n for n in names if n not in already]
        named = [(n, layer) for n, layer in every if any(a in layer.r for a in names)]
        layers = [layer for _, layer in named]
        for layer in layers:
            layer.check_mergeable()
            layer.check_dora_mergeable(names)
        if safe_merge:
            for layer in layers:
                layer.check_finite_merge([n for n in names if n in layer.r])
        shared = self._shared_weights()
        scratch = Scratch()  # work buffers shared by all layers
        for layer in layers:
            layer.merge(names, own_weight=id(layer.weight) in shared, scratch=scratch,
                        reversible=reversible)
        warn_requantization(named)  # quantized layers round the merged weights: say how much

    def _shared_weights(self) -> set[int]:
        return shared_parameters(self.model)

    def unmerge_adapter(self) -> None:
        """Take every merged adapter back out; the base weights come back bit for bit."""
        scratch = Scratch()  # work buffers shared by all layers
        for _, layer in self.lora_layers():
            layer.unmerge(scratch)

    def _unwrap(self, merge: bool, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        if merge:
            self.merge_adapter(adapter_names, safe_merge=safe_merge, reversible=False)  # the layers go away
        untied, replaced = False, []
        for name, module in list(self.model.named_modules()):
            if any(name.startswith(f"{r}.") for r in replaced):
                continue  # inside a module replaced as a whole (nested wrappers, MultiheadAttention's out_proj)
            if isinstance(module, TrainableTokensWrapper):
                module = module.token_adapter  # the wrapper goes with its layer
            if isinstance(module, LoraLayer):
                replacement = module
                while isinstance(replacement, LoraLayer):  # wrappers nest for several target_parameters
                    if not merge and replacement.merged:
                        replacement.unmerge()
                    if not merge:
                        replacement.restore_base()  # "as it was": a PiSSA/OLoRA residual goes back to the original
                    untied |= replacement.has_private_weight
                    replacement = replacement.unwrapped()
                replaced.append(name)
            elif isinstance(module, ModulesToSaveWrapper):
                replacement = module.unloaded_module
            else:
                continue
            parent, child = parent_and_child(self.model, name)
            setattr(parent, child, replacement)
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad_before.get(n, True))
        model_config = getattr(self.model, "config", None)
        if untied and getattr(model_config, "tie_word_embeddings", False):
            model_config.tie_word_embeddings = False  # the merged weights differ now; don't let a reload re-tie them
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None,
                         dequantize: bool = False) -> nn.Module:
        """Merge the adapters and return the bare base model (original module classes, no trace of lorakit).

        Quantized layers are merged by quantizing ``W + s·B@A`` again (with a :class:`RequantizationWarning` saying
        how much that rounded). ``dequantize=True`` instead returns a float model: every quantized linear layer
        becomes an ``nn.Linear`` holding its dequantized weight plus the exact updates.
        """
        if dequantize:
            check_adapter_names(list(self.active_adapters if adapter_names is None else adapter_names),
                                self.peft_config)
            dequantize_quantized_layers(self.model)
        return self._unwrap(True, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; return the base model as it was before lorakit, except that a
        ``modules_to_save`` module is the active adapter's trained copy (PEFT's choice)."""
        return self._unwrap(False)

    # -- combination (maths in lorakit.combine) ----------------------------------------------------------------------
    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", **kwargs) -> None:
        """A new adapter combining existing ones; see :func:`lorakit.combine.add_weighted_adapter`."""
        from .combine import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, **kwargs)


def _adapt_parameter(lora_model, target, adapter_name: str, config: LoraConfig, created: list, updated: list) -> None:
    """Give the parameter ``target.name`` (``<module>.<parameter>``) the adapter, wrapping its module in a
    ParamWrapper if no earlier adapter did; records what changed in ``created``/``updated`` for rollback."""
    module_name, _, parameter = target.name.rpartition(".")
    if not module_name:
        raise ValueError(f"target_parameters: {parameter!r} is a parameter of the model itself; only parameters "
                         "of its submodules can be adapted")
    holder = lora_model.model.get_submodule(module_name)
    layer, new = find_or_wrap(holder, parameter)
    if new:
        layer.active_adapters = list(lora_model.active_adapters)
        parent, child = parent_and_child(lora_model.model, module_name)
        setattr(parent, child, layer)
        created.append((module_name, holder))
    else:
        updated.append(layer)
    layer.update_layer(adapter_name, target.r, target.alpha, config.lora_dropout, config.init_lora_weights,
                       config.use_rslora, lora_bias=config.lora_bias, use_dora=config.use_dora)


def _check_new_adapter_name(adapter_name, existing) -> None:
    """``ValueError`` unless ``adapter_name`` can name a new adapter: a fresh, non-empty name without '.', not
    reserved (``"__base__"``, lorakit's ``lora_`` prefix, or an ``nn.Module`` attribute such as ``to``)."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name={adapter_name!r} is invalid: expected a non-empty name without '.'")
    if adapter_name in existing:
        raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it first or pick another name")
    if adapter_name == BASE or adapter_name.startswith(LORA_PREFIX) or hasattr(nn.ModuleDict(), adapter_name):
        raise ValueError(
            f"adapter_name={adapter_name!r} is reserved (it is {BASE!r}, starts with {LORA_PREFIX!r}, or is an "
            "nn.Module attribute such as 'double' or 'to'); pick another name"
        )


def _warn_unreached_experts(names: list[str]) -> None:
    """``"all-linear"`` adapts linear layers only: say once which expert stacks it left alone, and how to reach them."""
    if not names:
        return
    entries = sorted({".".join(n.split(".")[-2:]) for n in names})
    warnings.warn(
        f"target_modules='all-linear' adapts nn.Linear layers only; {len(names)} 3-D expert parameter(s) of this model "
        f"get no adapter, e.g. {names[:4]}. To adapt the experts, add target_parameters={entries}",
        UserWarning, stacklevel=4,
    )
