"""``lora_bias=True``: a bias on ``lora_B`` (PEFT's ``lora_B.<name>.bias``), scaled with B. PEFT's outputs on
Linear, GPT-2 Conv1D and Conv layers, the dense float64 reference, exact merge → unmerge (also where the base
layer has no bias: merging gives it one, unmerging takes it away), files both ways, mixed batches, refusals."""

import pytest
import torch

import lorakit
from conftest import CustomNet, custom_inputs, lorakit_and_peft, tiny_gpt2, tiny_llama, token_ids
from reference import dense_update


def non_base(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


CASES = {
    "llama-with-bias": (lambda: tiny_llama(attention_bias=True), ["q_proj", "v_proj", "gate_proj"], token_ids),
    "gpt2-conv1d": (tiny_gpt2, ["c_attn", "c_fc"], token_ids),
    "conv": (lambda: CustomNet(dilation=(1, 1)).eval(), ["conv1d", "conv2d", "lin1"], custom_inputs),
}


def output(model, x):
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft_merge_unmerge_exact(case):
    make, targets, inputs = CASES[case]
    ours, theirs = lorakit_and_peft(make(), dict(r=4, lora_alpha=8, init_lora_weights=False, lora_bias=True,
                                                 target_modules=targets))
    ours.eval(), theirs.eval()
    assert any(k.endswith("lora_B.default.bias") for k in ours.state_dict())
    x = inputs()
    with torch.no_grad():
        live = output(ours, x)
        torch.testing.assert_close(live, output(theirs, x), atol=1e-5, rtol=0)
        before = non_base(ours)
        ours.merge_adapter()
        torch.testing.assert_close(output(ours, x), live, atol=1e-5, rtol=0)
        ours.unmerge_adapter()
    assert all(torch.equal(p, before[n]) for n, p in non_base(ours).items())
    with torch.no_grad():
        torch.testing.assert_close(output(ours.merge_and_unload(), x), live, atol=1e-5, rtol=0)


def test_linear_dense_float64_reference():
    model = lorakit.get_peft_model(tiny_llama(attention_bias=True), lorakit.LoraConfig(
        r=4, lora_alpha=12, init_lora_weights=False, lora_bias=True, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, 32)
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    bias_B = layer.lora_B["default"].bias.double()
    s = layer.scaling["default"]
    expected = x.double() @ (W + dense_update(*layer.factors("default"), s)).T + b + s * bias_B
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=0)


def test_base_without_bias_gets_one_on_merge_and_loses_it_on_unmerge():
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, init_lora_weights=False, lora_bias=True,
                                                                    target_modules=["q_proj", "down_proj"]))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert layer.base_layer.bias is None
    ids = token_ids()
    with torch.no_grad():
        live = model(ids).logits
        model.merge_adapter()
        torch.testing.assert_close(layer.base_layer.bias.double(),
                                   layer.scaling["default"] * layer.lora_B["default"].bias.double(), atol=1e-7, rtol=0)
        torch.testing.assert_close(model(ids).logits, live, atol=1e-5, rtol=0)
        model.unmerge_adapter()
    assert layer.base_layer.bias is None
    plain = model.merge_and_unload()
    assert plain.model.layers[0].mlp.down_proj.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, live, atol=1e-5, rtol=0)


def test_files_both_ways(tmp_path):
    import peft

    ours, theirs = lorakit_and_peft(tiny_llama(attention_bias=True), dict(
        r=4, init_lora_weights=False, lora_bias=True, target_modules=["q_proj", "o_proj"]))
    ids = token_ids()
    with torch.no_grad():
        expected = theirs.eval()(ids).logits
    ours.save_pretrained(tmp_path / "lk")
    theirs.save_pretrained(tmp_path / "peft")
    from_peft = lorakit.PeftModel.from_pretrained(tiny_llama(attention_bias=True), tmp_path / "peft").eval()
    into_peft = peft.PeftModel.from_pretrained(tiny_llama(attention_bias=True), tmp_path / "lk").eval()
    with torch.no_grad():
        torch.testing.assert_close(from_peft(ids).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(into_peft(ids).logits, expected, atol=1e-5, rtol=0)


def test_mixed_batch_rows_get_their_adapters_bias():
    kw = dict(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(lora_bias=True, **kw)).eval()
    model.add_adapter("plain", lorakit.LoraConfig(**kw))
    ids = token_ids(n=3)
    names = ["default", "plain", "__base__"]
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
        rows = []
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    rows.append(model(ids[i:i + 1]).logits[0])
            else:
                model.set_adapter(name)
                rows.append(model(ids[i:i + 1]).logits[0])
    torch.testing.assert_close(mixed, torch.stack(rows), atol=1e-5, rtol=0)


def test_init_true_starts_at_zero_and_trains():
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(lora_bias=True, target_modules=["q_proj"]))
    bias = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].bias
    assert torch.equal(bias, torch.zeros_like(bias)) and bias.requires_grad


def test_refusals():
    with pytest.raises(ValueError, match="lora_bias"):
        lorakit.LoraConfig(lora_bias=True, init_lora_weights="gaussian")
    with pytest.raises(ValueError, match="lora_bias=True is not supported for Embedding"):
        lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(lora_bias=True, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="lora_bias=True cannot be used with target_parameters"):
        from test_target_parameters import EXPERTS, tiny_mixtral

        lorakit.get_peft_model(tiny_mixtral(), lorakit.LoraConfig(lora_bias=True, target_modules=[],
                                                                  target_parameters=EXPERTS))
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(lora_bias=True, target_modules=["q_proj"]))
    model.add_adapter("b", lorakit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(NotImplementedError, match="lora_bias"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "sum", combination_type="cat")
