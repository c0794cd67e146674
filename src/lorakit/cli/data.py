"""Training data for ``lorakit finetune``: read conversations, split them, turn them into token ids and labels.

Every example becomes a chat, a list of ``{"role", "content"}`` messages, whatever its source (a JSONL row with
``prompt``/``completion`` or ``messages``, or a pair from the chatterbot corpus). A chat is rendered with the
tokenizer's own chat template, so the model is trained on exactly the text it will see when it is used as a
chat model, and only the assistant's replies are learned: every other token gets the label ``-100``.

The rendered text is cut into segments (what comes before a reply, the reply itself, …) and each segment is
tokenized on its own. So the prompt a user sends at inference (:func:`prompt_ids`) is tokenized exactly as the
unlabelled part of a training example was.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")

#: used when a tokenizer has no chat template of its own (plain base models such as GPT-2)
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token or '' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)

Chat = list  # list[dict[str, str]]: one conversation


# ------------------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike) -> list[Chat]:
    """Chats from a JSONL file whose rows are ``{"prompt": str, "completion": str}`` or ``{"messages": [...]}``.

    Blank lines are skipped. Any other problem is a ``ValueError`` naming the file, the line and what was
    expected, so the user can fix the file without guessing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist" if not path.exists() else f"{path} is not a file")
    chats: list[Chat] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            chats.append(_chat_from_row(row, where))
    if not chats:
        raise ValueError(f"{path} holds no examples: expected one JSON object per line")
    return chats


def _chat_from_row(row: object, where: str) -> Chat:
    expected = 'expected {"prompt": "...", "completion": "..."} or {"messages": [{"role": ..., "content": ...}]}'
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a JSON {type(row).__name__}, {expected}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        chat = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise ValueError(
                    f"{where}: messages[{i}] = {json.dumps(m)[:80]} must be an object with 'role' in {list(ROLES)} "
                    "and a string 'content'"
                )
            chat.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in chat):
            raise ValueError(f"{where}: no 'assistant' message, so there is nothing to learn from this row")
        return chat
    if "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"{where}: {key!r} must be a string, got {json.dumps(row.get(key))[:80]}")
        if not row["completion"]:
            raise ValueError(f"{where}: 'completion' is empty, so there is nothing to learn from this row")
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    raise ValueError(f"{where}: keys {sorted(row)}, {expected}")


def chatterbot_chats(language: str = "english") -> list[Chat]:
    """Unique (statement, reply) pairs from the chatterbot-corpus package, in a fixed order, as one-turn chats.

    The corpus is YAML: per category, a list of conversations, each a list of statements where every statement
    answers the one before it. The package is found without importing it (its ``__init__`` needs chatterbot).
    """
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the demo data needs the chatterbot-corpus package: pip install chatterbot-corpus (or pass --data FILE)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / language
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise FileNotFoundError(f"no chatterbot-corpus YAML files in {folder}")
    seen: set[tuple[str, str]] = set()
    chats: list[Chat] = []
    for file in files:
        with open(file, encoding="utf-8") as f:
            conversations = (yaml.safe_load(f) or {}).get("conversations") or []
        for conversation in conversations:
            statements = [str(s).strip() for s in conversation if s is not None]
            for question, answer in zip(statements, statements[1:]):
                if question and answer and (question, answer) not in seen:
                    seen.add((question, answer))
                    chats.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return chats


def split(chats: Sequence[Chat], eval_split: float, seed: int = 0) -> tuple[list[Chat], list[Chat]]:
    """``(train, held_out)``: a fixed random split. ``eval_split`` < 1 is a fraction, >= 1 a number of examples.

    The split depends only on the data and ``seed``, so runs with different settings are scored on the same
    held-out examples.
    """
    n = len(chats)
    if eval_split < 0:
        raise ValueError(f"--eval-split={eval_split} is out of range: expected a fraction in [0, 1) or a count >= 1")
    count = round(eval_split * n) if eval_split < 1 else int(eval_split)
    if eval_split >= 1 and count != eval_split:
        raise ValueError(f"--eval-split={eval_split}: a value >= 1 is a number of examples and must be whole")
    if eval_split > 0 and count == 0:
        count = 1
    if count >= n:
        raise ValueError(
            f"--eval-split={eval_split} holds out {count} of {n} examples, leaving none to train on: "
            "use a smaller fraction or count"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [c for i, c in enumerate(chats) if i not in held], [c for i, c in enumerate(chats) if i in held]


# ------------------------------------------------------------------------------------------------------------------
# Tokenizing
# ------------------------------------------------------------------------------------------------------------------
def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template :data:`FALLBACK_CHAT_TEMPLATE`; True when it had to."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return True


def _render(tokenizer, messages: Chat, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def segments(tokenizer, chat: Chat) -> list[tuple[str, bool]]:
    """The rendered chat as ``(text, learned)`` pieces: assistant replies are learned, all else is context.

    A reply's text is what the template adds between "prompt for the assistant" and "chat including the reply"
    (so the end-of-turn marker is learned too, which teaches the model to stop).
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, chat[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, chat[: i + 1])
        if not before.startswith(done) or not through.startswith(before):
            raise ValueError(
                "the tokenizer's chat template renders a conversation differently depending on where it ends, so the "
                "assistant's replies cannot be located in the text; use a model with a prefix-consistent template"
            )
        if before != done:
            pieces.append((before[len(done):], False))
        pieces.append((through[len(before):], True))
        done = through
    full = _render(tokenizer, chat)
    if not full.startswith(done):
        raise ValueError("the tokenizer's chat template is not prefix-consistent (see lorakit.cli.data.segments)")
    if full != done:
        pieces.append((full[len(done):], False))
    return pieces


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_learned(self) -> int:
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


def encode(tokenizer, chat: Chat, max_length: int) -> Encoded:
    """Token ids and labels (``-100`` outside assistant replies), cut to ``max_length`` tokens."""
    ids: list[int] = []
    labels: list[int] = []
    for text, learned in segments(tokenizer, chat):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if learned else [IGNORE_INDEX] * len(piece)
    return Encoded(ids[:max_length], labels[:max_length])


def encode_all(tokenizer, chats: Sequence[Chat], max_length: int) -> tuple[list[Encoded], int]:
    """Encode every chat; drop those with no learned token left after truncation. Returns (kept, dropped)."""
    kept = [e for e in (encode(tokenizer, c, max_length) for c in chats) if e.n_learned > 0]
    return kept, len(chats) - len(kept)


def last_exchange(chat: Chat) -> tuple[str, str]:
    """(what the assistant last answered, its answer): for showing a held-out example."""
    last = max(i for i, m in enumerate(chat) if m["role"] == "assistant")
    return (chat[last - 1]["content"] if last else ""), chat[last]["content"]


def distinct_questions(chats: Sequence[Chat], n: int) -> list[Chat]:
    """The first ``n`` chats whose last question differs from the others' (the corpus repeats questions)."""
    chosen, seen = [], set()
    for chat in chats:
        question = last_exchange(chat)[0]
        if question not in seen and len(chosen) < n:
            seen.add(question)
            chosen.append(chat)
    return chosen


def prompt_ids(tokenizer, chat: Chat) -> list[int]:
    """The tokens a model is given to write the chat's last assistant reply (as in training)."""
    last = max(i for i, m in enumerate(chat) if m["role"] == "assistant")
    ids: list[int] = []
    for text, learned in segments(tokenizer, chat[: last + 1])[:-1]:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


# ------------------------------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------------------------------
def collate(examples: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random, group: int = 16) -> list[list[int]]:
    """One epoch of training batches: random, but each made of examples of similar length (little padding).

    The examples are shuffled, cut into groups of ``group`` batches, sorted by length within a group and cut into
    batches; then the batches are shuffled. Every example appears exactly once.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * group
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[s : s + batch_size] for s in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def token_chunks(examples: Sequence[Encoded], max_tokens: int) -> list[list[Encoded]]:
    """Consecutive runs of ``examples`` whose padded size (rows × longest) stays within ``max_tokens``.

    A training step runs its batch chunk by chunk and adds up the gradients: the same step with a lower peak
    memory. A single example longer than ``max_tokens`` is a chunk of its own.
    """
    chunks: list[list[Encoded]] = []
    current: list[Encoded] = []
    width = 0
    for e in examples:
        wider = max(width, len(e.input_ids))
        if current and wider * (len(current) + 1) > max_tokens:
            chunks.append(current)
            current, wider = [], len(e.input_ids)
        current.append(e)
        width = wider
    if current:
        chunks.append(current)
    return chunks


def length_batches(examples: Sequence[Encoded], batch_size: int) -> list[list[int]]:
    """Indices grouped by similar length (for evaluation: little padding, same batches every time)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def pad_id_of(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if token_id is not None:
            return int(token_id)
    return 0  # pragma: no cover

