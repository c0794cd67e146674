"""The base class of every adapted layer: a base layer plus any number of named low-rank adapters.

Every adapted layer keeps the user's layer untouched as ``base_layer`` and adds, per adapter name, a low-rank
pair ``lora_A``/``lora_B`` (``lora_embedding_A``/``lora_embedding_B`` for embeddings), a ``scaling`` and a
dropout, with PEFT's attribute names so state dicts and user code written for PEFT keep working. The maths is in
:mod:`lorakit.ops`; merge and unmerge fold the update in exactly reversibly with :mod:`lorakit.exact_merge`.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..exact_merge import Scratch, merge_exact, unmerge_exact
from ..ops import adapter_dtype, kaiming_uniform_, lora_delta, lora_factors, lora_scaling
from .construction import add_child, init_module, new_module
from .dora import DoraMixin
from .init import check_base_rewrite, restore_base
from .routing import RowRouting
from .rows import WatchedTable, watched
from .scales import AdapterScales

__all__ = ["LoraLayer", "factor_weight"]


def factor_weight(module: nn.Module) -> Tensor:
    """``module.weight``, read from ``_parameters`` where it is registered there: ``Module.__getattr__`` is a Python
    call that costs more than a batch-1 LoRA matmul. Read at every call, so replaced parameters are picked up."""
    weight = module._parameters.get("weight")
    return module.weight if weight is None else weight


class LoraLayer(DoraMixin, AdapterScales, RowRouting, nn.Module):
    """A base layer plus any number of named low-rank adapters.

    Subclasses say how to build one adapter's factors (:meth:`_create_factors`), how to read them as tensors in
    PEFT's orientation (:meth:`factors`) and how to add one adapter's output (:meth:`_add_adapter_output`).
    Everything else (adapter bookkeeping, merge, unmerge, delete) lives here, once; the scale controls
    (``set_scale``, ``scale_layer``, ``unscale_layer``) in :class:`~lorakit.layers.scales.AdapterScales`; DoRA
    adapters are a part composed in (:class:`~lorakit.layers.dora.DoraMixin`).
    """

    #: names of the ModuleDict/ParameterDict attributes holding per-adapter tensors (for save/load and deletion)
    adapter_layer_names: tuple[str, ...] = ("lora_A", "lora_B", "lora_magnitude_vector")
    #: ``True`` where the base weight is stored ``in × out``
    transpose_delta: bool = False
    #: whether ``lora_bias=True`` (a bias on ``lora_B``) is supported: layers whose B is a module with a bias slot
    supports_lora_bias: bool = False
    #: whether add_weighted_adapter can combine this layer's adapters (plain ``out × r``/``r × in`` factors)
    combinable: bool = True

    def __init__(self, base_layer: nn.Module) -> None:
        init_module(self)
        watched(self)  # its children table, lora_A/lora_B's and the scalings count their writes (see StackCache)
        # Written straight into the module's tables: the names are new here, so Module.__setattr__'s checks
        # (~3 µs a field, more than the rest of building the layer) would find nothing to do.
        self._modules.update(
            base_layer=base_layer,
            lora_A=watched(new_module(nn.ModuleDict)),
            lora_B=watched(new_module(nn.ModuleDict)),
            lora_dropout=new_module(nn.ModuleDict),
            lora_magnitude_vector=new_module(nn.ModuleDict),  # DoRA adapters only
        )
        vars(self).update(
            training=base_layer.training,  # new parts follow the mode of the layer they adapt
            r={}, lora_alpha={}, scaling=WatchedTable(), use_rslora={}, dropout_p={},  # per adapter name
            active_adapters=[],
            merged_adapters=[],
            disable_adapters=False,
            _fixups={},  # per merged adapter, the MergeRecord that makes unmerging exact
            _own_weight_of=None,  # the shared weight we copied away from on merge
            _live=(),  # adapters the forward adds: active, present, unmerged, not disabled
            _dora_live=False,  # whether any of them is a DoRA adapter
            _dora_cache={},  # DoRA weight norms (see lorakit.layers.dora)
            _rows=None,  # set for the length of one mixed-batch call
            _stack_cache=None,
            base_rewrite=None,  # a PiSSA/OLoRA adapter's rewrite of the base weight (lorakit.layers.init)
        )

    # -- construction ---------------------------------------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The base layer's weight (code written for the bare layer often reads ``layer.weight``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return getattr(self.base_layer, "bias", None)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights=True,
        use_rslora: bool = False,
        lora_bias: bool = False,
        use_dora: bool = False,
    ) -> None:
        """Add (or replace) the adapter ``adapter_name`` with rank ``r``; its weights follow ``init_lora_weights``.
        ``lora_bias``: ``lora_B`` gets a bias (PEFT's ``lora_B.<name>.bias``), scaled like ``B``. ``use_dora`` makes it
        a DoRA adapter (:mod:`lorakit.layers.dora`)."""
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"rank r={r!r} for adapter {adapter_name!r} is invalid: expected a positive int")
        if lora_bias and not self.supports_lora_bias:
            raise ValueError(f"lora_bias=True is not supported for {type(self).__name__} layers "
                             f"({type(self.base_layer).__name__}); PEFT supports it on Linear, Conv1D and Conv layers")
        check_base_rewrite(self, adapter_name)
        weight = self.weight
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        dtype = adapter_dtype(weight)
        self._create_factors(adapter_name, r, dtype=dtype, device=device)
        if lora_bias:
            B = self.lora_B[adapter_name]
            B._parameters["bias"] = nn.Parameter(torch.empty(B.weight.shape[0], dtype=dtype, device=device))
        if lora_dropout > 0:
            add_child(self._modules["lora_dropout"], adapter_name, nn.Dropout(lora_dropout).train(self.training))
        else:
            add_child(self._modules["lora_dropout"], adapter_name, new_module(nn.Identity, training=self.training))
        self.dropout_p[adapter_name] = float(lora_dropout)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = use_rslora
        self.scaling[adapter_name] = lora_scaling(lora_alpha, r, use_rslora)
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        self._dora_cache.clear()
        self.set_dora(adapter_name, use_dora)
        trainable = adapter_name in self.active_adapters
        for p in self._adapter_parameters(adapter_name):
            p.requires_grad_(trainable)
        self._refresh()

    def keep_base_dtype(self, adapter_name: str) -> None:
        """Store one adapter's factors in the base weight's dtype (PEFT's ``autocast_adapter_dtype=False``): on a
        half-precision base they are float16/bfloat16 instead of float32. The parameters stay the same objects."""
        dtype = self.base_layer.weight.dtype
        if not dtype.is_floating_point:
            return
        with torch.no_grad():
            for p in self._adapter_parameters(adapter_name):
                p.data = p.data.to(dtype)
        self._stack_cache = None

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights) -> None:
        """PEFT's initialisations: ``True`` kaiming-uniform A and zero B; ``"gaussian"`` normal A (std 1/r) and
        zero B; ``False`` both kaiming-uniform (a non-zero adapter, for tests). Factors are created uninitialised,
        so this is the only initialisation they get. Other string inits exist for linear layers only (as in PEFT)."""
        if isinstance(init_lora_weights, str) and init_lora_weights != "gaussian":
            raise ValueError(
                f"init_lora_weights={init_lora_weights!r} is implemented for linear layers only (as in PEFT), not for "
                f"{type(self.base_layer).__name__}; exclude that module or use init_lora_weights=True"
            )
        A, B = self._factor_params(adapter_name)
        with torch.no_grad():
            if init_lora_weights == "gaussian":
                A.normal_(std=1 / self.r[adapter_name])
            else:
                kaiming_uniform_(A)
            if init_lora_weights is False:
                kaiming_uniform_(B)
            else:
                B.zero_()
            bias = self.lora_bias_of(adapter_name)
            if bias is not None:  # as nn.Linear(r, out) initialises it for False, zero otherwise (PEFT)
                bias.uniform_(-1 / self.r[adapter_name] ** 0.5, 1 / self.r[adapter_name] ** 0.5) if (
                    init_lora_weights is False) else bias.zero_()

    def lora_bias_of(self, adapter_name: str) -> Optional[Tensor]:
        """The bias on ``lora_B`` of one adapter (``lora_bias=True``), else ``None``."""
        B = self._modules["lora_B"]._modules.get(adapter_name)
        return None if B is None else B._parameters.get("bias")

    def _create_factors(self, adapter_name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate one adapter's factors (uninitialised: :meth:`reset_lora_parameters` fills them)."""
        raise NotImplementedError

    def _factor_params(self, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """The A and B parameters of one adapter (as stored; may be transposed relative to :meth:`factors`).

        Read through ``_modules`` (``self.lora_A[name].weight`` is three Python-level lookups): mixed batches
        read every adapter's factors at every call.
        """
        modules = self._modules
        return (factor_weight(modules["lora_A"]._modules[adapter_name]), factor_weight(modules["lora_B"]._modules[adapter_name]))

    def factors(self, adapter_name: str) -> tuple[Tensor, Tensor]:
        """``(A, B)`` in PEFT's orientation: ``A`` is ``r × in…``, ``B`` is ``out × r…``."""
        return self._factor_params(adapter_name)

    # -- the maths --------------------------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> Tensor:
        """``scaling · B @ A`` shaped (and oriented) like the base weight, in at least float32."""
        A, B = self.factors(adapter_name)
        return lora_delta(A, B, self.scaling[adapter_name], self.weight.shape, self.transpose_delta)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self._modules["base_layer"](x, *args, **kwargs)  # not self.base_layer: a Python-level lookup
        if self._rows is not None:
            return self._routed(out, x, self._rows)
        if self._dora_live:
            for name in self._live:
                out = self._adapter_output(out, x, name)
            return out
        for name in self._live:
            out = self._add_adapter_output(out, x, name)
        return out

    def _add_adapter_output(self, out: Tensor, x: Tensor, adapter_name: str) -> Tensor:
        raise NotImplementedError

    # -- adapter bookkeeping ----------------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def merge_records(self) -> dict:
        """Per merged adapter, the :class:`~lorakit.exact_merge.MergeRecord` that makes unmerging exact (``None``
        for one merged with ``reversible=False``): what being merged costs in memory."""
        return dict(self._fixups)

    @property
    def has_private_weight(self) -> bool:
        """Whether merging gave this layer its own copy of a weight it shared (tied embeddings); unmerging gives
        the shared one back."""
        return self._own_weight_of is not None

    def set_adapter(self, adapter_names: str | Iterable[str], inference_mode: bool = False) -> None:
        """Make ``adapter_names`` the active adapters; their parameters train (unless ``inference_mode``), the
        others' don't (PEFT's rule)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in self.adapter_names:
            trainable = name in names and not inference_mode
            for p in self._adapter_parameters(name):
                p.requires_grad_(trainable)
        vars(self)["active_adapters"] = names  # a plain attribute: no Module.__setattr__ checks (see _refresh)
        self._refresh()

    def set_requires_grad(self, adapter_names: Iterable[str], requires_grad: bool = True) -> None:
        """Turn training of the named adapters' parameters on or off, active or not (PEFT's ``set_requires_grad``)."""
        for name in adapter_names:
            for p in self._adapter_parameters(name) if name in self.r else ():
                p.requires_grad_(requires_grad)

    def _adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """Every parameter one adapter holds in :attr:`adapter_layer_names` (what trains while it is active)."""
        params = []
        for layer_name in self.adapter_layer_names:
            holder = self._modules.get(layer_name)  # not getattr: Module.__getattr__ is a Python-level lookup
            if holder is None:
                holder = getattr(self, layer_name)
            if type(holder) is nn.ModuleDict:
                item = holder._modules.get(adapter_name)
                if item is None:
                    continue
            elif adapter_name in holder:
                item = holder[adapter_name]
            else:
                continue
            if not isinstance(item, nn.Module):
                params.append(item)
            elif item._modules:
                params += item.parameters()
            else:  # a leaf such as a factor: its own table (parameters() walks generators, ~10x slower)
                params += [p for p in item._parameters.values() if p is not None]
        return params

    def enable_adapters(self, enabled: bool) -> None:
        self.disable_adapters = not enabled
        self._refresh()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the weights; unmerge it before deleting it")
        for layer_name in self.adapter_layer_names + ("lora_dropout",):
            holder = getattr(self, layer_name)
            if adapter_name in holder:
                del holder[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling, self.use_rslora, self.dropout_p):
            table.pop(adapter_name, None)
        if self.base_rewrite is not None and self.base_rewrite.adapter_name == adapter_name:
            restore_base(self)  # its PiSSA/OLoRA residual goes with it: the original weight, bit for bit
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]
        self._dora_cache.pop(adapter_name, None)
        self._refresh()

    def _refresh(self) -> None:
        """Recompute, once per state change, which adapters the forward adds (keeps the hot path free of checks)."""
        # Plain attributes, written straight into the instance dict: Module.__setattr__ checks each value against
        # parameters and modules (~2 µs a field), and wrapping a 32-layer model refreshes 224 layers.
        state = vars(self)
        state["_stack_cache"] = None  # adapters added, deleted, merged: let the old stacks go
        self._dora_cache.clear()  # merges write through .data, which no version counter sees
        if self.disable_adapters:
            live = ()
        else:
            live = tuple(a for a in self.active_adapters if a in self.r and a not in self.merged_adapters)
        state["_live"] = live
        magnitudes = self._modules["lora_magnitude_vector"]
        state["_dora_live"] = any(a in magnitudes for a in live)

    def restore_base(self) -> None:
        """Give the base layer its original weight back if a PiSSA/OLoRA adapter rewrote it (``unload()``)."""
        restore_base(self)

    # -- merging ----------------------------------------------------------------------------------------------------
    def check_mergeable(self) -> None:
        """Raise ``ValueError`` where this layer's update cannot be folded into its weight."""

    def check_finite_merge(self, adapter_names: Sequence[str]) -> None:
        """Raise ``ValueError`` if merging any of ``adapter_names`` would put inf/nan into the weight."""
        weight = self.weight
        for name, total in self._merged_weights(adapter_names):
            if not torch.isfinite(total.to(weight.dtype)).all():
                raise ValueError(
                    f"merging adapter {name!r} would put non-finite values into {type(self.base_layer).__name__}'s "
                    "weight; nothing was merged"
                )
            bias = self.lora_bias_of(name)
            if bias is not None and not torch.isfinite(bias).all():
                raise ValueError(f"merging adapter {name!r} would put non-finite values into the bias; nothing was "
                                 "merged")

    def merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False, own_weight: bool = False,
              scratch: Optional[Scratch] = None, reversible: bool = True):
        """Fold adapters (default: the active ones) into the base weight, exactly reversibly
        (:func:`~lorakit.exact_merge.merge_exact`).

        Adapters already merged are skipped. ``own_weight``: the base weight is shared with another module (tied
        embeddings), so merge into a private copy and leave the shared one alone. ``safe_merge`` checks for
        non-finite results before the weight is touched. ``scratch``: work buffers to reuse across layers.
        ``reversible=False``: the same merged bits in one pass, but the layer can no longer unmerge (for
        ``merge_and_unload``, which throws the layer away).
        """
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        names = [n for n in names if n in self.r and n not in self.merged_adapters]
        if not names:
            return
        self.check_mergeable()
        self.check_dora_mergeable(names)
        if safe_merge:
            self.check_finite_merge(names)
        if own_weight and self._own_weight_of is None:
            shared = self.base_layer.weight
            self.base_layer.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
            self._own_weight_of = shared
        scratch = scratch or Scratch()
        scales = self._dora_scales(names)  # all from the weight before this merge, as the forward sees it
        for name in names:
            if name in scales:
                self._fixups[name] = self._merge_dora(name, scales[name], reversible)
            else:
                self._fixups[name] = self._merge_one(name, scratch, reversible)
            self.merged_adapters.append(name)
        self._refresh()

    def unmerge(self, scratch: Optional[Scratch] = None) -> None:
        """Subtract every merged adapter, last merged first, restoring the original weight bit for bit."""
        irreversible = [n for n in self.merged_adapters if getattr(self._fixups[n], "record", self._fixups[n]) is None]
        if irreversible:
            raise ValueError(f"adapter(s) {irreversible} were merged with reversible=False (for unloading); "
                             "they cannot be unmerged")
        scratch = scratch or Scratch()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            record = self._fixups.pop(name)
            if name in self.lora_magnitude_vector:
                self._unmerge_dora(name, record)
            else:
                self._unmerge_one(name, record, scratch)
        if self._own_weight_of is not None:
            self.base_layer.weight = self._own_weight_of
            self._own_weight_of = None
        self._refresh()

    def _merge_one(self, adapter_name: str, scratch: Scratch, reversible: bool):
        """Fold one adapter into the weight; returns what :meth:`_unmerge_one` needs (``None`` if not
        ``reversible``)."""
        record = merge_exact(self.weight.data, *self._merge_factors(adapter_name), scratch, record=reversible)
        if self.lora_bias_of(adapter_name) is None:
            return record
        base = self.base_layer
        created = base.bias is None  # the base has no bias: merging gives it one, unmerging takes it away
        if created:
            weight = self.weight
            base.bias = nn.Parameter(weight.new_zeros(weight.shape[1 if self.transpose_delta else 0]),
                                     requires_grad=False)
        bias_record = merge_exact(base.bias.data, *self._bias_factors(adapter_name), scratch, record=reversible)
        return (record, bias_record, created) if reversible else None

    def _unmerge_one(self, adapter_name: str, record, scratch: Scratch) -> None:
        """Take one adapter merged by :meth:`_merge_one` back out, bit for bit."""
        if self.lora_bias_of(adapter_name) is None:
            unmerge_exact(self.weight.data, *self._merge_factors(adapter_name), record, scratch)
            return
        record, bias_record, created = record
        unmerge_exact(self.weight.data, *self._merge_factors(adapter_name), record, scratch)
        unmerge_exact(self.base_layer.bias.data, *self._bias_factors(adapter_name), bias_record, scratch)
        if created:
            self.base_layer.bias = None

    def _bias_factors(self, adapter_name: str) -> tuple[Tensor, Tensor, float]:
        """``s · b`` as a product ``(b as a column) @ [[1]] · s``, for merging it exactly like a weight."""
        bias = self.lora_bias_of(adapter_name).detach()
        dtype = torch.promote_types(bias.dtype, torch.float32)
        return bias.to(dtype).view(-1, 1), torch.ones(1, 1, dtype=dtype, device=bias.device), self.scaling[adapter_name]

    def unwrapped(self) -> nn.Module:
        """The module to put back in this layer's place when unloading (merged or unmerged before)."""
        return self.base_layer

    def _merge_factors(self, adapter_name: str) -> tuple[Tensor, Tensor, float]:
        """:func:`lora_factors` of one adapter, for merge and unmerge."""
        A, B = self.factors(adapter_name)
        return lora_factors(A.detach(), B.detach(), self.scaling[adapter_name], self.transpose_delta)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.r[n]}, scaling={self.scaling[n]:g}" for n in self.adapter_names)
