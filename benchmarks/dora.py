"""The DoRA section (``--only dora``): lorakit's and PEFT's ``use_dora=True`` side by side on the issue's model.

The model is issue 15's reference (Llama, hidden 384, 4 layers, r=16 on every linear layer, training batch
4×128); ``--tiny`` shrinks it as for the other sections. Both libraries get identical adapters (factors and
magnitudes set by parameter name) and are checked to give the same outputs before anything is timed.
"""

from __future__ import annotations

import copy
from types import ModuleType
from typing import Callable

import torch
from torch import nn

from . import memory
from . import workloads as w
from .harness import Group, Row, Stats, Target, timed

NO_SLOWER = Target("ratio", "<=", 1.0, "≤ 1.00")

#: issue 15's reference model (its PEFT numbers were taken on it)
MODEL = dict(vocab_size=16000, hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6)
TRAIN = (4, 128)


def _log(message: str) -> None:
    from .items import log

    log(message)


def wrap(lib: ModuleType, base: nn.Module, scale: w.Scale, dora: bool = True, dropout: float = 0.0) -> nn.Module:
    """``get_peft_model`` with DoRA on every target; factors as :func:`workloads.randomize_lora`, magnitudes
    moved off their initial norms by the same factors in both libraries."""
    config = lib.LoraConfig(r=scale.r, lora_alpha=scale.alpha, lora_dropout=dropout, target_modules=list(w.TARGETS),
                            use_dora=dora)
    model = lib.get_peft_model(base, config, adapter_name="a0")
    w.randomize_lora(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _models(base: nn.Module, scale: w.Scale, **kwargs) -> dict[str, nn.Module]:
    return {n: wrap(w.library(n), copy.deepcopy(base), scale, **kwargs) for n in w.LIB_NAMES}


def section_dora(ctx) -> list[Row]:
    tiny = ctx.scale is w.TINY
    scale = ctx.scale
    base = w.llama(scale.model if tiny else dict(MODEL))
    batch, tokens = scale.train if tiny else TRAIN
    ids = w.token_ids(scale, batch, tokens)
    probe = w.token_ids(scale, 1, 8)
    rows: list[Row] = []

    _log(f"DoRA training step {batch}×{tokens}, with and without dropout {memory.DROPOUT}")
    for dropout in (0.0, memory.DROPOUT):
        dora = _models(base, scale, dropout=dropout)
        lora = _models(base, scale, dora=False, dropout=dropout)
        w.check_same_outputs(dora["lorakit"], dora["peft"], probe, f"DoRA, dropout {dropout}, eval mode")
        g = Group(ctx.errors)
        for n in w.LIB_NAMES:
            g.add(n, lambda m=dora[n]: w.TrainStep(m.train(), ids))
            g.add(f"{n} lora", lambda m=lora[n]: w.TrainStep(m.train(), ids))
        g.run(ctx.heavy_rounds)
        label = f"DoRA training step, batch {batch}×{tokens}" + (f", dropout {dropout}" if dropout else "")
        if not tiny and not dropout:
            label += f" (Llama {MODEL['hidden_size']}×{MODEL['num_hidden_layers']} layers, r={scale.r})"
        target = Target("ratio", "<=", 0.85, "≤ 0.85") if dropout else NO_SLOWER
        rows += [
            Row(label, g.cell("lorakit"), g.cell("peft"), g.ratio("lorakit", "peft"), target),
            Row(f"DoRA / LoRA training step{f', dropout {dropout}' if dropout else ''}",
                g.ratio("lorakit", "lorakit lora"), g.ratio("peft", "peft lora"), None,
                Target("lorakit", "<=", 1.10, "≤ 1.10")),
        ]
        del dora, lora

    models = _models(base, scale)
    w.check_same_outputs(models["lorakit"], models["peft"], probe, "DoRA")
    _log("DoRA eval forward, decode")
    g = Group(ctx.errors)
    for n, m in models.items():
        g.add(n, lambda m=m: w.Prefill(m, ids))
    g.run(ctx.heavy_rounds)
    rows.append(Row(f"DoRA eval forward, batch {batch}×{tokens}", g.cell("lorakit"), g.cell("peft"),
                    g.ratio("lorakit", "peft"), NO_SLOWER))
    cache = w.make_cache(base, 1, scale.cache, scale)
    g = Group(ctx.errors)
    for n, m in models.items():
        g.add(n, lambda m=m: w.Decode(m, cache))
    g.run(ctx.decode_rounds, warmup=2)
    rows.append(Row(f"DoRA decode step, batch 1, cache {scale.cache}", g.cell("lorakit"), g.cell("peft"),
                    g.ratio("lorakit", "peft"), NO_SLOWER))

    _log("DoRA merge / unmerge")
    g = Group(ctx.errors)
    for n, m in models.items():
        g.add(n, lambda m=m: _merge_step(m))
    g.run(ctx.rounds)
    rows.append(Row("DoRA merge_adapter", g.cell("lorakit"), g.cell("peft"), g.ratio("lorakit", "peft")))
    rows.append(Row("DoRA merge→unmerge, largest weight error (bf16, 1 cycle)",
                    *[_roundtrip_error(m) for m in _models(base.to(torch.bfloat16), scale).values()],
                    None, Target("lorakit", "==", 0.0, "exactly 0")))
    rows += _memory(ctx)
    return rows


def _merge_step(model: nn.Module) -> Callable[[], float]:
    merged = copy.deepcopy(model)
    merged.merge_adapter()
    probe = torch.arange(8)[None]
    w.check_same_outputs(merged, model, probe, "DoRA merged copy")

    def run() -> float:
        t = timed(model.merge_adapter)
        model.unmerge_adapter()
        return t

    return run


def _roundtrip_error(model: nn.Module) -> Stats:
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    model.merge_adapter()
    model.unmerge_adapter()
    after = dict(model.named_parameters())
    error = max(float((after[n].detach().float() - p.float()).abs().max()) for n, p in before.items())
    return Stats.of([error], "error")


def _memory(ctx) -> list[Row]:
    """Peak memory of a DoRA training step with dropout, each library in fresh processes (alternating order)."""
    results: dict[str, list[dict]] = {n: [] for n in w.LIB_NAMES}
    for run in range(ctx.memory_runs):
        for n in (w.LIB_NAMES if run % 2 == 0 else w.LIB_NAMES[::-1]):
            _log(f"memory: {n}, DoRA training step with dropout {memory.DROPOUT} in a fresh process "
                 f"({run + 1}/{ctx.memory_runs})")
            results[n].append(memory.measure(n, ctx.scale is w.TINY, ctx.threads, dora=True))

    def cells(key: str):
        out = [Stats.of([r[key] for r in results[n]], "mib") for n in w.LIB_NAMES]
        ratios = [a[key] / b[key] for a, b in zip(results["lorakit"], results["peft"]) if b[key] > 0]
        return (*out, Stats.of(ratios, "ratio") if ratios else None)

    return [
        Row(f"DoRA peak memory rise, training step, dropout {memory.DROPOUT}", *cells("step_peak_mib"),
            Target("ratio", "<", 1.0, "below PEFT")),
        Row("DoRA tensors saved for backward, same step", *cells("saved_mib")),
    ]
