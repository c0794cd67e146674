"""What the CLI tests share: a chat template, question/answer pairs, a tokenizer trained on them, a tiny Llama,
and a way to run ``lorakit ARGS`` and capture its output."""

from __future__ import annotations

import contextlib
import io

import torch

from lorakit.cli import main

CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")

QA = [("what is two plus two", "four"), ("what is one plus one", "two"), ("say hello", "hello world"),
      ("how are you", "I am fine thanks"), ("what colour is the sky", "blue"), ("name a fruit", "an apple"),
      ("what is three plus one", "four"), ("say goodbye", "goodbye world"), ("what is the capital of france", "paris"),
      ("count to three", "one two three"), ("what do cats say", "meow"), ("what do dogs say", "woof"),
      ("is water wet", "yes it is"), ("what is ice", "frozen water"), ("who are you", "a tiny model"),
      ("what is two plus one", "three")]


def make_tokenizer(chat_template=CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([f"{q} {a} user assistant system" for q, a in QA] * 3, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>")
    tok.chat_template = chat_template
    return tok


def make_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def cli(*args):
    """Run ``lorakit ARGS``; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def make_assets(root):
    """A tiny Llama with its tokenizer saved in ``root/llama`` and a 16-example chat file ``root/chat.jsonl``
    (prompt/completion rows and multi-turn ``messages`` rows); returns (model folder, data file, tokenizer)."""
    import json

    tok = make_tokenizer()
    model_dir = root / "llama"
    make_llama(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = [{"prompt": q, "completion": a} for q, a in QA[:12]]
    rows += [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": q},
                           {"role": "assistant", "content": a}, {"role": "user", "content": "say hello"},
                           {"role": "assistant", "content": "hello world"}]} for q, a in QA[12:]]
    data = root / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    return model_dir, data, tok


def settings_from(argv):
    """What ``lorakit finetune ARGV`` would run (its ``Settings``), and where each setting came from."""
    import dataclasses

    from lorakit.cli import build_parser
    from lorakit.cli.finetune import Settings
    from lorakit.cli.recipe import resolve_settings

    args = build_parser().parse_args(["finetune", *map(str, argv)])
    fields = {f.name for f in dataclasses.fields(Settings)}
    return resolve_settings({k: v for k, v in vars(args).items() if k in fields}, args.config)
