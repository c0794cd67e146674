"""``lorakit finetune --quantize nf4|int8``: QLoRA from the command line (the base quantized with bitsandbytes after
loading). The adapter it writes is an ordinary PEFT adapter: it loads on the float base, in lorakit and in PEFT."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("bitsandbytes")

from .helpers import QA, cli, make_llama, make_tokenizer  # noqa: E402

RUN = ["--steps", 4, "--batch-size", 4, "--eval-split", 4, "--r", 4, "--alpha", 8, "--lr", 1e-2, "--samples", 1,
       "--max-new-tokens", 4, "--seed", 1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora_cli")
    tok = make_tokenizer()
    make_llama(len(tok)).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    (root / "chat.jsonl").write_text("\n".join(json.dumps({"prompt": q, "completion": a}) for q, a in QA) + "\n")
    return root


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_finetune_on_a_quantized_base(assets, kind):
    out = assets / kind
    code, stdout, stderr = cli("finetune", "--model", assets / "llama", "--data", assets / "chat.jsonl", "--out", out,
                               "--quantize", kind, *RUN)
    assert code == 0, stderr
    assert f"14 linear layers in {kind}" in stdout  # every projection; the (tied) output head stays float
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["quantize"] == kind
    assert metrics["after"]["perplexity"] < metrics["before"]["perplexity"]
    # merged with dequantize=True: a float model computing exactly what the adapter on the quantized base did
    assert metrics["merged"]["perplexity"] == pytest.approx(metrics["after"]["perplexity"], rel=1e-4)

    import peft
    from transformers import AutoModelForCausalLM

    import lorakit

    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = lorakit.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets / "llama"), out)
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets / "llama"), out)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)
        with ours.disable_adapter():
            base = ours(ids).logits
        assert not torch.equal(ours(ids).logits, base)  # it trained something


def test_quantize_choices_are_checked(assets):
    import contextlib
    import io

    from lorakit.cli import main

    err = io.StringIO()
    with pytest.raises(SystemExit) as exit_, contextlib.redirect_stderr(err):
        main(["finetune", "--model", str(assets / "llama"), "--quantize", "int4"])
    assert exit_.value.code == 2 and "--quantize: invalid choice: 'int4'" in err.getvalue()
    from lorakit.cli.finetune import Settings

    with pytest.raises(ValueError, match="--quantize=int4"):
        Settings(quantize="int4").check()
