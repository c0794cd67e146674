"""DoRA (weight-decomposed LoRA, Liu et al. 2024): a part every adapted layer kind composes.

A DoRA adapter adds to LoRA's ``A``/``B`` a magnitude ``m``, one number per output (PEFT's
``lora_magnitude_vector[name].weight``: shape ``(out,)`` for Linear, GPT-2 Conv1D and Embedding, whose outputs
are its ``embedding_dim`` columns; ``(1, out, 1, …)`` for convs). The adapted weight is

    W' = m / ‖W + s·B@A‖ ⊙ (W + s·B@A)        (norm per output, taken over everything else)

with the norm detached from the graph (section 4.3 of the paper, and PEFT), so the output is
``g ⊙ (W x + s·B A x) + b`` with ``g = m / ‖W + s·B@A‖``. Several active adapters compose in order as in PEFT:
each DoRA adapter maps the running output ``y`` to ``g ⊙ (y − b + s·B A x) + b``, a LoRA adapter adds ``s·B A x``.

What differs from PEFT (each has a test):

- The norm is computed from the factors, ``‖Wᵢ‖² + 2s·Wᵢ·(B@A)ᵢ + s²·Bᵢ(A Aᵀ)Bᵢᵀ`` (:func:`weight_norm`), with a
  rank-sized product ``W Aᵀ`` instead of PEFT's identity pass through the factors and a full-size ``W + s·B@A``.
  In eval mode it is cached per adapter until the base weight or a factor changes (an in-place update or a
  replaced tensor; writes through ``.data`` are not seen) or the layer's adapters change; ``‖W‖²`` is kept in
  training too, while the base weight is the same tensor at the same version.
- Dropout acts on the LoRA branch only: ``g ⊙ (W x + s·B A dropout(x)) + b``, one base matmul. PEFT runs the base
  a second time on the dropped input (PEFT issue 2107); both have the same expectation, and without dropout (or
  in eval mode) the outputs are the same.
- An output whose ``W + s·B@A`` row is exactly zero has norm 0; PEFT divides by it and gives NaN (PEFT issue
  2049). Here its norm counts as 1: the row stays zero whatever ``m`` is, and nothing becomes NaN.
- Merging folds ``g`` into the weight; unmerging restores the weight bit for bit in every dtype (PEFT's
  ``W / g − Δ`` does not): :func:`dora_merge` rounds ``g ⊙ (W + Δ)`` once, computes what undoing it would give and
  keeps the few elements that would come back wrong (:func:`lorakit.exact_merge.restore_record`). As in PEFT,
  ``g`` is taken from the weight with no adapter merged (a copy with the merged ones taken out exactly, if any),
  so adapters merged in one call or several give what the unmerged forward gives (PEFT issue 3608); the rescale
  runs along the output axis of ``fan_in_fan_out`` weights too (PEFT issue 3531).

Limits: in a mixed-adapter batch, a layer with DoRA adapters among the batch's runs each adapter on its rows, one
after another (the batched path serves layers whose adapters in the batch are all LoRA); ``add_weighted_adapter`` refuses DoRA adapters (a weighted sum of rescaled updates has no exact meaning).
An unmerged DoRA adapter next to merged ones takes its norm from the weight as it is (merged ones included), as
PEFT's forward does.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ..exact_merge import MergeRecord, apply_record, restore_record, unmerge_exact
from .construction import init_module

__all__ = ["Magnitude", "DoraRecord", "DoraMixin", "weight_norm", "dora_scale", "dora_combine", "dora_merge",
           "dora_unmerge"]


class Magnitude(nn.Module):
    """One DoRA adapter's magnitude vector, as PEFT holds it (``lora_magnitude_vector[name].weight``)."""

    def __init__(self, weight: Tensor) -> None:
        init_module(self)
        self._parameters["weight"] = nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"shape={tuple(self._parameters['weight'].shape)}"


# -- the maths: pure tensor functions --------------------------------------------------------------------------------
def _weight_matrix(weight: Tensor, transpose: bool) -> Tensor:
    """The weight as a 2-D matrix in its stored orientation (convs flattened to ``out × in·k…``)."""
    return weight if transpose else weight.flatten(1)


def squared_norms(weight: Tensor, transpose: bool, dtype: torch.dtype) -> Tensor:
    """``‖Wᵢ‖²`` per output ``i`` (columns when ``transpose``), in ``dtype``."""
    matrix = _weight_matrix(weight, transpose).to(dtype)
    return torch.linalg.vector_norm(matrix, dim=0 if transpose else 1).square()


def weight_norm(weight: Tensor, A: Tensor, B: Tensor, scaling: float, transpose: bool = False,
                sq_norms: Optional[Tensor] = None) -> Tensor:
    """``‖W + s·B@A‖`` per output, shape ``(out,)``, in at least float32, without a gradient.

    ``A`` is ``r × in…`` and ``B`` ``out × r…`` (PEFT's orientation); the weight is stored ``out × in…``, or
    ``in × out`` with ``transpose``. Computed as ``‖Wᵢ‖² + 2s·(W Aᵀ)ᵢ·Bᵢ + s²·Bᵢ(A Aᵀ)Bᵢᵀ``: rank-sized products,
    no full-size update (where a square overflows, the norm of ``W + s·B@A`` formed in full). ``sq_norms``:
    ``‖Wᵢ‖²`` if already known (it does not change while the base is frozen).
    """
    with torch.no_grad():
        dtype = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
        A2, B2 = A.detach().flatten(1).to(dtype), B.detach().flatten(1).to(dtype)
        matrix = _weight_matrix(weight.detach(), transpose).to(dtype)
        if sq_norms is None:
            sq_norms = squared_norms(matrix, transpose=transpose, dtype=dtype)
        proj = (A2 @ matrix).T if transpose else matrix @ A2.T  # W Aᵀ: out × r
        cross = (proj * B2).sum(1)
        quad = ((B2 @ (A2 @ A2.T)) * B2).sum(1)
        squared = sq_norms.to(dtype) + (2 * scaling) * cross + (scaling * scaling) * quad
        # squares overflow (rows above ~1e19) long before the norm does: then in full, in float64 (not while
        # torch.compile traces: a data-dependent branch would break its graph)
        if not _compiling() and not torch.isfinite(squared).all():
            delta = (B2 @ A2).mul_(scaling)
            full = (matrix + (delta.T if transpose else delta)).double()
            return torch.linalg.vector_norm(full, dim=0 if transpose else 1).to(dtype)
        return squared.clamp_min_(0).sqrt_()


def dora_scale(magnitude: Tensor, norm: Tensor) -> Tensor:
    """``g = m / norm`` shaped like ``m`` (the gradient reaches ``m`` only); a zero norm counts as 1."""
    norm = torch.where(norm == 0, torch.ones_like(norm), norm).view(magnitude.shape)
    return magnitude / norm.to(magnitude.dtype)


def dora_combine(z: Tensor, g: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``g ⊙ (z − b) + b`` in ``z``'s dtype, as one fused op: ``z`` is the running output plus the LoRA branch
    (bias included), ``g`` broadcasts against it (``(out,)``, or ``(1, out, 1, …)`` for convs)."""
    if bias is None:
        y = z * g
    else:
        b = bias.view(g.shape).to(g.dtype)
        y = torch.addcmul(b * (1 - g), z, g)
    return y if y.dtype == z.dtype else y.to(z.dtype)


@dataclass(frozen=True)
class DoraRecord:
    """What unmerging one DoRA adapter needs: the scale ``g`` it was merged with, and the elements of the weight
    that undoing the merge would not bring back (``None`` for a merge that is not to be undone)."""

    scale: Tensor
    record: Optional[MergeRecord]

    @property
    def nbytes(self) -> int:
        return self.scale.nbytes + (self.record.nbytes if self.record is not None else 0)


def _scaled_view(g: Tensor, columns: bool) -> Tensor:
    return g.reshape(1, -1) if columns else g.reshape(-1, 1)


def _matrix(weight: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``weight`` as the ``rows × cols`` matrix the product fills (a contiguous copy if it cannot be a view)."""
    if weight.numel() != left.shape[0] * right.shape[1]:
        raise ValueError(f"the product of factors {tuple(left.shape)} and {tuple(right.shape)} does not fit a "
                         f"weight of shape {tuple(weight.shape)}")
    return weight.contiguous().view(left.shape[0], right.shape[1])


def _write_back(weight: Tensor, matrix: Tensor) -> None:
    if matrix.data_ptr() != weight.data_ptr():
        weight.copy_(matrix.view(weight.shape))


def dora_merge(weight: Tensor, left: Tensor, right: Tensor, scale: float, g: Tensor, columns: bool,
               record: bool = True) -> DoraRecord:
    """``W ← g ⊙ (W + (left @ right)·scale)`` in place, rounded once to the weight's dtype; returns what
    :func:`dora_unmerge` needs to restore ``W`` bit for bit.

    ``weight`` is read as the ``left.shape[0] × right.shape[1]`` matrix of :func:`lorakit.ops.lora_factors`;
    ``g`` scales its rows, or its columns when ``columns`` (weights stored ``in × out``).
    """
    with torch.no_grad():
        matrix = _matrix(weight, left, right)
        delta = torch.mm(left, right)
        if scale != 1:
            delta.mul_(scale)
        gv = _scaled_view(g.detach().to(delta.dtype), columns)
        merged = (matrix.to(delta.dtype) + delta).mul_(gv).to(weight.dtype)
        kept = None
        if record:
            kept = restore_record(matrix, _undo(merged, delta, gv))
        matrix.copy_(merged)
        _write_back(weight, matrix)
    return DoraRecord(g.detach().clone(), kept)


def dora_unmerge(weight: Tensor, left: Tensor, right: Tensor, scale: float, record: DoraRecord,
                 columns: bool) -> None:
    """Undo :func:`dora_merge` in place (same factors, scale and orientation): the original bits come back."""
    if record.record is None:
        raise ValueError("this DoRA adapter was merged with reversible=False; it cannot be unmerged")
    with torch.no_grad():
        matrix = _matrix(weight, left, right)
        delta = torch.mm(left, right)
        if scale != 1:
            delta.mul_(scale)
        gv = _scaled_view(record.scale.to(delta.dtype), columns)
        matrix.copy_(_undo(matrix, delta, gv))
        apply_record(matrix, record.record)
        _write_back(weight, matrix)


def _undo(merged: Tensor, delta: Tensor, gv: Tensor) -> Tensor:
    """``merged / g − Δ`` rounded to the weight's dtype: what unmerging computes before its record is applied."""
    return merged.to(delta.dtype).div(gv).sub_(delta).to(merged.dtype)


# -- the part the layers compose -------------------------------------------------------------------------------------
def _compiling() -> bool:
    return getattr(torch, "compiler", None) is not None and torch.compiler.is_compiling()


def _cacheable(training: bool, *tensors: Tensor) -> bool:
    """Whether norms may be cached: eval mode (for the whole norm), tensors with version counters (not inference
    tensors), and not while ``torch.compile`` traces (the graph recomputes them; version checks would break it)."""
    return not training and not _compiling() and not any(t.is_inference() for t in tensors)


class DoraMixin:
    """DoRA for :class:`~lorakit.layers.LoraLayer`: magnitudes in ``lora_magnitude_vector``, the forward, and the
    merge of one adapter. Layer kinds whose weight holds one output per row (per column with ``transpose_delta``)
    set ``supports_dora``."""

    #: whether this layer kind can carry DoRA adapters
    supports_dora: bool = False

    @property
    def use_dora(self) -> dict[str, bool]:
        """Per adapter name, whether it is a DoRA adapter (PEFT's ``layer.use_dora``)."""
        return {name: name in self.lora_magnitude_vector for name in self.r}

    def set_dora(self, adapter_name: str, use_dora: bool) -> None:
        """Make ``adapter_name`` a DoRA adapter (its magnitude starts at ``‖W + s·B@A‖``, so ``g = 1``) or not."""
        if not use_dora:
            magnitudes = self._modules["lora_magnitude_vector"]  # not self.<name>: a Python-level lookup per layer
            if adapter_name in magnitudes:
                del magnitudes[adapter_name]
            return
        if not self.supports_dora:
            raise NotImplementedError(f"use_dora=True is not supported for {type(self).__name__} layers "
                                      f"(adapting {type(self.base_layer).__name__}); use plain LoRA for them")
        if self.lora_bias_of(adapter_name) is not None:
            raise ValueError(f"adapter {adapter_name!r} has lora_bias=True, which DoRA does not support (as in PEFT); "
                             "use one or the other")
        if getattr(self.base_layer, "groups", 1) != 1:
            raise ValueError(f"use_dora=True needs a dense weight; {type(self.base_layer).__name__} has "
                             f"groups={self.base_layer.groups}, so W + s·B@A has no meaning for it")
        weight = self.base_layer.weight
        A, _ = self.factors(adapter_name)
        if weight.device.type == "meta":  # a placeholder until the adapter's weights are loaded
            norm = torch.ones(self.out_features, dtype=A.dtype, device=A.device)
        else:
            norm = self._dora_norm(adapter_name).to(A.dtype)
        shape = (self.out_features,) if weight.dim() == 2 else (1, self.out_features) + (1,) * (weight.dim() - 2)
        magnitude = Magnitude(norm.reshape(shape).to(A.device))
        magnitude.train(self.training)
        self.lora_magnitude_vector[adapter_name] = magnitude

    def _magnitude(self, adapter_name: str) -> Tensor:
        return self._modules["lora_magnitude_vector"]._modules[adapter_name]._parameters["weight"]

    def _dora_norm(self, adapter_name: str) -> Tensor:
        """``‖W + s·B@A‖`` per output for the current weight; cached in eval mode (see the module docstring)."""
        weight = self.base_layer.weight
        A, B = self.factors(adapter_name)
        scaling = self.scaling[adapter_name]
        key = None
        if _cacheable(self.training, weight, A, B):
            tensors = (weight, A, B)  # a 0-dim tensor scaling (compiled hotswap) is read by value
            key = (tensors, (weight._version, weight.data_ptr(), A._version, B._version, float(scaling)))
            hit = self._dora_cache.get(adapter_name)
            if hit is not None and all(map(operator.is_, hit[0][0], tensors)) and hit[0][1] == key[1]:
                return hit[1]
        norm = weight_norm(weight, A, B, scaling, self.transpose_delta, self._squared_norms(weight))
        if key is not None:
            self._dora_cache[adapter_name] = (key, norm)
        return norm

    def _squared_norms(self, weight: Tensor) -> Optional[Tensor]:
        """``‖Wᵢ‖²`` of the base weight, kept while it is the same tensor at the same version (a frozen base)."""
        if not _cacheable(False, weight):
            return None
        key = (weight, weight._version, weight.data_ptr())
        hit = self._dora_cache.get(None)
        if hit is None or hit[0][0] is not weight or hit[0][1:] != key[1:]:
            dtype = torch.promote_types(weight.dtype, torch.float32)
            hit = self._dora_cache[None] = (key, squared_norms(weight, self.transpose_delta, dtype))
        return hit[1]

    def _dora_scale(self, adapter_name: str) -> Tensor:
        return dora_scale(self._magnitude(adapter_name), self._dora_norm(adapter_name))

    def _add_dora_output(self, out: Tensor, x: Tensor, adapter_name: str) -> Tensor:
        """The running output ``y`` becomes ``g ⊙ (y − b + s·B A x) + b`` (the LoRA branch as the layer adds it)."""
        g = self._dora_scale(adapter_name)
        z = self._add_adapter_output(out, x, adapter_name)
        return dora_combine(z, g, getattr(self.base_layer, "bias", None))

    def _adapter_output(self, out: Tensor, x: Tensor, adapter_name: str) -> Tensor:
        """One adapter's effect on the running output, DoRA or LoRA."""
        if adapter_name in self._modules["lora_magnitude_vector"]._modules:
            return self._add_dora_output(out, x, adapter_name)
        return self._add_adapter_output(out, x, adapter_name)

    # -- merging ----------------------------------------------------------------------------------------------------
    def _dora_scales(self, adapter_names: Sequence[str]) -> dict[str, Tensor]:
        """``g`` of every DoRA adapter among ``adapter_names``, from the weight with no adapter merged (as PEFT):
        merged in one call or several, in the active order, they give what the unmerged forward gives."""
        names = [n for n in adapter_names if n in self.lora_magnitude_vector]
        if not names:
            return {}
        weight = self._unmerged_weight()
        scales = {}
        for name in names:
            A, B = self.factors(name)
            norm = weight_norm(weight, A, B, self.scaling[name], self.transpose_delta)
            scales[name] = dora_scale(self._magnitude(name).detach(), norm).reshape(-1)
        return scales

    def _unmerged_weight(self) -> Tensor:
        """The base weight without the adapters merged into it: the weight itself, or, while some are merged, a
        copy with them taken out exactly."""
        weight = self.base_layer.weight.detach()
        if not self.merged_adapters:
            return weight
        copy = weight.clone()
        for name in reversed(self.merged_adapters):  # check_dora_mergeable: all reversible
            record = self._fixups[name]
            if isinstance(record, DoraRecord):
                dora_unmerge(copy, *self._merge_factors(name), record, self.transpose_delta)
            else:  # a LoRA adapter's record (with lora_bias: the weight's record, the bias's, whether it was made)
                unmerge_exact(copy, *self._merge_factors(name), record[0] if isinstance(record, tuple) else record)
        return copy

    def check_dora_mergeable(self, adapter_names: Sequence[str]) -> None:
        """Raise ``ValueError`` before anything changes where merging the DoRA adapters among ``adapter_names``
        cannot work: a non-finite magnitude, or an adapter merged irreversibly that the norm would need taken out."""
        names = [n for n in adapter_names if n in self.lora_magnitude_vector and n not in self.merged_adapters]
        if not names:
            return
        for name in names:
            if not torch.isfinite(self._magnitude(name)).all():
                raise ValueError(f"DoRA adapter {name!r} has a non-finite magnitude in "
                                 f"{type(self.base_layer).__name__}; nothing was merged")
        gone = [n for n in self.merged_adapters if getattr(self._fixups[n], "record", self._fixups[n]) is None]
        if gone:
            raise ValueError(f"adapter(s) {gone} were merged with reversible=False; the weight without them, which "
                             f"DoRA adapter(s) {names} take their norm from, is gone; nothing was merged")

    def _merge_dora(self, adapter_name: str, g: Tensor, reversible: bool) -> DoraRecord:
        left, right, scale = self._merge_factors(adapter_name)
        return dora_merge(self.base_layer.weight.data, left, right, scale, g, self.transpose_delta, record=reversible)

    def _unmerge_dora(self, adapter_name: str, record: DoraRecord) -> None:
        left, right, scale = self._merge_factors(adapter_name)
        dora_unmerge(self.base_layer.weight.data, left, right, scale, record, self.transpose_delta)

    def _merged_weights(self, adapter_names: Sequence[str]) -> Iterator[tuple[str, Tensor]]:
        """``(name, weight)`` after merging each of ``adapter_names`` in turn, in at least float32 (for checks;
        nothing is stored)."""
        weight = self.base_layer.weight
        total = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
        scales = self._dora_scales(adapter_names)
        for name in adapter_names:
            total = total + self.delta_weight(name)
            if name in scales:
                g = scales[name]
                total = total * (g.reshape(1, -1) if self.transpose_delta else g.reshape(-1, *[1] * (total.dim() - 1)))
            yield name, total
