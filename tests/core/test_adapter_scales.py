"""Adapter scales at inference: PEFT's set_scale / scale_layer / unscale_layer and rescale_adapter_scale, and
lorakit's weighted active adapters (set_adapter(names, weights=[…])), against float64 dense references."""

import copy

import pytest
import torch
from conftest import tiny_llama, token_ids
from reference import dense_update, scale_of

import lorakit
from lorakit import LoraConfig, PeftModel, get_model_status, get_peft_model
from lorakit.helpers import rescale_adapter_scale
from lorakit.layers import Linear

TARGETS = ["q_proj", "v_proj", "down_proj"]


def two_adapter_model(rslora_b=True):
    """A float64 tiny Llama with adapter "a" (r=4, alpha=8) and "b" (r=2, alpha=3, rsLoRA), both non-zero."""
    base = tiny_llama().double()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=3, use_rslora=rslora_b, target_modules=["q_proj", "down_proj"],
                                      init_lora_weights=False))
    return model


def linear_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]


def reference(layer, x, weighted):
    """``x @ (W + Σ w·s·B@A).T + b`` in float64, ``weighted`` = [(adapter, multiplier)], ``s`` from alpha and r."""
    W = layer.base_layer.weight.detach().double().clone()
    for name, w in weighted:
        if name in layer.r:
            A, B = layer.factors(name)
            W += dense_update(A, B, w * scale_of(layer.lora_alpha[name], layer.r[name], layer.use_rslora[name]))
    return x @ W.T + layer.base_layer.bias.detach().double() if layer.base_layer.bias is not None else x @ W.T


def x_for(layer):
    return torch.randn(3, 5, layer.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("rslora", [False, True])
def test_set_scale_equals_an_adapter_with_alpha_times_k(rslora):
    base = tiny_llama().double()
    kw = dict(r=4, lora_alpha=6, use_rslora=rslora, target_modules=TARGETS, init_lora_weights=False)
    scaled = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
    bigger = get_peft_model(copy.deepcopy(base), LoraConfig(**dict(kw, lora_alpha=6 * 2.5)))
    bigger.load_state_dict(scaled.state_dict())
    for _, layer in linear_layers(scaled):
        layer.set_scale("default", 2.5)
        x = x_for(layer)
        torch.testing.assert_close(layer(x), reference(layer, x, [("default", 2.5)]), rtol=1e-12, atol=1e-12)
    ids = token_ids()
    torch.testing.assert_close(scaled(input_ids=ids).logits, bigger(input_ids=ids).logits, rtol=1e-10, atol=1e-10)
    assert get_model_status(scaled).adapter_weights == {"default": 2.5}


def test_set_scale_matches_peft_under_rslora():
    import peft
    from conftest import lorakit_and_peft

    ours, theirs = lorakit_and_peft(tiny_llama(), dict(r=4, lora_alpha=8, use_rslora=True, target_modules=TARGETS,
                                                       init_lora_weights=False))
    for model in (ours, theirs):
        for m in model.modules():
            if isinstance(m, (lorakit.LoraLayer, peft.tuners.lora.LoraLayer)):
                m.set_scale("default", 0.3)
    ids = token_ids()
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_scale_layer_and_unscale_layer():
    model = two_adapter_model()
    model.set_adapter(["default", "b"])
    for _, layer in linear_layers(model):
        x = x_for(layer)
        layer.scale_layer(3.0)
        torch.testing.assert_close(layer(x), reference(layer, x, [("default", 3.0), ("b", 3.0)]), rtol=1e-12, atol=1e-12)
        layer.unscale_layer(2.0)
        torch.testing.assert_close(layer(x), reference(layer, x, [("default", 1.5), ("b", 1.5)]), rtol=1e-12, atol=1e-12)
        layer.unscale_layer()
        assert all(layer.scaling[a] == layer.base_scaling(a) for a in layer.r)
        with pytest.raises(ValueError, match="divide by zero"):
            layer.unscale_layer(0)
        with pytest.raises(ValueError, match="finite real number"):
            layer.scale_layer(float("nan"))


def test_rescale_adapter_scale_multiplies_and_restores_bit_for_bit():
    model = two_adapter_model()
    model.set_adapter(["default", "b"])
    ids = token_ids()
    before = model(input_ids=ids).logits
    scalings = [dict(layer.scaling) for _, layer in linear_layers(model)]
    with rescale_adapter_scale(model, 0.4):
        assert get_model_status(model).adapter_weights == {"b": 0.4, "default": 0.4}
        for _, layer in linear_layers(model):
            x = x_for(layer)
            torch.testing.assert_close(layer(x), reference(layer, x, [("default", 0.4), ("b", 0.4)]),
                                       rtol=1e-12, atol=1e-12)
    assert torch.equal(model(input_ids=ids).logits, before)
    with pytest.raises(RuntimeError, match="inside"):
        with rescale_adapter_scale(model, 7):
            raise RuntimeError("inside")
    assert [dict(layer.scaling) for _, layer in linear_layers(model)] == scalings
    assert torch.equal(model(input_ids=ids).logits, before)


def test_rescale_adapter_scale_refusals_change_nothing():
    model = two_adapter_model()
    with pytest.raises(TypeError, match="float or an int"):
        with rescale_adapter_scale(model, "2"):
            pass
    with pytest.raises(ValueError, match="no LoRA layers"):
        with rescale_adapter_scale(tiny_llama(), 2.0):
            pass
    model.merge_adapter(["b"])
    scalings = [dict(layer.scaling) for _, layer in linear_layers(model)]
    with pytest.raises(ValueError, match=r"\['b'\] are merged"):
        with rescale_adapter_scale(model, 2.0):
            pass
    assert [dict(layer.scaling) for _, layer in linear_layers(model)] == scalings
    layer = linear_layers(model)[0][1]
    with pytest.raises(ValueError, match="merged"):
        layer.set_scale("b", 2.0)
    layer.set_scale("b", 1.0)  # no change: allowed
    layer.set_scale("not-here", 2.0)  # PEFT: a layer without the adapter is left alone


def test_weighted_active_adapters_equal_the_weighted_sum():
    model = two_adapter_model()
    model.set_adapter(["default", "b"], weights=[0.7, -0.3])
    assert model.active_adapters == ["default", "b"]
    for _, layer in linear_layers(model):
        x = x_for(layer)
        torch.testing.assert_close(layer(x), reference(layer, x, [("default", 0.7), ("b", -0.3)]),
                                   rtol=1e-12, atol=1e-12)
    status = get_model_status(model)
    assert status.adapter_weights == {"b": -0.3, "default": 0.7}
    assert {s.name: s.adapter_weights for s in lorakit.get_layer_status(model)}[
        "model.model.layers.0.self_attn.v_proj"] == {"default": 0.7}
    # without weights, set_adapter leaves scales alone (PEFT's set_adapter); weights set again replace them
    model.set_adapter("default")
    assert get_model_status(model).adapter_weights["default"] == 0.7
    model.set_adapter(["default", "b"], weights=[1, 1])
    assert get_model_status(model).adapter_weights == {"b": 1.0, "default": 1.0}


def test_weights_apply_in_mixed_batches():
    model = two_adapter_model()
    model.set_adapter(["default", "b"], weights=[0.5, 2.0])
    for _, layer in linear_layers(model):
        x = x_for(layer)
        with model.base_model.mixed_batch(["b", "__base__", "default"]):
            got = layer(x)
        for row, weighted in enumerate([[("b", 2.0)], [], [("default", 0.5)]]):
            torch.testing.assert_close(got[row], reference(layer, x[row], weighted), rtol=1e-12, atol=1e-12)


def test_weights_are_saved_nowhere(tmp_path):
    model = two_adapter_model()
    ids = token_ids()
    model.set_adapter("default", weights=[0.25])
    model.save_pretrained(tmp_path)
    model.set_adapter("default", weights=[1.0])
    full = model(input_ids=ids).logits
    assert lorakit.LoraConfig.from_pretrained(tmp_path).lora_alpha == 8
    reloaded = PeftModel.from_pretrained(model.unload(), tmp_path)
    assert get_model_status(reloaded).adapter_weights == {"default": 1.0}
    torch.testing.assert_close(reloaded(input_ids=ids).logits, full, rtol=0, atol=0)


@pytest.mark.parametrize("weights, match", [
    ([0.5], "1 entries for 2"),
    ([0.5, "x"], "finite real number"),
    ([0.5, float("inf")], "finite real number"),
    ([True, 0.5], "finite real number"),
    (0.5, "list of numbers"),
])
def test_bad_weights_change_nothing(weights, match):
    model = two_adapter_model()
    scalings = [dict(layer.scaling) for _, layer in linear_layers(model)]
    with pytest.raises(ValueError, match=match):
        model.set_adapter(["default", "b"], weights=weights)
    assert model.active_adapters == ["default"]
    assert [dict(layer.scaling) for _, layer in linear_layers(model)] == scalings


def test_weighting_a_merged_adapter_or_modules_to_save_is_refused():
    model = two_adapter_model()
    model.merge_adapter(["b"])
    scalings = [dict(layer.scaling) for _, layer in linear_layers(model)]
    with pytest.raises(ValueError, match=r"\['b'\] are merged"):
        model.set_adapter(["default", "b"], weights=[0.5, 0.5])
    assert [dict(layer.scaling) for _, layer in linear_layers(model)] == scalings
    assert model.active_adapters == ["default"]
    saved = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        saved.set_adapter("default", weights=[0.5])
    saved.set_adapter("default", weights=[1.0])


def test_tensor_scalings_reach_mixed_batches_after_every_change():
    """Prepared for compiled hotswap, scalings are tensors written in place: the cached stacks of a mixed batch
    must see each new value (the cache compares their version counters)."""
    from lorakit.hotswap import prepare_model_for_compiled_hotswap

    model = two_adapter_model()
    prepare_model_for_compiled_hotswap(model, target_rank=4)
    layer = dict(linear_layers(model))["base_model.model.model.layers.0.self_attn.q_proj"]
    x = x_for(layer)
    for weight in (1.0, 0.5, -2.0):
        layer.set_scale("b", weight)  # written in place, nothing else changes
        with torch.no_grad(), model.base_model.mixed_batch(["b", "default", "b"]):
            got = layer(x)
        for row, name in enumerate(["b", "default", "b"]):
            w = weight if name == "b" else 1.0
            torch.testing.assert_close(got[row], reference(layer, x[row], [(name, w)]), rtol=1e-12, atol=1e-12)


def test_trainable_tokens_are_values_not_scaled_updates():
    model = get_peft_model(tiny_llama().double(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                                                             trainable_token_indices=[1, 2]))
    tokens = [m for m in model.modules() if isinstance(m, lorakit.LoraLayer) and not m.scalable]
    assert tokens
    with pytest.raises(ValueError, match="trainable tokens"):
        model.set_adapter("default", weights=[0.5])
    with rescale_adapter_scale(model, 0.5):  # the LoRA layers only, as in PEFT
        assert get_model_status(model).adapter_weights == {"default": 0.5}
        assert all(m.scaling["default"] == 1.0 for m in tokens)
    with pytest.raises(ValueError, match="no scale to set"):
        tokens[0].set_scale("default", 2.0)
