"""The base class of every adapted layer: a base layer plus any number of named low-rank adapters.

Every adapted layer keeps the user's layer untouched as ``base_layer`` and adds, per adapter name, a low-rank
pair ``lora_A``/``lora_B`` (``lora_embedding_A``/``lora_embedding_B`` for embeddings), a ``scaling`` and a
dropout, with PEFT's attribute names so state dicts and user code written for PEFT keep working. The maths is in
:mod:`lorakit.ops`; merge and unmerge fold the update in exactly reversibly with :mod:`lorakit.exact_merge`.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..exact_merge import Scratch, merge_exact, unmerge_exact
from ..ops import adapter_dtype, kaiming_uniform_, lora_delta, lora_factors, lora_scaling
from .construction import init_module, new_module
from .init import check_base_rewrite, restore_base
from .rows import RowAdapters, StackCache
from .scales import AdapterScales

__all__ = ["LoraLayer", "factor_weight"]


def factor_weight(module: nn.Module) -> Tensor:
    """``module.weight``, read from ``_parameters`` where it is registered there: ``Module.__getattr__`` is a Python
    call that costs more than a batch-1 LoRA matmul. Read at every call, so replaced parameters are picked up."""
    weight = module._parameters.get("weight")
    return module.weight if weight is None else weight


class LoraLayer(AdapterScales, nn.Module):
    """A base layer plus any number of named low-rank adapters.

    Subclasses say how to build one adapter's factors (:meth:`_create_factors`), how to read them as tensors in
    PEFT's orientation (:meth:`factors`) and how to add one adapter's output (:meth:`_add_adapter_output`).
    Everything else (adapter bookkeeping, merge, unmerge, delete) lives here, once; the scale controls
    (``set_scale``, ``scale_layer``, ``unscale_layer``) in :class:`~lorakit.layers.scales.AdapterScales`.
    """

    #: names of the ModuleDict/ParameterDict attributes holding per-adapter tensors (for save/load and deletion)
    adapter_layer_names: tuple[str, ...] = ("lora_A", "lora_B")
    #: ``True`` where the base weight is stored ``in × out``
    transpose_delta: bool = False

    def __init__(self, base_layer: nn.Module) -> None:
        init_module(self)
        # Written straight into the module's tables: the names are new here, so Module.__setattr__'s checks
        # (~3 µs a field, more than the rest of building the layer) would find nothing to do.
        self._modules.update(
            base_layer=base_layer,
            lora_A=new_module(nn.ModuleDict),
            lora_B=new_module(nn.ModuleDict),
            lora_dropout=new_module(nn.ModuleDict),
        )
        vars(self).update(
            training=base_layer.training,  # new parts follow the mode of the layer they adapt
            r={}, lora_alpha={}, scaling={}, use_rslora={}, dropout_p={},  # per adapter name
            active_adapters=[],
            merged_adapters=[],
            disable_adapters=False,
            _fixups={},  # per merged adapter, the MergeRecord that makes unmerging exact
            _own_weight_of=None,  # the shared weight we copied away from on merge
            _live=(),  # adapters the forward adds: active, present, unmerged, not disabled
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
    ) -> None:
        """Add (or replace) the adapter ``adapter_name`` with rank ``r``; its weights follow ``init_lora_weights``."""
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"rank r={r!r} for adapter {adapter_name!r} is invalid: expected a positive int")
        check_base_rewrite(self, adapter_name)
        weight = self.base_layer.weight
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        self._create_factors(adapter_name, r, dtype=adapter_dtype(weight), device=device)
        if lora_dropout > 0:
            self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout).train(self.training)
        else:
            self.lora_dropout[adapter_name] = new_module(nn.Identity, training=self.training)
        self.dropout_p[adapter_name] = float(lora_dropout)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = use_rslora
        self.scaling[adapter_name] = lora_scaling(lora_alpha, r, use_rslora)
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        trainable = adapter_name in self.active_adapters
        for p in self._adapter_parameters(adapter_name):
            p.requires_grad_(trainable)
        self._refresh()

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
        return lora_delta(A, B, self.scaling[adapter_name], self.base_layer.weight.shape, self.transpose_delta)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self._modules["base_layer"](x, *args, **kwargs)  # not self.base_layer: a Python-level lookup
        if self._rows is not None:
            rows = self._rows
            return self._add_row_outputs(out, x, rows) if any(n in self.r for n in rows.names) else out
        for name in self._live:
            out = self._add_adapter_output(out, x, name)
        return out

    # -- mixed batches: a different adapter per batch row ----------------------------------------------------------
    def set_row_adapters(self, rows: Optional[RowAdapters]) -> None:
        """Route batch rows to adapters (:mod:`lorakit.mixed_batch` sets this for one call, then ``None``)."""
        self._rows = rows

    def _add_row_outputs(self, out: Tensor, x: Tensor, rows: RowAdapters) -> Tensor:
        """Each row gets its own adapter's output. This general version runs each adapter on its rows; layer
        kinds with a batched path (Linear, Embedding) override it."""
        index = rows.for_batch(x.shape[0])
        for i, name in enumerate(rows.names, start=1):
            if name not in self.r:
                continue
            picked = (index == i).nonzero().squeeze(1)
            if picked.numel():
                out = out.index_copy(0, picked, self._add_adapter_output(out[picked], x[picked], name))
        return out

    def _stacked_factors(self, names: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``A`` of every adapter in ``names`` as ``(K+1, r_max, in)`` and ``scaling·B`` as ``(K+1, out, r_max)``;
        slot 0 (the base model) and adapters this layer lacks are zeros, smaller ranks are zero-padded.

        Cached while no gradient is recorded (see :class:`~lorakit.layers.rows.StackCache`).
        """
        present = [n for n in names if n in self.r]
        tensors = self._factor_list(present)
        scalings = [self.scaling.get(n) for n in names]
        grad = torch.is_grad_enabled() or torch.compiler.is_compiling()  # a compiled graph builds its own stacks
        if not grad and self._stack_cache is not None and self._stack_cache.matches(names, scalings, tensors):
            return self._stack_cache.stacks
        pairs = dict(zip(present, zip(tensors[0::2], tensors[1::2])))
        any_A, any_B = tensors[:2]
        r_max = max(self.r[n] for n in present)
        As = [any_A.new_zeros(r_max, *any_A.shape[1:])]
        Bs = [any_B.new_zeros(any_B.shape[0], r_max)]
        for name in names:
            if name not in pairs:
                As.append(As[0])
                Bs.append(Bs[0])
            else:
                A, B = pairs[name]
                As.append(F.pad(A, (0, 0, 0, r_max - A.shape[0])))
                Bs.append(F.pad(B, (0, r_max - B.shape[1])) * self.scaling[name])
        A_stack, B_stack = torch.stack(As), torch.stack(Bs)
        self._stack_cache = None if grad else StackCache(names, scalings, tensors, (A_stack, B_stack))
        return A_stack, B_stack

    def _factor_list(self, names: Sequence[str]) -> list[Tensor]:
        """``[A, B, A, B, …]`` (:meth:`factors`) of the adapters ``names``, all present in this layer."""
        return [t for n in names for t in self.factors(n)]

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

    def set_adapter(self, adapter_names: str | Iterable[str]) -> None:
        """Make ``adapter_names`` the active adapters; their parameters train, the others' don't."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in self.adapter_names:
            trainable = name in names
            for p in self._adapter_parameters(name):
                p.requires_grad_(trainable)
        self.active_adapters = names
        self._refresh()

    def _adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """Every parameter one adapter holds in :attr:`adapter_layer_names` (what trains while it is active)."""
        params = []
        for layer_name in self.adapter_layer_names:
            holder = getattr(self, layer_name)
            if adapter_name not in holder:
                continue
            item = holder[adapter_name]
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
        self._refresh()

    def _refresh(self) -> None:
        """Recompute, once per state change, which adapters the forward adds (keeps the hot path free of checks)."""
        self._stack_cache = None  # adapters added, deleted, merged: let the old stacks go
        if self.disable_adapters:
            self._live = ()
        else:
            self._live = tuple(a for a in self.active_adapters if a in self.r and a not in self.merged_adapters)

    def restore_base(self) -> None:
        """Give the base layer its original weight back if a PiSSA/OLoRA adapter rewrote it (``unload()``)."""
        restore_base(self)

    # -- merging ----------------------------------------------------------------------------------------------------
    def check_mergeable(self) -> None:
        """Raise ``ValueError`` where this layer's update cannot be folded into its weight."""

    def check_finite_merge(self, adapter_names: Sequence[str]) -> None:
        """Raise ``ValueError`` if merging any of ``adapter_names`` would put inf/nan into the weight."""
        weight = self.base_layer.weight
        total = weight.to(torch.promote_types(weight.dtype, torch.float32))
        for name in adapter_names:
            total = total + self.delta_weight(name)
            if not torch.isfinite(total.to(weight.dtype)).all():
                raise ValueError(
                    f"merging adapter {name!r} would put non-finite values into {type(self.base_layer).__name__}'s "
                    "weight; nothing was merged"
                )

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
        if safe_merge:
            self.check_finite_merge(names)
        if own_weight and self._own_weight_of is None:
            shared = self.base_layer.weight
            self.base_layer.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
            self._own_weight_of = shared
        scratch = scratch or Scratch()
        for name in names:
            self._fixups[name] = merge_exact(self.base_layer.weight.data, *self._merge_factors(name), scratch,
                                             record=reversible)
            self.merged_adapters.append(name)
        self._refresh()

    def unmerge(self, scratch: Optional[Scratch] = None) -> None:
        """Subtract every merged adapter, last merged first, restoring the original weight bit for bit."""
        irreversible = [n for n in self.merged_adapters if self._fixups[n] is None]
        if irreversible:
            raise ValueError(f"adapter(s) {irreversible} were merged with reversible=False (for unloading); "
                             "they cannot be unmerged")
        scratch = scratch or Scratch()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            unmerge_exact(self.base_layer.weight.data, *self._merge_factors(name), self._fixups.pop(name), scratch)
        if self._own_weight_of is not None:
            self.base_layer.weight = self._own_weight_of
            self._own_weight_of = None
        self._refresh()

    def _merge_factors(self, adapter_name: str) -> tuple[Tensor, Tensor, float]:
        """:func:`lora_factors` of one adapter, for merge and unmerge."""
        A, B = self.factors(adapter_name)
        with torch.no_grad():
            return lora_factors(A.detach(), B.detach(), self.scaling[adapter_name], self.transpose_delta)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.r[n]}, scaling={self.scaling[n]:g}" for n in self.adapter_names)
