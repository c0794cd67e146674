"""A weight ``V = W + Σ s·L@R`` that is used as a weight but never formed: :class:`FactoredWeight`.

LoRA on a parameter that a module uses directly (the 3-D expert stacks of Mixtral/Qwen3-MoE/gpt-oss, a router's
2-D weight) cannot add a branch after a submodule: the module does its own maths with the parameter. PEFT swaps
in ``W + ΔW`` through a parametrization, which builds a weight the size of the whole expert stack in every forward
(and its gradient in every backward). Here the module is handed a :class:`FactoredWeight` instead: a tensor that
looks like ``W`` (shape, dtype, device) and carries the low-rank terms beside it. The operations expert code runs
on its weight are done in factored form:

- indexing the expert dimension (``W[e]``, ``W[expert_ids]``, slices) picks the same experts' factors;
- ``transpose(-2, -1)``/``.mT``/``.T`` swaps the factors' roles;
- ``F.linear``, ``@``/``matmul``, ``bmm`` and the grouped matmuls (``torch._grouped_mm``, ``F.grouped_mm``,
  transformers' fallback op) compute ``x·W`` and add ``s·(x·L)·R``: rank-sized work per token.

Any other operation gets the dense ``W + Σ s·L@R`` (correct, only not cheaper than PEFT). Gradients reach ``W``
(if it trains) and the factors through ordinary autograd.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FactoredWeight", "Term"]

#: ``(L, R, s)``: the term ``s · L @ R`` in the weight's own layout (``L`` is ``(…, p, r)``, ``R`` ``(…, r, q)``)
Term = tuple[Tensor, Tensor, float]

_METADATA = {
    Tensor.size, Tensor.dim, Tensor.stride, Tensor.data_ptr, Tensor.is_contiguous, Tensor.element_size,
    Tensor.numel, Tensor.__len__, Tensor.get_device, Tensor.is_floating_point,
}
_METADATA |= {getattr(Tensor, n).__get__ for n in (
    "shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "is_meta", "layout", "is_sparse", "is_quantized",
)}
_TRANSPOSES = {Tensor.transpose, torch.transpose, Tensor.mT.__get__, Tensor.T.__get__, Tensor.t, torch.t}
_GROUPED = ("_grouped_mm", "grouped_mm", "grouped_mm_fallback")


class FactoredWeight(Tensor):
    """``base + Σ s·L@R`` (see the module docstring); build with :meth:`of`."""

    base: Tensor
    terms: tuple[Term, ...]

    @staticmethod
    def of(base: Tensor, terms: Sequence[Term]) -> "FactoredWeight":
        """A tensor standing for ``base + Σ s·L@R``; ``base`` is used as it is (its gradient flows)."""
        weight = Tensor._make_subclass(FactoredWeight, base.detach(), False)
        weight.base, weight.terms = base, tuple(terms)
        return weight

    def dense(self) -> Tensor:
        """The weight it stands for, formed (in the factors' dtype, then rounded to the base's)."""
        total = None
        for L, R, s in self.terms:
            delta = torch.matmul(L, R) * s
            total = delta if total is None else total + delta
        base = self.base
        if total is None:
            return base
        return (base.to(total.dtype) + total).to(base.dtype)

    def __repr__(self) -> str:  # the base's values: the weight is never formed
        return f"FactoredWeight(shape={tuple(self.shape)}, terms={len(self.terms)})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            return _dispatch(func, args, kwargs)


def _dispatch(func, args, kwargs):
    me = args[0] if args and isinstance(args[0], FactoredWeight) else None
    if func in _METADATA and me is not None:
        return func(me.base, *args[1:], **kwargs)
    if func is Tensor.__getitem__ and me is not None:
        picked = _pick(me, args[1])
        if picked is not None:
            return picked
    if func in _TRANSPOSES and me is not None and not kwargs:
        flipped = _transposed(me, func, args[1:])
        if flipped is not None:
            return flipped
    product = _product(func, args, kwargs)
    if product is not None:
        return product
    dense_args = [a.dense() if isinstance(a, FactoredWeight) else a for a in args]
    dense_kwargs = {k: v.dense() if isinstance(v, FactoredWeight) else v for k, v in kwargs.items()}
    return func(*dense_args, **dense_kwargs)


def _pick(me: FactoredWeight, index) -> Optional[FactoredWeight]:
    """``W[index]`` where ``index`` selects along the expert (first) dimension of a 3-D weight only."""
    if me.base.dim() != 3:
        return None
    if isinstance(index, tuple):
        if len(index) != 1:
            return None
        index = index[0]
    if not (isinstance(index, (int, slice)) or (isinstance(index, Tensor) and not index.is_floating_point()
                                                and index.dtype != torch.bool and index.dim() <= 1)):
        return None
    return FactoredWeight.of(me.base[index], [(L[index], R[index], s) for L, R, s in me.terms])


def _transposed(me: FactoredWeight, func, dims) -> Optional[FactoredWeight]:
    """The weight with its last two dimensions swapped: ``(L@R)ᵀ = Rᵀ@Lᵀ``."""
    n = me.base.dim()
    if func in (Tensor.transpose, torch.transpose):
        if len(dims) != 2 or sorted(d % n for d in dims) != [n - 2, n - 1]:
            return None
    elif func in (Tensor.T.__get__, Tensor.t, torch.t) and n != 2:
        return None
    return FactoredWeight.of(me.base.transpose(-2, -1), [(R.mT, L.mT, s) for L, R, s in me.terms])


def _product(func, args, kwargs) -> Optional[Tensor]:
    """The matrix products expert code runs, in factored form; ``None`` for anything else."""
    if func is F.linear or func is torch._C._nn.linear:
        x, weight = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if isinstance(weight, FactoredWeight) and not isinstance(x, FactoredWeight) and weight.base.dim() == 2:
            out = F.linear(x, weight.base, bias)
            return _add_terms(out, x, [(R.mT, L.mT, s) for L, R, s in weight.terms], torch.matmul)
        return None
    if func in (torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm) and not kwargs:
        left, right = args
        mm = torch.bmm if func in (torch.bmm, Tensor.bmm) else torch.matmul
        if isinstance(right, FactoredWeight) and not isinstance(left, FactoredWeight):
            return _add_terms(mm(left, right.base), left, right.terms, mm)
        if isinstance(left, FactoredWeight) and not isinstance(right, FactoredWeight):
            out = mm(left.base, right)
            for L, R, s in left.terms:  # (L @ R) @ y = L @ (R @ y)
                out = out + (mm(L, mm(R, right.to(R.dtype))) * s).to(out.dtype)
            return out
        return None
    if func is Tensor.__rmatmul__ and not kwargs:
        me, left = args
        return _add_terms(torch.matmul(left, me.base), left, me.terms, torch.matmul)
    name = getattr(func, "__name__", "") or ""
    if name in _GROUPED and len(args) >= 2 and isinstance(args[1], FactoredWeight) and not isinstance(args[0], FactoredWeight):
        x, weight = args[0], args[1]
        offs = args[2] if len(args) > 2 else kwargs.get("offs")
        rest = {k: v for k, v in kwargs.items() if k != "offs"}  # F.grouped_mm passes bias=None, out_dtype=None
        if offs is None or any(v is not None for v in rest.values()) or len(args) > 3 or weight.base.dim() != 3:
            return None
        out = func(x, weight.base, offs=offs, **rest)
        for L, R, s in weight.terms:
            out = out + (_grouped_factored(x.to(L.dtype), L, R, offs) * s).to(out.dtype)
        return out
    return None


def _add_terms(out: Tensor, x: Tensor, terms: Sequence[Term], mm) -> Tensor:
    """``out + Σ s·(x@L)@R`` with the low-rank work in the factors' dtype."""
    for L, R, s in terms:
        out = out + (mm(mm(x.to(L.dtype), L), R) * s).to(out.dtype)
    return out


def _grouped_factored(x: Tensor, L: Tensor, R: Tensor, offs: Tensor) -> Tensor:
    """``x_g @ L[g] @ R[g]`` for the row groups ``g`` that ``offs`` (cumulative row counts per expert) marks; rows
    past the last offset get zeros, as the grouped kernels leave them untouched."""
    ends = offs.tolist()
    pieces, start = [], 0
    for g, end in enumerate(ends):
        if end > start:
            pieces.append((x[start:end] @ L[g]) @ R[g])
        start = end
    if start < x.shape[0]:
        pieces.append(x.new_zeros(x.shape[0] - start, R.shape[-1]))
    if not pieces:
        return x.new_zeros(x.shape[0], R.shape[-1])
    return torch.cat(pieces)
