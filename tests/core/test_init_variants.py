"""init_lora_weights beyond the default: orthogonal, PiSSA (exact and randomized), OLoRA. Checked against dense
float64 maths (the SVD/QR of the base weight) and against PEFT; the base-weight rewrite is safe and reversible."""

import copy
import warnings

import peft
import pytest
import torch

import lorakit
from conftest import CustomNet, tiny_gpt2, tiny_llama, token_ids
from reference import dense_delta

REWRITING = ["pissa", "pissa_niter_4", "olora"]
TARGETS = ["q_proj", "down_proj"]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def lora_layers(model):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if isinstance(m, lorakit.LoraLayer)}


@pytest.mark.parametrize("init", REWRITING + ["orthogonal"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_outputs_equal_the_base_at_init_and_residual_plus_update_is_the_weight(make, init):
    if init == "olora" and make is tiny_gpt2:
        pytest.skip("OLoRA is refused on Conv1D (tested below)")
    base = make()
    original = {n: p.detach().double().clone() for n, p in base.named_parameters()}
    ids = token_ids()
    expected = logits(base, ids)
    targets = TARGETS if make is tiny_llama else ["c_attn", "c_proj"]
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                            init_lora_weights=init))
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-6, rtol=0)
    for name, layer in lora_layers(model).items():
        A, B = layer.factors("default")
        assert A.abs().sum() > 0 and B.abs().sum() > 0  # a non-trivial start, not zeros
        W = layer.base_layer.weight.detach().double()
        if init == "orthogonal":
            assert torch.equal(layer.base_layer.weight, base.get_submodule(name).base_layer.weight)
            torch.testing.assert_close(dense_delta(layer), torch.zeros_like(W), atol=1e-7, rtol=0)
        else:  # W_res + s·B@A = W
            torch.testing.assert_close(W + dense_delta(layer), original[f"{name}.weight"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("make, targets", [(tiny_llama, TARGETS), (tiny_gpt2, ["c_attn"])])
def test_pissa_update_is_the_best_rank_r_part_of_the_weight(make, targets):
    """Independent reference: the top-r SVD of the weight in float64."""
    base = make()
    weights = {n: m.weight.detach().double().clone() for n, m in base.named_modules() if hasattr(m, "weight")}
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=3, lora_alpha=5, target_modules=targets,
                                                            init_lora_weights="pissa"))
    for name, layer in lora_layers(model).items():
        W = weights[name]
        W = W.T if layer.fan_in_fan_out else W
        U, S, Vh = torch.linalg.svd(W)
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        delta = dense_delta(layer)
        torch.testing.assert_close(delta.T if layer.fan_in_fan_out else delta, best, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal"])
def test_update_and_residual_match_peft(init):
    base = tiny_llama()
    kw = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    torch.manual_seed(7)
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw))
    torch.manual_seed(7)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    for name, layer in lora_layers(ours).items():
        other = peft_layers[name]
        their_delta = other.scaling["default"] * (other.lora_B["default"].weight.double()
                                                  @ other.lora_A["default"].weight.double())
        torch.testing.assert_close(dense_delta(layer), their_delta.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.base_layer.weight, other.base_layer.weight, atol=1e-6, rtol=0)


def train_a_little(model, ids, steps=3):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("init", REWRITING)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_converted_adapter_on_the_original_base_is_the_trained_model(tmp_path, init, use_rslora):
    kw = dict(r=4, lora_alpha=6, target_modules=TARGETS + ["embed_tokens"], init_lora_weights=init,
              use_rslora=use_rslora, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 5})
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(**kw))
    ids = token_ids()
    train_a_little(model, ids)
    trained = logits(model, ids)
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert not (tmp_path / "init").exists()  # lorakit kept the initial factors: nothing to read or write there
    saved = lorakit.LoraConfig.from_pretrained(tmp_path / "lora")
    assert saved.init_lora_weights is True and saved.r == 8 and saved.rank_pattern == {"down_proj": 4}
    converted = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora")
    torch.testing.assert_close(logits(converted, ids), trained, atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(in_peft, ids), trained, atol=1e-5, rtol=0)


def test_conversion_of_a_plain_adapter_is_refused(tmp_path):
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="init_lora_weights=True"):
        model.save_pretrained(tmp_path, path_initial_model_for_weight_conversion=tmp_path / "init")


@pytest.mark.parametrize("init", REWRITING)
def test_same_bits_whatever_the_global_rng_and_again_on_load(tmp_path, init):
    def build(seed):
        torch.manual_seed(seed)
        return lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=TARGETS,
                                                                       init_lora_weights=init))

    first, second = build(1), build(2)
    for (k, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), k
    ids = token_ids()
    train_a_little(first, ids)
    first.save_pretrained(tmp_path)
    torch.manual_seed(3)
    again = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(logits(again, ids), logits(first, ids))


def test_peft_pissa_niter_file_is_refused_naming_the_field(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=TARGETS, init_lora_weights="pissa_niter_2")
                            ).save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="init_lora_weights='pissa_niter_2'"):
        lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize("init", REWRITING)
def test_a_second_adapter_on_a_rewritten_base_raises_and_changes_nothing(init):
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=TARGETS,
                                                                    init_lora_weights=init))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kw in (dict(target_modules=["k_proj", "q_proj"]), dict(target_modules=["k_proj", "q_proj"],
                                                                init_lora_weights=init)):
        with pytest.raises(ValueError, match="rewr"):
            model.add_adapter("other", lorakit.LoraConfig(r=4, **kw))
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.add_adapter("elsewhere", lorakit.LoraConfig(r=4, target_modules=["k_proj"]))  # other layers are fine


def test_a_rewriting_adapter_on_a_layer_with_adapters_raises_and_rolls_back():
    base = tiny_llama()
    original = copy.deepcopy(base.state_dict())
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, target_modules=["k_proj", "down_proj"]))
    with pytest.raises(ValueError, match="rewrites the base weight"):
        # q_proj (first in model order) is rewritten before down_proj refuses: the rollback must give it back
        model.add_adapter("p", lorakit.LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                  init_lora_weights="pissa"))
    assert all(torch.equal(original[k], v) for k, v in model.unload().state_dict().items())


@pytest.mark.parametrize("init", REWRITING)
def test_delete_and_unload_give_the_original_weights_back_bit_for_bit(init):
    base = tiny_llama()
    original = copy.deepcopy(base.state_dict())
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=init))
    model.add_adapter("plain", lorakit.LoraConfig(r=2, target_modules=["k_proj"]))
    model.set_adapter("plain")
    model.delete_adapter("default")
    assert model.add_adapter("again", lorakit.LoraConfig(r=2, target_modules=TARGETS)) is None  # base is plain now
    plain = model.unload().state_dict()
    assert all(torch.equal(original[k], v) for k, v in plain.items())
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=init))
    assert all(torch.equal(original[k], v) for k, v in model.unload().state_dict().items())


def test_merge_and_unload_of_a_pissa_adapter_is_the_trained_model():
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=TARGETS,
                                                                    init_lora_weights="pissa"))
    ids = token_ids()
    train_a_little(model, ids)
    trained = logits(model, ids)
    torch.testing.assert_close(logits(model.merge_and_unload(), ids), trained, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal"])
def test_non_linear_layers_refuse_like_peft_and_nothing_changes(init):
    torch.manual_seed(0)
    net = CustomNet().eval()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}'"):
        lorakit.get_peft_model(net, lorakit.LoraConfig(r=2, target_modules=["lin1", "conv1d"],
                                                       init_lora_weights=init))
    assert not any(isinstance(m, lorakit.LoraLayer) for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_olora_on_conv1d_and_odd_orthogonal_rank_are_refused():
    with pytest.raises(ValueError, match="olora"):
        lorakit.get_peft_model(tiny_gpt2(), lorakit.LoraConfig(target_modules=["c_attn"], init_lora_weights="olora"))
    with pytest.raises(ValueError, match="even rank"):
        lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=3, target_modules=TARGETS,
                                                                init_lora_weights="orthogonal"))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_trained_file_loaded_here_converts_to_a_plain_lora_equal_to_peft_s_model(tmp_path, init):
    """lorakit rebuilds the initial factors on load (the same SVD/QR), so a PEFT-trained PiSSA/OLoRA file converts
    here; the converted file on the untouched base gives PEFT's trained outputs, in PEFT and in lorakit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=TARGETS,
                                                                    init_lora_weights=init))
        ids = token_ids()
        train_a_little(trained, ids)
        expected = logits(trained, ids)
        trained.save_pretrained(tmp_path / "pissa")
        ours = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "pissa")
        torch.testing.assert_close(logits(ours, ids), expected, atol=1e-5, rtol=0)
        ours.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
        in_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(in_peft, ids), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora"), ids),
                               expected, atol=1e-5, rtol=0)


def test_embeddings_take_the_default_init_so_another_adapter_there_is_fine():
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["embed_tokens"]))
    model.add_adapter("p", lorakit.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"],
                                              init_lora_weights="pissa"))
    layer = model.get_base_model().model.embed_tokens
    assert layer.base_rewrite is None and sorted(layer.r) == ["default", "p"]
