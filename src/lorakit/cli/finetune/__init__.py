"""``lorakit finetune``: LoRA fine-tuning of a causal language model on chat data, with a report; on the CPU,
a CUDA GPU or Apple's MPS (``--device``, ``--dtype``: :mod:`lorakit.cli.device`).

One run: read and split the data, load the model, add LoRA, score the held-out answers, train, score again,
save the adapter (PEFT's format), a loss curve and ``metrics.json``, then merge the adapter into the model and
score once more (the merged model must score as the adapted one did).

Two things keep it fast on a small CPU (both exact on every device; the second in float32 only, see
:func:`.prepare.prepare_run`):

- logits are computed only where a loss is taken (the answer tokens), not over the whole 49k-word vocabulary at
  every position;
- the opening that every example shares (the chat template's system prompt, say) is run once per batch instead
  of once per row, and its keys and values are handed to the rest of the batch as a cache. The gradient flows
  through that cache, so this is the same computation, not an approximation; a check against the plain
  computation on real data turns it off for any model where the two disagree.

Training state (adapter, optimizer, step, losses) is checkpointed atomically every ``save_every`` steps, and the
order of batches is a pure function of the seed and the step, so ``--resume`` continues to the same weights an
uninterrupted run reaches.

The run goes in phases, one module each: :mod:`.settings` (the options and their checks), :mod:`.prepare` (data,
model, LoRA, ``--resume``), :mod:`.score` (answer-token logits, held-out metrics, sample answers), :mod:`.train`
(schedule, batches, the loop), :mod:`.checkpoints` (written during training, read by ``--resume``) and
:mod:`.report` (scores after training and merging, the adapter, ``loss.png``, ``metrics.json``). :func:`run`
chains them; with ``--eval-only`` it scores an existing adapter instead (:mod:`.eval_only`). The settings can
come from a recipe file (:mod:`lorakit.cli.recipe`); the run saves its own as ``recipe.yaml``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Collection, Optional

import lorakit.distributed as distributed

from ..device import out_of_memory_as_error
from .checkpoints import CHECKPOINTS, LATEST, RECIPE_FILE, STATE_FILE, latest_checkpoint, resume_state, save_checkpoint
from .eval_only import score_adapter
from .prepare import Prepared, lora_config, prepare_run
from .report import plot_losses, write_report
from .score import Scores, answer_logits, answers, evaluate, prefix_sharing_works, score_held_out, shared_prefix_len
from .settings import RECIPE_KEYS, RUN_IDENTITY, Settings, default_out
from .train import BatchPlan, Trained, learning_rate, train_run

__all__ = [
    "BatchPlan", "CHECKPOINTS", "LATEST", "Prepared", "RECIPE_FILE", "RECIPE_KEYS", "RUN_IDENTITY", "STATE_FILE",
    "Scores", "Settings", "Trained", "answer_logits", "answers", "default_out", "evaluate", "latest_checkpoint",
    "learning_rate", "lora_config", "plot_losses", "prefix_sharing_works", "prepare_run", "resume_state", "run",
    "save_checkpoint", "score_adapter", "score_held_out", "shared_prefix_len", "train_run", "write_report",
]


def _quiet(line: str) -> None:
    """The log of ranks other than 0."""


def run(settings: Settings, log: Callable[[str], None] = print,
        on_step: Optional[Callable[[int, float], None]] = None,
        explicit: Optional[Collection[str]] = None) -> dict[str, Any]:
    """Fine-tune as ``settings`` say; returns the metrics written to ``metrics.json`` (with ``eval_only``: score
    ``settings.adapter`` and return its metrics, training nothing).

    ``on_step(step, loss)`` is called after each optimizer step (and after its checkpoint, if one is due).
    ``explicit`` names the settings the user gave (the CLI's case; a mapping from name to the recipe file or
    command line that gave it): with ``--resume`` the others are taken from the run being continued. ``None``
    means all were given. Running out of memory on the device is a one-line ``DeviceOutOfMemoryError``.

    In a process group (``torchrun``; the CLI joins it) each process trains on its share of every batch and
    the gradients are summed over the processes, so the steps are those of one process on the whole batch. Rank 0
    alone logs, writes checkpoints and files and scores the trained model; the other ranks return ``{}``.
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    settings.check()
    rank = distributed.rank()
    if rank:
        log = _quiet
    with out_of_memory_as_error(settings, [f.name for f in dataclasses.fields(settings)]):
        return _run(settings, explicit, log, on_step, t_start, cpu_start)


def _run(settings: Settings, explicit: Optional[Collection[str]], log: Callable[[str], None],
         on_step: Optional[Callable[[int, float], None]], t_start: float, cpu_start: float) -> dict[str, Any]:
    rank = distributed.rank()
    prep = prepare_run(settings, explicit, log)
    if settings.eval_only:
        return {} if rank else score_adapter(prep, log, t_start)
    if prep.saved is not None:
        before = Scores(prep.saved["before"], prep.saved["before_answers"])
        log(f"resume    from {prep.checkpoint} (step {prep.saved['step']} of {settings.steps})")
    else:
        before = prep.score(prep.model)
    log(f"before    held-out perplexity {before.metrics['perplexity']:.2f}, token accuracy "
        f"{before.metrics['token_accuracy']:.3f} ({before.metrics['tokens']} answer tokens)")
    trained = train_run(prep, before, on_step)
    if rank:
        return {}
    return write_report(prep, before, trained, log, t_start, cpu_start)
