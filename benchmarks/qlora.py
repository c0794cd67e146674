"""QLoRA: a training step on an nf4-quantized base, lorakit vs PEFT on the same quantized model, and vs the float base.

The Llama is saved to a temporary folder and loaded back with transformers' ``BitsAndBytesConfig`` (4-bit nf4,
compute in float32), as a user loads a quantized model; nothing is downloaded. Times: interleaved rounds in this
process. Memory: each library on each base in a fresh process (``python -m benchmarks.memory --folder F [--nf4]``).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import warnings

from torch import nn

from . import memory
from . import workloads as w
from .harness import Group, Row, Stats, Target, Unsupported, failure_text

NO_SLOWER = Target("ratio", "<=", 1.0, "≤ 1.00")


def saved_llama(kwargs: dict) -> str:
    """A temporary folder holding :func:`workloads.llama` as a checkpoint (the caller removes it)."""
    folder = tempfile.mkdtemp(prefix="lorakit-bench-qlora-")
    w.llama(kwargs).save_pretrained(folder)
    return folder


def load_llama(folder: str, nf4: bool = True) -> nn.Module:
    """The checkpoint in ``folder`` loaded with ``from_pretrained``: in 4-bit nf4 (bitsandbytes, compute in float32)
    or, with ``nf4=False``, in float32 by the same path; in eval mode."""
    from transformers import LlamaForCausalLM

    kwargs = {}
    if nf4:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as exc:
            raise Unsupported(f"bitsandbytes is not installed ({exc}); pip install 'lorakit[quantized]'") from exc
        import torch

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM.from_pretrained(folder, **kwargs).eval()


def section_qlora(ctx) -> list[Row]:
    folder = saved_llama(ctx.scale.model)
    try:
        return _timed_rows(ctx, load_llama(folder)) + _memory_rows(ctx, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _timed_rows(ctx, base: nn.Module) -> list[Row]:
    s = ctx.scale
    models = {n: w.wrap(w.library(n), copy.deepcopy(base), s) for n in w.LIB_NAMES}
    floats = {n: w.wrap(w.library(n), copy.deepcopy(ctx.base), s) for n in w.LIB_NAMES}
    for m in models.values():  # train mode throughout (no dropout here): bitsandbytes' CPU inference kernel
        m.train()  # repacks 4-bit weights, and needs sizes the tiny model does not have
    w.check_same_outputs(models["lorakit"], models["peft"], w.token_ids(s, 1, 8), "QLoRA, nf4 base")
    ids = w.token_ids(s, *s.train)
    g = Group(ctx.errors)
    for n in w.LIB_NAMES:
        for key, m in ((n, models[n]), (f"{n} float", floats[n])):
            m.train()
            g.add(key, lambda m=m: w.TrainStep(m, ids))
    g.run(ctx.heavy_rounds)
    batch, tokens = s.train
    rows = [
        Row(f"QLoRA training step, nf4 base, batch {batch}×{tokens}", g.cell("lorakit"), g.cell("peft"),
            g.ratio("lorakit", "peft"), NO_SLOWER),
        Row("QLoRA training step, nf4 / float base", g.ratio("lorakit", "lorakit float"),
            g.ratio("peft", "peft float")),
    ]
    return rows


def _memory_rows(ctx, folder: str) -> list[Row]:
    """Peak memory of one training step (with dropout), each library on each base in its own process; both bases
    are loaded from the checkpoint in ``folder`` by the same path, so the difference is the quantization's."""
    runs = {(n, q): [] for n in w.LIB_NAMES for q in ("nf4", None)}
    failed: dict[tuple, str] = {}
    if ctx.scale is w.TINY:  # smaller than bitsandbytes' own import: a float comparison would say nothing
        failed.update({(n, None): "not measured with --tiny" for n in w.LIB_NAMES})
    for key in runs:
        if key in failed:
            continue
        try:
            runs[key].append(memory.measure(key[0], ctx.scale is w.TINY, ctx.threads, folder=folder,
                                            nf4=key[1] == "nf4"))
        except Exception as exc:  # noqa: BLE001
            failed[key] = failure_text(exc)
            ctx.errors.append(f"QLoRA memory, {key[0]} {key[1] or 'float'}: {failed[key]}")

    def cell(key, field):
        return failed.get(key) or Stats.of([r[field] for r in runs[key]], "mib")

    def ratio(num, den, field):
        if num in failed or den in failed or not runs[den][0][field]:
            return None
        return Stats.of([a[field] / b[field] for a, b in zip(runs[num], runs[den])], "ratio")

    batch, tokens = ctx.scale.train
    step = f"training step {batch}×{tokens}, dropout {memory.DROPOUT}"
    return [
        Row(f"QLoRA peak resident memory, nf4 base, {step}", cell(("lorakit", "nf4"), "peak_mib"),
            cell(("peft", "nf4"), "peak_mib"), ratio(("lorakit", "nf4"), ("peft", "nf4"), "peak_mib"),
            Target("ratio", "<=", 1.0, "≤ 1.00")),
        Row("QLoRA peak memory rise during the step, nf4 base", cell(("lorakit", "nf4"), "step_peak_mib"),
            cell(("peft", "nf4"), "step_peak_mib"), ratio(("lorakit", "nf4"), ("peft", "nf4"), "step_peak_mib")),
        Row("float base: peak resident memory, same step", cell(("lorakit", None), "peak_mib"),
            cell(("peft", None), "peak_mib"), ratio(("lorakit", None), ("peft", None), "peak_mib")),
    ]
