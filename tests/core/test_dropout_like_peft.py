"""LoRA dropout draws its mask exactly as ``nn.Dropout`` does (so as PEFT does): the same seed gives the same masks,
and training with dropout gives the same parameters in lorakit and PEFT. The mask is still kept as bits."""

import copy

import pytest
import torch
from torch import nn

from conftest import mlp_input, peft_test_mlp, tiny_llama, token_ids
from lorakit.ops import keep_mask


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # CUDA: nn.Dropout's fused kernel


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 13), (2, 64)])
def test_keep_mask_is_nn_dropouts_mask(shape, p, dtype, device):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1)).add_(0.5).to(dtype=dtype, device=device)
    torch.manual_seed(123)
    ours = keep_mask(x, p)
    after_ours = torch.rand(3, device=device)
    torch.manual_seed(123)
    theirs = nn.Dropout(p).train()(x) != 0
    after_theirs = torch.rand(3, device=device)
    assert ours.dtype == torch.bool and torch.equal(ours, theirs)
    assert torch.equal(after_ours, after_theirs)  # the generator moved on by the same draws


def train(model, inputs, loss_of, steps=4, seed=0):
    """A few SGD steps with dropout on; the trainable parameters afterwards."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    torch.manual_seed(seed)
    for _ in range(steps):
        loss_of(model, inputs).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", ["mlp", "llama"])
def test_training_with_dropout_gives_peft_parameters(case):
    import peft

    import lorakit

    if case == "mlp":
        base, inputs = peft_test_mlp(), mlp_input() / 90
        kw = dict(target_modules=["lin0", "lin1"], lora_dropout=0.5, init_lora_weights=False)
        loss_of = lambda m, X: m(X=X).sum()  # noqa: E731
    else:
        base, inputs = tiny_llama(), token_ids(n=2, t=6)
        kw = dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.3)
        loss_of = lambda m, ids: m(input_ids=ids, labels=ids).loss  # noqa: E731
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    ours.load_state_dict(theirs.state_dict())
    start = copy.deepcopy(theirs.state_dict())
    got, expected = train(ours, inputs, loss_of), train(theirs, inputs, loss_of)
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # the masks mattered: another seed trains differently
    other = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw))
    other.load_state_dict(start, strict=False)
    changed = train(other, inputs, loss_of, seed=1)
    assert any((changed[n] - expected[n]).abs().max() > 1e-4 for n in got)
