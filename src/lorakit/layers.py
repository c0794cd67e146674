"""The adapted layers: one base class holding per-adapter A/B, one small class per kind of base layer.

Every adapted layer keeps the user's layer untouched as ``base_layer`` and adds, per adapter name, a low-rank
pair ``lora_A``/``lora_B`` (``lora_embedding_A``/``lora_embedding_B`` for embeddings), a ``scaling`` and a
dropout, with PEFT's attribute names so state dicts and user code written for PEFT keep working.

The update ``s·B@A`` as a weight is computed by :func:`lora_delta` (forward checks, export), exactly as PEFT
computes it; merge and unmerge take it in factored form (:func:`lora_factors`, the same bits) and fold it in
exactly reversibly with :mod:`lorakit.exact_merge`.
"""

from __future__ import annotations

import copy
import math
import operator
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .exact_merge import Scratch, merge_exact, unmerge_exact
from .kernels import add_dropped_lora, add_lora, add_lora_rows

try:  # the global hooks that Module.__call__ checks (see Linear.forward)
    from torch.nn.modules.module import (
        _global_backward_hooks,
        _global_backward_pre_hooks,
        _global_forward_hooks,
        _global_forward_pre_hooks,
    )
except ImportError:  # a torch that keeps them elsewhere: assume there are hooks, always call the module
    _global_forward_hooks = _global_forward_pre_hooks = _global_backward_hooks = _global_backward_pre_hooks = {0: 0}
_LINEAR_FORWARD = nn.Linear.forward

__all__ = [
    "LoraLayer",
    "Linear",
    "Embedding",
    "Conv",
    "lora_delta",
    "lora_factors",
    "register_lora_layer",
    "lora_layer_for",
]


# ----------------------------------------------------------------------------------------------------------------
# The maths, in one place
# ----------------------------------------------------------------------------------------------------------------
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
    dtype = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
    left, right = B.flatten(1).to(dtype), A.flatten(1).to(dtype)
    if scaling != 0 and math.frexp(scaling)[0] == 0.5:  # ±2^k
        left, scaling = left * scaling, 1.0
    return (right.T, left.T, scaling) if transpose else (left, right, scaling)


def _kaiming_uniform_(t: Tensor) -> Tensor:
    """``nn.init.kaiming_uniform_(t, a=sqrt(5))`` (torch's default for Linear/Conv weights): U(±1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(math.prod(t.shape[1:]))
    return t.uniform_(-bound, bound)


def _adapter_dtype(weight: Tensor) -> torch.dtype:
    """Adapters train in float32 on half-precision bases (PEFT's ``autocast_adapter_dtype``), else in the base's."""
    if weight.dtype in (torch.float16, torch.bfloat16) or not weight.dtype.is_floating_point:
        return torch.float32
    return weight.dtype


_PRISTINE = vars(nn.Module())  # the fields nn.Module.__init__ gives a module in the installed torch
_MODULE_FIELDS = {k: v for k, v in _PRISTINE.items() if not isinstance(v, (dict, set))}
_MODULE_TABLES = tuple((k, type(v)) for k, v in _PRISTINE.items() if isinstance(v, (dict, set)))


def _init_module(module: nn.Module) -> None:
    """Give ``module`` the state ``nn.Module.__init__`` gives it, in half the time.

    ``nn.Module.__init__`` writes its 17 fields one at a time through ``super().__setattr__``; an adapted layer
    is seven modules (the layer, three ModuleDicts, A, B, dropout), so a 32-layer Llama builds 1568 of them.
    The fields are those of a pristine ``nn.Module()`` of the installed torch, with fresh empty tables.
    """
    state = vars(module)
    state.update(_MODULE_FIELDS)
    for key, table in _MODULE_TABLES:
        state[key] = table()


def _new_module(cls: type, training: bool = True) -> nn.Module:
    """A new ``cls`` (a module whose ``__init__`` adds nothing to ``nn.Module``'s: ModuleDict, Identity) in the
    given mode (it has no children yet, so its own flag is all ``train()`` would set)."""
    module = cls.__new__(cls)
    _init_module(module)
    vars(module)["training"] = training
    return module


@dataclass(frozen=True)
class RowAdapters:
    """Which adapter each batch row uses in a mixed batch: ``index[n] = i`` means ``names[i-1]``; 0 is the base.

    A layer that sees ``k`` times as many rows (beam search, ``num_return_sequences``, or tokens flattened
    batch-major) gives each original row's adapter to its ``k`` consecutive copies.
    """

    names: tuple[str, ...]
    index: Tensor
    #: row ``n`` uses the ``n``-th distinct adapter (a typical multi-tenant decode batch): the stacked factors
    #: are then already in row order and need no per-row gather
    in_order: bool = False

    @classmethod
    def from_names(cls, adapter_names: Sequence[str], base: str, device: torch.device) -> "RowAdapters":
        names = tuple(dict.fromkeys(n for n in adapter_names if n != base))
        index = torch.tensor([0 if n == base else names.index(n) + 1 for n in adapter_names], device=device)
        return cls(names, index, in_order=list(adapter_names) == list(names))

    def rows_of(self, stack: Tensor, n: int) -> Tensor:
        """``stack[index]`` for a batch of ``n`` rows; a view of ``stack``, not a copy, when rows are in order."""
        if self.in_order and n == self.index.shape[0]:
            return stack[1:]
        return stack[self.for_batch(n)]

    def for_batch(self, n: int) -> Tensor:
        rows = self.index.shape[0]
        if n == rows:
            return self.index
        if n % rows == 0:
            return self.index.repeat_interleave(n // rows)
        raise ValueError(f"adapter_names has {rows} entries but a layer received a batch of {n} rows")


_version = operator.attrgetter("_version")


class _StackCache:
    """A layer's stacked factors for one list of adapter names, with what they were built from.

    Valid while the names, the scalings and the factor tensors are the same: the same objects (holding them keeps
    their ids from being reused; a replaced parameter is a new object) at the same version counters (an in-place
    update, such as an optimizer step or ``load_state_dict``, bumps them). The checks run in C loops: a mixed
    batch of 32 adapters checks 64 tensors per layer per step.
    """

    def __init__(self, names: Sequence[str], scalings: list, tensors: list, stacks: tuple[Tensor, Tensor]) -> None:
        self.names, self.scalings, self.tensors, self.stacks = tuple(names), scalings, tensors, stacks
        self.versions = list(map(_version, tensors))

    def matches(self, names: Sequence[str], scalings: list, tensors: list) -> bool:
        return (
            self.names == tuple(names)
            and self.scalings == scalings
            and len(self.tensors) == len(tensors)
            and all(map(operator.is_, self.tensors, tensors))
            and self.versions == list(map(_version, tensors))
        )


# ----------------------------------------------------------------------------------------------------------------
# The base class
# ----------------------------------------------------------------------------------------------------------------
class LoraLayer(nn.Module):
    """A base layer plus any number of named low-rank adapters.

    Subclasses say how to build one adapter's factors (:meth:`_create_factors`), how to read them as tensors in
    PEFT's orientation (:meth:`factors`) and how to add one adapter's output (:meth:`_add_adapter_output`).
    Everything else (adapter bookkeeping, merge, unmerge, delete) lives here, once.
    """

    #: names of the ModuleDict/ParameterDict attributes holding per-adapter tensors (for save/load and deletion)
    adapter_layer_names: tuple[str, ...] = ("lora_A", "lora_B")
    #: ``True`` where the base weight is stored ``in × out``
    transpose_delta: bool = False

    def __init__(self, base_layer: nn.Module) -> None:
        _init_module(self)
        # Written straight into the module's tables: the names are new here, so Module.__setattr__'s checks
        # (~3 µs a field, more than the rest of building the layer) would find nothing to do.
        self._modules.update(
            base_layer=base_layer,
            lora_A=_new_module(nn.ModuleDict),
            lora_B=_new_module(nn.ModuleDict),
            lora_dropout=_new_module(nn.ModuleDict),
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
        weight = self.base_layer.weight
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        self._create_factors(adapter_name, r, dtype=_adapter_dtype(weight), device=device)
        if lora_dropout > 0:
            self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout).train(self.training)
        else:
            self.lora_dropout[adapter_name] = _new_module(nn.Identity, training=self.training)
        self.dropout_p[adapter_name] = float(lora_dropout)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = use_rslora
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        trainable = adapter_name in self.active_adapters
        for p in self._adapter_parameters(adapter_name):
            p.requires_grad_(trainable)
        self._refresh()

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights) -> None:
        """PEFT's initialisations: ``True`` kaiming-uniform A and zero B; ``"gaussian"`` normal A (std 1/r) and
        zero B; ``False`` both kaiming-uniform (a non-zero adapter, for tests). Factors are created uninitialised,
        so this is the only initialisation they get."""
        A, B = self._factor_params(adapter_name)
        with torch.no_grad():
            if init_lora_weights == "gaussian":
                A.normal_(std=1 / self.r[adapter_name])
            else:
                _kaiming_uniform_(A)
            if init_lora_weights is False:
                _kaiming_uniform_(B)
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
        return (_weight(modules["lora_A"]._modules[adapter_name]), _weight(modules["lora_B"]._modules[adapter_name]))

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
            return out if self.r.keys().isdisjoint(rows.names) else self._add_row_outputs(out, x, rows)
        for name in self._live:
            out = self._add_adapter_output(out, x, name)
        return out

    # -- mixed batches: a different adapter per batch row ----------------------------------------------------------
    def _add_row_outputs(self, out: Tensor, x: Tensor, rows: "RowAdapters") -> Tensor:
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

        Cached while no gradient is recorded (see :class:`_StackCache`).
        """
        present = [n for n in names if n in self.r]
        tensors = self._factor_list(present)
        scalings = [self.scaling.get(n) for n in names]
        grad = torch.is_grad_enabled()
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
        self._stack_cache = None if grad else _StackCache(names, scalings, tensors, (A_stack, B_stack))
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
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]
        self._refresh()

    def _refresh(self) -> None:
        """Recompute, once per state change, which adapters the forward adds (keeps the hot path free of checks)."""
        self._stack_cache = None  # adapters added, deleted, merged: let the old stacks go
        if self.disable_adapters:
            self._live = ()
        else:
            self._live = tuple(a for a in self.active_adapters if a in self.r and a not in self.merged_adapters)

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


# ----------------------------------------------------------------------------------------------------------------
# One class per kind of base layer
# ----------------------------------------------------------------------------------------------------------------
class Factor(nn.Linear):
    """A bias-free ``nn.Linear`` whose weight is allocated but not initialised.

    ``nn.Linear`` initialises in its constructor and LoRA re-initialises right after; skipping the first one
    halves the cost of building adapters (the conv factors are rare enough to take the plain constructors).
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device) -> None:
        _init_module(self)
        vars(self).update(in_features=in_features, out_features=out_features)
        weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        self._parameters.update(weight=weight, bias=None)  # new names: see LoraLayer.__init__

class Linear(LoraLayer):
    """``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (weight stored ``in × out``, detected by class)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        transpose = _is_conv1d(base_layer)
        in_features, out_features = base_layer.weight.shape if transpose else base_layer.weight.shape[::-1]
        vars(self).update(transpose_delta=transpose, in_features=in_features, out_features=out_features)

    @property
    def fan_in_fan_out(self) -> bool:
        return self.transpose_delta

    def _create_factors(self, adapter_name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        self.lora_A[adapter_name] = Factor(self.in_features, r, dtype, device)
        self.lora_B[adapter_name] = Factor(r, self.out_features, dtype, device)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """:meth:`LoraLayer.forward`, calling the base layer as ``F.linear`` where that is exactly what calling it
        would do: a stock ``nn.Linear`` (not a subclass: quantized and parametrized layers have their own forward)
        with no hooks of its own or global ones, no ``forward`` patched onto the instance or the class (accelerate's
        offloading patches the instance) and its tensors registered as parameters (FSDP swaps in plain tensors).

        At batch-1 decode ``Module.__call__`` costs as much as a LoRA matmul, and so does every further Python call
        per layer (the interpreter's code and data are out of cache after each layer's weights stream through), so
        the checks are written out here rather than in a helper.
        """
        base = self._modules["base_layer"]
        params = base._parameters
        if (
            args or kwargs or self._rows is not None
            or type(base) is not nn.Linear or nn.Linear.forward is not _LINEAR_FORWARD or "forward" in base.__dict__
            or base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks
            or _global_forward_hooks or _global_forward_pre_hooks
            or _global_backward_hooks or _global_backward_pre_hooks
            or "weight" not in params or "bias" not in params
        ):
            return super().forward(x, *args, **kwargs)
        out = F.linear(x, params["weight"], params["bias"])
        for name in self._live:
            out = self._add_adapter_output(out, x, name)
        return out

    def _add_adapter_output(self, out: Tensor, x: Tensor, adapter_name: str) -> Tensor:
        A, B = self._factor_params(adapter_name)
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        p = self.dropout_p[adapter_name]
        if p and self.training:
            return add_dropped_lora(out, x, A, B, self.scaling[adapter_name], p)
        return add_lora(out, F.linear(x, A), B, self.scaling[adapter_name])

    def _factor_list(self, names: Sequence[str]) -> list[Tensor]:
        """As the base class's, read in one loop without a method call per adapter: a mixed batch reads every
        adapter's factors in every layer at every step. Factor modules hold ``weight`` in ``_parameters`` unless
        something (a parametrization) replaced it; then the general path."""
        A, B = self._modules["lora_A"]._modules, self._modules["lora_B"]._modules
        try:
            return [t for n in names for t in (A[n]._parameters["weight"], B[n]._parameters["weight"])]
        except KeyError:
            return super()._factor_list(names)

    def _add_row_outputs(self, out: Tensor, x: Tensor, rows: "RowAdapters") -> Tensor:
        index = rows.for_batch(x.shape[0])
        A_stack, B_stack = self._stacked_factors(rows.names)
        if x.dtype != A_stack.dtype:
            x = x.to(A_stack.dtype)
        if self.training:
            p = x.new_tensor([0.0] + [self.dropout_p.get(n, 0.0) for n in rows.names])[index]
            if p.any():
                p = p.view(-1, *([1] * (x.dim() - 1)))
                x = x * torch.bernoulli((1 - p).expand_as(x)) / (1 - p)
        return add_lora_rows(out, x, rows.rows_of(A_stack, x.shape[0]), rows.rows_of(B_stack, x.shape[0]))


class Embedding(LoraLayer):
    """``nn.Embedding``: A is ``r × num_embeddings`` and is looked up like the base table, B is ``dim × r``."""

    adapter_layer_names = ("lora_embedding_A", "lora_embedding_B")
    transpose_delta = True

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim

    def _create_factors(self, adapter_name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r, dtype=dtype, device=device))

    def _factor_params(self, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter]:
        modules = self._modules  # ParameterDict keeps its entries in _parameters
        return (modules["lora_embedding_A"]._parameters[adapter_name],
                modules["lora_embedding_B"]._parameters[adapter_name])

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights) -> None:
        """Reversed roles (PEFT, for True and "gaussian" alike): A starts at zero and B normal, so the looked-up
        rows start at zero while B's columns already point somewhere. ``False``: both normal."""
        A, B = self._factor_params(adapter_name)
        with torch.no_grad():
            if init_lora_weights is False:
                nn.init.normal_(A)
            else:
                nn.init.zeros_(A)
            nn.init.normal_(B)

    def _lookup(self, ids: Tensor, table: Tensor) -> Tensor:
        base = self.base_layer
        return F.embedding(ids, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)

    def _add_adapter_output(self, out: Tensor, x: Tensor, adapter_name: str) -> Tensor:
        A, B = self._factor_params(adapter_name)
        return add_lora(out, self._lookup(x, A.T), B, self.scaling[adapter_name])

    def _add_row_outputs(self, out: Tensor, x: Tensor, rows: "RowAdapters") -> Tensor:
        """One lookup in all adapters' A tables laid end to end, then one batched matmul with each row's B."""
        index = rows.for_batch(x.shape[0])
        A_stack, B_stack = self._stacked_factors(rows.names)  # (K+1, r, num), (K+1, dim, r)
        tables = A_stack.transpose(1, 2).reshape(-1, A_stack.shape[1])  # ((K+1)·num, r)
        offset = (index * self.in_features).view(-1, *([1] * (x.dim() - 1)))
        h = F.embedding(x + offset, tables)
        n = x.shape[0]
        y = torch.bmm(h.reshape(n, -1, h.shape[-1]), rows.rows_of(B_stack, n).transpose(1, 2))
        return out + y.view(out.shape).to(out.dtype)


class Conv(LoraLayer):
    """``nn.Conv1d/2d/3d`` of any kernel, stride, padding, dilation, padding mode, and their subclasses.

    A is a conv with the base's geometry and ``r`` output channels, B a 1×1 conv (grouped like the base). For a
    subclass with its own ``forward`` (e.g. "same"-padding convs), A is a shallow twin of the base layer with its
    own weight, so the LoRA branch sees exactly the input transformation the base applies.
    """

    def __init__(self, base_layer: nn.modules.conv._ConvNd) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self._kernel_dims = base_layer.weight.dim() - 2

    def _create_factors(self, adapter_name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        base = self.base_layer
        groups = base.groups
        if r % groups:
            raise ValueError(
                f"rank r={r} is not divisible by the conv's groups={groups} ({type(base).__name__}); "
                "choose a rank that is a multiple of groups"
            )
        weight = torch.empty(r, base.in_channels, *base.kernel_size, dtype=dtype, device=device)
        conv = _torch_class(base)
        if type(base).forward is not conv.forward:
            self.lora_A[adapter_name] = _conv_twin(base, weight)
        else:
            self.lora_A[adapter_name] = conv(
                base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                bias=False, padding_mode=base.padding_mode, dtype=dtype, device=device,
            )
        ones = (1,) * self._kernel_dims
        conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[self._kernel_dims]
        self.lora_B[adapter_name] = conv_cls(
            r, self.out_features, ones, ones, groups=groups, bias=False, dtype=dtype, device=device
        )

    def check_mergeable(self) -> None:
        if self.base_layer.groups > 1:
            raise ValueError(
                f"cannot merge LoRA into {type(self.base_layer).__name__} with groups={self.base_layer.groups}: the "
                "update is a dense conv and does not fit a grouped weight; keep the adapter unmerged"
            )

    def delta_weight(self, adapter_name: str) -> Tensor:
        self.check_mergeable()
        return super().delta_weight(adapter_name)

    def _add_adapter_output(self, out: Tensor, x: Tensor, adapter_name: str) -> Tensor:
        A = self.lora_A[adapter_name]
        h = A(self.lora_dropout[adapter_name](x.to(A.weight.dtype)))
        y = self.lora_B[adapter_name](h) * self.scaling[adapter_name]
        return out + y.to(out.dtype)


def _weight(module: nn.Module) -> Tensor:
    """``module.weight``, read from ``_parameters`` where it is registered there: ``Module.__getattr__`` is a Python
    call that costs more than a batch-1 LoRA matmul. Read at every call, so replaced parameters are picked up."""
    weight = module._parameters.get("weight")
    return module.weight if weight is None else weight


def _torch_class(module: nn.Module) -> type:
    """The torch.nn class ``module``'s class derives from (itself for a stock layer)."""
    return next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn"))


def _conv_twin(base: nn.Module, weight: Tensor) -> nn.Module:
    """A shallow copy of ``base`` (same class, same submodules such as padding) that convolves with ``weight``.

    ``groups`` is 1 and there is no bias: the twin computes ``A``'s dense conv through the subclass's own forward.
    """
    twin = copy.copy(base)
    twin._parameters = {}
    twin._buffers = dict(base._buffers)
    twin._modules = dict(base._modules)
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks"):
        if hasattr(twin, hooks):
            setattr(twin, hooks, type(getattr(base, hooks))())
    twin.weight = nn.Parameter(weight)
    twin.bias = None
    twin.out_channels, twin.groups = weight.shape[0], 1
    return twin


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` (weight stored ``in × out``), recognised without importing transformers."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(module).__mro__)


# ----------------------------------------------------------------------------------------------------------------
# Which layer class adapts which module
# ----------------------------------------------------------------------------------------------------------------
_REGISTRY: dict[type, Callable[[nn.Module], LoraLayer]] = {
    nn.Linear: Linear,
    nn.Embedding: Embedding,
    nn.Conv1d: Conv,
    nn.Conv2d: Conv,
    nn.Conv3d: Conv,
}


def register_lora_layer(module_type: type, layer_cls: type[LoraLayer]) -> None:
    """Teach lorakit to adapt ``module_type`` (and its subclasses) with ``layer_cls``.

    ``layer_cls`` subclasses :class:`LoraLayer` and implements ``_create_factors``, ``_add_adapter_output`` and,
    if its tensors are not ``lora_A[name].weight``/``lora_B[name].weight``, ``_factor_params``. Its base module
    must have a ``weight`` that ``lora_delta`` can reshape the update into, if it is to be merged.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not (isinstance(layer_cls, type) and issubclass(layer_cls, LoraLayer)):
        raise TypeError(f"layer_cls must be a LoraLayer subclass, got {layer_cls!r}")
    _REGISTRY[module_type] = layer_cls


def lora_layer_for(module: nn.Module) -> Optional[Callable[[nn.Module], LoraLayer]]:
    """The layer class that adapts ``module`` (most specific registered base class wins), or None."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
        if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
            return Linear
    return None
