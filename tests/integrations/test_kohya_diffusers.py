"""kohya files against diffusers' own reader (``pipeline.load_lora_weights``, which converts kohya keys with
``loaders/lora_conversion_utils.py`` and builds PEFT layers): a file written by the sd-scripts-style helper, and a
file written by ``lorakit.convert.to_kohya``, give the same UNet and text-encoder outputs in diffusers as in lorakit.

diffusers 0.42.1 replaces the alphas of attention (``to_q/k/v/out``) and text-encoder modules that differ from the
file's most common alpha by that most common one; lorakit keeps each module's own (tests/core/test_kohya.py checks
them against the hand-written merge). The files compared here therefore share one alpha across those modules; their
ranks differ per module, so each module still has its own scale ``alpha / r``. diffusers also reads a text-encoder
part correctly only when it adapts ``out_proj`` (as sd-scripts always does)."""

import copy
import warnings

import pytest
import torch

import lorakit
from lorakit.convert import to_kohya

pytest.importorskip("diffusers", reason="diffusers is not installed")
from diffusers import DDPMScheduler, StableDiffusionPipeline  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from kohya_files import (  # noqa: E402
    as_sgm, kohya_file, merged_by_hand, run_clip, run_unet, sd_scripts_modules, tiny_clip, tiny_sdxl_unet, tiny_unet,
    unet_inputs,
)

# diffusers recognises a kohya text-encoder part only when out_proj is in it (it infers the key style from
# "to_out_lora"); otherwise it drops the attention LoRAs with a load report. sd-scripts adapts all six.
TEXT_ENCODER_LINEARS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
CLOSE = dict(rtol=0, atol=1e-5)  # the bound; in float64 both sides agree to ~1e-15


def diffusers_pipeline(unet, te):
    return StableDiffusionPipeline(vae=None, text_encoder=copy.deepcopy(te), tokenizer=None, unet=copy.deepcopy(unet),
                                   scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def load_in_diffusers(unet, te, path):
    pipe = diffusers_pipeline(unet, te)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(path))
    return pipe


def lorakit_loads(model, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the other component's tensors are left out, with a warning
        return lorakit.PeftModel.from_pretrained(copy.deepcopy(model), str(path))


@pytest.mark.parametrize("conv", [False, True], ids=["attention", "locon"])
def test_diffusers_reads_a_kohya_file_as_lorakit_does(tmp_path, conv):
    unet, te = tiny_unet(), tiny_clip()
    state = kohya_file({"lora_unet": (unet, "unet"), "lora_te": (te, "te")}, conv=conv, alpha=lambda i: 3.0,
                       dtype=torch.float64)
    path = tmp_path / "kohya.safetensors"
    save_file(state, str(path))
    pipe = load_in_diffusers(unet, te, path)
    inputs = unet_inputs()
    ours_unet, ours_te = lorakit_loads(unet, path), lorakit_loads(te, path)
    assert (run_unet(ours_unet, inputs) - run_unet(unet, inputs)).abs().max() > 1e-2
    torch.testing.assert_close(run_unet(ours_unet, inputs), run_unet(pipe.unet, inputs), **CLOSE)
    torch.testing.assert_close(run_clip(ours_te), run_clip(pipe.text_encoder), **CLOSE)


def test_diffusers_reads_lorakits_kohya_export(tmp_path):
    unet, te = tiny_unet(), tiny_clip()
    ours_unet = lorakit.get_peft_model(copy.deepcopy(unet), lorakit.LoraConfig(
        r=4, lora_alpha=6, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in",
                                                                   "ff.net.2", "conv1", "conv2"],
        rank_pattern={"conv1": 2, "to_k": 3}, alpha_pattern={"conv2": 5}))
    ours_te = lorakit.get_peft_model(copy.deepcopy(te), lorakit.LoraConfig(
        r=2, lora_alpha=6, init_lora_weights=False, target_modules=TEXT_ENCODER_LINEARS, rank_pattern={"fc1": 3}))
    path = tmp_path / "from_lorakit.safetensors"
    save_file(to_kohya(unet=ours_unet, text_encoder=ours_te), str(path))
    pipe = load_in_diffusers(unet, te, path)
    inputs = unet_inputs()
    assert (run_unet(ours_unet, inputs) - run_unet(unet, inputs)).abs().max() > 1e-2
    torch.testing.assert_close(run_unet(pipe.unet, inputs), run_unet(ours_unet, inputs), **CLOSE)
    torch.testing.assert_close(run_clip(pipe.text_encoder), run_clip(ours_te), **CLOSE)


def test_diffusers_reads_sdxl_block_names_as_lorakit_does(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    unet = tiny_sdxl_unet()
    state = as_sgm(kohya_file({"lora_unet": (unet, "unet")}, conv=True, alpha=lambda i: 2.0, dtype=torch.float64),
                   unet)
    path = tmp_path / "sdxl.safetensors"
    save_file(state, str(path))
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=copy.deepcopy(unet), scheduler=DDPMScheduler())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(path))
    inputs = unet_inputs()
    added = {"text_embeds": torch.zeros(2, 8, dtype=torch.float64), "time_ids": torch.zeros(2, 6, dtype=torch.float64)}
    x, t, cond = inputs

    def run(model):
        with torch.no_grad():
            return model(x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample

    torch.testing.assert_close(run(lorakit_loads(unet, path)), run(pipe.unet), **CLOSE)


@pytest.mark.xfail(reason="diffusers 0.42.1 replaces differing alphas of attention and text-encoder modules by the "
                          "most common alpha (lorakit keeps each; tests/core/test_kohya.py)", strict=False)
def test_diffusers_honours_per_module_alphas(tmp_path):
    unet, te = tiny_unet(), tiny_clip()
    first_q = next(i for i, (_, n, _) in enumerate(sd_scripts_modules(unet, "unet")) if n.endswith("attn1.to_q"))
    state = kohya_file({"lora_unet": (unet, "unet")}, alpha=lambda i: 2.5 if i == first_q else 4.0,
                       dtype=torch.float64)
    path = tmp_path / "alphas.safetensors"
    save_file(state, str(path))
    pipe = load_in_diffusers(unet, te, path)
    inputs = unet_inputs()
    reference = merged_by_hand(unet, state, "lora_unet", "unet")
    torch.testing.assert_close(run_unet(lorakit_loads(unet, path), inputs), run_unet(reference, inputs), **CLOSE)
    torch.testing.assert_close(run_unet(pipe.unet, inputs), run_unet(reference, inputs), **CLOSE)
