"""Every LoRA formula, once, as plain tensor functions (no modules): the scaling, the update ``s·B@A`` as a weight
(:func:`lora_delta`) and in factored form for merging (:func:`lora_factors`), the initialisation, and the hot paths
of the forward:

- :func:`add_lora` adds ``s · B(A(x))`` to the base output as one fused matmul-add.
- :class:`_DroppedLora` does the same with dropout on ``x`` without keeping a dropped copy of ``x`` for backward:
  the mask is kept as bits, 1/32 of a float32 copy (PEFT keeps a full-size dropped copy, plus a byte-per-element
  mask, per adapted layer).
- :func:`add_lora_rows` adds a different adapter to each batch row with two batched matmuls (mixed batches);
  :func:`add_lora_groups` does it with the rows grouped by adapter, so the factors need no per-row copy.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "lora_scaling",
    "lora_delta",
    "lora_factors",
    "kaiming_uniform_",
    "adapter_dtype",
    "add_lora",
    "add_dropped_lora",
    "add_lora_rows",
    "add_lora_groups",
    "keep_mask",
    "pack_bits",
    "unpack_bits",
]


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA: the factor the update is multiplied by."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


def lora_delta(A: Tensor, B: Tensor, scaling: float, weight_shape: Sequence[int], transpose: bool = False) -> Tensor:
    """``scaling · B @ A`` shaped like the base weight.

    ``A`` is ``r × in`` (convs: ``r × in × k…``), ``B`` is ``out × r`` (convs: ``out × r × 1…``). ``transpose`` is
    for weights stored ``in × out`` (GPT-2's Conv1D, embeddings). Computed in at least float32.
    """
    dtype = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
    delta = B.flatten(1).to(dtype) @ A.flatten(1).to(dtype)
    if transpose:
        delta = delta.T
    return delta.mul_(scaling).reshape(weight_shape)


def lora_factors(A: Tensor, B: Tensor, scaling: float, transpose: bool = False) -> tuple[Tensor, Tensor, float]:
    """``(left, right, scale)`` with ``(left @ right) · scale`` the update as a matrix in the base weight's
    orientation (rows first), in at least float32: what merging multiplies out. A power-of-two scaling is folded
    into the rank-sized ``B`` (the same bits as :func:`lora_delta`'s ``(B @ A) · s``, without a pass over the
    full-size product); any other stays a separate factor, so the bits stay PEFT's."""
    scaling = float(scaling)  # a tensor scaling (compiled hotswap) too
    dtype = A.dtype if A.dtype is B.dtype and A.dtype in _WIDE else torch.promote_types(
        torch.promote_types(A.dtype, B.dtype), torch.float32)
    left, right = _as_2d(B, dtype), _as_2d(A, dtype)  # merging calls this per layer: no calls that change nothing
    if scaling != 0 and math.frexp(scaling)[0] == 0.5:  # ±2^k
        left, scaling = left * scaling, 1.0
    return (right.T, left.T, scaling) if transpose else (left, right, scaling)


_WIDE = (torch.float32, torch.float64)


def _as_2d(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.flatten(1).to(dtype)``, skipping each step where it would return ``t`` unchanged."""
    if t.dim() != 2:
        t = t.flatten(1)
    return t if t.dtype is dtype else t.to(dtype)


def kaiming_uniform_(t: Tensor) -> Tensor:
    """``nn.init.kaiming_uniform_(t, a=sqrt(5))`` (torch's default for Linear/Conv weights): U(±1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(math.prod(t.shape[1:]))
    return t.uniform_(-bound, bound)


def adapter_dtype(weight: Tensor) -> torch.dtype:
    """Adapters train in float32 on half-precision bases (PEFT's ``autocast_adapter_dtype``), else in the base's."""
    if weight.dtype in (torch.float16, torch.bfloat16) or not weight.dtype.is_floating_point:
        return torch.float32
    return weight.dtype


def add_lora(out: Tensor, h: Tensor, B: Tensor, scaling: float | Tensor) -> Tensor:
    """``out + scaling · h @ B.T``, fused (in place when no gradient is recorded); ``h`` is ``x @ A.T``.

    A tensor ``scaling`` (a model prepared for compiled hotswap) cannot be ``addmm``'s ``alpha``: it scales the
    rank-sized ``h`` instead, so a compiled graph reads it as an input rather than baking in its value."""
    if type(scaling) is not float:
        if isinstance(scaling, Tensor):
            h = h * scaling
            scaling = 1.0
        else:
            scaling = float(scaling)
    if h.dtype != out.dtype:
        return out + (h @ B.T * scaling).to(out.dtype)
    shape = out.shape
    flat_h = h.reshape(-1, h.shape[-1])
    if not torch.is_grad_enabled() and out.is_contiguous():
        out.view(-1, shape[-1]).addmm_(flat_h, B.T, alpha=scaling)
        return out
    return torch.addmm(out.reshape(-1, shape[-1]), flat_h, B.T, alpha=scaling).view(shape)


def keep_mask(like: Tensor, p: float) -> Tensor:
    """Which elements dropout ``p`` keeps (bool, Bernoulli(1 − p)): the very mask ``nn.Dropout`` would draw for a
    tensor like ``like`` (its shape, dtype and device), from the same generator in the same way (``bernoulli_(1 −
    p)`` on CPU, the fused kernel on CUDA), because it is drawn by torch's dropout itself; so a seed gives lorakit
    and PEFT the same masks."""
    if like.device.type == "cpu":  # CPU dropout's own draw, empty_like(x).bernoulli_(1 − p), without its multiply
        return torch.empty_like(like).bernoulli_(1 - p).bool()
    return F.dropout(torch.ones_like(like), p, training=True) != 0  # the draws depend on the shape, not the values


def pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor as bits, eight to a byte (``mask.numel()/8`` bytes): element ``j·q + i`` is bit ``j`` of byte
    ``i``, so packing and unpacking are eight contiguous vectorised passes."""
    flat = mask.reshape(-1)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    parts = flat.view(torch.uint8).view(8, -1)
    packed = parts[0].clone()
    for j in range(1, 8):
        packed |= parts[j] << j
    return packed


def unpack_bits(packed: Tensor, shape: torch.Size) -> Tensor:
    """The bool tensor of ``shape`` that :func:`pack_bits` packed."""
    bits = torch.empty(8, packed.numel(), dtype=torch.uint8, device=packed.device)
    for j in range(8):
        torch.bitwise_and(packed >> j, 1, out=bits[j])
    return bits.view(-1)[: math.prod(shape)].view(torch.bool).view(shape)


class _DroppedLora(torch.autograd.Function):
    """``out + s · dropout(x) @ A.T @ B.T`` saving only ``x`` (already alive), ``h = dropout(x) @ A.T`` (rank-sized)
    and the dropout mask as bits; backward unpacks the mask (drawing it again would cost more than the matmuls)."""

    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, A: Tensor, B: Tensor, scaling: float, p: float):
        keep = keep_mask(x, p)
        h = (x * keep.to(x.dtype).div_(1 - p)) @ A.T  # x times nn.Dropout's noise, bernoulli/(1 − p)
        ctx.save_for_backward(x, A, B, h, pack_bits(keep))
        ctx.scaling, ctx.p = scaling, p
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), B.T, alpha=scaling).view(out.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, A, B, h, packed = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1]).to(B.dtype)
        h2 = h.reshape(-1, h.shape[-1])
        grad_x = grad_A = grad_B = None
        gh = (g @ B) * s  # (M, r)
        if ctx.needs_input_grad[3]:
            grad_B = (g.T @ h2) * s
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            mask = unpack_bits(packed, x.shape).to(x.dtype).div_(1 - ctx.p)
            if ctx.needs_input_grad[2]:
                grad_A = gh.T @ (x * mask).reshape(-1, x.shape[-1])
            if ctx.needs_input_grad[1]:
                grad_x = (gh @ A).view(x.shape) * mask
        return grad, grad_x, grad_A, grad_B, None, None


def add_dropped_lora(out: Tensor, x: Tensor, A: Tensor, B: Tensor, scaling: float, p: float) -> Tensor:
    """:func:`add_lora` with dropout ``p`` on ``x``, memory-lean in training (see :class:`_DroppedLora`)."""
    if isinstance(scaling, Tensor):  # compiled hotswap: scale the rank-sized B (autograd carries it), no .item()
        B, scaling = B * scaling, 1.0
    if out.dtype != x.dtype:  # adapters in float32 on a half-precision base: keep the maths in the adapter dtype
        return out + _DroppedLora.apply(torch.zeros_like(out, dtype=x.dtype), x, A, B, scaling, p).to(out.dtype)
    return _DroppedLora.apply(out, x, A, B, scaling, p)


def add_lora_rows(out: Tensor, h_in: Tensor, A_rows_t: Tensor, B_rows_t: Tensor) -> Tensor:
    """``out[n] += h_in[n] @ A_rows[n].T @ B_rows[n].T`` for every batch row ``n`` (scaling folded into B_rows).

    ``h_in`` is ``(N, …, in)``; the factors come transposed (views of the stacks, made once with them):
    ``A_rows_t`` ``(N, in, r)``, ``B_rows_t`` ``(N, r, out)``. Two ``bmm`` calls in all.
    """
    n = h_in.shape[0]
    h = torch.bmm(h_in.reshape(n, -1, h_in.shape[-1]), A_rows_t)
    y = torch.bmm(h, B_rows_t).view(out.shape)
    return out + (y if y.dtype == out.dtype else y.to(out.dtype))


def add_lora_groups(out: Tensor, h_in: Tensor, take: Tensor, dest: Tensor, src: Tensor | None,
                    *stacks: Tensor) -> Tensor:
    """Mixed-batch rows grouped by adapter: ``out[dest] += (h_in[take] @ S₁.T @ S₂.T …)[src]``, batched per group.

    ``h_in`` is ``(N, …, in)``; ``take`` (``G·c`` rows of ``h_in``, group by group) regroups it as ``(G, c·…, in)``;
    each stack is ``(G, k_out, k_in)``, one matrix per group (``A`` then ``scaling·B`` for a linear layer).
    Result rows ``src`` (all when ``None``) are added to batch rows ``dest``; other rows of ``out`` are unchanged.
    """
    groups = stacks[0].shape[0]
    n = take.shape[0]
    h = h_in.reshape(h_in.shape[0], -1, h_in.shape[-1])[take].view(groups, -1, h_in.shape[-1])
    for stack in stacks:
        h = torch.bmm(h, stack.transpose(1, 2))
    y = h.view(n, *out.shape[1:])
    if src is not None:
        y = y[src]
    return out.index_add(0, dest, y.to(out.dtype))
