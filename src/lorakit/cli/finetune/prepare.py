"""Preparing a ``lorakit finetune`` run: the output folder and what it continues from, the data, the model, and
LoRA on it. Everything that can fail on the user's input fails here, before any training."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Optional

import torch
from torch import nn

import lorakit.cli.data as D
import lorakit.distributed as distributed
from lorakit.config import LoraConfig
from lorakit.peft_model import PeftModel, get_peft_model
from lorakit.targeting import list_entry_matches

from ..device import Placement
from ..device import resolve as resolve_placement
from ..loading import LoadedModel, load_causal_lm, quantize_linear_layers, reset_peak_memory
from .checkpoints import check_resumed_dtype, resume_state, write_recipe
from .score import Scores, prefix_sharing_works, score_held_out, shared_prefix_len
from .settings import Settings, default_out


@dataclass
class Prepared:
    """A run ready to be scored and trained: what the later phases (score, train, report) work on."""

    settings: Settings
    placement: Placement  # the device and the base model's dtype
    out: Path
    checkpoint: Optional[Path]  # the checkpoint continued from (--resume), else None
    saved: Optional[dict[str, Any]]  # its training state
    data_label: str
    model_label: str
    source: str  # the base model as the adapter records it
    model: nn.Module  # the base model with LoRA
    tokenizer: Any
    train: list[D.Encoded]
    held: list[D.Encoded]
    sample_chats: list[D.Chat]  # held-out questions answered before and after training
    pad_id: int
    prefix_len: int  # opening tokens run once per batch (0: recomputed per row)
    eval_batch: int
    seconds_load: float

    def score(self, model: nn.Module) -> Scores:
        """``model``'s held-out metrics and sample answers."""
        return score_held_out(model, self.tokenizer, self.held, self.sample_chats, self.eval_batch, self.pad_id,
                              self.prefix_len, self.settings.max_new_tokens)


def prepare_run(settings: Settings, explicit: Optional[Collection[str]], log: Callable[[str], None]) -> Prepared:
    """Resolve ``--out`` and ``--resume``, read and split the data, load the model onto the device, encode the
    examples and add LoRA (or load it from the checkpoint, or ``--adapter`` with ``--eval-only``); log what was
    set up. A training run's recipe is saved in ``--out``."""
    out = Path(settings.out) if settings.out else default_out(settings)
    checkpoint, saved = (None, None) if settings.eval_only else resume_state(settings, out, explicit)
    placement = resolve_placement(settings.device, settings.dtype)
    check_resumed_dtype(saved, placement.dtype_name, out)
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
    loaded = load_causal_lm(settings.model, placement.dtype)
    if settings.quantize:  # QLoRA: the frozen base in 4-bit (or 8-bit), the adapter in float32
        loaded.description += "; " + quantize_linear_layers(loaded.model, settings.quantize)
    load_peak = reset_peak_memory()  # the peak reported at the end is then the run's, not loading's
    if load_peak is not None:
        loaded.description += f"; peak memory {load_peak:.0f} MB while loading"
    if placement.device.type == "cuda":
        torch.cuda.set_device(placement.device)  # NCCL (torchrun) and the default stream follow it
    model, tokenizer = loaded.model.to(placement.device), loaded.tokenizer
    seconds_load = time.perf_counter() - t_load
    fallback_template = D.ensure_chat_template(tokenizer)
    train, dropped_train = D.encode_all(tokenizer, train_chats, settings.max_length)
    held, dropped_held = D.encode_all(tokenizer, held_chats, settings.max_length)
    if not train or not held:
        raise ValueError(f"--max-length={settings.max_length} cuts every answer off the {'training' if not train else 'held-out'} "
                         "examples: raise it")
    prefix_len = shared_prefix_len(train + held)
    pad_id = D.pad_id_of(tokenizer)

    if settings.eval_only:
        model = PeftModel.from_pretrained(model, settings.adapter)
    elif saved is not None:
        model = PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
    else:
        config = lora_config(settings, model, loaded.source)  # the source: `lorakit merge` finds the base by it
        torch.manual_seed(settings.seed)
        model = get_peft_model(model, config)
    prep = Prepared(settings, placement, out, checkpoint, saved, data_label, model_label, loaded.source, model,
                    tokenizer, train, held, D.distinct_questions(held_chats, settings.samples), pad_id, prefix_len,
                    2 * settings.batch_size, seconds_load)
    _log_setup(prep, log, loaded, len(chats), dropped_train + dropped_held, fallback_template)
    if not settings.eval_only and distributed.rank() == 0:
        write_recipe(out, settings)

    probe = D.collate(held[:2], pad_id)  # two real examples: enough to see a model whose cache differs
    if prefix_len and placement.dtype != torch.float32:
        # In half precision the cached and the plain logits differ by rounding as much as a subtly wrong cache
        # would make them differ (SmolLM2 in bf16: 3% of the largest logit; one changed prefix token: 6%), so the
        # check below cannot vouch for the cache: the plain computation is used.
        log(f"          (the shared opening is recomputed per row: its check needs float32, not {placement.dtype_name})")
        prep.prefix_len = 0
    elif prefix_len and not prefix_sharing_works(model, probe, prefix_len):
        log("          (the shared opening is recomputed per row: this model's cache did not reproduce its logits)")
        prep.prefix_len = 0
    return prep


def _log_setup(prep: Prepared, log: Callable[[str], None], loaded: LoadedModel, n_chats: int, dropped: int,
               fallback_template: bool) -> None:
    settings, model, train, held = prep.settings, prep.model, prep.train, prep.held
    trainable, total = model.get_nb_trainable_parameters()
    n_layers = sum(1 for _ in model.base_model.lora_layers())
    mean_len = sum(len(e.input_ids) for e in train) / len(train)
    mean_learned = sum(e.n_learned for e in train) / len(train)
    log(f"model     {loaded.description} (loaded in {prep.seconds_load:.1f} s)")
    log(f"device    {prep.placement.describe()}")
    log(f"data      {prep.data_label}: {n_chats} examples -> {len(train)} train, {len(held)} held out"
        + (f" ({dropped} dropped: no answer token within --max-length)" if dropped else "")
        + f"; {mean_len:.1f} tokens per example, {mean_learned:.1f} learned")
    log(f"template  {'lorakit fallback (the tokenizer has none)' if fallback_template else 'the model chat template'}; "
        f"{prep.prefix_len} opening tokens shared by all examples")
    if settings.eval_only:
        c = model.peft_config["default"]
        targets = c.target_modules if isinstance(c.target_modules, str) else ",".join(sorted(c.target_modules))
        size = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        log(f"adapter   {settings.adapter}: r={c.r} alpha={c.lora_alpha:g} on {n_layers} modules ({targets}), "
            f"{size:,} parameters; scored without training")
        return
    log(f"lora      r={settings.r} alpha={settings.alpha:g} dropout={settings.dropout:g}{' DoRA' * settings.dora} on "
        f"{n_layers} modules "
        f"({settings.targets}): {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    log(f"train     {settings.steps} steps x {settings.batch_size} examples, AdamW lr {settings.lr:g} "
        f"(warm-up, cosine), {torch.get_num_threads()} torch thread(s), seed {settings.seed}")


def lora_config(settings: Settings, model: nn.Module, base_name: Optional[str] = None) -> LoraConfig:
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
                      use_dora=settings.dora, task_type="CAUSAL_LM", base_model_name_or_path=base_name)
