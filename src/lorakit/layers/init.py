"""The initialisations beyond the default one: orthogonal, PiSSA (exact or randomized SVD) and OLoRA (QR).

PiSSA and OLoRA move the top-``r`` part of the base weight into the adapter: ``A``/``B`` start as that part and the
base weight becomes the residual ``W − s·B@A``, so the model's outputs are unchanged at init. lorakit makes that
rewrite explicit and safe:

- it is recorded on the layer (:class:`BaseRewrite`: the adapter, its initial factors, and the exact-merge record),
  so a second adapter on a rewritten layer raises instead of silently training on a different base, and deleting the
  adapter (or ``unload()``) gives the original weight back bit for bit;
- ``"pissa_niter_<k>"`` draws its random subspace from a private generator with a fixed seed: the same bits
  whatever the global RNG state, at init and again on load (PEFT draws from the global RNG each time);
- the initial factors stay available, so the trained adapter converts to a plain LoRA of rank ``2r`` for the
  untouched base (:func:`lorakit.pissa.converted_state`).

The maths are plain tensor functions (:func:`orthogonal_factors`, :func:`pissa_factors`, :func:`olora_factors`);
:func:`initialize` applies one to a layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..exact_merge import MergeRecord, merge_exact, unmerge_exact

__all__ = [
    "BaseRewrite",
    "orthogonal_factors",
    "pissa_factors",
    "olora_factors",
    "initialize",
    "restore_base",
    "check_base_rewrite",
    "PISSA_SEED",
]

#: seed of the private generator behind ``"pissa_niter_<k>"`` (fixed: the same factors at init and on load)
PISSA_SEED = 0
_NITER = re.compile(r"pissa_niter_(\d+)")


@dataclass
class BaseRewrite:
    """How a PiSSA/OLoRA adapter rewrote its layer's base weight: ``W_res = W − scaling·B0@A0``."""

    adapter_name: str
    init: str
    A0: Tensor  # initial factors, float32, PEFT's orientation (A: r × in, B: out × r)
    B0: Tensor
    scaling: float
    record: MergeRecord  # makes the rewrite exactly reversible


def orthogonal_factors(r: int, in_features: int, out_features: int) -> tuple[Tensor, Tensor]:
    """Orthogonal init (PEFT's ``"orthogonal"``): ``A`` and ``B`` are random products with the odd and the even rows
    of one random orthogonal ``r × r`` matrix, so ``B@A = 0`` while neither factor is zero. Draws from the global
    RNG, in PEFT's order. ``r`` must be even."""
    if r % 2:
        raise ValueError(f"init_lora_weights='orthogonal' needs an even rank, got r={r}")
    Q, _ = torch.linalg.qr(torch.randn(r, r))
    A = (torch.randn(in_features, r // 2) @ Q[0::2]).T / 10.0
    B = torch.randn(r // 2, out_features).T @ Q[1::2] / 10.0
    return A.contiguous(), B.contiguous()


def _randomized_svd(W: Tensor, r: int, niter: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``r`` SVD of ``W`` by randomized subspace iteration (Halko et al.), from a private generator seeded with
    :data:`PISSA_SEED`: ``(U_r, S_r, Vh_r)``."""
    generator = torch.Generator(device=W.device).manual_seed(PISSA_SEED)
    omega = torch.randn(W.shape[1], r, generator=generator, device=W.device, dtype=W.dtype)
    Q = torch.linalg.qr(W @ omega).Q
    for _ in range(niter):
        Q = torch.linalg.qr(W.T @ Q).Q
        Q = torch.linalg.qr(W @ Q).Q
    U, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)
    return Q @ U, S, Vh


def pissa_factors(W: Tensor, r: int, scaling: float, niter: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """PiSSA: ``A = diag(√(S_r/s))·Vh_r`` and ``B = U_r·diag(√(S_r/s))`` from the top-``r`` singular triplets of
    ``W`` (``out × in``, float32), so that ``s·B@A`` is ``W``'s best rank-``r`` part. ``niter``: randomized SVD with
    that many subspace iterations (deterministic), else the exact SVD."""
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, Vh = _randomized_svd(W, r, niter)
    root = torch.sqrt(S / scaling)
    return (root[:, None] * Vh).contiguous(), (U * root).contiguous()


def olora_factors(W: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """OLoRA: ``W = Q·R``; ``A = R[:r]`` and ``B = Q[:, :r]`` (``W`` is ``out × in``, float32)."""
    Q, R = torch.linalg.qr(W)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def check_base_rewrite(layer, adapter_name: str) -> None:
    """Refuse any other adapter on a layer whose base weight a PiSSA/OLoRA adapter rewrote: it would train on (or
    be applied to) the residual instead of the base model."""
    rewrite = getattr(layer, "base_rewrite", None)
    if rewrite is not None and rewrite.adapter_name != adapter_name:
        raise ValueError(
            f"adapter {rewrite.adapter_name!r} (init_lora_weights={rewrite.init!r}) rewrote the base weight of "
            f"{type(layer.base_layer).__name__}; adapter {adapter_name!r} would see that residual instead of the base "
            "model. Convert it to a plain LoRA (save_pretrained(path_initial_model_for_weight_conversion=...)) or "
            "delete it first"
        )


def _check_can_rewrite(layer, adapter_name: str, init: str) -> None:
    """A PiSSA/OLoRA adapter may rewrite the base weight only of a layer with no other adapter (they were trained
    on that weight), and only once."""
    if getattr(layer, "base_rewrite", None) is not None:
        raise ValueError(f"adapter {layer.base_rewrite.adapter_name!r} already rewrote this layer's base weight "
                         f"({layer.base_rewrite.init!r})")
    others = [n for n in layer.r if n != adapter_name]
    if others:
        raise ValueError(
            f"init_lora_weights={init!r} for adapter {adapter_name!r} rewrites the base weight, which adapters "
            f"{others} on the same layer were trained on; put it on a fresh model"
        )


def initialize(layer, adapter_name: str, init: str) -> None:
    """Apply the string init ``init`` (orthogonal, PiSSA, OLoRA) to one adapter of a linear layer (``layer`` has
    ``in_features``, ``out_features``, ``transpose_delta`` for GPT-2's ``Conv1D``; OLoRA refuses that one). Factors
    keep their dtype; a rewritten base weight keeps its dtype."""
    A, B = layer.factors(adapter_name)
    r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    if init == "orthogonal":
        A0, B0 = orthogonal_factors(r, layer.in_features, layer.out_features)
    else:
        _check_can_rewrite(layer, adapter_name, init)
        if init == "olora" and layer.transpose_delta:
            raise ValueError("init_lora_weights='olora' is not supported on GPT-2's Conv1D (fan_in_fan_out) layers")
        weight = layer.base_layer.weight
        if not weight.dtype.is_floating_point or weight.device.type == "meta":
            raise ValueError(f"init_lora_weights={init!r} needs a real floating-point base weight, got "
                             f"{weight.dtype} on {weight.device.type}")
        W = weight.detach().float()
        W = W.T if layer.transpose_delta else W
        if init == "olora":
            A0, B0 = olora_factors(W, r)
        else:
            niter = _NITER.fullmatch(init)
            A0, B0 = pissa_factors(W, r, scaling, int(niter.group(1)) if niter else None)
    with torch.no_grad():
        A.copy_(A0)
        B.copy_(B0)
    if init != "orthogonal":
        _rewrite_base(layer, adapter_name, init, A0, B0, scaling)


def _rewrite_base(layer, adapter_name: str, init: str, A0: Tensor, B0: Tensor, scaling: float) -> None:
    """``W ← W − s·B0@A0`` in place (in the weight's orientation), recorded so it can be undone exactly."""
    left, right = (-B0, A0) if not layer.transpose_delta else (A0.T.contiguous(), -B0.T.contiguous())
    record = merge_exact(layer.base_layer.weight.data, left, right, scaling)
    layer.base_rewrite = BaseRewrite(adapter_name, init, A0.detach().clone(), B0.detach().clone(), scaling, record)


def restore_base(layer) -> None:
    """Undo a PiSSA/OLoRA rewrite of ``layer``'s base weight, bit for bit (nothing to do if there is none)."""
    rewrite = getattr(layer, "base_rewrite", None)
    if rewrite is None:
        return
    A0, B0 = rewrite.A0, rewrite.B0
    left, right = (-B0, A0) if not layer.transpose_delta else (A0.T.contiguous(), -B0.T.contiguous())
    unmerge_exact(layer.base_layer.weight.data, left, right, rewrite.scaling, rewrite.record)
    layer.base_rewrite = None
