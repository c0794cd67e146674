"""The report of ``lorakit finetune``: scores after training and after merging, the adapter, the loss curve and
``metrics.json``. The merged model must score as the adapted one did."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

import lorakit.cli.data as D
from lorakit.io import atomic_write_text

from ..device import peak_device_memory_mb
from .checkpoints import CHECKPOINTS, RECIPE_FILE
from .prepare import Prepared
from .score import Scores, agreement, evaluate
from .train import Trained


def write_report(prep: Prepared, before: Scores, trained: Trained, log: Callable[[str], None], t_start: float,
                 cpu_start: float) -> dict[str, Any]:
    """Score the trained model, save the adapter and the loss curve, merge and score again, write metrics.json.

    ``t_start`` and ``cpu_start`` are the run's start (``time.perf_counter()``, ``time.process_time()``).
    Returns the metrics; a merged model that scores differently from the adapted one is a ``RuntimeError``.
    """
    settings, model, out = prep.settings, prep.model, prep.out
    after = prep.score(model)
    log(f"after     held-out perplexity {after.metrics['perplexity']:.2f}, token accuracy "
        f"{after.metrics['token_accuracy']:.3f}")
    for chat, a, b in zip(prep.sample_chats, before.answers, after.answers):
        question, reference = D.last_exchange(chat)
        log(f"\n  Q: {question}\n  reference: {reference}\n  before:    {a}\n  after:     {b}")

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    plot_losses(out / "loss.png", trained.losses, f"lorakit finetune: {prep.model_label}, LoRA r={settings.r}",
                (math.log(before.metrics["perplexity"]), math.log(after.metrics["perplexity"])))

    t0 = time.perf_counter()
    merged = model.merge_and_unload(dequantize=True)  # a quantized (--quantize) base comes back as float: exact
    merged_metrics = evaluate(merged, prep.held, prep.eval_batch, prep.pad_id, prep.prefix_len)
    t_eval = before.seconds + after.seconds + time.perf_counter() - t0
    # in float32 the merged weights are the adapted computation to rounding; in half precision W + s·B@A is
    # rounded to the base's dtype, so the two agree to that dtype's precision
    tolerance = agreement(prep.placement.dtype)
    agree = abs(merged_metrics["perplexity"] - after.metrics["perplexity"]) <= tolerance * after.metrics["perplexity"]
    log(f"merged    held-out perplexity {merged_metrics['perplexity']:.2f}, token accuracy "
        f"{merged_metrics['token_accuracy']:.3f} ({'equal to the adapter' if agree else 'DIFFERS from the adapter'})")

    metrics = {
        "model": prep.source,
        "data": prep.data_label,
        "before": before.metrics,
        "after": after.metrics,
        "merged": merged_metrics,
        "seconds": {"load": round(prep.seconds_load, 2), "train": round(trained.seconds, 2), "eval": round(t_eval, 2),
                    "total": round(time.perf_counter() - t_start, 2),
                    "cpu": round(time.process_time() - cpu_start, 2)},
        "peak_memory_mb": round(_peak_memory_mb(), 1),
        "device": str(prep.placement.device),
        "dtype": prep.placement.dtype_name,
        "threads": torch.get_num_threads(),
        "settings": settings.identity(),
        "losses": trained.losses,
    }
    device_peak = peak_device_memory_mb(prep.placement.device)
    if device_peak is not None:
        metrics["peak_device_memory_mb"] = round(device_peak, 1)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    log(f"\nsaved     adapter (PEFT format): {out}/adapter_config.json, {out}/adapter_model.safetensors\n"
        f"          loss curve: {out}/loss.png   metrics: {out}/metrics.json   recipe: {out / RECIPE_FILE}   "
        f"checkpoint: {out / CHECKPOINTS}\n"
        f"time      {metrics['seconds']['total']:.0f} s in all (load {prep.seconds_load:.0f} s, train {trained.seconds:.0f} s, "
        f"evaluation {t_eval:.0f} s; {metrics['seconds']['cpu']:.0f} s of CPU time); peak memory {metrics['peak_memory_mb']:.0f} MB "
        "after loading" + (f", on {prep.placement.device} {device_peak:.0f} MB" if device_peak is not None else ""))
    if not agree:
        raise RuntimeError("the merged model scores differently from the adapted one: please report this as a bug")
    return metrics


def _peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def plot_losses(path: Path, losses: Sequence[float], title: str, held_out: Optional[tuple[float, float]] = None) -> None:
    """A PNG of the training loss per step with a running mean, and the held-out loss before and after
    (``held_out``, as log-perplexities); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from lorakit.io import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, lw=1, alpha=0.45, marker="." if len(losses) <= 50 else None, label="training batch")
    window = max(2, min(25, len(losses) // 4))
    smooth = [sum(losses[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(losses))]
    ax.plot(steps, smooth, lw=2, label=f"training, mean of last {window} steps")
    if held_out is not None:
        ax.axhline(held_out[0], color="grey", ls="--", lw=1, label=f"held out, before ({held_out[0]:.2f})")
        ax.axhline(held_out[1], color="green", ls="--", lw=1.5, label=f"held out, after ({held_out[1]:.2f})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on answer tokens")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
