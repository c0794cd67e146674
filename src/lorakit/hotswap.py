"""Swapping an adapter's weights in place (PEFT's ``peft.utils.hotswap``): a server replaces the adapter a
(possibly ``torch.compile``-d) model runs without rebuilding anything, so a compiled graph keeps running.

- :func:`hotswap_adapter` reads a saved adapter and writes it over an existing one, same name: its factors are
  copied into the existing tensors (a smaller rank fills the leading rows/columns, the rest is zero), its scaling
  replaces the old one, layers the new adapter does not target get a zero update. What cannot be done in place is
  refused before anything changes, naming why: a file targeting modules the adapter lacks, a rank above the one
  allocated, a merged adapter, differing ``lora_dropout``/``bias``/``modules_to_save``/``fan_in_fan_out``.
- :func:`prepare_model_for_compiled_hotswap` readies a model before ``torch.compile``: ranks are zero-padded to
  ``target_rank`` (the largest rank to be swapped in) and scalings become 0-dim tensors, so adapters of other
  ranks and alphas swap in without a recompile (a Python float in the graph is a constant; a tensor is an input).

After a swap (and after padding) ``peft_config[adapter_name]`` describes the adapter as it now is in the model:
the new file's settings, with ``r``/``rank_pattern`` the allocated ranks and ``lora_alpha``/``alpha_pattern`` the
values giving the new scalings at those ranks; so ``save_pretrained`` writes a file that loads to the same outputs.
The swapped adapter runs at scale 1, as a freshly loaded one does (a weight set before is not carried over).
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections import Counter
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from .checkpoint import load_options, read_weights
from .config import LoraConfig, read_config
from .convert import peft_key_aliases, strip_peft_prefix, to_peft_key
from .keys import check_adapter_names, is_adapter_key
from .layers import Conv, Embedding, Linear, LoraLayer
from .model import LoraModel
from .ops import lora_scaling
from .peft_model import PeftModel
from .targeting import pattern_value

__all__ = ["hotswap_adapter", "hotswap_adapter_from_state_dict", "prepare_model_for_compiled_hotswap"]

#: settings that change an adapter's outputs or training beyond its tensors, ranks and alphas: must be equal
SAME_FIELDS = ("lora_dropout", "bias", "modules_to_save", "fan_in_fan_out")
#: which modules hold the adapter: the model keeps its layers through a swap, so these stay the model's
TARGET_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "target_parameters")


def _lora_model(model: nn.Module) -> LoraModel:
    """The :class:`LoraModel` inside ``model`` (a PeftModel, a LoraModel, or a ``torch.compile`` wrapper of one)."""
    root = getattr(model, "_orig_mod", model)
    if isinstance(root, PeftModel):
        return root.base_model
    if isinstance(root, LoraModel):
        return root
    raise TypeError(f"expected a lorakit PeftModel or LoraModel (or a torch.compile of one), got {type(root).__name__}")


def _check_unmerged(lora_model: LoraModel, adapter_names, action: str) -> None:
    merged = [n for n in lora_model.merged_adapter_names() if n in adapter_names]
    if merged:
        raise ValueError(f"adapter(s) {merged} are merged into the weights; unmerge_adapter() before {action}")


# -- preparing ------------------------------------------------------------------------------------------------------
def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: Optional[int] = None,
    config: Optional[LoraConfig | dict[str, LoraConfig]] = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Pad every adapter to ``target_rank`` (if given) and hold every scaling as a tensor, so that adapters of
    other ranks (up to ``target_rank``) and alphas can be hotswapped into the compiled model without a recompile.
    Call it after loading the first adapter and before ``torch.compile``. The outputs do not change.

    ``config`` (PEFT's argument): configs whose ``r`` and ``rank_pattern`` values become ``target_rank``. The
    model's own ``peft_config`` is always updated to describe the padded adapters. Raises (before any change) for
    an adapter whose rank exceeds ``target_rank``, a merged adapter, or a conv layer that would need padding.
    """
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiled must be 'error', 'warn' or 'ignore', got {check_compiled!r}")
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
        message = "prepare_model_for_compiled_hotswap must be called before compiling the model"
        if check_compiled == "error":
            raise ValueError(message)
        if check_compiled == "warn":
            warnings.warn(f"{message}; the compiled model will recompile", stacklevel=2)
    lora_model = _lora_model(model)
    layers = [(name, layer) for name, layer in lora_model.lora_layers() if layer.r and layer.scalable]
    if not layers:
        raise ValueError("the model holds no LoRA adapter: load the first adapter, then prepare, then compile")
    if target_rank is not None:
        _check_target_rank(lora_model, layers, target_rank)
    for _, layer in layers:
        for adapter in list(layer.r):
            if target_rank is not None and layer.r[adapter] < target_rank:
                _pad(layer, adapter, target_rank)
            if not isinstance(layer.scaling[adapter], Tensor):
                A, _ = layer.factors(adapter)
                layer.scaling[adapter] = torch.tensor(float(layer.scaling[adapter]), dtype=A.dtype, device=A.device)
    for adapter, old in list(lora_model.peft_config.items()):
        lora_model.peft_config[adapter] = describe(old, lora_model, adapter)
    if target_rank is not None and config is not None:
        for cfg in (config.values() if isinstance(config, dict) else [config]):
            cfg.r = target_rank
            cfg.rank_pattern = {k: target_rank for k in (cfg.rank_pattern or {})}


def _check_target_rank(lora_model: LoraModel, layers, target_rank) -> None:
    if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank <= 0:
        raise ValueError(f"target_rank={target_rank!r} is invalid: expected a positive int")
    _check_unmerged(lora_model, lora_model.peft_config, "padding ranks")
    too_big = [(name, a, layer.r[a]) for name, layer in layers for a in layer.r if layer.r[a] > target_rank]
    if too_big:
        raise ValueError(f"target_rank={target_rank} is below the rank of {too_big[:5]} (module, adapter, rank)")
    conv = [name for name, layer in layers if not isinstance(layer, (Linear, Embedding))
            and any(r < target_rank for r in layer.r.values())]
    if conv:
        raise NotImplementedError(
            f"padding the rank of {type(dict(layers)[conv[0]]).__name__} layers ({conv[:5]}) is not implemented (Linear "
            "and Embedding are); pass no target_rank (scalings still become tensors) or keep them out of the adapters"
        )


def _pad(layer: LoraLayer, adapter: str, rank: int) -> None:
    """Zero-pad one adapter of a Linear/Embedding layer to ``rank`` (same output: the new rows/columns are zero),
    keeping its scaling: ``lora_alpha`` is rewritten to give the same scaling at the new rank."""
    A, B = layer.factors(adapter)
    r = A.shape[0]
    with torch.no_grad():
        new_A = A.new_zeros(rank, *A.shape[1:])
        new_A[:r] = A
        new_B = B.new_zeros(B.shape[0], rank, *B.shape[2:])
        new_B[:, :r] = B
    new_A, new_B = nn.Parameter(new_A, A.requires_grad), nn.Parameter(new_B, B.requires_grad)
    if isinstance(layer, Embedding):
        layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter] = new_A, new_B
    else:
        layer.lora_A[adapter].weight, layer.lora_B[adapter].weight = new_A, new_B
        layer.lora_A[adapter].out_features = layer.lora_B[adapter].in_features = rank
    layer.lora_alpha[adapter] = alpha_for(layer.base_scaling(adapter), rank, layer.use_rslora[adapter])
    layer.r[adapter] = rank


def alpha_for(scaling: float, r: int, use_rslora: bool) -> float:
    """The ``lora_alpha`` that gives ``scaling`` at rank ``r``."""
    return scaling * (math.sqrt(r) if use_rslora else r)


def describe(config: LoraConfig, lora_model: LoraModel, adapter: str) -> LoraConfig:
    """A copy of ``config`` whose ranks and alphas are the ones the model holds for ``adapter``: the most common
    as ``r``/``lora_alpha``, the others in ``rank_pattern``/``alpha_pattern`` (exact module names)."""
    ranks, alphas = {}, {}
    for name, layer in lora_model.lora_layers():
        if adapter in layer.r and layer.scalable:  # trainable tokens have no rank or alpha of a config
            ranks[name], alphas[name] = layer.r[adapter], layer.lora_alpha[adapter]
    out = copy.deepcopy(config)
    if not ranks:
        return out
    out.r = Counter(ranks.values()).most_common(1)[0][0]
    out.lora_alpha = Counter(alphas.values()).most_common(1)[0][0]
    out.rank_pattern = {re.escape(n): r for n, r in ranks.items() if r != out.r}
    out.alpha_pattern = {re.escape(n): a for n, a in alphas.items() if a != out.lora_alpha}
    return out


# -- swapping -------------------------------------------------------------------------------------------------------
def hotswap_adapter(model: nn.Module, model_name_or_path, adapter_name: str, torch_device: Optional[str] = None,
                    **kwargs: Any) -> None:
    """Replace adapter ``adapter_name`` of ``model`` (a PeftModel, or ``torch.compile`` of one) by the adapter
    saved at ``model_name_or_path`` (a folder or a Hub id), in place; outputs then equal those of a fresh load.
    ``torch_device`` is accepted for PEFT's signature: the tensors go where the adapter's are. ``subfolder``,
    ``revision`` and the Hub's keywords are passed on. Refused swaps raise and leave the model as it was."""
    subfolder, revision = kwargs.pop("subfolder", None), kwargs.pop("revision", None)
    hub, allow_pickle, _ = load_options(kwargs)  # autocast: the tensors go into the existing ones, their dtype
    config = read_config(model_name_or_path, subfolder, revision, **hub)
    tensors, source = read_weights(model_name_or_path, subfolder, revision, allow_pickle, **hub)
    hotswap_adapter_from_state_dict(model, tensors, adapter_name, config, source=str(source))


def hotswap_adapter_from_state_dict(model: nn.Module, state_dict: dict[str, Tensor], adapter_name: str,
                                    config: LoraConfig, source: str = "state_dict") -> None:
    """:func:`hotswap_adapter` from tensors with PEFT's keys (as in ``adapter_model.safetensors``) and their
    config."""
    lora_model = _lora_model(model)
    check_adapter_names([adapter_name], lora_model.peft_config)
    _check_unmerged(lora_model, [adapter_name], "hotswapping it")
    old = lora_model.peft_config[adapter_name]
    differ = [f for f in SAME_FIELDS if getattr(old, f) != getattr(config, f)]
    if differ:
        raise ValueError(
            f"{source} cannot be hotswapped into adapter {adapter_name!r}: its {differ} differ "
            f"({', '.join(f'{f}={getattr(config, f)!r} vs {getattr(old, f)!r}' for f in differ)}); load it with "
            "load_adapter under a new name instead"
        )
    if isinstance(config.init_lora_weights, str) and config.init_lora_weights != "gaussian":
        raise ValueError(f"{source} is a {config.init_lora_weights!r} adapter (it rewrites the base weights); it "
                         "cannot be hotswapped")
    tokens = [n for n, layer in lora_model.lora_layers() if not layer.scalable and adapter_name in layer.r]
    if tokens:
        raise ValueError(f"adapter {adapter_name!r} holds trainable tokens ({tokens[:3]}); it cannot be hotswapped")
    rewritten = [n for n, layer in lora_model.lora_layers()
                 if layer.base_rewrite is not None and layer.base_rewrite.adapter_name == adapter_name]
    if rewritten:
        raise ValueError(f"adapter {adapter_name!r} rewrote base weights (PiSSA/OLoRA) in {rewritten[:3]}; it cannot "
                         "be hotswapped (convert it to plain LoRA first)")
    plans, other = _plan(lora_model, adapter_name, config, state_dict, source)
    with torch.no_grad():
        for layer, new_A, new_B, scaling, alpha in plans:
            A, B = layer.factors(adapter_name)
            A.zero_()
            B.zero_()
            if new_A is not None:
                r = new_A.shape[0]
                A[:r].copy_(new_A)
                B[:, :r].copy_(new_B)
                alloc = layer.r[adapter_name]
                layer.use_rslora[adapter_name] = config.use_rslora
                layer.lora_alpha[adapter_name] = alpha if r == alloc else alpha_for(scaling, alloc, config.use_rslora)
                layer.set_scaling(adapter_name, scaling)
        for target, tensor in other:
            target.copy_(tensor)
    described = copy.deepcopy(config)
    for f in TARGET_FIELDS + ("inference_mode",):
        setattr(described, f, copy.deepcopy(getattr(old, f)))
    lora_model.peft_config[adapter_name] = describe(described, lora_model, adapter_name)


def _plan(lora_model: LoraModel, adapter_name: str, config: LoraConfig, state_dict, source: str):
    """Check the whole swap and say what to write: ``[(layer, new A or None, new B, scaling)]`` for every layer
    holding the adapter, and ``[(model tensor, file tensor)]`` for the rest (modules_to_save copies, biases)."""
    peft = strip_peft_prefix(state_dict, source)
    own = lora_model.adapter_state(adapter_name)
    found: dict[str, Tensor] = {}
    for key in own:
        names = [n for n in peft_key_aliases(key, adapter_name) if n in peft]
        if names:
            found[key] = peft[names[0]]
    used = {n for key in found for n in peft_key_aliases(key, adapter_name)}
    base = _base_tensors(lora_model, {k: v for k, v in peft.items() if k not in used}, source)
    unexpected = sorted(k for k in peft if k not in used and k not in base)
    if unexpected:
        raise ValueError(
            f"{source} holds tensors for modules adapter {adapter_name!r} does not have, e.g. {unexpected[:5]}: "
            "a hotswap cannot add layers (new targets); load it with load_adapter under a new name instead"
        )
    plans, factor_keys = [], set()
    for name, layer in lora_model.lora_layers():
        if adapter_name not in layer.r:
            continue
        if not isinstance(layer, (Linear, Embedding, Conv)):
            raise NotImplementedError(f"hotswapping into a {type(layer).__name__} layer ({name!r}) is not implemented "
                                      "(Linear, Embedding and Conv layers are); load the adapter with load_adapter")
        keys = _factor_keys(name, layer, adapter_name)
        factor_keys.update(keys)
        plans.append(_layer_plan(name, layer, adapter_name, config, [found.get(k) for k in keys], source))
    other = []
    for key, tensor in own.items():
        if key in factor_keys:
            continue
        if key not in found:
            raise ValueError(f"{source} lacks {to_peft_key(key, adapter_name)!r}, which adapter {adapter_name!r} "
                             "holds (a modules_to_save copy or a trained bias); it cannot be hotswapped")
        if tuple(found[key].shape) != tuple(tensor.shape):
            raise ValueError(f"{source}: {to_peft_key(key, adapter_name)!r} has shape {tuple(found[key].shape)}, "
                             f"the model expects {tuple(tensor.shape)}")
        other.append((tensor, found[key]))
    return plans, other + list(base.values())


def _base_tensors(lora_model: LoraModel, rest: dict[str, Tensor], source: str) -> dict[str, tuple[Tensor, Tensor]]:
    """The file's base-model tensors (PEFT saves embedding weights with an adapter that targets them) that name a
    tensor of the model: ``{file key: (model tensor, file tensor)}``; a fresh load copies them in, so a swap does."""
    rest = {k: v for k, v in rest.items() if not is_adapter_key(k)}
    if not rest:
        return {}
    model_state = lora_model.model.state_dict(keep_vars=True)
    out = {}
    for key, tensor in rest.items():
        parent, _, leaf = key.rpartition(".")
        target = model_state.get(key, model_state.get(f"{parent}.base_layer.{leaf}" if parent else f"base_layer.{leaf}"))
        if target is not None:
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"{source}: {key!r} has shape {tuple(tensor.shape)}, the model's is "
                                 f"{tuple(target.shape)}")
            out[key] = (target.detach(), tensor)
    return out


def _factor_keys(name: str, layer: LoraLayer, adapter_name: str) -> list[str]:
    """The model's state-dict keys of the layer's ``A`` and ``B`` for ``adapter_name``."""
    A, B = layer.factors(adapter_name)
    keys = {id(p): f"{name}.{n}" if name else n for n, p in layer.named_parameters()}
    return [keys[id(A)], keys[id(B)]]


def _layer_plan(name: str, layer: LoraLayer, adapter_name: str, config: LoraConfig, new, source: str):
    new_A, new_B = new
    if new_A is None and new_B is None:
        return layer, None, None, None, None  # not targeted by the new adapter: its update becomes zero
    if new_A is None or new_B is None:
        raise ValueError(f"{source} holds only one of lora_A/lora_B for module {name!r}")
    A, B = layer.factors(adapter_name)
    r = new_A.shape[0]
    if not isinstance(layer, (Linear, Embedding)):
        fits = new_A.shape == A.shape and new_B.shape == B.shape  # no padding for conv factors (grouped B)
    else:
        fits = new_A.dim() == 2 and new_B.dim() == 2 and new_A.shape[1] == A.shape[1] and new_B.shape == (B.shape[0], r)
    if not fits:
        raise ValueError(
            f"{source}: module {name!r} gets lora_A {tuple(new_A.shape)} / lora_B {tuple(new_B.shape)}, which do not "
            f"fit the adapter's {tuple(A.shape)} / {tuple(B.shape)} in place (a {type(layer).__name__} layer"
            + (" swaps only tensors of its own shape)" if not isinstance(layer, (Linear, Embedding)) else ")")
        )
    if r > A.shape[0]:
        raise ValueError(
            f"{source}: module {name!r} has rank {r}, above the {A.shape[0]} allocated for adapter {adapter_name!r}; "
            f"call prepare_model_for_compiled_hotswap(model, target_rank={r} or more) before compiling"
        )
    declared = pattern_value(name, config.rank_pattern, config.r)
    if declared != r:
        raise ValueError(f"{source}: module {name!r} has rank {r} but its config says {declared}")
    alpha = pattern_value(name, config.alpha_pattern, config.lora_alpha)
    return layer, new_A, new_B, lora_scaling(alpha, r, config.use_rslora), alpha
