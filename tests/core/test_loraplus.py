"""LoRA+ (create_loraplus_optimizer): the same parameter groups, learning rates and weight decays as PEFT 0.21.2,
on a model with adapted Linear and Embedding layers, trained biases, layer norms and modules_to_save."""

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus

import lorakit
from conftest import lorakit_and_peft, tiny_bert_cls, tiny_llama
from lorakit.optimizers import create_loraplus_optimizer

KW = dict(r=4, target_modules=["query", "value", "word_embeddings"], bias="all",
          modules_to_save=["classifier", "LayerNorm"])
OPTIONS = dict(lr=1e-3, loraplus_lr_ratio=16, loraplus_lr_embedding=1e-5, loraplus_weight_decay=0.1)


def settings(model, optimizer):
    """name -> (lr, weight_decay) of every parameter the optimizer holds."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert names[id(p)] not in out  # each parameter in one group
            out[names[id(p)]] = (group["lr"], group["weight_decay"])
    return out


@pytest.mark.parametrize("optimizer_cls", [torch.optim.AdamW, torch.optim.SGD])
def test_groups_equal_peft(optimizer_cls):
    ours, theirs = lorakit_and_peft(tiny_bert_cls(), KW, task_type="SEQ_CLS")
    mine = settings(ours, create_loraplus_optimizer(ours, optimizer_cls, **OPTIONS))
    peft_s = settings(theirs, peft_loraplus(theirs, optimizer_cls, **OPTIONS))
    assert mine == peft_s
    assert mine.keys() == {n for n, p in ours.named_parameters() if p.requires_grad}
    assert len({v for v in mine.values()}) == 4  # all four groups are used by this model


def test_embedding_factors_get_the_embedding_rate_and_nothing_else_does():
    """PEFT before its fix for issue 3499 put embedding LoRA factors in the A/B groups."""
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(
        target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]))
    got = settings(model, create_loraplus_optimizer(model, torch.optim.AdamW, **OPTIONS))
    embedding = {n for n, v in got.items() if v[0] == OPTIONS["loraplus_lr_embedding"]}
    assert embedding == {"base_model.model.model.embed_tokens.lora_embedding_A.default",
                         "base_model.model.model.embed_tokens.lora_embedding_B.default"}
    lr, ratio = OPTIONS["lr"], OPTIONS["loraplus_lr_ratio"]
    assert got["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] == (lr, 0.1)
    assert got["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"] == (lr * ratio, 0.1)
    assert got["base_model.model.lm_head.modules_to_save.default.weight"] == (lr, 0.1)


def test_defaults_and_bad_values():
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["embed_tokens"]))
    opt = create_loraplus_optimizer(model, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=4)
    assert {g["lr"] for g in opt.param_groups if g["params"]} == {1e-6}  # PEFT's default embedding rate
    for bad in (0, -1, "16", True):
        with pytest.raises(ValueError, match="loraplus_lr_ratio"):
            create_loraplus_optimizer(model, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=bad)
    assert peft.optimizers.create_loraplus_optimizer.__name__ == create_loraplus_optimizer.__name__
