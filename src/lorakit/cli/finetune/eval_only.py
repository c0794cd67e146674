"""``lorakit finetune --eval-only --adapter DIR``: score an existing adapter (held-out perplexity, next-token
accuracy, sample answers) as a run scores its trained model, without training and without writing anything.

The held-out examples are those of the run that trained the adapter when the settings that choose them are the
same (``--data``, ``--eval-split``, ``--max-length``; the CLI takes them from the ``recipe.yaml`` beside the
adapter), and the scoring is the run's own, so the numbers are the run's "after" numbers.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import lorakit.cli.data as D

from .prepare import Prepared


def score_adapter(prep: Prepared, log: Callable[[str], None], t_start: float) -> dict[str, Any]:
    """Score ``prep.model`` (the base with ``--adapter`` loaded); log the numbers and answers and return them."""
    scores = prep.score(prep.model)
    m = scores.metrics
    log(f"eval      held-out perplexity {m['perplexity']:.2f}, token accuracy {m['token_accuracy']:.3f} "
        f"({m['tokens']} answer tokens)")
    for chat, answer in zip(prep.sample_chats, scores.answers):
        question, reference = D.last_exchange(chat)
        log(f"\n  Q: {question}\n  reference: {reference}\n  adapter:   {answer}")
    return {
        "model": prep.source,
        "data": prep.data_label,
        "adapter": str(prep.settings.adapter),
        "eval": m,
        "answers": scores.answers,
        "device": str(prep.placement.device),
        "dtype": prep.placement.dtype_name,
        "seconds": {"load": round(prep.seconds_load, 2), "eval": round(scores.seconds, 2),
                    "total": round(time.perf_counter() - t_start, 2)},
    }
