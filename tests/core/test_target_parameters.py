"""LoRA on MoE expert stacks and other bare parameters (``target_parameters``): PEFT's keys and shapes, PEFT's
outputs under every transformers experts implementation, the dense float64 reference, exact merge → unmerge,
files both ways, and the "all-linear" warning."""

import copy
import itertools
import warnings

import pytest
import torch

import lorakit
from conftest import token_ids
from lorakit.factored import FactoredWeight

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_mixtral(experts_implementation="eager", **kw):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, **kw)
    cfg._experts_implementation = experts_implementation
    return MixtralForCausalLM(cfg).eval()


def tiny_qwen3_moe(experts_implementation="eager"):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=12,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, num_experts=6,
                         num_experts_per_tok=2, head_dim=8, max_position_embeddings=64, decoder_sparse_step=1)
    cfg._experts_implementation = experts_implementation
    return Qwen3MoeForCausalLM(cfg).eval()


def tiny_gpt_oss(experts_implementation="eager"):
    """Experts stored transposed, ``(E, in, out)`` (``is_transposed``), with biases."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                       head_dim=8, max_position_embeddings=64, layer_types=["full_attention"] * 2)
    cfg._experts_implementation = experts_implementation
    return GptOssForCausalLM(cfg).eval()


def both(base, **kw):
    import peft

    kw = dict(r=3, lora_alpha=6, init_lora_weights=False, target_modules=[]) | kw
    twin = copy.deepcopy(base)
    theirs = peft.get_peft_model(twin, peft.LoraConfig(**copy.deepcopy(kw)))
    ours = lorakit.get_peft_model(base, lorakit.LoraConfig(**kw))
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("make", [tiny_mixtral, tiny_qwen3_moe, tiny_gpt_oss])
def test_experts_match_peft(make, impl):
    ours, theirs = both(make(impl), target_parameters=EXPERTS)
    adapter_keys = {k: tuple(v.shape) for k, v in ours.state_dict().items() if "lora_" in k}
    assert adapter_keys == {k: tuple(v.shape) for k, v in theirs.state_dict().items() if "lora_" in k}
    ids = token_ids(vocab=64)
    with torch.no_grad():
        base = ours.get_base_model()
        ours_out, theirs_out = ours(ids).logits, theirs(ids).logits
        with ours.disable_adapter():
            plain = ours(ids).logits
    torch.testing.assert_close(ours_out, theirs_out, atol=1e-5, rtol=0)
    assert not torch.allclose(ours_out, plain, atol=1e-3)  # the adapter does something
    assert base is ours.get_base_model()
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_peft_key_layout_and_factor_order():
    """Outer wrapper = the later-registered parameter; A is expert-major rows, B rank-major columns."""
    ours, _ = both(tiny_mixtral(), target_parameters=EXPERTS, r=2)
    experts = ours.base_model.model.model.layers[0].mlp.experts
    assert type(experts).__name__ == "ParamWrapper" and experts.parameter_name == "down_proj"
    assert experts.base_layer.parameter_name == "gate_up_proj"
    keys = set(ours.state_dict())
    assert "base_model.model.model.layers.0.mlp.experts.lora_A.default.weight" in keys
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.default.weight" in keys
    # ΔW[e] from the stored factors, by PEFT's documented reshapes, in float64
    inner = experts.base_layer
    A, B = (t.detach().double() for t in inner.factors("default"))
    E, r = 4, 2
    s = inner.scaling["default"]
    for e in range(E):
        A_e = A[e * r:(e + 1) * r]  # rows e·r …
        B_e = B[:, [j * E + e for j in range(r)]]  # columns e, e+E, …
        torch.testing.assert_close(inner.delta_weight("default")[e].double(), s * B_e @ A_e, atol=1e-6, rtol=0)


def _dense_experts_reference(model, ids):
    """The model's output with every expert stack replaced by ``W + s·B_e@A_e`` computed densely in float64."""
    ref = copy.deepcopy(model.get_base_model()).double()
    lk = model.base_model
    for name, layer in lk.lora_layers():
        if type(layer).__name__ != "ParamWrapper":
            continue
        owner = ref.get_submodule(name.replace(".base_layer", ""))
        while type(owner).__name__ == "ParamWrapper":
            owner = owner.base_layer
        A, B = (t.detach().double() for t in layer.factors("default"))
        E, r = layer.num_experts, layer.r["default"]
        W = getattr(owner, layer.parameter_name)
        with torch.no_grad():
            for e in range(E):
                delta = layer.scaling["default"] * B[:, e::E] @ A[e * r:(e + 1) * r]
                W[e] += delta.to(W.dtype) if W.shape[1:] == delta.shape else delta.T
    unwrapped = lorakit.get_peft_model(ref, lorakit.LoraConfig(target_modules=[], target_parameters=EXPERTS))
    with torch.no_grad(), unwrapped.disable_adapter():
        return unwrapped(ids).logits


def test_experts_match_dense_float64_reference():
    ours, _ = both(tiny_mixtral(), target_parameters=EXPERTS)
    ids = token_ids(vocab=64)
    with torch.no_grad():
        out = ours(ids).logits.double()
    torch.testing.assert_close(out, _dense_experts_reference(ours, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_merge_unmerge_bit_exact_and_merged_outputs(impl):
    ours, _ = both(tiny_mixtral(impl), target_parameters=EXPERTS)
    ids = token_ids(vocab=64)
    params = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        live = ours(ids).logits
        ours.merge_adapter()
        merged = ours(ids).logits
        ours.unmerge_adapter()
    torch.testing.assert_close(merged, live, atol=1e-5, rtol=0)
    for n, p in ours.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, params[n]), n
    plain = ours.merge_and_unload()
    assert "ParamWrapper" not in {type(m).__name__ for m in plain.modules()}
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, live, atol=1e-5, rtol=0)


def test_bf16_base_merge_unmerge_bit_exact():
    base = tiny_mixtral().to(torch.bfloat16)
    ours = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, init_lora_weights=False, target_modules=[],
                                                           target_parameters=EXPERTS))
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_" not in n}
    ours.merge_adapter()
    ours.unmerge_adapter()
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters() if "lora_" not in n)


def test_files_both_ways(tmp_path):
    import peft

    ours, theirs = both(tiny_mixtral(), target_parameters=EXPERTS)
    ids = token_ids(vocab=64)
    with torch.no_grad():
        expected = theirs(ids).logits
    ours.save_pretrained(tmp_path / "lk")
    theirs.save_pretrained(tmp_path / "peft")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lk" / "adapter_model.safetensors"), "pt") as f:
        assert "expert e in rows e*r" in f.metadata()["lorakit_expert_factor_layout"]  # the layout is in the file
    from_peft = lorakit.PeftModel.from_pretrained(tiny_mixtral(), tmp_path / "peft").eval()
    into_peft = peft.PeftModel.from_pretrained(tiny_mixtral(), tmp_path / "lk").eval()
    with torch.no_grad():
        torch.testing.assert_close(from_peft(ids).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(into_peft(ids).logits, expected, atol=1e-5, rtol=0)


def test_training_step_matches_peft_gradients():
    ours, theirs = both(tiny_mixtral("grouped_mm"), target_parameters=EXPERTS)
    ids = token_ids(vocab=64)
    ours(ids, labels=ids).loss.backward()
    theirs(ids, labels=ids).loss.backward()
    g_ours = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    g_theirs = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert g_ours.keys() == g_theirs.keys() and len(g_ours) == 8
    for n in g_ours:
        torch.testing.assert_close(g_ours[n], g_theirs[n], atol=1e-5, rtol=1e-4)


def test_two_adapters_disable_delete_and_2d_router():
    base = tiny_mixtral()
    kw = dict(r=2, init_lora_weights=False, target_modules=[])
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(target_parameters=EXPERTS, **kw))
    model.add_adapter("router", lorakit.LoraConfig(target_parameters=["mlp.gate.weight"], **kw))
    model.add_adapter("second", lorakit.LoraConfig(target_parameters=EXPERTS, **kw))
    ids = token_ids(vocab=64)
    with torch.no_grad():
        with model.disable_adapter():
            plain = model(ids).logits
        outs = {}
        for name in ("default", "router", "second"):
            model.set_adapter(name)
            outs[name] = model(ids).logits
        model.set_adapter(["default", "router"])
        combined = model(ids).logits
    assert all(not torch.allclose(o, plain) for o in outs.values())
    # a 2-D router weight is an ordinary out × in LoRA: F.linear's output plus s·(x@Aᵀ)@Bᵀ
    gate = model.base_model.model.model.layers[0].mlp.gate
    assert type(gate).__name__ == "ParamWrapper" and gate.num_experts == 1
    x = torch.randn(5, 16)
    A, B = (t.detach().double() for t in gate.factors("router"))
    W = gate.weight.detach().double()
    model.set_adapter("router")
    with torch.no_grad():
        logits = gate(x)[0]  # the router returns (logits, scores, indices)
    torch.testing.assert_close(logits.double(), x.double() @ (W + gate.scaling["router"] * B @ A).T,
                               atol=1e-5, rtol=0)
    # keys stay PEFT's for each adapter; deleting one leaves the others working
    model.delete_adapter("second")
    model.set_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, outs["default"], atol=0, rtol=0)
    assert not torch.allclose(combined, outs["default"]) and not torch.allclose(combined, outs["router"])


def test_all_linear_warns_naming_expert_parameters():
    with pytest.warns(UserWarning, match=r"target_parameters=\['experts.down_proj', 'experts.gate_up_proj'\]"):
        lorakit.get_peft_model(tiny_mixtral(), lorakit.LoraConfig(target_modules="all-linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.get_peft_model(tiny_mixtral(), lorakit.LoraConfig(target_modules="all-linear",
                                                                  target_parameters=EXPERTS))


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="lora_dropout"):
        lorakit.get_peft_model(tiny_mixtral(), lorakit.LoraConfig(target_modules=[], target_parameters=EXPERTS,
                                                                  lora_dropout=0.1))
    with pytest.raises(ValueError, match="matched no parameter"):
        lorakit.get_peft_model(tiny_mixtral(), lorakit.LoraConfig(target_modules=[], target_parameters=["nope"]))
    model = lorakit.get_peft_model(tiny_mixtral(), lorakit.LoraConfig(target_modules=[], target_parameters=EXPERTS))
    with pytest.raises(NotImplementedError, match="mixed-adapter"):
        model(token_ids(vocab=64), adapter_names=["default", "__base__"])
    with pytest.raises(NotImplementedError, match="ParamWrapper"):
        model.add_weighted_adapter(["default"], [1.0], "sum", combination_type="cat")


def test_factored_weight_never_forms_the_stack():
    """The forward hands the experts a FactoredWeight, and the eager/batched/grouped paths never call dense()."""
    calls = []
    original = FactoredWeight.dense

    def spy(self):
        calls.append(tuple(self.shape))
        return original(self)

    for make, impl in itertools.product((tiny_mixtral, tiny_gpt_oss), ("eager", "batched_mm", "grouped_mm")):
        ours, _ = both(make(impl), target_parameters=EXPERTS)
        FactoredWeight.dense = spy
        try:
            ours(token_ids(vocab=64), labels=token_ids(vocab=64)).loss.backward()
        finally:
            FactoredWeight.dense = original
        assert calls == [], (make.__name__, impl)
