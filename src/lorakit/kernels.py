"""The LoRA branch's hot paths, as plain tensor functions.

- :func:`add_lora` adds ``s · B(A(x))`` to the base output as one fused matmul-add.
- :class:`_DroppedLora` does the same with dropout on ``x`` without keeping a dropped copy of ``x`` for backward:
  the mask is regenerated from a seed (PEFT keeps a full-size dropped copy, plus the mask, per adapted layer).
- :func:`add_lora_rows` adds a different adapter to each batch row with two batched matmuls (mixed batches).
"""

from __future__ import annotations

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


def dropout_mask(like: Tensor, p: float, seed: int) -> Tensor:
    """The scaled keep-mask (0 or 1/(1-p)) for ``like``, reproducible from ``seed`` on any device."""
    generator = torch.Generator(device=like.device).manual_seed(seed)
    keep = torch.empty(like.shape, dtype=like.dtype, device=like.device).bernoulli_(1 - p, generator=generator)
    return keep.div_(1 - p)


class _DroppedLora(torch.autograd.Function):
    """``out + s · dropout(x) @ A.T @ B.T`` saving only ``x`` (already alive), ``h = dropout(x) @ A.T`` (rank-sized)
    and a seed; backward regenerates the mask."""

    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, A: Tensor, B: Tensor, scaling: float, p: float, seed: int):
        xd = x * dropout_mask(x, p, seed)
        h = xd @ A.T
        ctx.save_for_backward(x, A, B, h)
        ctx.scaling, ctx.p, ctx.seed = scaling, p, seed
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), B.T, alpha=scaling).view(out.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, A, B, h = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1]).to(B.dtype)
        h2 = h.reshape(-1, h.shape[-1])
        grad_x = grad_A = grad_B = None
        gh = (g @ B) * s  # (M, r)
        if ctx.needs_input_grad[3]:
            grad_B = (g.T @ h2) * s
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            mask = dropout_mask(x, ctx.p, ctx.seed)
            if ctx.needs_input_grad[2]:
                grad_A = gh.T @ (x * mask).reshape(-1, x.shape[-1])
            if ctx.needs_input_grad[1]:
                grad_x = (gh @ A).view(x.shape) * mask
        return grad, grad_x, grad_A, grad_B, None, None, None


def add_dropped_lora(out: Tensor, x: Tensor, A: Tensor, B: Tensor, scaling: float, p: float) -> Tensor:
    """:func:`add_lora` with dropout ``p`` on ``x``, memory-lean in training (see :class:`_DroppedLora`)."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    if out.dtype != x.dtype:  # adapters in float32 on a half-precision base: keep the maths in the adapter dtype
        return out + _DroppedLora.apply(torch.zeros_like(out, dtype=x.dtype), x, A, B, scaling, p, seed).to(out.dtype)
    return _DroppedLora.apply(out, x, A, B, scaling, p, seed)


def add_lora_rows(out: Tensor, h_in: Tensor, A_rows: Tensor, B_rows: Tensor) -> Tensor:
    """``out[n] += h_in[n] @ A_rows[n].T @ B_rows[n].T`` for every batch row ``n`` (scaling folded into B_rows).

    ``h_in`` is ``(N, …, in)``, ``A_rows`` ``(N, r, in)``, ``B_rows`` ``(N, out, r)``; two ``bmm`` calls in all.
    """
    n = h_in.shape[0]
    h = torch.bmm(h_in.reshape(n, -1, h_in.shape[-1]), A_rows.transpose(1, 2))
    y = torch.bmm(h, B_rows.transpose(1, 2))
    return out + y.view(out.shape).to(out.dtype)
