"""``lorakit finetune``, ``merge`` and ``inspect`` end to end on a tiny Llama, ``--resume``, and the errors."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lorakit.cli import data as D
from lorakit.cli import finetune as FT
from lorakit.cli import main

from .helpers import CHATML, cli, make_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir, data, tok = make_assets(root)
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
