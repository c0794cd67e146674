"""The diffusion example's code path on a tiny diffusers UNet2DConditionModel, and the export to diffusers' LoRA
format: diffusers' own loaders (``unet.load_lora_adapter``, ``pipeline.load_lora_weights``, which build PEFT layers)
must give the UNet outputs lorakit gives, which in turn equal the dense float64 reference ``W + s·B@A``."""

import copy
import json

import pytest
import torch
from torch import nn

import lorakit

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'lorakit[diffusion]')")
from diffusers import UNet2DConditionModel  # noqa: E402
from safetensors import safe_open  # noqa: E402

from conftest import load_example  # noqa: E402
from reference import dense_update  # noqa: E402
from lorakit.integrations.diffusers_export import DIFFUSERS_WEIGHT_NAME, save_diffusers_lora, to_diffusers  # noqa: E402

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_unet(dtype=torch.float64):
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4,
    ).to(dtype).eval()


def unet_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 8, 8, generator=g).to(dtype)
    cond = torch.randn(2, 3, 8, generator=g).to(dtype)
    return x, torch.tensor([3, 700]), cond


def run(unet, inputs):
    x, t, cond = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=cond).sample


def adapted(config_kwargs, dtype=torch.float64):
    """A tiny UNet with a random (non-zero) lorakit adapter, and a copy of its base."""
    base = tiny_unet(dtype)
    fresh = copy.deepcopy(base)
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(init_lora_weights=False, **config_kwargs))
    return model, fresh


def dense_reference(model, fresh, inputs):
    """The base UNet with ``W + s·B@A`` written into every adapted weight, computed here in float64."""
    reference = copy.deepcopy(fresh)
    with torch.no_grad():
        for name, layer in model.base_model.lora_layers():
            weight = reference.get_submodule(name).weight
            delta = dense_update(*layer.factors("default"), layer.scaling["default"])
            weight.add_(delta.reshape(weight.shape).to(weight.dtype))
    return run(reference, inputs)


CONFIGS = {
    "attention, alpha != r": dict(r=4, lora_alpha=12, target_modules=ATTENTION),
    "rank and alpha patterns, rslora": dict(r=4, lora_alpha=8, target_modules=ATTENTION, use_rslora=True,
                                            rank_pattern={"attn2.to_k": 2}, alpha_pattern={"to_out.0": 3}),
    "convs and linears": dict(r=2, lora_alpha=5, target_modules=["conv1", "conv2", "proj_in", "to_q", "ff.net.2"]),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_diffusers_loads_the_export_with_identical_outputs(case, tmp_path):
    model, fresh = adapted(CONFIGS[case])
    inputs = unet_inputs()
    ours = run(model, inputs)
    with model.disable_adapter():
        assert (ours - run(model, inputs)).abs().max() > 1e-3  # the adapter really changes the outputs
    torch.testing.assert_close(ours, dense_reference(model, fresh, inputs), rtol=1e-12, atol=1e-12)

    path = save_diffusers_lora(model, tmp_path)
    assert path == tmp_path / DIFFUSERS_WEIGHT_NAME
    theirs = copy.deepcopy(fresh)
    theirs.load_lora_adapter(str(tmp_path), prefix="unet", adapter_name="mine", weight_name=DIFFUSERS_WEIGHT_NAME)
    torch.testing.assert_close(run(theirs, inputs), ours, rtol=1e-12, atol=1e-12)
    # diffusers built its own PEFT layers: the same modules, nothing more
    wrapped = {n for n, m in theirs.named_modules() if hasattr(m, "lora_A") and "mine" in getattr(m, "lora_A", {})}
    assert wrapped == {n for n, _ in model.base_model.lora_layers()}


def test_pipeline_load_lora_weights(tmp_path):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    model, fresh = adapted(CONFIGS["rank and alpha patterns, rslora"])
    inputs = unet_inputs()
    save_diffusers_lora(model, tmp_path)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=copy.deepcopy(fresh),
                                   scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(run(pipe.unet, inputs), run(model, inputs), rtol=1e-12, atol=1e-12)


def test_export_needs_no_metadata_to_mean_the_same(tmp_path):
    """A reader that ignores the file's config metadata infers ranks from the shapes and takes alpha = r: the scale
    folded into B makes that reading exact too."""
    model, fresh = adapted(CONFIGS["rank and alpha patterns, rslora"])
    inputs = unet_inputs()
    tensors, config = to_diffusers(model)
    assert config["lora_alpha"] == config["r"] and config["alpha_pattern"] == config["rank_pattern"]
    theirs = copy.deepcopy(fresh)
    theirs.load_lora_adapter(tensors, prefix="unet")  # a dict: no metadata
    torch.testing.assert_close(run(theirs, inputs), run(model, inputs), rtol=1e-12, atol=1e-12)


def test_export_file_layout(tmp_path):
    model, _ = adapted(dict(r=4, lora_alpha=8, target_modules=ATTENTION), dtype=torch.float32)
    save_diffusers_lora(model, tmp_path / "new" / "folder")
    with safe_open(str(tmp_path / "new" / "folder" / DIFFUSERS_WEIGHT_NAME), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        A = f.get_tensor("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight")
        B = f.get_tensor("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight")
    layers = dict(model.base_model.lora_layers())
    assert keys == {f"unet.{n}.lora_{x}.weight" for n in layers for x in "AB"}
    layer = layers["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert torch.equal(A, layer.lora_A["default"].weight)
    torch.testing.assert_close(B, layer.lora_B["default"].weight * 2.0)  # scale 8/4 folded in
    config = json.loads(metadata["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 4
    assert sorted(config["unet.target_modules"]) == sorted(layers)
    assert metadata["format"] == "pt" and not list(tmp_path.glob("new/folder/*.tmp"))


def test_export_refuses_what_diffusers_cannot_load(tmp_path):
    with pytest.raises(TypeError, match="PeftModel or LoraModel"):
        to_diffusers(tiny_unet())
    model, _ = adapted(dict(r=2, target_modules=ATTENTION))
    with pytest.raises(ValueError, match="unknown adapter 'other'"):
        to_diffusers(model, adapter_name="other")
    with pytest.raises(TypeError, match="prefix"):
        to_diffusers(model, prefix=None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        save_diffusers_lora(model, tmp_path / "file")
    saving, _ = adapted(dict(r=2, target_modules=ATTENTION, modules_to_save=["conv_out"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        to_diffusers(saving)
    biased, _ = adapted(dict(r=2, target_modules=ATTENTION, bias="lora_only"))
    with pytest.raises(ValueError, match="bias"):
        to_diffusers(biased)
    convs, _ = adapted(dict(r=4, target_modules=["conv1"]))  # plain convs are fine
    assert to_diffusers(convs)[0]

    class SamePad(nn.Conv2d):
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))

    net = nn.Sequential(SamePad(1, 2, 3))
    with pytest.raises(ValueError, match="own forward"):
        to_diffusers(lorakit.get_peft_model(net, lorakit.LoraConfig(r=2, target_modules=["0"])))
    emb = nn.Sequential(nn.Embedding(5, 3))
    with pytest.raises(ValueError, match="Embedding"):
        to_diffusers(lorakit.get_peft_model(emb, lorakit.LoraConfig(r=2, target_modules=["0"])))
    assert not list(tmp_path.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# The example's own helpers
# ---------------------------------------------------------------------------------------------------------------
def test_denoising_loss_is_the_ddpm_objective():
    ex = load_example("diffusion_dreambooth")
    sched = ex.scheduler()
    unet = tiny_unet(torch.float32)
    g = torch.Generator().manual_seed(0)
    images, cond = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1, torch.randn(3, 1, 8, generator=g)
    got = ex.denoising_loss(unet, sched, images, cond, range(5, 7))
    # reference: x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε with the schedule's ᾱ, and ε-MSE, seed by seed
    alphas_bar = torch.cumprod(1 - sched.betas.double(), 0)
    total = 0.0
    for seed in (5, 6):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(images.shape, generator=g)
        t = torch.randint(0, 1000, (3,), generator=g)
        a = alphas_bar[t].float()[:, None, None, None]
        noisy = a.sqrt() * images + (1 - a).sqrt() * noise
        with torch.no_grad():
            total += ((unet(noisy, t, encoder_hidden_states=cond).sample - noise) ** 2).mean().item()
    assert got == pytest.approx(total / 2, rel=1e-5)


def test_dreambooth_training_path_and_export(tmp_path):
    ex = load_example("diffusion_dreambooth")
    common = load_example("common")
    sched = ex.scheduler()
    base = tiny_unet(torch.float32)
    # frozen like the adapted model's base: torch's matmul may fold batch dims differently (other rounding) for
    # weights that require grad, so a trainable copy need not agree to the last bit
    fresh = copy.deepcopy(base).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    shots, token = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1, torch.randn(1, 8, generator=g)
    cond = token.expand(3, 1, 8)
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, lora_alpha=4, target_modules=ex.TARGETS))
    before = ex.denoising_loss(model, sched, shots, cond, range(3))
    ex.train(model, sched, shots, cond, steps=40, lr=1e-2, batch=6)
    assert ex.denoising_loss(model, sched, shots, cond, range(3)) < before
    inputs = (shots, torch.tensor([5, 300, 900]), cond)
    assert common.check_merge(model, lambda m: m(shots, inputs[1], encoder_hidden_states=cond).sample) < 1e-4
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(run(model, inputs), run(fresh, inputs), rtol=0, atol=0)
    save_diffusers_lora(model, tmp_path)
    theirs = copy.deepcopy(fresh)
    theirs.load_lora_adapter(str(tmp_path), prefix="unet", use_safetensors=True)
    torch.testing.assert_close(run(theirs, inputs), run(model, inputs))
    kohya = ex.save_kohya_file(model, tmp_path / "kohya")  # A1111 / ComfyUI: lora_unet_… keys with .alpha
    assert kohya.name == ex.KOHYA_NAME
    again = lorakit.PeftModel.from_pretrained(copy.deepcopy(fresh), kohya)
    torch.testing.assert_close(run(again, inputs), run(model, inputs))
    samples = ex.sample(model, token, 2, steps=3)
    assert samples.shape == (2, 1, 8, 8) and samples.abs().max() <= 1
