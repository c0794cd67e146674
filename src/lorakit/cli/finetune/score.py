"""Scoring for ``lorakit finetune``: logits on the answer tokens only, the shared opening run once per batch,
held-out perplexity and accuracy, and sample answers."""

from __future__ import annotations

import functools
import inspect
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lorakit.cli.data as D


@functools.lru_cache(maxsize=None)
def _forward_options(cls: type) -> tuple[bool, Optional[str]]:
    """(logits can be limited to a boolean mask of positions, name of the cache argument) for a model class."""
    params = inspect.signature(cls.forward).parameters
    try:
        from transformers import modeling_utils

        mask_slicing = hasattr(modeling_utils, "slice_logits_to_keep")  # transformers >= 5 reads a 2-D bool mask
    except ImportError:  # pragma: no cover
        mask_slicing = False
    cache = next((name for name in ("cache", "past_key_values") if name in params), None)
    return mask_slicing and "logits_to_keep" in params, cache



def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def answer_logits(model: nn.Module, batch: dict[str, Tensor], prefix_len: int = 0) -> tuple[Tensor, Tensor]:
    """``(logits, targets)`` at the positions whose next token is learned: ``(N, vocab)`` and ``(N,)``.

    With ``prefix_len`` > 0, the first ``prefix_len`` tokens (the same in every row) run once and reach the rest
    of the batch as a key/value cache; none of them may predict a learned token.
    """
    device = _device_of(model)
    ids, mask, labels = batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device)
    learned = labels[:, 1:] != D.IGNORE_INDEX  # position t predicts token t + 1
    keep = F.pad(learned, (0, 1), value=False)
    targets = labels[:, 1:][learned]
    mask_slicing, cache_arg = _forward_options(type(_base(model)))
    kwargs: dict[str, Any] = {}
    if prefix_len:
        if cache_arg is None:
            raise TypeError(f"{type(_base(model)).__name__}.forward takes no key/value cache")
        kwargs[cache_arg] = _prefix_cache(model, ids[0, :prefix_len], ids.shape[0], cache_arg, mask_slicing)
        ids, keep = ids[:, prefix_len:], keep[:, prefix_len:]
    if mask_slicing:
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    return (logits if logits.dim() == 2 else logits[keep]), targets


def _prefix_cache(model: nn.Module, prefix: Tensor, batch_size: int, cache_arg: str, mask_slicing: bool):
    extra = {"logits_to_keep": 1} if mask_slicing else {}
    out = model(input_ids=prefix[None], use_cache=True, **extra)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        raise TypeError(f"{type(_base(model)).__name__} returned no key/value cache that lorakit can share")
    cache.batch_repeat_interleave(batch_size)
    return cache


def shared_prefix_len(examples: Sequence[D.Encoded], minimum: int = 4) -> int:
    """How many opening tokens all examples share before any token they learn (0 if fewer than ``minimum``)."""
    if not examples:
        return 0
    common = len(os.path.commonprefix([e.input_ids for e in examples]))
    first_learned = min(next(i for i, t in enumerate(e.labels) if t != D.IGNORE_INDEX) for e in examples)
    n = min(common, first_learned - 1, min(len(e.input_ids) for e in examples) - 1)
    return n if n >= minimum else 0


@torch.no_grad()
def prefix_sharing_works(model: nn.Module, batch: dict[str, Tensor], prefix_len: int) -> bool:
    """Whether running the shared opening once gives this model's logits on real data (to 1e-4 relative)."""
    if not prefix_len:
        return False
    was_training = model.training
    model.eval()  # no dropout: both computations must be deterministic to be compared
    try:
        plain, _ = answer_logits(model, batch)
        try:
            shared, _ = answer_logits(model, batch, prefix_len)
        except Exception:  # a model whose cache works differently: use the plain computation
            return False
    finally:
        model.train(was_training)
    scale = plain.abs().max().clamp_min(1.0)
    return shared.shape == plain.shape and bool(((shared - plain).abs().max() / scale) <= 1e-4)


def agreement(dtype: torch.dtype) -> float:
    """How closely (relative) two exact ways of computing a score in ``dtype`` agree: 1e-4 in float32; in half
    precision a few units of its rounding (bfloat16 keeps 8 bits, float16 11)."""
    return max(1e-4, 4 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-4


@torch.no_grad()
def evaluate(model: nn.Module, examples: Sequence[D.Encoded], batch_size: int, pad_id: int, prefix_len: int = 0):
    """Held-out perplexity and next-token accuracy over the learned (answer) tokens, all tokens weighted alike."""
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64)
    correct = count = 0
    for indices in D.length_batches(examples, batch_size):
        logits, targets = answer_logits(model, D.collate([examples[i] for i in indices], pad_id), prefix_len)
        nll += F.cross_entropy(logits.float(), targets, reduction="sum").double().cpu()
        correct += int((logits.argmax(-1) == targets).sum())
        count += int(targets.numel())
    model.train(was_training)
    return {"perplexity": float(torch.exp(nll / count)), "token_accuracy": correct / count, "tokens": count}


@torch.no_grad()
def answers(model: nn.Module, tokenizer, chats: Sequence[D.Chat], max_new_tokens: int) -> list[str]:
    """The model's greedy replies to each chat's last question, prompted as in training; one batched
    ``generate`` call (prompts padded on the left)."""
    if not chats:
        return []
    was_training = model.training
    model.eval()
    prompts = [D.prompt_ids(tokenizer, c) for c in chats]
    width, pad = max(map(len, prompts)), D.pad_id_of(tokenizer)
    device = _device_of(model)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
    model.train(was_training)
    return [tokenizer.decode(row[width:].tolist(), skip_special_tokens=True).strip() for row in out]


@dataclass
class Scores:
    """The held-out score of one model: ``metrics`` from :func:`evaluate`, its sample ``answers``, and the
    ``seconds`` both took."""

    metrics: dict[str, Any]
    answers: list[str]
    seconds: float = 0.0


def score_held_out(model: nn.Module, tokenizer, held: Sequence[D.Encoded], sample_chats: Sequence[D.Chat],
                   batch_size: int, pad_id: int, prefix_len: int, max_new_tokens: int) -> Scores:
    """:func:`evaluate` on the held-out examples and :func:`answers` to the sample questions, timed together."""
    t0 = time.perf_counter()
    metrics = evaluate(model, held, batch_size, pad_id, prefix_len)
    replies = answers(model, tokenizer, sample_chats, max_new_tokens)
    return Scores(metrics, replies, time.perf_counter() - t0)
