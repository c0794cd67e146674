"""torch.compile as a tested promise (CPU, aot_eager: the graphs inductor would get, without its C++ build time):
every inference/training mode traces with no graph break and equals eager; adapters of other ranks and alphas
hotswap into a compiled, prepared model without a recompile and give a fresh load's outputs."""

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

QV = ["q_proj", "v_proj"]


def one_layer_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(4))


def adapted(mode):
    model = get_peft_model(one_layer_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=QV + ["down_proj"],
                                                         init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=QV, init_lora_weights=False,
                                      lora_dropout=0.1 if mode == "prepared-train-dropout" else 0.0))
    if mode == "prepared-train-dropout":
        model.set_adapter("b")
    if mode == "several-weighted":
        model.set_adapter(["default", "b"], weights=[0.6, 1.5])
    if mode.startswith("prepared"):
        prepare_model_for_compiled_hotswap(model, target_rank=8)
    return model


def run(model, mode):
    """The mode's computation: logits (inference) or the loss (training)."""
    if mode == "mixed":
        return model(input_ids=IDS, adapter_names=["b", "__base__", "default"]).logits
    if "train" in mode:
        return model(input_ids=IDS, labels=IDS).loss
    return model(input_ids=IDS).logits


@pytest.mark.parametrize("mode", ["single", "several-weighted", "mixed", "prepared", "train"])
def test_compiles_without_graph_breaks_and_equals_eager(mode):
    torch._dynamo.reset()
    model = adapted(mode)
    model.train(mode == "train")
    grad = torch.enable_grad() if mode == "train" else torch.no_grad()
    with grad:
        explained = torch._dynamo.explain(lambda: run(model, mode))()
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
        torch._dynamo.reset()
        compiled = torch.compile(lambda: run(model, mode), backend="aot_eager", fullgraph=True)
        got = compiled()
        want = run(model, mode)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    if mode == "train":
        params = [p for p in model.parameters() if p.requires_grad]
        eager_grads = torch.autograd.grad(want, params)
        compiled_grads = torch.autograd.grad(got, params)
        for g_compiled, g_eager in zip(compiled_grads, eager_grads):
            torch.testing.assert_close(g_compiled, g_eager, rtol=1e-5, atol=1e-6)


def test_training_with_dropout_and_tensor_scalings_has_no_graph_break():
    """Dropout draws differ between eager and compiled runs, so only the trace is checked here."""
    torch._dynamo.reset()
    model = adapted("prepared-train-dropout").train()
    explained = torch._dynamo.explain(lambda: run(model, "prepared-train-dropout"))()
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    base = one_layer_llama()
    specs = {
        "r4": dict(r=4, lora_alpha=8, target_modules=QV),
        "r2-rslora": dict(r=2, lora_alpha=3, use_rslora=True, target_modules=QV),
        "r8-patterns": dict(r=8, lora_alpha=5, rank_pattern={"v_proj": 6}, alpha_pattern={"q_proj": 12},
                            target_modules=QV),
        "fewer": dict(r=4, lora_alpha=16, target_modules=["q_proj"]),
    }
    out = {}
    for i, (name, kw) in enumerate(specs.items()):
        torch.manual_seed(20 + i)
        path = tmp_path_factory.mktemp(name)
        get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kw)).save_pretrained(path)
        with torch.no_grad():
            out[name] = (path, PeftModel.from_pretrained(copy.deepcopy(base), path)(input_ids=IDS).logits)
    return base, out


def test_hotswap_into_a_compiled_model_never_recompiles(saved):
    torch._dynamo.reset()
    base, adapters = saved
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapters["r4"][0])
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=IDS).logits, adapters["r4"][1], rtol=0, atol=1e-6)
        assert counter.frame_count == 1
        for name in ["r2-rslora", "r8-patterns", "fewer", "r4"]:
            hotswap_adapter(compiled, adapters[name][0], "default")
            torch.testing.assert_close(compiled(input_ids=IDS).logits, adapters[name][1], rtol=0, atol=1e-6)
        before = compiled(input_ids=IDS).logits
        with pytest.raises(ValueError, match="above the 8 allocated"):
            hotswap_from_rank(compiled, base, 12)
        assert torch.equal(compiled(input_ids=IDS).logits, before)
    assert counter.frame_count == 1  # four swaps of other ranks, alphas, rsLoRA and targets: one graph


def hotswap_from_rank(compiled, base, r):
    """Swap in a non-zero adapter of rank ``r`` built on the spot (from its state dict)."""
    from lorakit.hotswap import hotswap_adapter_from_state_dict

    config = LoraConfig(r=r, lora_alpha=8, target_modules=QV, init_lora_weights=False)
    state = get_peft_model(copy.deepcopy(base), config).state_dict()
    state = {k.replace(".default", ""): v for k, v in state.items() if "lora_" in k}
    hotswap_adapter_from_state_dict(compiled, state, "default", config)


def test_without_preparation_a_new_alpha_recompiles_but_stays_correct(saved):
    """The control for the test above: float scalings are constants in a graph, so the counter does move."""
    torch._dynamo.reset()
    base, adapters = saved
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapters["r4"][0])
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        compiled(input_ids=IDS)
        hotswap_adapter(compiled, adapters["fewer"][0], "default")  # same rank, alpha 16 instead of 8
        torch.testing.assert_close(compiled(input_ids=IDS).logits, adapters["fewer"][1], rtol=0, atol=1e-6)
    assert counter.frame_count > 1
