"""What the benchmark measures, one function per section; each returns rows of the results table.

Every section builds the same model for lorakit and for PEFT (identical adapter weights, checked to give the same
outputs), measures both in one :class:`~benchmarks.harness.Group` (interleaved rounds) and reports medians with
min–max and the per-round ratio lorakit/PEFT.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import memory
from . import moe
from . import workloads as w
from .decode import section_decode
from .dora import section_dora
from .inference import section_inference
from .qlora import section_qlora
from .harness import BenchError, Group, Row, Stats, Target, Unsupported, failure_text, timed

NO_SLOWER = Target("ratio", "<=", 1.0, "≤ 1.00")


@dataclass
class Context:
    scale: w.Scale
    rounds: int  # rounds for cheap items
    heavy_rounds: int  # rounds for training step and prefills
    decode_rounds: int  # rounds (one step each) for decode steps
    cycles: int  # merge/unmerge cycles for the round-trip error
    threads: int
    memory_runs: int  # fresh processes per library for the memory measurement
    errors: list[str] = field(default_factory=list)
    _base: nn.Module | None = None

    @property
    def base(self) -> nn.Module:
        """The main model, never modified (each library wraps its own copy)."""
        if self._base is None:
            self._base = w.llama(self.scale.model)
        return self._base


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _both(build: Callable[[str], nn.Module]) -> dict[str, nn.Module]:
    """``{lib_name: build(lib_name)}`` for both libraries."""
    return {name: build(name) for name in w.LIB_NAMES}


# ----------------------------------------------------------------------------------------------------------------
# The 8-layer model with one adapter: training, prefill, decode, merge, save, load
# ----------------------------------------------------------------------------------------------------------------
def section_main(ctx: Context) -> list[Row]:
    s = ctx.scale
    models = _both(lambda n: w.wrap(w.library(n), copy.deepcopy(ctx.base), s))
    probe = w.token_ids(s, 1, 8)
    w.check_same_outputs(models["lorakit"], models["peft"], probe, "one adapter")
    rows: list[Row] = []

    log(f"training step {s.train[0]}×{s.train[1]}")
    for m in models.values():
        m.train()
    ids = w.token_ids(s, *s.train)
    g = Group(ctx.errors)
    for n, m in models.items():
        g.add(n, lambda m=m: w.TrainStep(m, ids))
    g.run(ctx.heavy_rounds)
    rows.append(Row(f"training step, batch {s.train[0]}×{s.train[1]}", g.cell("lorakit"), g.cell("peft"),
                    g.ratio("lorakit", "peft"), NO_SLOWER))
    for m in models.values():
        m.eval()
        m.zero_grad(set_to_none=True)

    log(f"training step {s.train[0]}×{s.train[1]}, dropout {memory.DROPOUT}")
    dropped = _both(lambda n: w.wrap(w.library(n), copy.deepcopy(ctx.base), s, dropout=memory.DROPOUT))
    w.check_same_outputs(dropped["lorakit"], dropped["peft"], probe, "one adapter with dropout, eval mode")
    g = Group(ctx.errors)
    for n, m in dropped.items():
        g.add(n, lambda m=m: w.TrainStep(m.train(), ids))
    g.run(ctx.heavy_rounds)
    rows.append(Row(f"training step, batch {s.train[0]}×{s.train[1]}, dropout {memory.DROPOUT}", g.cell("lorakit"),
                    g.cell("peft"), g.ratio("lorakit", "peft")))
    del dropped

    log(f"prefill {s.prefill[0]}×{s.prefill[1]}")
    ids = w.token_ids(s, *s.prefill)
    g = Group(ctx.errors)
    for n, m in models.items():
        g.add(n, lambda m=m: w.Prefill(m, ids))
    g.run(ctx.heavy_rounds)
    rows.append(Row(f"prefill, batch {s.prefill[0]}×{s.prefill[1]}", g.cell("lorakit"), g.cell("peft"),
                    g.ratio("lorakit", "peft"), NO_SLOWER))

    log(f"decode, batch 1, cache {s.cache}")
    cache = w.make_cache(ctx.base, 1, s.cache, s)
    g = Group(ctx.errors)
    for n, m in models.items():
        g.add(n, lambda m=m: w.Decode(m, cache))
        g.add(f"{n} merged", lambda m=m: w.Decode(w.merged_copy(m, probe), cache))
    g.add("minimal", lambda: _minimal(ctx, models["lorakit"], cache, probe))
    g.run(ctx.decode_rounds, warmup=2)
    rows += [
        Row(f"decode step, batch 1, cache {s.cache}, unmerged", g.cell("lorakit"), g.cell("peft"),
            g.ratio("lorakit", "peft")),
        Row("decode step, merged", g.cell("lorakit merged"), g.cell("peft merged"),
            g.ratio("lorakit merged", "peft merged")),
        Row("decode unmerged / merged", g.ratio("lorakit", "lorakit merged"), g.ratio("peft", "peft merged"),
            None, Target("lorakit", "<=", 1.10, "≤ 1.10")),
        Row("reference: hand-written minimal LoRA, decode unmerged / merged", g.ratio("minimal", "lorakit merged"),
            "—"),
    ]

    log("save / load")
    rows += _save_load(ctx, models)
    return rows


def _minimal(ctx: Context, adapted: nn.Module, cache, probe) -> Callable[[], float]:
    """Decode with :class:`~benchmarks.workloads.MinimalLora` layers (checked to compute what ``adapted`` does)."""
    minimal = w.minimal_lora(ctx.base, adapted, ctx.scale)
    w.check_same_outputs(minimal, adapted, probe, "hand-written minimal LoRA")
    return w.Decode(minimal, cache)


# ----------------------------------------------------------------------------------------------------------------
# Merge and unmerge of the 8-layer model's adapter, at several update sizes and dtypes
# ----------------------------------------------------------------------------------------------------------------
MERGE_CASES = (  # (label suffix, dtype, b_std of randomize_lora or None for init_lora_weights=False)
    ("", torch.float32, 0.01),
    ("fp32", torch.float32, 0.001),
    ("bf16", torch.bfloat16, 0.001),
    ("fp32, init_lora_weights=False", torch.float32, None),
)


def section_merge(ctx: Context) -> list[Row]:
    """``merge_adapter``/``unmerge_adapter`` (exact, reversible in lorakit) and ``merge_and_unload``, side by side.
    The first case is the benchmark's adapter (‖ΔW‖/‖W‖ about 16 %, the plain ``merge_adapter`` rows); then a
    trained-looking update 10× smaller in fp32 and bf16, and PEFT's ``init_lora_weights=False`` (|ΔW| ≫ |W|)."""
    rows: list[Row] = [Row("lorakit's exact merge", _merge_path(), "—")]
    probe = w.token_ids(ctx.scale, 1, 8)
    for suffix, dtype, b_std in MERGE_CASES:
        models = _merge_models(ctx, dtype, b_std)
        if dtype == torch.float32:  # bf16 forwards differ by rounding; the merged weights are compared below
            w.check_same_outputs(models["lorakit"], models["peft"], probe, f"merge case {suffix or 'default'}")
        _check_same_merged_weights(models, suffix or "default")
        relative = _relative_update(models["lorakit"])
        label = f", {suffix}, ‖ΔW‖/‖W‖ = {relative:.1%}" if suffix else ""
        log(f"merge / unmerge{label}")
        for what in ("merge", "unmerge"):
            g = Group(ctx.errors)
            for n, m in models.items():
                g.add(n, lambda m=m, what=what: _merge_step(m, what))
            if not suffix:  # lorakit without numba (or with it switched off): the eager PyTorch passes
                g.add("eager", lambda m=models["lorakit"], what=what: _merge_step(m, what, compiled=False))
            g.run(ctx.rounds)
            rows.append(Row(f"{what}_adapter{label}", g.cell("lorakit"), g.cell("peft"), g.ratio("lorakit", "peft"),
                            NO_SLOWER))
            if not suffix:
                rows.append(Row(f"{what}_adapter, eager fallback (no numba)", g.cell("eager"), g.cell("peft"),
                                g.ratio("eager", "peft")))
        if suffix:
            continue
        log("merge_and_unload")
        unloaded = {n: copy.deepcopy(m).merge_and_unload() for n, m in models.items()}
        w.check_same_outputs(unloaded["lorakit"], unloaded["peft"], probe, "merge_and_unload")
        del unloaded
        g = Group(ctx.errors)
        for n, m in models.items():
            g.add(n, lambda m=m: _unload_step(m))
        g.run(ctx.rounds)
        rows.append(Row("merge_and_unload", g.cell("lorakit"), g.cell("peft"), g.ratio("lorakit", "peft")))
    return rows


def _merge_models(ctx: Context, dtype: torch.dtype, b_std) -> dict[str, nn.Module]:
    """The 8-layer model in ``dtype`` with one adapter, for each library: factors from
    :func:`~benchmarks.workloads.randomize_lora` with ``b_std``, or (``None``) PEFT's ``init_lora_weights=False``
    factors (lorakit's model loads PEFT's)."""
    if b_std is not None:
        models = _both(lambda n: w.wrap(w.library(n), copy.deepcopy(ctx.base).to(dtype), ctx.scale))
        for m in models.values():
            w.randomize_lora(m, b_std=b_std)
        return models
    models = {}
    for n in w.LIB_NAMES:
        lib = w.library(n)
        config = lib.LoraConfig(r=ctx.scale.r, lora_alpha=ctx.scale.alpha, target_modules=list(w.TARGETS),
                                init_lora_weights=False)
        models[n] = lib.get_peft_model(copy.deepcopy(ctx.base).to(dtype), config, adapter_name="a0").eval()
    factors = {k: v for k, v in models["peft"].state_dict().items() if ".lora_" in k}
    missing, unexpected = models["lorakit"].load_state_dict(factors, strict=False)
    if unexpected or any(".lora_" in k for k in missing):
        raise BenchError(f"init_lora_weights=False factors do not fit: {unexpected or missing}")
    return models


def _check_same_merged_weights(models: dict[str, nn.Module], what: str) -> None:
    """Merged, both libraries hold the same base weights bit for bit (lorakit adds as PEFT's ``W += Δ``)."""
    merged = {}
    for n, m in models.items():
        m.merge_adapter()
        merged[n] = {k.replace(".base_layer", ""): p.detach().clone() for k, p in m.get_base_model().named_parameters()
                     if ".lora_" not in k}
        m.unmerge_adapter()
    for k, p in merged["peft"].items():
        if not torch.equal(p, merged["lorakit"][k]):
            raise BenchError(f"merge case {what}: merged weight {k} differs from PEFT's")


def _relative_update(model: nn.Module) -> float:
    """‖ΔW‖/‖W‖ over the adapted layers of a lorakit model."""
    layers = [layer for _, layer in model.base_model.lora_layers()]
    delta = sum(layer.delta_weight("a0").float().norm() ** 2 for layer in layers) ** 0.5
    weight = sum(layer.base_layer.weight.float().norm() ** 2 for layer in layers) ** 0.5
    return float(delta / weight)


def _merge_path() -> str:
    """Which path lorakit's exact merge takes here (waits for the compiled one to load, so that it is measured)."""
    try:
        from lorakit import merge_kernel
    except ImportError:
        return "eager PyTorch passes"
    if merge_kernel.ready(timeout=600):
        import numba

        return f"compiled pass (numba {numba.__version__})"
    return "eager PyTorch passes (numba not installed)"


def _merge_step(model: nn.Module, what: str, compiled: bool = True) -> Callable[[], float]:
    def run() -> float:
        with _merge_paths(compiled):
            if what == "merge":
                t = timed(model.merge_adapter)
                model.unmerge_adapter()
            else:
                model.merge_adapter()
                t = timed(model.unmerge_adapter)
        return t

    return run


def _merge_paths(compiled: bool):
    """lorakit's ``exact_merge.compiled`` switch where it exists (a no-op for PEFT's models)."""
    try:
        from lorakit.exact_merge import compiled as switch
    except ImportError:
        return contextlib.nullcontext()
    return switch(compiled)


def _unload_step(model: nn.Module) -> Callable[[], float]:
    """``merge_and_unload`` of a fresh copy of ``model`` (the copy is not timed)."""
    def run() -> float:
        return timed(copy.deepcopy(model).merge_and_unload)

    return run


def _save_load(ctx: Context, models: dict[str, nn.Module]) -> list[Row]:
    """save_pretrained of each library into fresh folders; from_pretrained of the files PEFT wrote, into a fresh
    copy of the base model (the copy is not timed). Wall-clock time whatever the clock: both wait on the disk."""
    tmp = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    try:
        models["peft"].save_pretrained(str(tmp / "reference"))
        reference = tmp / "reference" / "a0"  # PEFT puts an adapter not named "default" in a subfolder
        counter = iter(range(10**9))

        def saver(n: str) -> Callable[[], Callable[[], float]]:
            def setup() -> Callable[[], float]:
                def run() -> float:
                    target = tmp / f"{n}-{next(counter)}"
                    t = timed(lambda: models[n].save_pretrained(str(target)), wall=True)
                    shutil.rmtree(target)
                    return t

                w.lorakit_feature(run) if n == "lorakit" else run()
                return run

            return setup

        def loader(n: str) -> Callable[[], Callable[[], float]]:
            lib = w.library(n)

            def setup() -> Callable[[], float]:
                loaded = w.lorakit_feature(lambda: lib.PeftModel.from_pretrained(copy.deepcopy(ctx.base), str(reference)))
                w.check_same_outputs(loaded, models["peft"], w.token_ids(ctx.scale, 1, 8), f"{n} loading PEFT's files")
                del loaded

                def run() -> float:
                    fresh = copy.deepcopy(ctx.base)
                    return timed(lambda: lib.PeftModel.from_pretrained(fresh, str(reference)), wall=True)

                return run

            return setup

        rows = []
        for label, make in (("save_pretrained", saver), ("from_pretrained (PEFT's files)", loader)):
            g = Group(ctx.errors)
            for n in w.LIB_NAMES:
                g.add(n, make(n))
            g.run(ctx.rounds)
            rows.append(Row(label, g.cell("lorakit"), g.cell("peft"), g.ratio("lorakit", "peft")))
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Mixed-adapter batches: every row its own adapter
# ----------------------------------------------------------------------------------------------------------------
def section_mixed(ctx: Context) -> list[Row]:
    s = ctx.scale
    most = max(s.adapters)
    models = _both(lambda n: w.wrap(w.library(n), copy.deepcopy(ctx.base), s, adapters=most))
    w.check_same_outputs(models["lorakit"], models["peft"], w.token_ids(s, 1, 8), f"{most} adapters")
    names = [f"a{i}" for i in range(most)]
    check_ids = w.token_ids(s, most, 4, seed=5)
    support: dict[str, BaseException | None] = {}
    for n, m in models.items():
        log(f"checking {n}'s mixed batches against per-adapter runs")
        try:
            w.check_mixed(n, m, names, check_ids)
            support[n] = None
        except Exception as exc:  # noqa: BLE001 — shown in the rows below
            support[n] = exc
            log(f"  {n}: {failure_text(exc)}")

    def mixed(n: str, make: Callable[..., Callable[[], float]], k: int) -> Callable[[], Callable[[], float]]:
        def setup() -> Callable[[], float]:
            if support[n] is not None:
                raise support[n]
            return make(models[n], adapter_names=names[:k])

        return setup

    reference = w.minimal_mixed_lora(ctx.base, models["lorakit"], names, s)
    for gather in (True, False):
        w.configure_mixed(reference, most, gather)
        expected = w.logits(models["peft"], check_ids, adapter_names=names)
        if not torch.allclose(w.logits(reference, check_ids), expected, rtol=1e-4, atol=1e-4):
            raise BenchError("hand-written mixed-batch reference differs from PEFT's mixed batch")

    def hand_written(make: Callable[..., Callable[[], float]], k: int, gather: bool):
        def setup() -> Callable[[], float]:
            measure = make(reference)

            def run() -> float:
                w.configure_mixed(reference, k, gather)
                return measure()

            return run

        return setup

    rows: list[Row] = []
    for kind in ("decode", "prefill"):
        for k in s.adapters:
            log(f"mixed {kind}, {k} adapters")
            if kind == "decode":
                cache = w.make_cache(ctx.base, k, s.cache, s)
                make = lambda m, **kw: w.Decode(m, cache, **kw)  # noqa: E731
                shape, rounds = f"batch {k}, cache {s.cache}", max(1, ctx.decode_rounds * 3 // 4)
            else:
                ids = w.token_ids(s, k, s.mixed_tokens)
                make = lambda m, **kw: w.Prefill(m, ids, **kw)  # noqa: E731
                shape, rounds = f"batch {k}×{s.mixed_tokens}", ctx.heavy_rounds
            g = Group(ctx.errors)
            for n in w.LIB_NAMES:
                g.add(f"{n} mixed", mixed(n, make, k))
                g.add(f"{n} single", lambda n=n, make=make: make(models[n]))
            if kind == "decode":
                g.add("gather", hand_written(make, k, gather=True))
                g.add("slice", hand_written(make, k, gather=False))
            g.run(rounds)
            target = Target("lorakit", "<=", 1.2, "≤ 1.2") if kind == "decode" and k == most else None
            rows += [
                Row(f"mixed {kind}, {k} adapters ({shape})", g.cell("lorakit mixed"), g.cell("peft mixed"),
                    g.ratio("lorakit mixed", "peft mixed")),
                Row(f"mixed / single adapter, {kind}, {k} adapters", g.ratio("lorakit mixed", "lorakit single"),
                    g.ratio("peft mixed", "peft single"), None, target),
            ]
            if kind == "decode":
                rows += [
                    Row(f"reference: hand-written gather + 2 bmm / lorakit single, decode, {k} adapters",
                        g.ratio("gather", "lorakit single"), "—"),
                    Row(f"reference: hand-written 2 bmm without gather / lorakit single, decode, {k} adapters",
                        g.ratio("slice", "lorakit single"), "—"),
                ]
    return rows + repeated_mixed(ctx, models, support, names)


def repeated_mixed(ctx: Context, models: dict, support: dict, names: list[str]) -> list[Row]:
    """A batch of ``max(adapters)`` rows where ``min(adapters)`` adapters repeat and every 4th row is ``__base__``
    (many users, fewer adapters, some without one), compared with the same batch through a single adapter."""
    s = ctx.scale
    most, few = max(s.adapters), min(s.adapters)
    served = iter(names[i % few] for i in range(most))
    repeated = ["__base__" if i % 4 == 3 else next(served) for i in range(most)]
    for n, m in models.items():
        if support[n] is None:
            w.check_mixed(n, m, repeated, w.token_ids(s, most, 4, seed=6))
    rows: list[Row] = []
    for kind in ("decode", "prefill"):
        log(f"mixed {kind}, {few} adapters repeated over {most} rows with __base__ rows")
        if kind == "decode":
            cache = w.make_cache(ctx.base, most, s.cache, s)
            make = lambda m, **kw: w.Decode(m, cache, **kw)  # noqa: E731
            shape, rounds = f"batch {most}, cache {s.cache}", max(1, ctx.decode_rounds * 3 // 4)
        else:
            ids = w.token_ids(s, most, s.mixed_tokens)
            make = lambda m, **kw: w.Prefill(m, ids, **kw)  # noqa: E731
            shape, rounds = f"batch {most}×{s.mixed_tokens}", ctx.heavy_rounds
        g = Group(ctx.errors)
        for n in w.LIB_NAMES:
            def setup(n=n, make=make) -> Callable[[], float]:
                if support[n] is not None:
                    raise support[n]
                return make(models[n], adapter_names=repeated)

            g.add(f"{n} mixed", setup)
            g.add(f"{n} single", lambda n=n, make=make: make(models[n]))
        g.run(rounds)
        target = Target("lorakit", "<=", 1.25, "≤ 1.25") if kind == "decode" else None
        label = f"{few} adapters repeated + __base__ rows"
        rows += [
            Row(f"mixed {kind}, {label} ({shape})", g.cell("lorakit mixed"), g.cell("peft mixed"),
                g.ratio("lorakit mixed", "peft mixed")),
            Row(f"mixed / single adapter, {kind}, {label}", g.ratio("lorakit mixed", "lorakit single"),
                g.ratio("peft mixed", "peft single"), None, target),
        ]
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Injection on the narrow 32-layer model
# ----------------------------------------------------------------------------------------------------------------
def section_inject(ctx: Context) -> list[Row]:
    s = ctx.scale
    narrow = w.llama(s.narrow)
    layers = s.narrow["num_hidden_layers"]
    log(f"get_peft_model on a {layers}-layer model")

    def inject(n: str) -> Callable[[], float]:
        lib = w.library(n)

        def run() -> float:
            fresh, config = copy.deepcopy(narrow), w.lora_config(lib, s)
            return timed(lambda: lib.get_peft_model(fresh, config))

        return run

    g = Group(ctx.errors)
    for n in w.LIB_NAMES:
        g.add(n, lambda n=n: inject(n))
    g.run(ctx.rounds)
    rows = [Row(f"get_peft_model, {layers}-layer model", g.cell("lorakit"), g.cell("peft"),
                g.ratio("lorakit", "peft"), Target("ratio", "<=", 0.125, "≥ 8× faster"))]

    most = max(s.adapters)
    log(f"add_adapter: the 2nd and the {_ordinal(most)}")

    def add(n: str, existing: int) -> Callable[[], float]:
        lib = w.library(n)
        model = w.wrap(lib, copy.deepcopy(narrow), s, adapters=existing)

        def run() -> float:
            config = w.lora_config(lib, s)
            t = timed(lambda: model.add_adapter("new", config))
            model.delete_adapter("new")
            return t

        return run

    g = Group(ctx.errors)
    for n in w.LIB_NAMES:
        g.add(f"{n} 2nd", lambda n=n: add(n, 1))
        g.add(f"{n} last", lambda n=n: add(n, most - 1))
    g.run(ctx.heavy_rounds)
    rows += [
        Row("add_adapter, 2nd adapter", g.cell("lorakit 2nd"), g.cell("peft 2nd"), g.ratio("lorakit 2nd", "peft 2nd")),
        Row(f"add_adapter, {_ordinal(most)} adapter", g.cell("lorakit last"), g.cell("peft last"),
            g.ratio("lorakit last", "peft last")),
        Row(f"add_adapter {_ordinal(most)} / 2nd", g.ratio("lorakit last", "lorakit 2nd"),
            g.ratio("peft last", "peft 2nd")),
    ]
    return rows


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# ----------------------------------------------------------------------------------------------------------------
# Exactness of merge → unmerge in low precision
# ----------------------------------------------------------------------------------------------------------------
def section_roundtrip(ctx: Context) -> list[Row]:
    """Largest change of any base weight after 1 and after ``ctx.cycles`` merge → unmerge cycles; and what
    lorakit keeps while merged to make that exact (its size relative to the merged weights)."""
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        short = str(dtype).removeprefix("torch.").replace("float", "fp").replace("bfp", "bf")
        log(f"merge → unmerge round trip in {short}")
        base = copy.deepcopy(ctx.base).to(dtype)
        result: dict[str, list] = {}
        for n in w.LIB_NAMES:
            try:
                result[n] = _roundtrip_errors(w.wrap(w.library(n), copy.deepcopy(base), ctx.scale), ctx.cycles)
            except Exception as exc:  # noqa: BLE001
                ctx.errors.append(f"{short} round trip, {n}: {failure_text(exc)}")
                result[n] = [failure_text(exc)] * 2
        exact = Target("lorakit", "==", 0.0, "exactly 0") if dtype != torch.float32 else None
        for i, cycles in enumerate((1, ctx.cycles)):
            label = f"{short} merge→unmerge, largest weight error, {cycles} cycle{'s' if cycles > 1 else ''}"
            rows.append(Row(label, result["lorakit"][i], result["peft"][i], None, exact))
        for b_std in (0.01, 0.001):  # the benchmark's adapter, and one with a 10× smaller update
            try:
                record, relative = _exactness_record(w.wrap(w.library("lorakit"), copy.deepcopy(base), ctx.scale),
                                                     b_std)
            except Exception as exc:  # noqa: BLE001
                ctx.errors.append(f"{short} exactness record: {failure_text(exc)}")
                record, relative = failure_text(exc), float("nan")
            target = Target("lorakit", "<=", 0.01, "≤ ~1 %") if b_std == 0.01 else Target("lorakit", "<=", 0.03,
                                                                                                "≤ 3 %")
            rows.append(Row(f"{short} merged, ‖ΔW‖/‖W‖ = {relative:.1%}: exactness record / merged weights", record,
                            "—", None, target))
        del base
    return rows


def _roundtrip_errors(model: nn.Module, cycles: int) -> list[Stats]:
    """Largest change of any base weight after 1 and after ``cycles`` merge → unmerge cycles."""
    base = model.get_base_model()
    original = {n: p.detach().clone() for n, p in base.named_parameters() if ".lora_" not in n}
    errors = []
    for cycle in range(1, cycles + 1):
        model.merge_adapter()
        model.unmerge_adapter()
        if cycle in (1, cycles):
            now = dict(base.named_parameters())
            diffs = [(now[n].detach().float() - p.float()).abs() for n, p in original.items()]
            worst = max(d.max().item() for d in diffs)
            changed = sum(int((d != 0).sum()) for d in diffs)
            errors.append(Stats.of([worst], "error", f"({changed} weights changed)" if changed else ""))
    if cycles == 1:
        errors.append(errors[0])
    return errors


def _exactness_record(model: nn.Module, b_std: float) -> tuple[Stats, float]:
    """What lorakit keeps while merged to unmerge exactly (each layer's ``_fixups``: a ``MergeRecord`` of the
    elements that would not round-trip), in bytes over the merged weights' bytes; and the update's size
    ``‖ΔW‖/‖W‖`` it depends on."""
    w.randomize_lora(model, b_std=b_std)
    layers = [layer for _, layer in model.base_model.lora_layers()]
    delta = sum(layer.delta_weight("a0").float().norm() ** 2 for layer in layers) ** 0.5
    weight = sum(layer.base_layer.weight.float().norm() ** 2 for layer in layers) ** 0.5
    model.merge_adapter()
    kept = sum(record.nbytes for layer in layers for record in layer.merge_records.values())
    total = sum(layer.base_layer.weight.nbytes for layer in layers)
    return Stats.of([kept / total], "percent"), float(delta / weight)


# ----------------------------------------------------------------------------------------------------------------
# Peak memory of a training step with dropout (separate processes, see benchmarks.memory)
# ----------------------------------------------------------------------------------------------------------------
def section_memory(ctx: Context) -> list[Row]:
    results: dict[str, list[dict]] = {n: [] for n in w.LIB_NAMES}
    failed: dict[str, str] = {}
    for run in range(ctx.memory_runs):
        for n in (w.LIB_NAMES if run % 2 == 0 else w.LIB_NAMES[::-1]):
            if n in failed:
                continue
            log(f"memory: {n}, training step with dropout {memory.DROPOUT} in a fresh process ({run + 1}/{ctx.memory_runs})")
            try:
                results[n].append(memory.measure(n, ctx.scale is w.TINY, ctx.threads))
            except Exception as exc:  # noqa: BLE001
                failed[n] = failure_text(exc)
                ctx.errors.append(f"memory, {n}: {failed[n]}")

    def cells(key: str):
        out = {n: failed.get(n) or Stats.of([r[key] for r in results[n]], "mib") for n in w.LIB_NAMES}
        # a tiny model's step can stay inside memory already mapped (a rise of 0): no ratio for those runs
        ratios = [a[key] / b[key] for a, b in zip(results["lorakit"], results["peft"]) if b[key] > 0]
        ratio = Stats.of(ratios, "ratio") if ratios and not failed else None
        return out["lorakit"], out["peft"], ratio

    batch, tokens = ctx.scale.train
    return [
        Row(f"peak memory rise, training step {batch}×{tokens}, dropout {memory.DROPOUT}", *cells("step_peak_mib"),
            Target("ratio", "<", 1.0, "below PEFT")),
        Row("tensors saved for backward, same step", *cells("saved_mib")),
    ]


SECTIONS: dict[str, Callable[[Context], list[Row]]] = {
    "main": section_main,
    "decode": section_decode,
    "mixed": section_mixed,
    "inject": section_inject,
    "merge": section_merge,
    "roundtrip": section_roundtrip,
    "memory": section_memory,
    "inference": section_inference,
    "moe": moe.section_moe,
    "qlora": section_qlora,
    "dora": section_dora,
}


def run_section(name: str, ctx: Context) -> list[Row]:
    """Run one section; a section that cannot even start becomes one row saying why."""
    try:
        return SECTIONS[name](ctx)
    except Unsupported as exc:
        return [Row(name, failure_text(exc), "—")]
    except Exception as exc:  # noqa: BLE001 — report and go on with the other sections
        ctx.errors.append(f"section {name}: {failure_text(exc)}")
        return [Row(f"{name} (section failed)", failure_text(exc), "—")]
    finally:
        gc.collect()
