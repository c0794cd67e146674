"""PeftModel behaviour: training only adapters, several adapters, modules_to_save, merging, errors."""

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorakit
from conftest import CustomNet, custom_inputs, tiny_bert_cls, tiny_gpt2, tiny_llama, token_ids
from lorakit import LoraConfig, LoraLayer, ModulesToSaveWrapper, get_peft_model


def state_copy(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- training -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_training_changes_only_trainable_parameters(bias):
    base = tiny_llama()
    before = state_copy(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], bias=bias,
                                            modules_to_save=["lm_head"]))
    model.train()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or ".modules_to_save.default." in n or n.endswith("bias") for n in names)
    if bias == "lora_only":
        assert not any(n.endswith("bias") for n in names)  # Llama's projections have no bias
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = token_ids(t=6)
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n
    lora_B = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").lora_B["default"].weight
    assert lora_B.abs().sum() > 0  # it trained
    with model.disable_adapter():
        assert torch.equal(model.base_model.model.lm_head.weight, before["lm_head.weight"])
    trained_head = model.base_model.model.lm_head.modules_to_save["default"].weight.detach().clone()
    plain = model.unload()
    after = state_copy(plain)
    assert torch.equal(after.pop("lm_head.weight"), trained_head)  # unload keeps the trained copy (PEFT's choice)
    before.pop("lm_head.weight")
    assert_bit_identical(after, before)  # the rest of the base is bit-identical


def test_trainable_parameter_counts_match_peft_with_several_adapters():
    import peft

    ours = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    ours.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    theirs.add_adapter("other", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.active_adapter == theirs.active_adapter == "default"
    ours.set_adapter("other"), theirs.set_adapter("other")
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_print_trainable_parameters(capsys):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.print_trainable_parameters()
    t, a = model.get_nb_trainable_parameters()
    assert capsys.readouterr().out.strip() == f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}"


# -- several adapters ---------------------------------------------------------------------------------------------------
def test_switch_disable_delete():
    base = tiny_llama()
    ids = token_ids()
    plain = base(ids).logits
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    out_default = model(ids).logits
    model.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj", "q_proj"], init_lora_weights=False))
    torch.testing.assert_close(model(ids).logits, out_default)  # add_adapter does not activate
    model.set_adapter("b")
    out_b = model(ids).logits
    assert (out_b - out_default).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, plain)
    torch.testing.assert_close(model(ids).logits, out_b)
    with pytest.raises(RuntimeError):
        with model.disable_adapter():
            raise RuntimeError("boom")
    torch.testing.assert_close(model(ids).logits, out_b)  # restored after an exception too
    # both at once: in each layer the updates add up
    model.base_model.set_adapter(["default", "b"])
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 32)
    expected = q.base_layer(x) + x @ (q.delta_weight("default") + q.delta_weight("b")).T
    torch.testing.assert_close(q(x), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="nope"):
        model.set_adapter("nope")
    model.set_adapter("b")
    with pytest.warns(UserWarning, match="'default' is now active"):
        model.delete_adapter("b")
    assert model.active_adapter == "default" and list(model.peft_config) == ["default"]
    torch.testing.assert_close(model(ids).logits, out_default)
    with pytest.raises(ValueError, match="unknown adapter"):
        model.delete_adapter("b")


def test_modules_to_save_copies_per_adapter():
    base = tiny_bert_cls()
    original = state_copy(base.classifier)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    model.add_adapter("two", LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    wrapper = model.base_model.model.classifier
    assert isinstance(wrapper, ModulesToSaveWrapper) and set(wrapper.modules_to_save) == {"default", "two"}
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(1.0)
    ids = token_ids()
    out_default = model(input_ids=ids).logits
    model.set_adapter("two")
    out_two = model(input_ids=ids).logits
    assert (out_default - out_two).abs().max() > 0.1
    assert wrapper.modules_to_save["two"].weight.requires_grad and not wrapper.modules_to_save["default"].weight.requires_grad
    assert_bit_identical(state_copy(wrapper.original_module), original)
    assert torch.equal(wrapper.weight, wrapper.modules_to_save["two"].weight)  # attribute reads go to the active copy


# -- merging ----------------------------------------------------------------------------------------------------------------
MERGE_MODELS = {
    "llama": (lambda: tiny_llama(), dict(target_modules="all-linear"), lambda: token_ids()),
    "llama-embed": (lambda: tiny_llama(), dict(target_modules=["embed_tokens", "o_proj"]), lambda: token_ids()),
    "gpt2": (lambda: tiny_gpt2(), dict(target_modules=["c_attn", "c_fc"]), lambda: token_ids()),
    "custom": (lambda: CustomNet().eval(), dict(target_modules=["emb", "conv1d", "conv2d", "lin1"],
                                                modules_to_save=["lin2"]), custom_inputs),
}


def _out(model, x):
    y = model(x)
    return y if torch.is_tensor(y) else y.logits


@pytest.mark.parametrize("name", list(MERGE_MODELS))
def test_merge_equals_unmerged_and_unmerge_restores_bits(name):
    make, kw, inputs = MERGE_MODELS[name]
    base = make()
    original = state_copy(base)
    x = inputs()
    plain = _out(base, x)
    model = get_peft_model(base, LoraConfig(r=3, lora_alpha=5, init_lora_weights=False, **kw))
    second = {k: v for k, v in kw.items() if k != "modules_to_save"}  # two active copies of one module: refused
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, **second))
    model.base_model.set_adapter(["default", "second"])
    unmerged = _out(model, x)
    model.merge_adapter()
    assert set(model.base_model.merged_adapter_names()) == {"default", "second"}
    torch.testing.assert_close(_out(model, x), unmerged, atol=1e-5, rtol=0)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    torch.testing.assert_close(_out(model, x), unmerged, atol=1e-5, rtol=0)
    with model.disable_adapter():
        torch.testing.assert_close(_out(model, x), plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(_out(model, x), unmerged, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(_out(model, x), unmerged, atol=1e-5, rtol=0)
    plain = model.unload()
    assert_bit_identical(state_copy(plain), original)


@pytest.mark.parametrize("name", list(MERGE_MODELS))
def test_merge_and_unload_gives_plain_model(name):
    make, kw, inputs = MERGE_MODELS[name]
    base = make()
    classes = {n: type(m) for n, m in base.named_modules()}
    model = get_peft_model(base, LoraConfig(r=3, lora_alpha=5, init_lora_weights=False, **kw))
    x = inputs()
    expected = _out(model, x)
    plain = model.merge_and_unload()
    assert plain is base
    assert {n: type(m) for n, m in plain.named_modules()} == classes
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(_out(plain, x), expected, atol=1e-5, rtol=0)


def test_disable_adapter_on_merged_model_gives_base_then_remerges():
    base = tiny_llama()
    ids = token_ids()
    plain = base(ids).logits
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    adapted = model(ids).logits
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, plain, atol=1e-6, rtol=0)
    assert model.base_model.merged_adapter_names() == ["default"]
    torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=0)


def test_tied_embeddings_stay_correct():
    base = tiny_llama(tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    ids = token_ids()
    model = get_peft_model(base, LoraConfig(target_modules=["embed_tokens"], init_lora_weights=False))
    expected = model(ids).logits
    head_before = base.lm_head.weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)
    assert torch.equal(base.lm_head.weight, head_before)  # the tied head did not receive the embedding's update
    model.unmerge_adapter()
    layer = model.base_model.model.model.embed_tokens
    assert layer.base_layer.weight is base.lm_head.weight  # tied again
    plain = model.merge_and_unload()
    torch.testing.assert_close(plain(ids).logits, expected, atol=1e-5, rtol=0)
    assert plain.config.tie_word_embeddings is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_many_merge_cycles_are_bit_exact(dtype):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 32)).to(dtype)
    original = state_copy(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["0", "1"], init_lora_weights=False))
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        with torch.no_grad():
            layer.lora_B["default"].weight.mul_(10)  # a sizeable update: plenty of rounding
    for _ in range(10):
        model.merge_adapter()
        model.unmerge_adapter()
    assert_bit_identical(state_copy(model.unload()), original)


def test_safe_merge_refuses_non_finite_and_leaves_weights_untouched():
    base = tiny_llama()
    original = state_copy(base)
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_adapter(safe_merge=True)
    assert model.base_model.merged_adapter_names() == []
    assert_bit_identical({k: v for k, v in state_copy(model.unload()).items()}, original)


def test_failed_merge_of_grouped_conv_leaves_weights():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 8, 3, groups=2))
    original = state_copy(base)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights=False))
    with pytest.raises(ValueError, match="groups=2"):
        model.merge_adapter()
    assert model.base_model.merged_adapter_names() == []
    assert_bit_identical(state_copy(model.unload()), original)


# -- bad input ----------------------------------------------------------------------------------------------------------
def test_no_match_is_an_error_listing_real_names_and_model_unchanged():
    base = tiny_llama()
    with pytest.raises(ValueError) as info:
        get_peft_model(base, LoraConfig(target_modules=["qproj"]))
    assert "qproj" in str(info.value) and "model.layers.0" in str(info.value)
    assert not any(isinstance(m, LoraLayer) for m in base.modules())


def test_list_entry_matching_nothing_warns_naming_it():
    with pytest.warns(UserWarning, match=r"\['v_porj'\]"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_porj"]))


def test_unsupported_target_type_is_an_error_and_model_unchanged():
    base = tiny_llama()
    before = {n: type(m) for n, m in base.named_modules()}
    with pytest.raises(ValueError, match="LlamaAttention"):
        get_peft_model(base, LoraConfig(target_modules=["q_proj", "self_attn"]))
    assert {n: type(m) for n, m in base.named_modules()} == before


def test_failure_midway_rolls_back_add_adapter():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 1, groups=4))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["0", "1"]))
    before = {n: type(m) for n, m in model.named_modules()}
    params_before = set(n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="divisible"):
        model.add_adapter("bad", LoraConfig(r=3, target_modules=["0", "1"]))  # conv refuses rank 3 with groups 4
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert set(n for n, _ in model.named_parameters()) == params_before
    assert list(model.peft_config) == ["default"]


def test_adapter_name_errors():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="'a.b'"):
        model.add_adapter("a.b", LoraConfig(target_modules=["q_proj"]))
    for reserved in ("__base__", "double", "lora_x"):
        with pytest.raises(ValueError, match="reserved"):
            model.add_adapter(reserved, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError):
        get_peft_model(tiny_llama(), {"r": 8})


def test_passthrough_generate_and_attributes():
    base = tiny_llama()
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    assert isinstance(model, lorakit.PeftModelForCausalLM)
    assert model.config is base.config and model.get_base_model() is base and model.model is base
    ids = token_ids(n=1, t=3)
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


# -- properties --------------------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    n_in=st.integers(1, 12), n_out=st.integers(1, 12), r=st.integers(1, 6),
    alpha=st.floats(0.1, 64), rslora=st.booleans(), seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_property_merge_equals_forward_and_unmerge_restores(n_in, n_out, r, alpha, rslora, seed, dtype):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(n_in, n_out)).to(dtype)
    original = state_copy(base)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["0"],
                                            init_lora_weights=False))
    x = torch.randn(3, n_in, dtype=dtype)
    layer = model.base_model.model[0]
    expected = (x.double() @ (layer.base_layer.weight.double() + layer.delta_weight("default").double()).T
                + layer.base_layer.bias.double())
    unmerged = model(x)
    model.merge_adapter()
    merged = model(x)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    scale = 1 + expected.abs().max().item()
    torch.testing.assert_close(merged.double(), expected, atol=tol * scale, rtol=tol)
    torch.testing.assert_close(unmerged.double(), expected, atol=tol * scale, rtol=tol)
    model.unmerge_adapter()
    assert_bit_identical(state_copy(model.unload()), original)


def test_task_models_name_their_inputs_for_the_trainer():
    """transformers' Trainer keeps the dataset columns and finds the labels by reading forward's signature."""
    import inspect

    from transformers.utils import find_labels

    model = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    assert {"input_ids", "attention_mask", "labels"} <= set(inspect.signature(model.forward).parameters)
    assert find_labels(type(model)) == ["labels"]
    ids = token_ids()
    torch.testing.assert_close(model(ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss)
    cls = get_peft_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    assert cls(input_ids=ids, labels=torch.tensor([0, 2])).loss.ndim == 0
