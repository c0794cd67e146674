"""An MoE training step with LoRA on the expert stacks (``target_parameters``): time in one process, interleaved,
and the peak memory rise of one step, each library in its own fresh process.

The model is a Mixtral built from a config with 32 experts per layer (transformers' default experts
implementation); LoRA goes on ``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj`` only. PEFT adds the
update to the whole expert stack in every forward; lorakit applies it in factored form.

Run as ``python -m benchmarks.moe --lib lorakit|peft [--threads N] [--tiny]`` for one memory measurement (one
JSON line), or through ``python -m benchmarks.bench --only moe``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from . import memory
from . import workloads as w
from .harness import Group, Row, Stats, Target, failure_text

EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
#: MixtralConfig kwargs: the issue's 32 experts; TINY for the smoke test
FULL = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=32, num_experts_per_tok=2)
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
BATCH = {"full": (2, 256), "tiny": (2, 16)}


def mixtral(tiny: bool) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**(TINY if tiny else FULL))).eval()


def wrap(lib_name: str, base: nn.Module, scale: w.Scale) -> nn.Module:
    lib = w.library(lib_name)
    config = lib.LoraConfig(r=scale.r, lora_alpha=scale.alpha, target_modules=[], target_parameters=EXPERT_PARAMETERS)
    model = lib.get_peft_model(base, config, adapter_name="a0")
    w.randomize_lora(model)
    return model


def token_ids(tiny: bool) -> torch.Tensor:
    vocab = (TINY if tiny else FULL)["vocab_size"]
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, vocab, BATCH["tiny" if tiny else "full"], generator=g)


def worker(lib_name: str, tiny: bool, threads: int) -> dict:
    """Peak memory rise of one training step after a warm-up step (see :mod:`benchmarks.memory`)."""
    torch.set_num_threads(threads)
    model = wrap(lib_name, mixtral(tiny), w.TINY if tiny else w.FULL).train()
    step = w.TrainStep(model, token_ids(tiny))
    step()
    gc.collect()
    exact = memory.reset_peak()
    before = memory.status_kib("VmRSS") if exact else 0
    seconds = step()
    peak = memory.status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"lib": lib_name, "step_peak_mib": (peak - before) / 1024, "saved_mib": memory.saved_for_backward(step)
            / memory.MIB, "step_seconds": seconds}


def measure(lib_name: str, tiny: bool, threads: int, timeout: float = 900) -> dict:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    cmd = [sys.executable, "-m", "benchmarks.moe", "--lib", lib_name, "--threads", str(threads)] + (
        ["--tiny"] if tiny else [])
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"moe memory worker for {lib_name} exited with {done.returncode}: {tail[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def section_moe(ctx) -> list[Row]:
    tiny = ctx.scale is w.TINY
    cfg = TINY if tiny else FULL
    base = mixtral(tiny)
    models = {n: wrap(n, copy.deepcopy(base), ctx.scale) for n in w.LIB_NAMES}
    w.check_same_outputs(models["lorakit"], models["peft"], token_ids(tiny)[:1, :8], "MoE experts adapter")
    ids = token_ids(tiny)
    batch = f"{ids.shape[0]}×{ids.shape[1]}"
    what = f"{cfg['num_local_experts']} experts, target_parameters"
    g = Group(ctx.errors)
    for n, m in models.items():
        g.add(n, lambda m=m: w.TrainStep(m.train(), ids))
    g.run(ctx.heavy_rounds)
    rows = [Row(f"MoE training step, {what}, batch {batch}", g.cell("lorakit"), g.cell("peft"),
                g.ratio("lorakit", "peft"), Target("ratio", "<=", 0.6, "≤ 0.60"))]
    del models
    results: dict[str, list[dict]] = {n: [] for n in w.LIB_NAMES}
    failed: dict[str, str] = {}
    for run in range(ctx.memory_runs):
        for n in (w.LIB_NAMES if run % 2 == 0 else w.LIB_NAMES[::-1]):
            if n not in failed:
                try:
                    results[n].append(measure(n, tiny, ctx.threads))
                except Exception as exc:  # noqa: BLE001 — shown in the table
                    failed[n] = failure_text(exc)
                    ctx.errors.append(f"moe memory, {n}: {failed[n]}")
    for key, label, target in (("step_peak_mib", "peak memory rise", Target("ratio", "<=", 0.7, "≤ 0.70")),
                               ("saved_mib", "tensors saved for backward", None)):
        cells = {n: failed.get(n) or Stats.of([r[key] for r in results[n]], "mib") for n in w.LIB_NAMES}
        ratios = [a[key] / b[key] for a, b in zip(results["lorakit"], results["peft"]) if b[key] > 0]
        ratio = Stats.of(ratios, "ratio") if ratios and not failed else None
        rows.append(Row(f"MoE {label}, training step {batch}", cells["lorakit"], cells["peft"], ratio, target))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", required=True, choices=list(w.LIB_NAMES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    print(json.dumps(worker(args.lib, args.tiny, args.threads)))


if __name__ == "__main__":
    main()
