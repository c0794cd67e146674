"""hotswap_adapter / prepare_model_for_compiled_hotswap in eager mode: a swapped adapter gives the outputs of a
fresh load (whatever its rank, alpha, rsLoRA, patterns, fewer targets), the config describes the model afterwards,
and every refused swap leaves outputs, tensors and config as they were. (Compiled: tests/core/test_compile.py.)"""

import copy

import pytest
import torch
from conftest import tiny_llama, token_ids

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

QV = ["q_proj", "v_proj"]
ADAPTERS = {
    "r4": dict(r=4, lora_alpha=8, target_modules=QV),
    "r2-rslora": dict(r=2, lora_alpha=3, use_rslora=True, target_modules=QV),
    "r8-patterns": dict(r=8, lora_alpha=5, rank_pattern={"v_proj": 6}, alpha_pattern={"q_proj": 12}, target_modules=QV),
    "fewer": dict(r=4, lora_alpha=16, target_modules=["q_proj"]),
    "embed": dict(r=2, lora_alpha=4, target_modules=QV + ["embed_tokens"]),
    "new-targets": dict(r=4, lora_alpha=8, target_modules=QV + ["k_proj"]),
    "r16": dict(r=16, lora_alpha=8, target_modules=QV),
    "dropout": dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=QV),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every adapter saved once (non-zero weights), with the logits of a fresh load of it."""
    base = tiny_llama()
    ids = token_ids()
    out = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        path = tmp_path_factory.mktemp(name)
        get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kw)).save_pretrained(path)
        with torch.no_grad():
            fresh = PeftModel.from_pretrained(copy.deepcopy(base), path)(input_ids=ids).logits
        out[name] = (path, fresh)
    return base, ids, out


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(model.peft_config["default"])


def assert_unchanged(model, ids, before, state):
    assert torch.equal(logits(model, ids), before)
    tensors, config = state
    now = model.state_dict()
    assert tensors.keys() == now.keys() and all(torch.equal(tensors[k], now[k]) for k in tensors)
    assert model.peft_config["default"] == config


def test_prepared_model_swaps_ranks_and_alphas_like_fresh_loads(saved, tmp_path):
    base, ids, adapters = saved
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapters["r4"][0])
    before = logits(model, ids)
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=1e-6)  # padding changes nothing
    assert model.peft_config["default"].r == 8 and model.peft_config["default"].lora_alpha == 16
    for name in ["r2-rslora", "r8-patterns", "fewer", "r4"]:
        hotswap_adapter(model, adapters[name][0], "default")
        torch.testing.assert_close(logits(model, ids), adapters[name][1], rtol=0, atol=1e-6)
        # the config describes what the model now holds: saving and reloading gives the same outputs
        model.save_pretrained(tmp_path / name)
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name)
        torch.testing.assert_close(logits(reloaded, ids), adapters[name][1], rtol=0, atol=1e-6)
    assert model.peft_config["default"].use_rslora is False


def test_unprepared_swap_takes_the_new_alpha_and_leaves_other_adapters_alone(saved):
    base, ids, adapters = saved
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapters["r4"][0])
    model.load_adapter(adapters["r8-patterns"][0], "other")
    hotswap_adapter(model, adapters["fewer"][0], "default")  # same rank, other alpha, v_proj not targeted
    torch.testing.assert_close(logits(model, ids), adapters["fewer"][1], rtol=0, atol=1e-6)
    hotswap_adapter(model, adapters["r2-rslora"][0], "default")  # a smaller rank fills the allocated one
    torch.testing.assert_close(logits(model, ids), adapters["r2-rslora"][1], rtol=0, atol=1e-6)
    model.set_adapter("other")
    torch.testing.assert_close(logits(model, ids), adapters["r8-patterns"][1], rtol=0, atol=1e-6)


def test_embedding_layers_swap_too(saved):
    base, ids, adapters = saved
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapters["embed"][0])
    prepare_model_for_compiled_hotswap(model, target_rank=4)
    hotswap_adapter(model, adapters["embed"][0], "default")
    torch.testing.assert_close(logits(model, ids), adapters["embed"][1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, match", [
    ("new-targets", "does not have"),
    ("r16", "above the 8 allocated"),
    ("dropout", "lora_dropout"),
])
def test_refused_swaps_leave_the_model_as_it_was(saved, name, match):
    base, ids, adapters = saved
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapters["r4"][0])
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    before, state = logits(model, ids), snapshot(model)
    with pytest.raises(ValueError, match=match):
        hotswap_adapter(model, adapters[name][0], "default")
    assert_unchanged(model, ids, before, state)


def test_a_merged_adapter_is_not_swapped(saved):
    base, ids, adapters = saved
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapters["r4"][0])
    model.merge_adapter()
    before, state = logits(model, ids), snapshot(model)
    with pytest.raises(ValueError, match="merged"):
        hotswap_adapter(model, adapters["r2-rslora"][0], "default")
    assert_unchanged(model, ids, before, state)
    model.unmerge_adapter()
    hotswap_adapter(model, adapters["r2-rslora"][0], "default")  # rank 2 into rank 4: padded in place
    torch.testing.assert_close(logits(model, ids), adapters["r2-rslora"][1], rtol=0, atol=1e-6)


def test_prepare_refusals(saved):
    base, ids, adapters = saved
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapters["r8-patterns"][0])
    before, state = logits(model, ids), snapshot(model)
    with pytest.raises(ValueError, match="below the rank"):
        prepare_model_for_compiled_hotswap(model, target_rank=6)
    with pytest.raises(ValueError, match="positive int"):
        prepare_model_for_compiled_hotswap(model, target_rank=0)
    assert_unchanged(model, ids, before, state)
    with pytest.raises(ValueError, match="before compiling"):
        prepare_model_for_compiled_hotswap(torch.compile(model, backend="eager"), target_rank=8)
    with pytest.raises(TypeError, match="PeftModel or LoraModel"):
        prepare_model_for_compiled_hotswap(base)
    with pytest.raises(ValueError, match="unknown adapter 'missing'"):
        hotswap_adapter(model, adapters["r4"][0], "missing")


def test_an_adapter_that_rewrote_the_base_is_not_swapped(saved):
    base, ids, adapters = saved
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=QV,
                                                           init_lora_weights="pissa"))
    before, state = logits(model, ids), snapshot(model)
    with pytest.raises(ValueError, match="rewrote base weights"):
        hotswap_adapter(model, adapters["r4"][0], "default")
    assert_unchanged(model, ids, before, state)


def test_a_prepared_model_trains_like_the_unprepared_one():
    """Tensor scalings take other kernels (dropout path included): same loss and gradients, same dropout draws."""
    base = tiny_llama()
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=QV + ["embed_tokens"], init_lora_weights=False)
    plain = get_peft_model(copy.deepcopy(base), config).train()
    prepared = copy.deepcopy(plain)
    prepare_model_for_compiled_hotswap(prepared)  # no padding: the parameters stay comparable one to one
    ids = token_ids()
    results = []
    for model in (plain, prepared):
        torch.manual_seed(5)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_an_adapter_with_trainable_tokens_is_not_swapped(saved, tmp_path):
    base, ids, adapters = saved
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=QV,
                                                           trainable_token_indices=[1, 2], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    before, state = logits(model, ids), snapshot(model)
    with pytest.raises(ValueError, match="trainable tokens"):
        hotswap_adapter(model, tmp_path, "default")
    assert_unchanged(model, ids, before, state)


def test_a_layer_kind_without_in_place_swap_is_refused(tmp_path):
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    torch.manual_seed(0)
    model = get_peft_model(Attention(), LoraConfig(r=2, target_modules=["attn"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(NotImplementedError, match="MultiheadAttention"):
        hotswap_adapter(model, tmp_path, "default")
    with torch.no_grad():
        assert torch.equal(model(x), before)
