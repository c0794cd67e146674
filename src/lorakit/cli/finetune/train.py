"""Training for ``lorakit finetune``: the learning-rate schedule, the batch of each step, and the loop.

In a process group (``torchrun``) each process trains on its share of every batch and the gradients are summed
over the processes, so the steps are those of one process on the whole batch.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import lorakit.cli.data as D
import lorakit.distributed as distributed

from .checkpoints import save_checkpoint
from .prepare import Prepared
from .score import Scores, answer_logits


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 10% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


class BatchPlan:
    """The examples of training step ``k``: a pure function of (seed, k), so a resumed run sees the same batches."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self._epoch, self._batches = -1, []
        self.per_epoch = len(self._plan(0))

    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            rng = random.Random(f"{self.seed}/{epoch}")
            self._epoch, self._batches = epoch, D.length_grouped_batches(self.lengths, self.batch_size, rng)
        return self._batches

    def __call__(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.per_epoch)
        return self._plan(epoch)[k]


@dataclass
class Trained:
    """The training loss of every step, and the seconds spent training (over all sessions of a resumed run)."""

    losses: list[float]
    seconds: float


def train_run(prep: Prepared, before: Scores, on_step: Optional[Callable[[int, float], None]] = None) -> Trained:
    """Train ``prep.model`` for the remaining steps; rank 0 writes a checkpoint every ``save_every`` steps and at
    the end. ``on_step(step, loss)`` is called after each step (and after its checkpoint, if one is due)."""
    from tqdm.auto import tqdm

    settings, model = prep.settings, prep.model
    rank, world = distributed.rank(), distributed.world_size()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    plan = BatchPlan([len(e.input_ids) for e in prep.train], settings.batch_size, settings.seed)
    losses: list[float] = []
    start = 0
    seconds_train = 0.0
    if prep.saved is not None:
        optimizer.load_state_dict(prep.saved["optimizer"])
        losses, start, seconds_train = list(prep.saved["losses"]), prep.saved["step"], prep.saved["seconds_train"]
        torch.set_rng_state(prep.saved["rng"])
        if "cuda_rng" in prep.saved and prep.placement.device.type == "cuda":
            torch.cuda.set_rng_state(prep.saved["cuda_rng"], prep.placement.device)
    else:
        torch.manual_seed(settings.seed)

    def state(step: int) -> dict[str, Any]:
        saved = {"step": step, "settings": settings.identity(), "optimizer": optimizer.state_dict(), "losses": losses,
                 "before": before.metrics, "before_answers": before.answers, "rng": torch.get_rng_state(),
                 "seconds_train": seconds_train + time.perf_counter() - t_train, "dtype": prep.placement.dtype_name}
        if prep.placement.device.type == "cuda":  # dropout draws from the GPU's generator there
            saved["cuda_rng"] = torch.cuda.get_rng_state(prep.placement.device)
        return saved

    model.train()
    t_train = time.perf_counter()
    tokens_seen = 0
    with tqdm(total=settings.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, leave=True,
              disable=rank != 0) as bar:  # closed (its line ended) also when a step fails
        for step in range(start, settings.steps):
            rows = plan(step)[rank::world]  # this process's share of the batch (all of it with one process)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, settings.steps, settings.lr)
            loss, n_tokens = _step(model, params, optimizer, [prep.train[i] for i in rows], prep)
            losses.append(loss)
            tokens_seen += n_tokens
            elapsed = time.perf_counter() - t_train
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_seen / elapsed:.0f}", refresh=False)
            bar.update(1)
            done = step + 1
            if rank == 0 and ((settings.save_every and done % settings.save_every == 0) or done == settings.steps):
                save_checkpoint(prep.out, model, state(done))
            if on_step is not None:
                on_step(done, losses[-1])
    seconds_train += time.perf_counter() - t_train
    model.eval()
    return Trained(losses, seconds_train)


def _step(model: nn.Module, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
          examples: Sequence[D.Encoded], prep: Prepared) -> tuple[float, int]:
    """One optimizer step on this process's share of a batch: (the mean loss over the whole batch's answer
    tokens, the number of tokens in the whole batch)."""
    loss_sum, n_targets, n_tokens = 0.0, 0, 0
    for chunk in D.token_chunks(examples, prep.settings.chunk_tokens):
        batch = D.collate(chunk, prep.pad_id)
        logits, targets = answer_logits(model, batch, prep.prefix_len)
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        loss.backward()  # gradients add up over chunks (and processes); divided by the token count below
        loss_sum += loss.item()
        n_targets += targets.numel()
        n_tokens += int(batch["attention_mask"].sum())
    # the whole batch's summed gradient and loss on every process; then the mean over its answer tokens
    loss_sum, n_targets, n_tokens = distributed.sum_over_ranks(params, loss_sum, n_targets, n_tokens)
    for p in params:
        p.grad.div_(n_targets)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / n_targets, int(n_tokens)
