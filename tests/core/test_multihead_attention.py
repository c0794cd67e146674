"""``nn.MultiheadAttention``: PEFT's modules and keys, the dense float64 reference, PEFT's outputs (PEFT 0.21.2 adds
out_proj's update twice, PEFT PR 3774: lorakit adds it once, and equals PEFT given half of out_proj's B; a file
PEFT wrote is loaded with out_proj's B doubled, so it gives PEFT's outputs), exact
merge → unmerge, files both ways, and no silently unused adapter on out_proj."""

import copy
import warnings

import pytest
import torch
from torch import nn

import lorakit


class AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.attn(x, x, x)[0])


def inputs():
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))


def both(**kw):
    import peft

    base = AttentionNet().eval()
    kw = dict(r=2, lora_alpha=4, target_modules=["attn"], init_lora_weights=False) | kw
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(kw))).eval()
    ours = lorakit.get_peft_model(base, lorakit.LoraConfig(**kw)).eval()
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours, theirs


def dense_reference(ours, x):
    """The attention rebuilt in float64 with ``W + s·B@A`` written into in_proj and out_proj by hand."""
    layer = ours.base_model.model.attn
    out = layer.out_proj_layer
    ref = nn.MultiheadAttention(16, 4, batch_first=True).double().eval()
    head = copy.deepcopy(ours.base_model.model.head).double()
    with torch.no_grad():
        for target, base, lora in ((ref.in_proj_weight, layer.base_layer.in_proj_weight, layer),
                                   (ref.out_proj.weight, out.base_layer.weight, out)):
            A, B = (t.double() for t in lora.factors("default"))
            target.copy_(base.double() + lora.scaling["default"] * B @ A)
        ref.in_proj_bias.copy_(layer.base_layer.in_proj_bias.double())
        ref.out_proj.bias.copy_(out.base_layer.bias.double())
        x = x.double()
        return head(ref(x, x, x)[0])


def test_keys_dense_reference_and_peft():
    ours, theirs = both()
    x = inputs()
    with torch.no_grad():
        out = ours(x)
        torch.testing.assert_close(out.double(), dense_reference(ours, x), atol=1e-5, rtol=0)
        with ours.disable_adapter():
            assert not torch.allclose(ours(x), out, atol=1e-3)
        # PEFT adds out_proj's update twice; with half of out_proj's B, lorakit's one update equals PEFT's two
        layer = ours.base_model.model.attn.out_proj_layer
        layer.lora_B["default"].weight *= 2
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


def test_in_proj_alone_equals_peft():
    ours, theirs = both()
    with torch.no_grad():
        for model in (ours, theirs):
            model.base_model.model.attn.base_layer.out_proj.lora_B["default"].weight.zero_()
        x = inputs()
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


def test_merge_unmerge_bit_exact_and_unload():
    ours, _ = both()
    x = inputs()
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        live = ours(x)
        ours.merge_adapter()
        torch.testing.assert_close(ours(x), live, atol=1e-5, rtol=0)
        ours.unmerge_adapter()
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters() if "lora_" not in n)
    plain = ours.merge_and_unload()
    assert type(plain.attn) is nn.MultiheadAttention
    assert not any(isinstance(m, lorakit.LoraLayer) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), live, atol=1e-5, rtol=0)


def test_training_gradients_reach_both_projections():
    ours, _ = both()
    ours.train()
    ours(inputs()).sum().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_files_both_ways(tmp_path):
    import peft

    ours, theirs = both()
    ours.save_pretrained(tmp_path / "lk")
    theirs.save_pretrained(tmp_path / "peft")
    x = inputs()
    from_peft = lorakit.PeftModel.from_pretrained(AttentionNet().eval(), tmp_path / "peft").eval()
    into_peft = peft.PeftModel.from_pretrained(AttentionNet().eval(), tmp_path / "lk").eval()
    with torch.no_grad():  # the files mean what PEFT makes of them, both ways
        torch.testing.assert_close(from_peft(x), theirs(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(into_peft(x), ours(x), atol=1e-5, rtol=0)


def test_two_adapters_and_delete():
    base = AttentionNet().eval()
    kw = dict(r=2, target_modules=["attn"], init_lora_weights=False)
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(**kw)).eval()
    model.add_adapter("other", lorakit.LoraConfig(**kw))
    x = inputs()
    with torch.no_grad():
        first = model(x)
        model.set_adapter("other")
        other = model(x)
        model.delete_adapter("default")
        torch.testing.assert_close(model(x), other, atol=0, rtol=0)
    assert not torch.allclose(first, other)
    assert "default" not in model.base_model.model.attn.out_proj_layer.r


def test_out_proj_is_never_a_silent_target():
    with pytest.raises(ValueError, match="out_proj of nn.MultiheadAttention 'attn'.*Target 'attn'"):
        lorakit.get_peft_model(AttentionNet(), lorakit.LoraConfig(target_modules=["out_proj"]))
    with pytest.warns(UserWarning, match="leaves out.*attn.out_proj"):
        model = lorakit.get_peft_model(AttentionNet(), lorakit.LoraConfig(target_modules="all-linear"))
    assert type(model.base_model.model.attn) is nn.MultiheadAttention
    assert isinstance(model.base_model.model.head, lorakit.LoraLayer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.get_peft_model(AttentionNet(), lorakit.LoraConfig(target_modules=["attn", "head"]))


def test_refusals():
    with pytest.raises(ValueError, match="lora_bias"):
        lorakit.get_peft_model(AttentionNet(), lorakit.LoraConfig(target_modules=["attn"], lora_bias=True))
    model = lorakit.get_peft_model(AttentionNet(), lorakit.LoraConfig(target_modules=["attn"]))
    with pytest.raises(NotImplementedError, match="mixed-adapter"):
        model(inputs(), adapter_names=["default", "__base__"])


def test_out_proj_b_is_halved_in_the_file_exactly_and_round_trips_bit_for_bit(tmp_path):
    """The file holds half of out_proj's B (PEFT applies it twice); saving and loading again gives the same bits."""
    from safetensors.torch import load_file

    ours, _ = both()
    x = inputs()
    ours.save_pretrained(tmp_path / "lk")
    saved = load_file(tmp_path / "lk" / "adapter_model.safetensors")
    B = ours.base_model.model.attn.out_proj_layer.lora_B["default"].weight
    assert torch.equal(saved["base_model.model.attn.base_layer.out_proj.lora_B.weight"], B.detach() / 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = lorakit.PeftModel.from_pretrained(AttentionNet().eval(), tmp_path / "lk")
    assert torch.equal(again.base_model.model.attn.out_proj_layer.lora_B["default"].weight, B)
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))
