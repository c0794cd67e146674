"""``nn.MultiheadAttention`` (torchvision ViT, OpenCLIP): LoRA on the packed ``in_proj_weight`` and on
``out_proj``, PEFT's ``lora.MultiheadAttention`` (same modules, keys and outputs).

``nn.MultiheadAttention`` holds its input projection as a bare ``(3·E) × E`` parameter and reads
``out_proj.weight``/``out_proj.bias`` itself: ``out_proj``'s ``forward`` is never called. So an adapter on
``out_proj`` alone would be silently unused; lorakit refuses such a target (:func:`check_targets`) and adapts the
attention as a whole. The keys are PEFT's: ``attn.lora_A.weight`` (``r × E``) and ``attn.lora_B.weight``
(``3E × r``) for ``in_proj``, ``attn.base_layer.out_proj.lora_A.weight``/``lora_B.weight`` for ``out_proj``.

The forward hands the attention both weights as :class:`~lorakit.factored.FactoredWeight` for the length of the
call (nothing is written into the module, so an exception cannot leave a merged weight behind; PEFT merges and
unmerges around every call). Mixed-adapter batches are refused, as in PEFT.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..exact_merge import Scratch
from ..factored import FactoredWeight
from .base import LoraLayer
from .construction import Factor
from .linear import Linear

__all__ = ["MultiheadAttention", "check_targets", "doubled_from_file", "halved_for_file", "out_proj_b_keys",
           "uncalled_children"]


class MultiheadAttention(LoraLayer):
    """``nn.MultiheadAttention`` with LoRA on ``in_proj_weight`` (this layer's factors) and ``out_proj`` (a
    :class:`~lorakit.layers.Linear` put in its place, driven by this layer)."""

    combinable = False  # out_proj's factors live in the nested layer, which the combination would not see

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        if not base_layer._qkv_same_embed_dim:
            raise ValueError("nn.MultiheadAttention with kdim/vdim different from embed_dim (separate q/k/v weights) is "
                             "not supported; PEFT supports only the packed in_proj_weight too")
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise TypeError(f"out_proj of nn.MultiheadAttention must be an nn.Linear, got "
                            f"{type(base_layer.out_proj).__name__}")
        super().__init__(base_layer)
        E = base_layer.embed_dim
        vars(self).update(in_features=E, out_features=3 * E)
        base_layer.out_proj = Linear(base_layer.out_proj)

    @property
    def weight(self) -> Tensor:
        """The packed ``in_proj_weight``."""
        return self.base_layer.in_proj_weight

    @property
    def out_proj_layer(self) -> Linear:
        return self.base_layer.out_proj

    def _create_factors(self, adapter_name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        self.lora_A[adapter_name] = Factor(self.in_features, r, dtype, device)
        self.lora_B[adapter_name] = Factor(r, self.out_features, dtype, device)

    # -- adapters: out_proj follows this layer --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights=True, use_rslora: bool = False, lora_bias: bool = False,
                     use_dora: bool = False) -> None:
        if use_dora:
            raise NotImplementedError("use_dora=True is not supported for nn.MultiheadAttention (PEFT refuses it too)")
        if lora_bias:
            raise ValueError("lora_bias=True is not supported for nn.MultiheadAttention (PEFT ignores the bias there)")
        if lora_dropout:
            warnings.warn(f"lora_dropout={lora_dropout} is not applied inside nn.MultiheadAttention: its projections "
                          "are weights it multiplies itself (as in PEFT, which merges them for every call)",
                          stacklevel=3)
        super().update_layer(adapter_name, r, lora_alpha, 0.0, init_lora_weights, use_rslora)
        out = self.out_proj_layer
        out.active_adapters = list(self.active_adapters)
        out.update_layer(adapter_name, r, lora_alpha, 0.0, init_lora_weights, use_rslora)

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self.out_proj_layer.set_adapter(adapter_names, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad)
        self.out_proj_layer.set_requires_grad(adapter_names, requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self.out_proj_layer.enable_adapters(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.out_proj_layer.delete_adapter(adapter_name)

    # -- forward ------------------------------------------------------------------------------------------------------
    def forward(self, query: Tensor, *args, **kwargs):
        if self._rows is not None and not self.r.keys().isdisjoint(self._rows.names):
            raise NotImplementedError("mixed-adapter batches (adapter_names=...) are not supported for "
                                      "nn.MultiheadAttention; run one adapter at a time")
        base = self.base_layer
        if not self._live:
            return base(query, *args, **kwargs)
        out_base = self.out_proj_layer.base_layer
        in_weight, out_weight = base._parameters["in_proj_weight"], out_base._parameters["weight"]
        base._parameters["in_proj_weight"] = FactoredWeight.of(in_weight, self._terms(self))
        out_base._parameters["weight"] = FactoredWeight.of(out_weight, self._terms(self.out_proj_layer))
        try:
            return base(query, *args, **kwargs)
        finally:
            base._parameters["in_proj_weight"], out_base._parameters["weight"] = in_weight, out_weight

    def _terms(self, layer: LoraLayer) -> list:
        """``(B, A, s)`` of this layer's live adapters, read from ``layer`` (itself or out_proj)."""
        return [(*reversed(layer.factors(n)), layer.scaling[n]) for n in self._live if n in layer.r]

    # -- merging: both projections ------------------------------------------------------------------------------------
    def check_mergeable(self) -> None:
        self.out_proj_layer.check_mergeable()

    def check_finite_merge(self, adapter_names: Sequence[str]) -> None:
        super().check_finite_merge(adapter_names)
        self.out_proj_layer.check_finite_merge(adapter_names)

    def merge(self, adapter_names=None, safe_merge: bool = False, own_weight: bool = False,
              scratch: Optional[Scratch] = None, reversible: bool = True):
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        super().merge(names, safe_merge, own_weight, scratch, reversible)
        self.out_proj_layer.merge(names, safe_merge, False, scratch, reversible)

    def unmerge(self, scratch: Optional[Scratch] = None) -> None:
        super().unmerge(scratch)
        self.out_proj_layer.unmerge(scratch)

    def unwrapped(self) -> nn.MultiheadAttention:
        """The attention with its plain ``out_proj`` back (for unloading: merged or unmerged before)."""
        self.base_layer.out_proj = self.out_proj_layer.base_layer
        return self.base_layer


def uncalled_children(modules) -> list[str]:
    """Names of layers that their parent reads without calling (``out_proj`` of every ``nn.MultiheadAttention`` in
    ``modules``, pairs of name and module): an adapter there would never run."""
    return [f"{n}.out_proj" if n else "out_proj" for n, m in modules if isinstance(m, nn.MultiheadAttention)]


def check_targets(targets: list, uncalled: Sequence[str], all_linear: bool) -> list:
    """``targets`` without layers their parent never calls: ``"all-linear"`` leaves them out with one warning, a
    target naming one is refused."""
    bad = [t.name for t in targets if t.name in uncalled]
    if not bad:
        return targets
    parent = bad[0].rpartition(".")[0]
    if not all_linear:
        raise ValueError(
            f"{bad[0]} is the out_proj of nn.MultiheadAttention {parent!r}, which reads its weight without calling "
            f"it: an adapter there would never run. Target {parent.rpartition('.')[2]!r} instead (LoRA on in_proj "
            "and out_proj, as PEFT's lora.MultiheadAttention)"
        )
    warnings.warn(
        f"'all-linear' leaves out {bad[:4]}{' …' if len(bad) > 4 else ''}: nn.MultiheadAttention never calls its "
        "out_proj, so an adapter there would be unused (PEFT adds one anyway); add the attention modules "
        f"{sorted({b.rpartition('.')[0].rpartition('.')[2] for b in bad})} to target_modules to adapt them",
        UserWarning, stacklevel=4,
    )
    return [t for t in targets if t.name not in uncalled]


def out_proj_b_keys(lora_model, adapter_name: str) -> set[str]:
    """The keys (paths in the user's model, as :meth:`lorakit.LoraModel.adapter_state` gives them) of every
    MultiheadAttention's ``out_proj`` B of one adapter.

    PEFT 0.21.2 adds ``out_proj``'s update twice (in its forward and its merge; its PR 3774), so in PEFT's files that
    B holds half of the update the model applies. lorakit applies the update once and keeps the files' meaning:
    it writes half of its B (:func:`halved_for_file`) and reads the file's B doubled (:func:`doubled_from_file`),
    both exact, so files give equal outputs in both libraries."""
    keys = set()
    for name, layer in lora_model.lora_layers():
        if isinstance(layer, MultiheadAttention) and adapter_name in layer.out_proj_layer.r:
            target = layer.out_proj_layer.lora_B[adapter_name]
            keys.update(f"{sub}.weight" for sub, module in layer.named_modules(prefix=name) if module is target)
    return keys


def halved_for_file(tensors: dict, keys: set[str], prefix: str = "") -> dict:
    """``tensors`` with ``prefix + key`` halved for each of ``keys`` (see :func:`out_proj_b_keys`); new tensors."""
    return {k: (v * 0.5 if k[len(prefix):] in keys and k.startswith(prefix) else v) for k, v in tensors.items()}


def doubled_from_file(state: dict, keys: set[str]) -> dict:
    """``state`` (keyed like the adapter's own tensors) with each of ``keys`` doubled (see :func:`out_proj_b_keys`)."""
    return {k: (v * 2 if k in keys else v) for k, v in state.items()}
