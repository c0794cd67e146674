"""Training a few rows of an embedding (new special tokens) without saving the whole table:
``LoraConfig(trainable_token_indices=...)``, PEFT's layout.

An adapter stores, per listed token, the row that replaces the base row (PEFT's ``trainable_tokens_delta``: the
values, not a difference), so the file grows with ``tokens × dim`` and not with the vocabulary. Modules and keys
are PEFT's: the embedding ``embed_tokens`` becomes a :class:`TrainableTokensWrapper` whose ``token_adapter`` holds
the base layer and a ``trainable_tokens_delta`` table (file key ``<path>.token_adapter.trainable_tokens_delta``).

- ``trainable_token_indices=[…]`` adapts the model's input embedding; ``{name: […]}`` names the layers.
- A layer that shares its weight with the adapted embedding (a tied output head) gets a partner that shares the
  adapter's rows: tied layers stay tied, and the rows are saved once, as PEFT saves them. A linear head keeps its
  bias (PEFT drops it, PEFT issue 3649).
- The forward replaces rows of the looked-up embeddings (columns of a head's logits) instead of building a copy of
  the whole table; merging writes the rows into the weight and keeps the replaced rows, so unmerging is exact.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .exact_merge import Scratch
from .layers import LoraLayer

__all__ = ["TrainableTokensLayer", "TrainableTokensWrapper", "token_targets", "add_token_adapter"]


class TrainableTokensLayer(LoraLayer):
    """An ``nn.Embedding`` or ``nn.Linear`` whose rows ``token_indices[adapter]`` are replaced by trained values;
    PEFT's ``TrainableTokensLayer``. ``tied_to``: share another layer's rows (tied weights)."""

    adapter_layer_names = ("trainable_tokens_delta",)
    combinable = False  # rows of values, not low-rank factors
    scalable = False  # nor scaled (set_scale, weights, rescale_adapter_scale leave it alone)

    def __init__(self, base_layer: nn.Module, tied_to: Optional["TrainableTokensLayer"] = None) -> None:
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise ValueError(f"trainable_token_indices needs an nn.Embedding or nn.Linear, got "
                             f"{type(base_layer).__name__}")
        super().__init__(base_layer)
        if tied_to is None:
            self._modules["trainable_tokens_delta"] = nn.ParameterDict()
        vars(self).update(_tied=[tied_to] if tied_to is not None else [], _own_indices={})

    @property
    def trainable_tokens_delta(self) -> nn.ParameterDict:
        """Per adapter, the trained rows (``len(indices) × dim``); a tied partner reads its owner's."""
        return self._tied[0].trainable_tokens_delta if self._tied else self._modules["trainable_tokens_delta"]

    @property
    def token_indices(self) -> dict[str, list[int]]:
        return self._tied[0].token_indices if self._tied else self._own_indices

    def add_tokens(self, adapter_name: str, indices: Sequence[int], init_weights: bool = True) -> None:
        """Give ``adapter_name`` the rows ``indices``, starting from the base rows (or random, ``init_weights=False``)."""
        weight = self.weight
        rows = weight.shape[0]
        bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < rows]
        if bad or not indices or len(set(indices)) != len(indices):
            raise ValueError(f"trainable_token_indices for adapter {adapter_name!r}: {list(indices)} must be distinct "
                             f"token ids in [0, {rows}) (offending: {bad or 'duplicates or empty'})")
        if not self._tied:
            with torch.no_grad():
                values = weight[list(indices)].clone() if init_weights else torch.randn(
                    len(indices), weight.shape[1], dtype=weight.dtype, device=weight.device)
            self.trainable_tokens_delta[adapter_name] = nn.Parameter(values)
            self._own_indices[adapter_name] = list(indices)
        elif list(self.token_indices.get(adapter_name, ())) != list(indices):
            raise ValueError(f"tied layer for adapter {adapter_name!r} must use its owner's token indices")
        self.lora_dropout[adapter_name] = nn.Identity()
        for table, value in ((self.r, len(indices)), (self.lora_alpha, 0), (self.scaling, 1.0),
                             (self.use_rslora, False), (self.dropout_p, 0.0)):
            table[adapter_name] = value
        self.trainable_tokens_delta[adapter_name].requires_grad_(adapter_name in self.active_adapters)
        self._refresh()

    def factors(self, adapter_name: str):
        raise NotImplementedError(
            "trainable tokens have no low-rank factors: add_weighted_adapter and other factor maths do not apply"
        )

    # -- forward ------------------------------------------------------------------------------------------------------
    def _index(self, adapter_name: str, device) -> Tensor:
        return torch.tensor(self.token_indices[adapter_name], device=device)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        live = self._live
        if len(live) > 1:
            _check_disjoint({n: self.token_indices[n] for n in live})
        if self._rows is not None or type(self.base_layer) in (nn.Embedding, nn.Linear) or not live:
            return super().forward(x, *args, **kwargs)
        # a subclass with its own forward (a scaled embedding): hand it the weight with the rows replaced
        base = self.base_layer
        weight = base._parameters["weight"]
        base._parameters["weight"] = self.merged_weight(live)
        try:
            return base(x, *args, **kwargs)
        finally:
            base._parameters["weight"] = weight

    def merged_weight(self, adapter_names: Sequence[str]) -> Tensor:
        """The weight with the adapters' rows in it (a new tensor; the weight is left alone)."""
        W = self.base_layer.weight
        for name in adapter_names:
            W = W.index_copy(0, self._index(name, W.device), self.trainable_tokens_delta[name].to(W.dtype))
        return W

    def _add_adapter_output(self, out: Tensor, x: Tensor, adapter_name: str) -> Tensor:
        values = self.trainable_tokens_delta[adapter_name]
        index = self._index(adapter_name, out.device)
        if isinstance(self.base_layer, nn.Embedding):  # rows of tokens in the list take the adapter's values
            match = x.unsqueeze(-1) == index
            hit = match.any(-1, keepdim=True)
            picked = F.embedding(match.to(torch.int64).argmax(-1), values).to(out.dtype)
            return torch.where(hit, picked, out)
        bias = self.base_layer.bias  # a head: the listed logits come from the adapter's rows (and keep the bias)
        new = F.linear(x.to(values.dtype), values, None if bias is None else bias[index].to(values.dtype))
        return out.index_copy(-1, index, new.to(out.dtype))

    # -- merging: write the rows, keep the replaced ones --------------------------------------------------------------
    def merge(self, adapter_names=None, safe_merge: bool = False, own_weight: bool = False,
              scratch: Optional[Scratch] = None, reversible: bool = True):
        super().merge(adapter_names, safe_merge, False, scratch, reversible)  # tied partners share the rows on purpose

    def check_finite_merge(self, adapter_names: Sequence[str]) -> None:
        for name in adapter_names:
            if not torch.isfinite(self.trainable_tokens_delta[name]).all():
                raise ValueError(f"merging adapter {name!r} would put non-finite values into the embedding; nothing "
                                 "was merged")

    def _merge_one(self, adapter_name: str, scratch: Scratch, reversible: bool):
        W = self.weight.data
        index = self._index(adapter_name, W.device)
        if self._tied and self._tied[0].weight is self.weight:
            return ()  # the owner writes the shared rows
        replaced = W.index_select(0, index)
        W.index_copy_(0, index, self.trainable_tokens_delta[adapter_name].detach().to(W.dtype))
        return replaced if reversible else None

    def _unmerge_one(self, adapter_name: str, record, scratch: Scratch) -> None:
        if isinstance(record, Tensor):
            W = self.weight.data
            W.index_copy_(0, self._index(adapter_name, W.device), record)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._own_indices.pop(adapter_name, None)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {self.r[n]} tokens" for n in self.adapter_names) + (", tied" if self._tied else "")


class TrainableTokensWrapper(nn.Module):
    """The module put in place of the adapted layer (PEFT's name and layout: its ``token_adapter`` holds the layer)."""

    def __init__(self, token_adapter: TrainableTokensLayer) -> None:
        super().__init__()
        self.token_adapter = token_adapter

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self.token_adapter(x, *args, **kwargs)

    @property
    def weight(self) -> Tensor:
        """The weight as the forward uses it (the active adapters' rows in it), as PEFT's wrapper gives it."""
        layer = self.token_adapter
        return layer.merged_weight(layer._live) if layer._live else layer.base_layer.weight

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("token_adapter", "_modules"):
                raise
            return getattr(self._modules["token_adapter"].base_layer, name)  # num_embeddings, padding_idx, …


def _check_disjoint(indices: dict[str, list[int]]) -> None:
    seen: dict[int, str] = {}
    for name, ids in indices.items():
        for i in ids:
            if i in seen:
                raise ValueError(f"adapters {seen[i]!r} and {name!r} both train token {i}; active token adapters must "
                                 "use disjoint trainable_token_indices")
            seen[i] = name


def token_targets(spec: Union[list, dict, None], input_embedding_name: Optional[str],
                  module_names: Sequence[str]) -> dict[str, list[int]]:
    """``{module name: indices}`` for ``trainable_token_indices``: a list means the input embedding (PEFT falls back
    to a module named ``embed_tokens``); a dict's keys match module names as target_modules' list entries do."""
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        name = input_embedding_name or next((n for n in module_names if n.rpartition(".")[2] == "embed_tokens"), None)
        if name is None:
            raise ValueError("trainable_token_indices is a list, but the model has no input embedding "
                             "(get_input_embeddings) nor an embed_tokens module; pass {module name: indices}")
        return {name: list(spec)}
    out = {}
    for key, indices in spec.items():
        hits = [n for n in module_names if n == key or n.endswith("." + key)]
        if not hits:
            raise ValueError(f"trainable_token_indices names {key!r}, which matches no module of the model")
        out.update({n: list(indices) for n in hits})
    return out


def add_token_adapter(model: nn.Module, name: str, adapter_name: str, indices: list[int], init_weights: bool,
                      active: list[str], tied_to: Optional[TrainableTokensLayer] = None):
    """Give module ``name`` the token adapter (wrapping it if no earlier adapter did). Returns
    ``(layer, original module or None)``: the original when this call wrapped it (for rollback)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    module = getattr(parent, child)
    if isinstance(module, TrainableTokensWrapper):
        layer = module.token_adapter
        layer.add_tokens(adapter_name, indices, init_weights)
        return layer, None
    if isinstance(module, LoraLayer):
        raise ValueError(f"{name} is a LoRA target already; it cannot also take trainable_token_indices")
    layer = TrainableTokensLayer(module, tied_to)
    layer.active_adapters = list(active)
    layer.add_tokens(adapter_name, indices, init_weights)
    setattr(parent, child, TrainableTokensWrapper(layer))
    return layer, module


def inject_tokens(model: nn.Module, config, adapter_name: str, active: list[str], module_names: Sequence[str],
                  created: list, updated: list) -> None:
    """Add ``config.trainable_token_indices`` for ``adapter_name`` to ``model``, and to every layer that shares the
    adapted weight (tied heads). Records wrapped modules in ``created`` (name, original) and layers that got the
    adapter in ``updated``, for the caller's rollback."""
    get_in = getattr(model, "get_input_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    input_name = next((n for n, m in model.named_modules() if embedding is not None and m is embedding), None)
    targets = token_targets(config.trainable_token_indices, input_name, module_names)
    clash = [n for n in targets if any(n == e or n.endswith("." + e) for e in (config.modules_to_save or []))]
    if clash:
        raise ValueError(f"{clash} are in modules_to_save (trained in full) and in trainable_token_indices; "
                         "choose one")
    owners = []
    for name, indices in targets.items():
        if any(o[0] is _weight_of(model.get_submodule(name)) and o[2] == indices for o in owners):
            continue  # a head tied to an embedding listed before, with the same tokens: it follows that one
        layer, original = add_token_adapter(model, name, adapter_name, indices, config.init_lora_weights is not False,
                                            active)
        (created.append((name, original)) if original is not None else updated.append(layer))
        owners.append((layer.weight, layer, indices))
    for weight, owner, indices in owners:
        for name, module in list(model.named_modules()):
            base = module.token_adapter if isinstance(module, TrainableTokensWrapper) else module
            if ".token_adapter" in f".{name}" or base is owner or _weight_of(module) is not weight or isinstance(module, TrainableTokensLayer):
                continue
            if base in (o[1] for o in owners) or (isinstance(base, TrainableTokensLayer) and not base._tied):
                raise ValueError(f"{name} shares its weight with another trainable-tokens layer but has its own "
                                 "trainable_token_indices; tied layers must train the same tokens")
            layer, original = add_token_adapter(model, name, adapter_name, indices, True, active, tied_to=owner)
            (created.append((name, original)) if original is not None else updated.append(layer))


def _weight_of(module: nn.Module) -> Optional[Tensor]:
    if isinstance(module, TrainableTokensWrapper):
        return module.token_adapter.base_layer.weight
    if isinstance(module, LoraLayer):
        return None
    return module._parameters.get("weight")
