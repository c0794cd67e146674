"""add_weighted_adapter: a new adapter made from existing ones (task arithmetic, model soups, style mixing).

Two parts. First, pure tensor functions that know nothing of modules: the merge methods (weighted sum, TIES,
DARE, magnitude pruning) on same-shaped tensors, and, on one layer's factors in PEFT's orientation (``A: r × n``,
``B: m × r``, ``n`` the flattened input size, e.g. ``in · k…`` for convs), concatenation, the A/B-wise
combination and truncated SVD. Second,
:func:`add_weighted_adapter`, which checks its arguments, computes every layer's new ``A``/``B`` with those
functions (so bad input fails before the model changes), and only then adds the new adapter to the model.

Combination types (PEFT's names and numbers; ``cᵢ = wᵢ·sᵢ`` is adapter ``i``'s weight times its scaling):

- ``cat``: ``A = [c₁A₁; c₂A₂; …]``, ``B = [B₁ B₂ …]``, rank ``Σ rᵢ``; exactly ``Σ wᵢ·ΔWᵢ``.
- ``svd``: ``Σ wᵢ·ΔWᵢ`` (each ``ΔWᵢ = sᵢ·BᵢAᵢ`` from :meth:`LoraLayer.delta_weight`, so each adapter is scaled
  exactly once whatever its ``lora_alpha``, ``r``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``),
  truncated to ``svd_rank`` by SVD: the best rank-``svd_rank`` approximation, exact when the rank suffices.
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: PEFT's A/B-wise combination. The A's
  are merged with weights ``sign(cᵢ)·√|cᵢ|`` and the B's with ``√|cᵢ|``, separately, so all ranks in a layer must
  be equal. With one adapter ``linear`` is exact; with several the update is ``(Σ√|cᵢ|Bᵢ)(Σ±√|cᵢ|Aᵢ)``, which has
  cross terms ``BᵢAⱼ`` and is *not* ``Σ wᵢ·ΔWᵢ``. Use ``cat`` or ``svd`` for the exact weighted sum.
- ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the merge method applied to the
  full updates ``ΔWᵢ``, then truncated SVD as for ``svd``.

The new adapter has ``lora_alpha = r`` in every layer and ``use_rslora=False``, so its scaling is exactly 1 and
the combined scale lives in the factors. Its config lists the exact wrapped modules as ``target_modules`` and
writes per-layer ranks (and the matching alphas) into ``rank_pattern``/``alpha_pattern``, so the saved adapter
reloads with the same shapes in lorakit and in PEFT.

Deliberate differences from PEFT (each has a test that names it):

- PEFT copies ``use_rslora`` from the first adapter into the new config, which then scales the combination by
  ``√r`` a second time; here scaling is always 1.
- PEFT replaces the combination type by ``linear`` when only one adapter is given (ignoring ``svd_rank`` and
  ``density``); here the requested type is applied.
- PEFT's ``svd`` family fails on Conv1d/Conv3d layers; here every conv is flattened to ``out × (in·k…)``.
- PEFT gives the new adapter a fresh copy of each ``modules_to_save`` module, losing what the source adapter
  trained; here the new adapter gets a copy of that adapter's trained module (see below).
- An existing ``adapter_name``, a ``density`` outside (0, 1], or an option that the chosen type would ignore raise
  ``ValueError`` (PEFT returns silently or ignores them).

``modules_to_save``: where exactly one of the combined adapters has its own copy of a module, the new adapter
gets a copy of that trained module as it is (a whole module has no "update" to weight, so the weight does not
apply to it); where several do, the combination is ambiguous and refused, as in PEFT.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections import Counter
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from .keys import check_adapter_names

__all__ = [
    "COMBINATION_TYPES",
    "add_weighted_adapter",
    "concat_factors",
    "combine_factors",
    "merge_tensors",
    "magnitude_prune",
    "random_prune",
    "majority_sign_mask",
    "truncated_svd",
]

#: merge methods: how a list of same-shaped tensors and their weights become one tensor
MERGE_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
COMBINATION_TYPES = ("cat", "svd") + MERGE_METHODS + tuple(f"{m}_svd" for m in MERGE_METHODS if m != "linear")
_PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
_SIGN_ELECTING = ("ties", "dare_ties")
_RANDOM = ("dare_linear", "dare_ties")


# ----------------------------------------------------------------------------------------------------------------
# Pure tensor functions
# ----------------------------------------------------------------------------------------------------------------
def magnitude_prune(tensor: Tensor, density: float) -> Tensor:
    """Keep the ``int(density · numel)`` entries of largest magnitude, zero the rest (TIES' trim step)."""
    k = int(density * tensor.numel())
    if k >= tensor.numel():
        return tensor
    keep = torch.zeros(tensor.numel(), dtype=torch.bool, device=tensor.device)
    keep[torch.topk(tensor.abs().flatten(), k).indices] = True
    return tensor * keep.view_as(tensor)


def random_prune(tensor: Tensor, density: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """DARE: keep each entry with probability ``density`` and divide the survivors by ``density`` (so the
    expectation is unchanged). The mask is drawn from ``generator`` (on its device) or, if None, torch's global
    generator; ``density >= 1`` keeps everything."""
    if density >= 1:
        return tensor
    device = generator.device if generator is not None else tensor.device
    probs = torch.full(tensor.shape, density, dtype=tensor.dtype, device=device)
    mask = torch.bernoulli(probs, generator=generator).to(tensor.device)
    return tensor * mask / density


def majority_sign_mask(stacked: Tensor, method: str = "total") -> Tensor:
    """TIES' sign election over dim 0: True where an entry has the elected sign. ``"total"`` elects the sign of
    the sum, ``"frequency"`` the more frequent sign; a tie elects +."""
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(votes >= 0, 1.0, -1.0).to(sign.dtype)


def merge_tensors(
    method: str,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    density: Optional[float] = None,
    majority_sign_method: str = "total",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Merge same-shaped ``tensors`` with ``weights`` by ``method`` (one of :data:`MERGE_METHODS`).

    ``linear``: ``Σ wᵢ tᵢ``. ``magnitude_prune``: the same after keeping each tensor's top ``density`` entries.
    ``dare_linear``: after DARE's random drop-and-rescale. ``ties``/``dare_ties``: after pruning, each entry
    keeps only the tensors that agree with the elected sign (elected on the unweighted pruned tensors) and their
    weighted sum is divided by how many agreed.
    """
    if method in ("ties", "magnitude_prune"):
        tensors = [magnitude_prune(t, density) for t in tensors]
    elif method in _RANDOM:
        tensors = [random_prune(t, density, generator) for t in tensors]
    stacked = torch.stack(list(tensors))
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * w.view(-1, *([1] * (stacked.dim() - 1)))
    if method in _SIGN_ELECTING:
        agree = majority_sign_mask(stacked, majority_sign_method)
        return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    return weighted.sum(dim=0)


def concat_factors(factors: Sequence[tuple[Tensor, Tensor]], scales: Sequence[float]) -> tuple[Tensor, Tensor]:
    """``cat``: ``A = [c₁A₁; …]``, ``B = [B₁ …]``, so ``B @ A = Σ cᵢ BᵢAᵢ`` exactly, at rank ``Σ rᵢ``."""
    A = torch.cat([c * A for (A, _), c in zip(factors, scales)], dim=0)
    B = torch.cat([B for _, B in factors], dim=1)
    return A, B


def combine_factors(
    method: str, factors: Sequence[tuple[Tensor, Tensor]], scales: Sequence[float], **merge_kwargs
) -> tuple[Tensor, Tensor]:
    """PEFT's A/B-wise combination: merge the A's with weights ``sign(cᵢ)√|cᵢ|`` and the B's with ``√|cᵢ|``.

    Exact (``B @ A = c₁B₁A₁``) for one adapter; with several, ``B @ A`` contains cross terms ``BᵢAⱼ`` and is not
    the weighted sum of the updates. Ranks must be equal. A's masks are drawn before B's (PEFT's order).
    """
    ranks = [A.shape[0] for A, _ in factors]
    if len(set(ranks)) != 1:
        raise ValueError(f"A/B-wise combination needs equal ranks, got {ranks}")
    roots = [math.sqrt(abs(c)) for c in scales]
    A = merge_tensors(method, [A for A, _ in factors], [r if c >= 0 else -r for r, c in zip(roots, scales)],
                      **merge_kwargs)
    B = merge_tensors(method, [B for _, B in factors], roots, **merge_kwargs)
    return A, B


def truncated_svd(
    matrix: Tensor,
    rank: int,
    clamp: Optional[float] = None,
    full_matrices: bool = True,
    driver: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """``(A, B)`` with ``B @ A`` the best rank-``rank`` approximation of ``matrix`` (Eckart–Young):
    ``A = Vhₖ``, ``B = Uₖ·Sₖ``. ``clamp``: clip both to ± the ``clamp`` quantile of their entries (PEFT's
    option, which then no longer gives the best approximation)."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=full_matrices, driver=driver)
    B = U[:, :rank] * S[:rank]
    A = Vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        A, B = A.clamp(-high, high), B.clamp(-high, high)
    return A, B


# ----------------------------------------------------------------------------------------------------------------
# The model method
# ----------------------------------------------------------------------------------------------------------------
def add_weighted_adapter(
    lora_model,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: Optional[int] = None,
    svd_clamp: Optional[float] = None,
    svd_full_matrices: bool = True,
    svd_driver: Optional[str] = None,
    density: Optional[float] = None,
    majority_sign_method: str = "total",
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
) -> None:
    """Add ``adapter_name`` to ``lora_model``, combining ``adapters`` with ``weights`` (see the module docstring).

    ``svd_rank`` (``svd`` family): rank of the new adapter, default the largest rank of the combined adapters in
    any layer, capped per layer at ``min(out, in·k…)``. ``svd_clamp``: a quantile in (0, 1] to clip the SVD
    factors at. ``svd_full_matrices``/``svd_driver``: passed to ``torch.linalg.svd`` (the driver works on CUDA
    only). ``density`` (pruning types, required there): the fraction of entries kept, in (0, 1].
    ``majority_sign_method`` (TIES types): ``"total"`` or ``"frequency"``. ``generator`` or ``seed`` (DARE types):
    where the random masks come from, for reproducible results (a seed makes a CPU generator, so the result does
    not depend on the device); neither means torch's global generator, as in PEFT.

    The new adapter is added inactive. Raises ``ValueError`` (``TypeError`` for wrong types) before changing
    anything when an argument is bad or a layer cannot be combined.
    """
    adapters, weights = _check_adapters_and_weights(lora_model, adapters, weights)
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be a str, got {type(adapter_name).__name__}")
    if adapter_name in lora_model.peft_config:
        raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it first or pick another name")
    kind, method = _parse_type(combination_type)
    generator = _check_options(kind, method, combination_type, svd_rank, svd_clamp, svd_driver, density,
                               majority_sign_method, generator, seed)
    merge_kwargs = dict(density=density, majority_sign_method=majority_sign_method, generator=generator)

    layers = [(name, layer) for name, layer in lora_model.lora_layers() if any(a in layer.r for a in adapters)]
    if kind == "svd" and svd_rank is None:
        svd_rank = max(layer.r[a] for _, layer in layers for a in adapters if a in layer.r)
    new_factors: dict[str, tuple[Tensor, Tensor]] = {}
    for name, layer in layers:
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.r]
        try:
            new_factors[name] = _combine_layer(layer, present, kind, method, svd_rank, svd_clamp,
                                               svd_full_matrices, svd_driver, merge_kwargs)
        except ValueError as e:
            raise ValueError(f"cannot combine adapters {adapters} in layer {name!r}: {e}") from None
    inherited = _inherited_modules_to_save(lora_model, adapters)

    config = _new_config(lora_model, adapters, {n: A.shape[0] for n, (A, _) in new_factors.items()},
                         [n for n, _, _ in inherited])
    lora_model.inject_adapter(config, adapter_name, shares_biases_with=adapters)
    try:
        _fill(lora_model, adapter_name, new_factors, inherited)
    except Exception:
        lora_model.delete_adapter(adapter_name)
        raise


def _check_adapters_and_weights(lora_model, adapters, weights) -> tuple[list[str], list[float]]:
    if isinstance(adapters, str) or not isinstance(adapters, Sequence):
        raise TypeError(f"adapters must be a list of adapter names, got {adapters!r}")
    if isinstance(weights, (str, numbers.Number)) or not isinstance(weights, Iterable):
        raise TypeError(f"weights must be a list of numbers (one per adapter), got {weights!r}")
    adapters = list(adapters)
    weights = [w.item() if isinstance(w, Tensor) and w.numel() == 1 else w for w in weights]
    if not adapters:
        raise ValueError("adapters is empty: name at least one adapter to combine")
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(adapters)} adapters {adapters} but {len(weights)} weights {weights}: "
                         "expected one weight per adapter")
    check_adapter_names(adapters, lora_model.peft_config)
    kinds = sorted({type(layer).__name__ for _, layer in lora_model.lora_layers()
                    if not layer.combinable and any(a in layer.r for a in adapters)})
    if kinds:
        raise NotImplementedError(f"add_weighted_adapter cannot combine adapters on {kinds} layers (target_parameters, "
                                  "nn.MultiheadAttention, trainable_token_indices); combine adapters of plain layers")
    biased = [a for a in adapters if getattr(lora_model.peft_config[a], "lora_bias", False)]
    if biased:
        raise NotImplementedError(f"add_weighted_adapter cannot combine adapters with lora_bias=True {biased}: their "
                                  "lora_B biases are not part of the low-rank combination")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"weights must be finite real numbers, got {weights}")
    return adapters, [float(w) for w in weights]


def _parse_type(combination_type) -> tuple[str, str]:
    """``("cat", "")``, ``("svd", merge method)`` or ``("factors", merge method)``."""
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type={combination_type!r} is invalid: expected one of {COMBINATION_TYPES}")
    if combination_type == "cat":
        return "cat", ""
    if combination_type == "svd":
        return "svd", "linear"
    if combination_type.endswith("_svd"):
        return "svd", combination_type.removesuffix("_svd")
    return "factors", combination_type


def _check_options(kind, method, combination_type, svd_rank, svd_clamp, svd_driver, density,
                   majority_sign_method, generator, seed) -> Optional[torch.Generator]:
    """Validate the options, refusing any the chosen type would silently ignore; returns the DARE generator."""
    def ignored(option, value, used_by):
        if value is not None:
            raise ValueError(f"{option}={value!r} has no effect with combination_type={combination_type!r}; "
                             f"it is used by {used_by}")

    if kind == "svd":
        if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank <= 0):
            raise ValueError(f"svd_rank={svd_rank!r} is invalid: expected a positive int or None")
        if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, numbers.Real)
                                      or not 0 < svd_clamp <= 1):
            raise ValueError(f"svd_clamp={svd_clamp!r} is invalid: expected a quantile in (0, 1] or None")
        if svd_driver not in (None, "gesvd", "gesvdj", "gesvda"):
            raise ValueError(f"svd_driver={svd_driver!r} is invalid: expected None, 'gesvd', 'gesvdj' or 'gesvda'")
    else:
        svd_types = "the svd types"
        ignored("svd_rank", svd_rank, svd_types), ignored("svd_clamp", svd_clamp, svd_types)
        ignored("svd_driver", svd_driver, svd_types)
    if method in _PRUNING:
        if density is None:
            raise ValueError(f"combination_type={combination_type!r} needs density (the fraction kept, in (0, 1])")
        if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 < density <= 1:
            raise ValueError(f"density={density!r} is invalid: expected a number in (0, 1]")
    else:
        ignored("density", density, "ties, dare_* and magnitude_prune types")
    if method in _SIGN_ELECTING:
        if majority_sign_method not in ("total", "frequency"):
            raise ValueError(f"majority_sign_method={majority_sign_method!r} is invalid: "
                             "expected 'total' or 'frequency'")
    if method in _RANDOM:
        if generator is not None and seed is not None:
            raise ValueError("pass either generator or seed, not both")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
                raise TypeError(f"seed must be an int, got {seed!r}")
            generator = torch.Generator().manual_seed(int(seed))
    else:
        ignored("generator", generator, "the dare types"), ignored("seed", seed, "the dare types")
    return generator


def _combine_layer(layer, present, kind, method, svd_rank, clamp, full_matrices, driver, merge_kwargs):
    """One layer's new ``(A, B)``, shaped like the layer's factors (``A: r' × in × k…``, ``B: out × r' × 1…``)."""
    names = [a for a, _ in present]
    factors = [layer.factors(a) for a in names]
    A0, B0 = factors[0]
    for a, (A, B) in zip(names, factors):
        if B.flatten(1).shape[1] != A.shape[0]:
            raise ValueError(
                f"adapter {a!r} has B {tuple(B.shape)} and A {tuple(A.shape)}, whose product is not the layer's "
                f"update (a grouped conv, groups={getattr(layer.base_layer, 'groups', '?')}): it cannot be combined"
            )
    if kind == "factors":
        ranks = {a: layer.r[a] for a in names}
        if len(set(ranks.values())) != 1:
            raise ValueError(f"combination_type {method!r} combines A's and B's separately and needs equal "
                             f"ranks, got {ranks}; use 'cat' or 'svd' for adapters of different ranks")
    dtype = torch.promote_types(torch.promote_types(A0.dtype, B0.dtype), torch.float32)
    flat = [(A.detach().flatten(1).to(dtype), B.detach().flatten(1).to(dtype)) for A, B in factors]
    scales = [w * layer.scaling[a] for a, w in present]
    with torch.no_grad():
        if kind == "cat":
            A, B = concat_factors(flat, scales)
        elif kind == "factors":
            A, B = combine_factors(method, flat, scales, **merge_kwargs)
        else:
            # merged as the weights are stored (PEFT's order, so the same DARE masks), decomposed as out × in·k…
            merged = merge_tensors(method, [layer.delta_weight(a) for a in names], [w for _, w in present],
                                   **merge_kwargs)
            m, n = B0.shape[0], A0[0].numel()
            A, B = truncated_svd(_as_matrix(layer, merged, m), min(svd_rank, m, n), clamp, full_matrices, driver)
    r = A.shape[0]
    return A.reshape(r, *A0.shape[1:]), B.reshape(B0.shape[0], r, *B0.shape[2:])


def _as_matrix(layer, delta: Tensor, out_features: int) -> Tensor:
    """A weight-shaped update as the ``out × n`` matrix ``s·B@A`` (undoing the ``in × out`` storage of GPT-2's
    Conv1D and embeddings, and flattening conv kernels)."""
    return (delta.T if layer.transpose_delta else delta).reshape(out_features, -1)


def _inherited_modules_to_save(lora_model, adapters) -> list[tuple[str, object, str]]:
    """``(name, wrapper, owner)`` for every modules_to_save wrapper in which exactly one of ``adapters`` has a
    copy; ``ValueError`` where several do (no sensible way to combine whole modules)."""
    from .modules_to_save import ModulesToSaveWrapper

    unique = list(dict.fromkeys(adapters))
    inherited = []
    for name, module in lora_model.model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            owners = [a for a in unique if a in module.modules_to_save]
            if len(owners) > 1:
                raise ValueError(
                    f"adapters {owners} each have their own trained copy of {name!r} (modules_to_save); whole "
                    "modules cannot be combined. Combine adapters of which at most one trains that module"
                )
            if owners:
                inherited.append((name, module, owners[0]))
    return inherited


_BIAS_ORDER = ("none", "lora_only", "all")


def _new_config(lora_model, adapters, ranks: dict[str, int], modules_to_save: list[str]):
    """The new adapter's config: the first adapter's, with the exact wrapped modules, per-layer ranks and
    alphas equal to them (scaling 1, no rsLoRA), and the widest ``bias`` setting of the combined adapters (so
    biases they trained are saved with the new adapter)."""
    configs = [lora_model.peft_config[a] for a in adapters]
    names = list(ranks)
    wanted = set(names)
    ambiguous = any(  # does some other module's name end with ".<a wrapped name>"?
        ".".join(parts[i:]) in wanted
        for parts in (o.split(".") for o, _ in lora_model.model.named_modules()) for i in range(1, len(parts))
    )
    # A list entry or pattern key also matches names ending in ".entry"; where another module's name does, anchor.
    key = (lambda n: "^" + re.escape(n)) if ambiguous else re.escape
    targets = "|".join(re.escape(n) for n in names) if ambiguous else names
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {key(n): rank for n, rank in ranks.items() if rank != r}
    return dataclasses.replace(
        configs[0],
        r=r,
        lora_alpha=r,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        use_rslora=False,
        target_modules=targets,
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        modules_to_save=modules_to_save or None,
        bias=max((c.bias for c in configs), key=_BIAS_ORDER.index),
        init_lora_weights=True,
    )


def _fill(lora_model, adapter_name, new_factors, inherited) -> None:
    """Copy the computed factors into the new adapter, and the inherited modules_to_save copies."""
    with torch.no_grad():
        for name, (A, B) in new_factors.items():
            layer = lora_model.model.get_submodule(name)
            A_t, B_t = layer.factors(adapter_name)
            if A_t.shape != A.shape or B_t.shape != B.shape:
                raise RuntimeError(f"layer {name!r} made factors {tuple(A_t.shape)}/{tuple(B_t.shape)} for the "
                                   f"combined adapter, expected {tuple(A.shape)}/{tuple(B.shape)}")
            A_t.copy_(A)
            B_t.copy_(B)
            if not (torch.equal(layer.factors(adapter_name)[0], A.to(A_t.dtype))
                    and torch.equal(layer.factors(adapter_name)[1], B.to(B_t.dtype))):
                raise RuntimeError(f"{type(layer).__name__}.factors() of {name!r} does not return views of the "
                                   "stored parameters, so the combined adapter cannot be written into it")
        for _, wrapper, owner in inherited:
            wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[owner].state_dict())
