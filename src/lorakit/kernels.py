"""The LoRA branch's hot paths, as plain tensor functions.

- :func:`add_lora` adds ``s · B(A(x))`` to the base output as one fused matmul-add.
- :class:`_DroppedLora` does the same with dropout on ``x`` without keeping a dropped copy of ``x`` for backward:
  the mask is kept as bits, 1/32 of a float32 copy (PEFT keeps a full-size dropped copy, plus a byte-per-element
  mask, per adapted layer).
- :func:`add_lora_rows` adds a different adapter to each batch row with two batched matmuls (mixed batches).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def add_lora(out: Tensor, h: Tensor, B: Tensor, scaling: float) -> Tensor:
    """``out + scaling · h @ B.T``, fused (in place when no gradient is recorded); ``h`` is ``x @ A.T``."""
    if h.dtype != out.dtype:
        return out + (h @ B.T * scaling).to(out.dtype)
    shape = out.shape
    flat_h = h.reshape(-1, h.shape[-1])
    if not torch.is_grad_enabled() and out.is_contiguous():
        out.view(-1, shape[-1]).addmm_(flat_h, B.T, alpha=scaling)
        return out
    return torch.addmm(out.reshape(-1, shape[-1]), flat_h, B.T, alpha=scaling).view(shape)


def keep_mask(like: Tensor, p: float) -> Tensor:
    """Which elements dropout ``p`` keeps (bool, Bernoulli(1 − p)), from torch's global generator as ``nn.Dropout``
    draws, so ``torch.manual_seed`` makes it reproducible."""
    return torch.rand(like.shape, device=like.device) >= p


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
        h = (x * keep.to(x.dtype).mul_(1 / (1 - p))) @ A.T
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
            mask = unpack_bits(packed, x.shape).to(x.dtype).mul_(1 / (1 - ctx.p))
            if ctx.needs_input_grad[2]:
                grad_A = gh.T @ (x * mask).reshape(-1, x.shape[-1])
            if ctx.needs_input_grad[1]:
                grad_x = (gh @ A).view(x.shape) * mask
        return grad, grad_x, grad_A, grad_B, None, None


def add_dropped_lora(out: Tensor, x: Tensor, A: Tensor, B: Tensor, scaling: float, p: float) -> Tensor:
    """:func:`add_lora` with dropout ``p`` on ``x``, memory-lean in training (see :class:`_DroppedLora`)."""
    if out.dtype != x.dtype:  # adapters in float32 on a half-precision base: keep the maths in the adapter dtype
        return out + _DroppedLora.apply(torch.zeros_like(out, dtype=x.dtype), x, A, B, scaling, p).to(out.dtype)
    return _DroppedLora.apply(out, x, A, B, scaling, p)


def add_lora_rows(out: Tensor, h_in: Tensor, A_rows: Tensor, B_rows: Tensor) -> Tensor:
    """``out[n] += h_in[n] @ A_rows[n].T @ B_rows[n].T`` for every batch row ``n`` (scaling folded into B_rows).

    ``h_in`` is ``(N, …, in)``, ``A_rows`` ``(N, r, in)``, ``B_rows`` ``(N, out, r)``; two ``bmm`` calls in all.
    """
    n = h_in.shape[0]
    h = torch.bmm(h_in.reshape(n, -1, h_in.shape[-1]), A_rows.transpose(1, 2))
    y = torch.bmm(h, B_rows.transpose(1, 2))
    return out + y.view(out.shape).to(out.dtype)
