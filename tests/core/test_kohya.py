"""kohya's sd-scripts LoRA files (A1111, ComfyUI) in and out: loaded onto a tiny diffusers UNet and CLIP text
encoder built from configs, compared with the file's own tensors merged by hand in float64 (``W + alpha/r · up @
down``, every module its own rank and alpha); written back bit for bit."""

import copy
import warnings

import pytest
import torch
from torch import nn

import lorakit
from lorakit.convert import from_kohya, is_kohya_state, peft_to_kohya, to_kohya
from lorakit.targeting import pattern_value

pytest.importorskip("diffusers", reason="diffusers is not installed")
from safetensors.torch import load_file, save_file  # noqa: E402

from kohya_files import (  # noqa: E402
    as_sgm, kohya_file, merged_by_hand, run_clip, run_unet, sd_scripts_modules, tiny_clip, tiny_sdxl_unet, tiny_unet,
    unet_inputs,
)

TIGHT = dict(rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def models():
    return tiny_unet(), tiny_clip()


def write(tmp_path, state, name="lora.safetensors"):
    path = tmp_path / name
    save_file(state, str(path))
    return path


def load(model, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the other component's part of the file is left out, with a warning
        return lorakit.PeftModel.from_pretrained(copy.deepcopy(model), str(path), **kw)


@pytest.mark.parametrize("conv", [False, True], ids=["attention", "locon"])
def test_per_module_ranks_and_alphas_equal_the_hand_merge(models, tmp_path, conv):
    unet, te = models
    state = kohya_file({"lora_unet": (unet, "unet"), "lora_te": (te, "te")}, conv=conv, dtype=torch.float64)
    alphas = {float(v) for k, v in state.items() if k.endswith(".alpha")}
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_down.weight")}
    assert len(alphas) == 4 and len(ranks) == 3  # every module its own rank and alpha, not one per file
    path = write(tmp_path, state)
    inputs = unet_inputs()

    ours = load(unet, path)
    reference = merged_by_hand(unet, state, "lora_unet", "unet", conv)
    assert (run_unet(unet, inputs) - run_unet(reference, inputs)).abs().max() > 1e-2  # the file changes the UNet
    torch.testing.assert_close(run_unet(ours, inputs), run_unet(reference, inputs), **TIGHT)

    ours_te = load(te, path)
    reference_te = merged_by_hand(te, state, "lora_te", "te")
    assert (run_clip(te) - run_clip(reference_te)).abs().max() > 1e-2
    torch.testing.assert_close(run_clip(ours_te), run_clip(reference_te), **TIGHT)
    if conv:
        conv_layers = [n for n, layer in ours.base_model.lora_layers() if type(layer).__name__ == "Conv"
                       and layer.base_layer.kernel_size == (3, 3)]
        assert "down_blocks.0.resnets.0.conv1" in conv_layers


def test_each_layer_gets_the_files_rank_and_alpha(models, tmp_path):
    unet, _ = models
    state = kohya_file({"lora_unet": (unet, "unet")}, conv=True)
    ours = load(unet, write(tmp_path, state))
    layers = dict(ours.base_model.lora_layers())
    assert len(layers) == len(sd_scripts_modules(unet, "unet", conv=True))
    for kohya, full, _ in sd_scripts_modules(unet, "unet", conv=True):
        layer = layers[full]
        assert layer.r["default"] == state[f"lora_unet_{kohya}.lora_down.weight"].shape[0]
        assert layer.lora_alpha["default"] == float(state[f"lora_unet_{kohya}.alpha"])
        assert torch.equal(layer.lora_A["default"].weight, state[f"lora_unet_{kohya}.lora_down.weight"])
        assert torch.equal(layer.lora_B["default"].weight, state[f"lora_unet_{kohya}.lora_up.weight"])


def test_missing_or_zero_alpha_means_alpha_equals_rank(models, tmp_path):
    unet, _ = models
    state = kohya_file({"lora_unet": (unet, "unet")}, alpha=lambda i: None if i % 2 else 0.0, dtype=torch.float64)
    assert any(k.endswith(".alpha") for k in state) and not all(
        f"{k[:-len('.lora_down.weight')]}.alpha" in state for k in state if k.endswith("lora_down.weight"))
    ours = load(unet, write(tmp_path, state))
    inputs = unet_inputs()
    torch.testing.assert_close(run_unet(ours, inputs), run_unet(merged_by_hand(unet, state, "lora_unet", "unet"),
                                                                   inputs), **TIGHT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kohya_to_lorakit_to_kohya_is_bit_identical(models, tmp_path, dtype):
    unet, te = models
    unet, te = copy.deepcopy(unet).float(), copy.deepcopy(te).float()
    alpha = lambda i: [1.0, 3.0, 0.5, 7.0][i % 4]  # noqa: E731
    state = kohya_file({"lora_unet": (unet, "unet"), "lora_te": (te, "te")}, conv=True, dtype=dtype, alpha=alpha)
    path = write(tmp_path, state)
    out = to_kohya(unet=load(unet, path), text_encoder=load(te, path), dtype=None if dtype == torch.float32 else dtype)
    assert set(out) == set(state)
    for key, tensor in state.items():
        assert out[key].dtype == tensor.dtype and out[key].shape == tensor.shape, key
        assert torch.equal(out[key], tensor), key


def test_a_lone_model_is_named_by_its_kind(models, tmp_path):
    unet, te = models
    state = kohya_file({"lora_te": (te, "te")})
    out = to_kohya(load(te.float(), write(tmp_path, state)))
    assert set(out) == set(state)


def test_sdxl_second_text_encoder_and_te1(tmp_path):
    te1, te2 = tiny_clip(), tiny_clip(projection=True, hidden=12, seed=1)
    state = kohya_file({"lora_te1": (te1, "te"), "lora_te2": (te2, "te")}, dtype=torch.float64)
    parts = from_kohya(state, text_encoder=te1, text_encoder_2=te2)
    assert set(parts) == {"text_encoder", "text_encoder_2"}
    path = write(tmp_path, state)
    ours1, ours2 = load(te1, path), load(te2, path)  # each picks its part by the names and shapes that fit
    torch.testing.assert_close(run_clip(ours2), run_clip(merged_by_hand(te2, state, "lora_te2", "te")), **TIGHT)
    torch.testing.assert_close(run_clip(ours1), run_clip(merged_by_hand(te1, state, "lora_te1", "te")), **TIGHT)
    out = to_kohya(text_encoder=ours1, text_encoder_2=ours2, dtype=torch.float64)
    assert set(out) == set(state) and all(torch.equal(out[k], state[k]) for k in state)


def test_load_adapter_adds_a_kohya_file_as_a_second_adapter(models, tmp_path):
    unet, _ = models
    first = kohya_file({"lora_unet": (unet, "unet")}, seed=1, dtype=torch.float64)
    second = kohya_file({"lora_unet": (unet, "unet")}, conv=True, seed=2, dtype=torch.float64)
    folder = tmp_path / "folder"  # a folder holding only the file loads too
    folder.mkdir()
    write(folder, second, "my_lora.safetensors")
    model = load(unet, write(tmp_path, first))
    model.load_adapter(str(folder), adapter_name="other")
    inputs = unet_inputs()
    torch.testing.assert_close(run_unet(model, inputs),
                               run_unet(merged_by_hand(unet, first, "lora_unet", "unet"), inputs), **TIGHT)
    model.set_adapter("other")
    torch.testing.assert_close(run_unet(model, inputs),
                               run_unet(merged_by_hand(unet, second, "lora_unet", "unet", conv=True), inputs), **TIGHT)


def test_the_other_components_part_is_left_out_with_a_warning(models, tmp_path):
    unet, te = models
    path = write(tmp_path, kohya_file({"lora_unet": (unet, "unet"), "lora_te": (te, "te")}))
    with pytest.warns(UserWarning, match=r"unet part .* LoRAs of \{'text_encoder': 12\} modules are for other models"):
        lorakit.PeftModel.from_pretrained(copy.deepcopy(unet).float(), str(path))


def test_unknown_keys_are_named(models, tmp_path):
    unet, te = models
    state = kohya_file({"lora_unet": (unet, "unet")})
    for extra, error, match in [
        ({"lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
          "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)},
         ValueError, "lora_unet_down_blocks_9_attentions_0_proj_in"),
        ({"model.diffusion_model.foo.weight": torch.zeros(2)}, ValueError, "model.diffusion_model.foo.weight"),
        ({"lora_unet_conv_in.hada_w1_a": torch.zeros(2, 2)}, NotImplementedError, "LoHa.*lora_unet_conv_in.hada_w1_a"),
        ({"lora_unet_conv_in.dora_scale": torch.zeros(2)}, NotImplementedError, "DoRA.*lora_unet_conv_in.dora_scale"),
        ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 1, 3, 3)}, ValueError,
         "lora_unet_conv_in.*lack their lora_down.weight or lora_up.weight"),
        ({"lora_unet_conv_norm_out.lora_down.weight": torch.zeros(2, 8),
          "lora_unet_conv_norm_out.lora_up.weight": torch.zeros(8, 2)}, ValueError, "GroupNorm"),
        ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 1, 1, 1),
          "lora_unet_conv_in.lora_up.weight": torch.zeros(8, 2, 1, 1)}, ValueError,
         r"lora_unet_conv_in has lora_down \(2, 1, 1, 1\).*needs \(2, 1, 3, 3\)"),
    ]:
        with pytest.raises(error, match=match):
            from_kohya({**state, **extra}, unet=unet)
    path = write(tmp_path, {**state, "lora_unet_up_blocks_7_resnets_0_conv1.lora_down.weight": torch.zeros(2, 8, 3, 3),
                            "lora_unet_up_blocks_7_resnets_0_conv1.lora_up.weight": torch.zeros(8, 2, 1, 1)})
    model = copy.deepcopy(unet)
    with pytest.raises(ValueError, match="lora_unet_up_blocks_7_resnets_0_conv1"):
        lorakit.PeftModel.from_pretrained(model, str(path))
    assert not any("lora" in n for n, _ in model.named_modules())  # handed back untouched
    path = write(tmp_path, {**state, "bundle_emb.sks.clip_l": torch.zeros(2, 8)}, "pivotal.safetensors")
    with pytest.raises(ValueError, match=r"not kohya LoRA tensors .*'bundle_emb.sks.clip_l'"):
        lorakit.PeftModel.from_pretrained(model, str(path))
    with pytest.raises(ValueError, match=r"adapts the \['text_encoder'\].*text_encoder="):
        from_kohya(kohya_file({"lora_te": (te, "te")}), unet=unet)


class Underscored(nn.Module):
    """Module names with underscores, which kohya's names flatten: ``a_b.c`` and ``a.b_c`` are both ``a_b_c``."""

    def __init__(self, clash):
        super().__init__()
        self.a_b = nn.ModuleDict({"c": nn.Linear(4, 4), "d_e": nn.Linear(4, 3)})
        if clash:
            self.a = nn.ModuleDict({"b_c": nn.Linear(4, 4)})


def test_underscores_resolve_against_the_real_module_names():
    torch.manual_seed(0)
    state = {"lora_unet_a_b_d_e.lora_down.weight": torch.randn(2, 4), "lora_unet_a_b_d_e.lora_up.weight": torch.randn(3, 2),
             "lora_unet_a_b_c.lora_down.weight": torch.randn(1, 4), "lora_unet_a_b_c.lora_up.weight": torch.randn(4, 1)}
    part = from_kohya(state, unet=Underscored(clash=False))["unet"]
    assert part.config.target_modules == ["a_b.c", "a_b.d_e"]
    config = part.config
    assert {n: pattern_value(n, config.rank_pattern, config.r) for n in config.target_modules} == {"a_b.c": 1, "a_b.d_e": 2}
    assert torch.equal(part.state_dict["base_model.model.a_b.d_e.lora_A.weight"], state["lora_unet_a_b_d_e.lora_down.weight"])
    with pytest.raises(ValueError, match=r"lora_unet_a_b_c could be any of the modules \['a_b.c', 'a.b_c'\]"):
        from_kohya(state, unet=Underscored(clash=True))


def test_peft_files_convert_to_the_same_kohya_tensors(models, tmp_path):
    unet, _ = models
    model = lorakit.get_peft_model(copy.deepcopy(unet).float(), lorakit.LoraConfig(
        r=4, lora_alpha=6, target_modules=["to_q", "to_v", "conv1", "proj_in"], rank_pattern={"conv1": 2},
        alpha_pattern={"to_v": 3}, init_lora_weights=False))
    model.save_pretrained(tmp_path)
    direct = to_kohya(model)
    from_file = peft_to_kohya(load_file(str(tmp_path / "adapter_model.safetensors")),
                              lorakit.LoraConfig.from_pretrained(str(tmp_path)))
    assert set(direct) == set(from_file) and all(torch.equal(direct[k], from_file[k]) for k in direct)
    assert float(direct["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.alpha"]) == 3
    assert is_kohya_state(direct)


def test_rslora_exports_as_the_equivalent_alpha(models, tmp_path):
    unet, _ = models
    model = lorakit.get_peft_model(copy.deepcopy(unet), lorakit.LoraConfig(
        r=4, lora_alpha=6, target_modules=["to_q", "to_k"], use_rslora=True, rank_pattern={"to_k": 3},
        init_lora_weights=False))
    back = load(unet, write(tmp_path, to_kohya(model)))
    inputs = unet_inputs()
    torch.testing.assert_close(run_unet(back, inputs), run_unet(model, inputs), **TIGHT)


def test_what_kohya_cannot_carry_is_refused(models):
    unet, te = models
    with pytest.raises(ValueError, match="modules_to_save"):
        to_kohya(lorakit.get_peft_model(copy.deepcopy(unet), lorakit.LoraConfig(
            target_modules=["to_q"], modules_to_save=["conv_out"])))
    with pytest.raises(ValueError, match="token_embedding is a Embedding"):
        to_kohya(lorakit.get_peft_model(copy.deepcopy(te), lorakit.LoraConfig(target_modules=["token_embedding"])))
    with pytest.raises(ValueError, match="init_lora_weights='pissa'.*path_initial_model_for_weight_conversion"):
        to_kohya(lorakit.get_peft_model(copy.deepcopy(unet), lorakit.LoraConfig(
            target_modules=["to_q"], init_lora_weights="pissa")))
    with pytest.raises(ValueError, match="both given"):
        model = lorakit.get_peft_model(copy.deepcopy(unet), lorakit.LoraConfig(target_modules=["to_q"]))
        to_kohya(model, unet=model)


def test_sdxl_block_names_map_onto_the_diffusers_unet(tmp_path):
    """sd-scripts names SDXL's UNet as Stability's code does (input_blocks / middle_block / output_blocks)."""
    unet = tiny_sdxl_unet()
    state = kohya_file({"lora_unet": (unet, "unet")}, conv=True, dtype=torch.float64)
    sgm = as_sgm(state, unet)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha" in sgm
    assert "lora_unet_output_blocks_5_2_conv.lora_down.weight" in sgm  # an upsampler after an attention
    model = load(unet, write(tmp_path, sgm))
    inputs = unet_inputs()
    torch.testing.assert_close(run_unet(model, inputs),
                               run_unet(merged_by_hand(unet, state, "lora_unet", "unet", conv=True), inputs), **TIGHT)
    written = to_kohya(model, dtype=torch.float64)  # written back with the diffusers names
    assert set(written) == set(state) and all(torch.equal(written[k], state[k]) for k in state)


def test_save_kohya_writes_one_file_with_sd_scripts_metadata(models, tmp_path):
    from safetensors import safe_open

    from lorakit.kohya_file import save_kohya

    unet, _ = models
    model = lorakit.get_peft_model(copy.deepcopy(unet), lorakit.LoraConfig(
        r=4, lora_alpha=2, target_modules=["to_q", "to_v"], rank_pattern={"to_v": 2}, init_lora_weights=False))
    path = save_kohya(tmp_path / "sub" / "mine.safetensors", model)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["mine.safetensors"]
    with safe_open(str(path), "pt") as f:
        metadata, keys = f.metadata(), set(f.keys())
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_alpha"] == "2"
    assert keys == set(to_kohya(model))
    with pytest.raises(ValueError, match="a .safetensors file"):
        save_kohya(tmp_path / "mine.bin", model)


def test_a_config_cannot_override_a_kohya_files_own(models, tmp_path):
    unet, _ = models
    path = write(tmp_path, kohya_file({"lora_unet": (unet, "unet")}))
    with pytest.raises(ValueError, match="kohya LoRA file.*config= cannot be used"):
        lorakit.PeftModel.from_pretrained(copy.deepcopy(unet), str(path), config=lorakit.LoraConfig())


def test_from_kohya_parts_load_through_the_functional_api(models):
    unet, te = models
    state = kohya_file({"lora_unet": (unet, "unet"), "lora_te": (te, "te")}, dtype=torch.float64)
    parts = from_kohya(state, unet=unet, text_encoder=te)
    ours = lorakit.get_peft_model(copy.deepcopy(unet), parts["unet"].config)
    lorakit.set_peft_model_state_dict(ours, parts["unet"].state_dict)
    inputs = unet_inputs()
    torch.testing.assert_close(run_unet(ours, inputs),
                               run_unet(merged_by_hand(unet, state, "lora_unet", "unet"), inputs), **TIGHT)
