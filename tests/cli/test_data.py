"""Training data: only assistant replies learned, chat templates, the held-out split, the corpus, batches."""

from __future__ import annotations

import importlib.util

import pytest

from lorakit.cli import data as D
from lorakit.cli import finetune as FT

from .helpers import make_tokenizer


def test_only_assistant_replies_are_learned():
    tok = make_tokenizer()
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say hello"},
            {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "how are you"},
            {"role": "assistant", "content": "I am fine"}]
    e = D.encode(tok, chat, 1000)
    learned = [t for t, label in zip(e.input_ids, e.labels) if label != D.IGNORE_INDEX]
    assert [label for label in e.labels if label != D.IGNORE_INDEX] == learned
    assert tok.decode(learned) == "hello world<|im_end|>\nI am fine<|im_end|>\n"
    assert tok.decode(e.input_ids) == tok.apply_chat_template(chat, tokenize=False)
    prompt = D.prompt_ids(tok, chat)
    assert tok.decode(prompt) == tok.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
    assert e.input_ids[: len(prompt)] == prompt  # the prompt at inference is tokenized as in training
    short = D.encode(tok, chat, 10)
    assert len(short.input_ids) == len(short.labels) == 10


def test_fallback_template_for_tokenizers_without_one():
    tok = make_tokenizer(chat_template=None)
    assert D.ensure_chat_template(tok) and not D.ensure_chat_template(tok)
    e = D.encode(tok, [{"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hello world"}], 100)
    assert tok.decode([t for t in e.labels if t != D.IGNORE_INDEX]) == "hello world<|im_end|>\n"
    assert tok.decode(e.input_ids) == "user: say hello\nassistant: hello world<|im_end|>\n"


def test_template_that_rewrites_history_is_refused():
    tok = make_tokenizer("{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}{{ m['content'] }}"
                         "{% endif %}{% endfor %}")  # the last message is marked: history changes as the chat grows
    with pytest.raises(ValueError, match="prefix-consistent"):
        D.encode(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], 100)


def test_split_is_fixed_disjoint_and_checked():
    chats = [[{"role": "user", "content": str(i)}, {"role": "assistant", "content": "x"}] for i in range(50)]
    train, held = D.split(chats, 0.2)
    assert len(held) == 10 and len(train) == 40
    assert {c[0]["content"] for c in train}.isdisjoint(c[0]["content"] for c in held)
    assert D.split(chats, 10) == (train, held)
    assert D.split(chats, 10, seed=1) != (train, held)
    with pytest.raises(ValueError, match="none to train"):
        D.split(chats, 50)


@pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None, reason="chatterbot-corpus not installed")
def test_chatterbot_corpus_pairs():
    chats = D.chatterbot_chats()
    pairs = [(c[0]["content"], c[1]["content"]) for c in chats]
    assert len(pairs) == len(set(pairs)) > 1000
    assert ("What is AI?", "Artificial Intelligence is the branch of engineering and science devoted to constructing "
            "machines that think.") in pairs


def test_batches_cover_every_example_once_per_epoch():
    lengths = [5, 9, 3, 7, 7, 2, 8, 1, 4, 6, 10]
    plan = FT.BatchPlan(lengths, 3, seed=0)
    epoch = [plan(k) for k in range(plan.per_epoch)]
    assert sorted(i for b in epoch for i in b) == list(range(len(lengths)))
    assert [FT.BatchPlan(lengths, 3, seed=0)(k) for k in range(2 * plan.per_epoch)] == \
           [plan(k) for k in range(2 * plan.per_epoch)]
    assert [plan(plan.per_epoch + k) for k in range(plan.per_epoch)] != epoch  # a new order each epoch
    assert FT.learning_rate(0, 100, 1.0) == pytest.approx(0.1)
    assert FT.learning_rate(9, 100, 1.0) == pytest.approx(1.0)
    assert FT.learning_rate(100, 100, 1.0) == pytest.approx(0.1)
