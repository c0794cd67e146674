"""Reading the user's model: walks that do not enter lorakit's own layers, parents of a module, output heads.

Every walk here skips the insides of adapted layers and modules_to_save wrappers (one A, B, dropout or copy per
adapter: ours), so its cost does not grow with the number of adapters.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence

from torch import nn

from .layers import LoraLayer
from .modules_to_save import ModulesToSaveWrapper

__all__ = [
    "walk",
    "walk_modules",
    "leaf_parameters",
    "parent_and_child",
    "base_of",
    "head_names",
    "merged_names",
    "shared_parameters",
    "activation_checkpointing",
]


def walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` that does not enter lorakit's own layers (except to reach an adapted layer nested in
    another: several ``target_parameters`` of one module)."""
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
        elif isinstance(m, LoraLayer) and isinstance(m._modules["base_layer"], LoraLayer):
            stack.append((f"{name}.base_layer", m._modules["base_layer"]))  # nested wrappers (target_parameters)


def walk_modules(module: nn.Module) -> Iterator[nn.Module]:
    """:func:`walk` without the names (building a dotted name per module costs more than the rest of the walk:
    a mixed batch walks the model at every call)."""
    seen = set()
    stack = [module]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        yield m
        if not isinstance(m, (LoraLayer, ModulesToSaveWrapper)):
            stack.extend(reversed([c for c in m._modules.values() if c is not None]))
        elif isinstance(m, LoraLayer) and isinstance(m._modules["base_layer"], LoraLayer):
            stack.append(m._modules["base_layer"])  # nested wrappers (target_parameters)


def leaf_parameters(module: nn.Module, prefix: str) -> Iterable[tuple[str, nn.Parameter]]:
    """``module.named_parameters(prefix)``; a leaf's are read off its table (a base layer, usually: the generators
    behind ``named_parameters`` cost more than the rest of marking a layer trainable)."""
    if module._modules:
        return module.named_parameters(prefix)
    return [(f"{prefix}.{k}", p) for k, p in module._parameters.items() if p is not None]


def merged_names(layers: Iterable[LoraLayer]) -> list[str]:
    """The adapters merged into any of ``layers``, each once, in the order first met."""
    return list(dict.fromkeys(name for layer in layers for name in layer.merged_adapters))


def shared_parameters(module: nn.Module) -> set[int]:
    """The ``id`` of every parameter that ``module`` holds more than once (tied weights), as counting
    ``named_parameters(remove_duplicate=False)`` finds them, by a plain walk over ``_modules`` and ``_parameters``
    (the named generators cost more than the merge of a small model's layers). Inside an adapted layer only the
    base layer is visited: this is for finding shared base weights, and the factors are lorakit's own."""
    seen: set[int] = set()
    shared: set[int] = set()
    stack = [module]
    while stack:
        m = stack.pop()
        for p in m._parameters.values():
            if p is not None:
                (shared if id(p) in seen else seen).add(id(p))
        if isinstance(m, LoraLayer):
            stack.append(m._modules["base_layer"])
        else:
            stack.extend(c for c in m._modules.values() if c is not None)
    return shared


def parent_and_child(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding ``name`` and the attribute it is held under."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def base_of(module: nn.Module) -> nn.Module:
    """The user's layer inside an adapted layer (the module itself otherwise)."""
    return module.base_layer if isinstance(module, LoraLayer) else module


def head_names(model: nn.Module, task_type: Optional[str], named: Sequence[tuple[str, nn.Module]]) -> set[str]:
    """Output heads that "all-linear" must leave alone: the LM head, or a classifier head for SEQ_CLS.

    ``named`` is ``walk(model)`` (the caller's walk, reused)."""
    heads = []
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads.append(out)
    elif task_type == "SEQ_CLS":
        heads += [getattr(model, n) for n in ("classifier", "score") if isinstance(getattr(model, n, None), nn.Module)]
    inside = {id(x) for h in heads for x in h.modules()}  # a head wrapped by lorakit (trainable tokens) and its parts
    return {name for name, m in named if id(m) in inside or id(base_of(m)) in inside}


def activation_checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model recomputes activations in backward (gradient checkpointing)."""
    flag = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5; older ones use the old name
    if flag is None:
        flag = getattr(model, "is_gradient_checkpointing", False)
    return bool(flag)
