"""Adapters at inference: hotswapping an adapter vs loading it afresh, and compiled vs eager decode.

Section ``inference`` of the benchmark (registered in :data:`benchmarks.items.SECTIONS`):

- ``hotswap_adapter`` of a saved adapter over the running one (rank and alpha alternating between two files, the
  model prepared with ``prepare_model_for_compiled_hotswap``) against ``load_adapter`` of the same file under a
  new name (deleted after, untimed): lorakit and PEFT side by side, and hotswap / load per library. Wall-clock
  (both read the file from disk).
- One decode step (batch 1, fixed cache length) of a model compiled with ``torch.compile`` (inductor) against the
  same model in eager mode, after the compile (warm-up rounds, untimed). Checked to give eager's logits.
"""

from __future__ import annotations

import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import workloads as w
from .harness import BenchError, Group, Row, timed


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _hotswap_module(lib_name: str):
    if lib_name == "lorakit":
        return w.lorakit_feature(lambda: __import__("lorakit.hotswap", fromlist=["hotswap_adapter"]))
    from peft.utils import hotswap

    return hotswap


def _saved_adapters(ctx, tmp: Path) -> list[Path]:
    """Two PEFT-written adapters of the benchmark's targets: rank r (alpha 2r) and rank r/2 (alpha 3r)."""
    import peft

    s = ctx.scale
    paths = []
    for i, (r, alpha) in enumerate([(s.r, s.alpha), (max(1, s.r // 2), 3 * s.r)]):
        model = peft.get_peft_model(copy.deepcopy(ctx.base), peft.LoraConfig(r=r, lora_alpha=alpha,
                                                                             target_modules=list(w.TARGETS)))
        w.randomize_lora(model, seed=10 + i)
        model.save_pretrained(str(tmp / f"adapter{i}"))
        paths.append(tmp / f"adapter{i}")
    return paths


def _swapper(ctx, lib_name: str, paths: list[Path], probe) -> Callable[[], Callable[[], float]]:
    def setup() -> Callable[[], float]:
        lib, hot = w.library(lib_name), _hotswap_module(lib_name)
        model = lib.PeftModel.from_pretrained(copy.deepcopy(ctx.base), str(paths[0])).eval()
        hot.prepare_model_for_compiled_hotswap(model, target_rank=ctx.scale.r)
        hot.hotswap_adapter(model, str(paths[1]), "default")
        fresh = lib.PeftModel.from_pretrained(copy.deepcopy(ctx.base), str(paths[1])).eval()
        w.check_same_outputs(model, fresh, probe, f"{lib_name} hotswap vs a fresh load")
        turn = iter(range(10**9))

        def run() -> float:
            return timed(lambda: hot.hotswap_adapter(model, str(paths[next(turn) % 2]), "default"), wall=True)

        return run

    return setup


def _loader(ctx, lib_name: str, paths: list[Path]) -> Callable[[], Callable[[], float]]:
    def setup() -> Callable[[], float]:
        lib = w.library(lib_name)
        model = lib.PeftModel.from_pretrained(copy.deepcopy(ctx.base), str(paths[0])).eval()
        turn = iter(range(10**9))

        def run() -> float:
            name = f"fresh{next(turn)}"
            t = timed(lambda: model.load_adapter(str(paths[1]), name), wall=True)
            model.delete_adapter(name)
            return t

        return run

    return setup


def _compiled_decode(model: nn.Module, cache) -> Callable[[], float]:
    """A decode step of ``torch.compile(model)``, checked against eager on the same step (the check's call is the
    compile)."""
    compiled = torch.compile(model)
    token = torch.full((1, 1), 7, dtype=torch.long)
    with torch.no_grad():
        want = model(input_ids=token, cache=copy.deepcopy(cache), use_cache=True).logits
        got = compiled(input_ids=token, cache=copy.deepcopy(cache), use_cache=True).logits
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise BenchError(f"compiled logits differ from eager (max |Δ| {(got - want).abs().max().item():.2e})")
    return w.Decode(compiled, cache)


def section_inference(ctx) -> list[Row]:
    s = ctx.scale
    probe = w.token_ids(s, 1, 8)
    rows: list[Row] = []
    tmp = Path(tempfile.mkdtemp(prefix="lorakit-bench-hotswap-"))
    try:
        log("hotswap_adapter vs load_adapter")
        paths = _saved_adapters(ctx, tmp)
        g = Group(ctx.errors)
        for n in w.LIB_NAMES:
            g.add(f"{n} hotswap", _swapper(ctx, n, paths, probe))
            g.add(f"{n} load", _loader(ctx, n, paths))
        g.run(ctx.rounds)
        rows += [
            Row(f"hotswap_adapter (r {s.r}↔{max(1, s.r // 2)}, prepared)", g.cell("lorakit hotswap"),
                g.cell("peft hotswap"), g.ratio("lorakit hotswap", "peft hotswap")),
            Row("load_adapter, new name (same file)", g.cell("lorakit load"), g.cell("peft load"),
                g.ratio("lorakit load", "peft load")),
            Row("hotswap / load_adapter", g.ratio("lorakit hotswap", "lorakit load"),
                g.ratio("peft hotswap", "peft load")),
        ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    log(f"compiled vs eager decode, batch 1, cache {s.cache} (torch.compile, inductor)")
    models = {n: w.wrap(w.library(n), copy.deepcopy(ctx.base), s) for n in w.LIB_NAMES}
    w.check_same_outputs(models["lorakit"], models["peft"], probe, "one adapter")
    cache = w.make_cache(ctx.base, 1, s.cache, s)
    g = Group(ctx.errors)
    for n, m in models.items():
        g.add(n, lambda m=m: w.Decode(m, cache))
        g.add(f"{n} compiled", lambda m=m: _compiled_decode(m, cache))
    g.run(ctx.decode_rounds, warmup=3)
    rows += [
        Row(f"decode step, compiled (inductor), batch 1, cache {s.cache}", g.cell("lorakit compiled"),
            g.cell("peft compiled"), g.ratio("lorakit compiled", "peft compiled")),
        Row("decode compiled / eager", g.ratio("lorakit compiled", "lorakit"), g.ratio("peft compiled", "peft")),
    ]
    return rows
