"""``lorakit convert``: kohya <-> PEFT <-> diffusers files, checked by loading the outputs (lorakit, diffusers) and
comparing with the kohya file's tensors merged by hand in float64."""

import contextlib
import copy
import io
import json
import warnings

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.convert import to_kohya

pytest.importorskip("diffusers", reason="diffusers is not installed")
from safetensors.torch import load_file, save_file  # noqa: E402

from kohya_files import (  # noqa: E402
    kohya_file, merged_by_hand, run_clip, run_unet, tiny_clip, tiny_unet, unet_inputs,
)

from .helpers import cli  # noqa: E402

TIGHT = dict(rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A pipeline folder with only the configs (what --base needs), its models, and a kohya file for them."""
    root = tmp_path_factory.mktemp("convert")
    unet, te = tiny_unet(), tiny_clip()
    base = root / "base"
    unet.save_config(base / "unet")
    te.config.save_pretrained(base / "text_encoder")
    (base / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    state = kohya_file({"lora_unet": (unet, "unet"), "lora_te": (te, "te")}, conv=True, dtype=torch.float64)
    save_file(state, str(root / "kohya.safetensors"))
    return root, base, unet, te, state


def quiet_load(model, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lorakit.PeftModel.from_pretrained(copy.deepcopy(model), str(path))


def test_kohya_to_peft_and_back(pipeline, tmp_path):
    root, base, unet, te, state = pipeline
    code, out, err = cli("convert", root / "kohya.safetensors", tmp_path / "peft", "--to", "peft", "--base", base)
    assert code == 0, err
    assert out.count("\n") == 1 and out.startswith(f"converted {root / 'kohya.safetensors'} (kohya) -> ")
    assert "unet 79 modules, text_encoder 12 modules; rank 2-4, alpha 1-4" in out and f"{len(state)} keys mapped" in out
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["text_encoder", "unet"]  # nothing else left
    config = json.loads((tmp_path / "peft" / "unet" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and config["alpha_pattern"]

    inputs = unet_inputs()
    ours = lorakit.PeftModel.from_pretrained(copy.deepcopy(unet), tmp_path / "peft" / "unet")
    torch.testing.assert_close(run_unet(ours, inputs), run_unet(merged_by_hand(unet, state, "lora_unet", "unet", True),
                                                                   inputs), **TIGHT)
    ours_te = lorakit.PeftModel.from_pretrained(copy.deepcopy(te), tmp_path / "peft" / "text_encoder")
    torch.testing.assert_close(run_clip(ours_te), run_clip(merged_by_hand(te, state, "lora_te", "te")), **TIGHT)

    code, out, err = cli("convert", tmp_path / "peft", tmp_path / "back.safetensors", "--to", "kohya")
    assert code == 0, err
    back = load_file(str(tmp_path / "back.safetensors"))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype
                                           for k in state)


def test_a_component_folder_is_a_base_too(pipeline, tmp_path):
    root, base, unet, _, state = pipeline
    unet_only = {k: v for k, v in state.items() if k.startswith("lora_unet_")}
    save_file(unet_only, str(tmp_path / "unet_lora.safetensors"))
    code, out, err = cli("convert", tmp_path / "unet_lora.safetensors", tmp_path / "out", "--to", "peft", "--base",
                         base / "unet")
    assert code == 0, err
    assert (tmp_path / "out" / "adapter_config.json").is_file()


def test_kohya_to_diffusers_loads_in_diffusers(pipeline, tmp_path):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    root, base, unet, te, _ = pipeline
    state = kohya_file({"lora_unet": (unet, "unet"), "lora_te": (te, "te")}, dtype=torch.float64,
                       alpha=lambda i: [1.0, 3.0, 0.5][i % 3])  # per-module alphas: folded into lora_B
    save_file(state, str(tmp_path / "k.safetensors"))
    code, out, err = cli("convert", tmp_path / "k.safetensors", tmp_path / "diffusers", "--to", "diffusers", "--base",
                         base)
    assert code == 0, err
    pipe = StableDiffusionPipeline(vae=None, text_encoder=copy.deepcopy(te), tokenizer=None, unet=copy.deepcopy(unet),
                                   scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(tmp_path / "diffusers"))
    inputs = unet_inputs()
    torch.testing.assert_close(run_unet(pipe.unet, inputs),
                               run_unet(merged_by_hand(unet, state, "lora_unet", "unet"), inputs), **TIGHT)
    torch.testing.assert_close(run_clip(pipe.text_encoder), run_clip(merged_by_hand(te, state, "lora_te", "te")),
                               **TIGHT)
    # and the diffusers file reads back into PEFT's format with the same meaning
    code, out, err = cli("convert", tmp_path / "diffusers", tmp_path / "peft", "--to", "peft")
    assert code == 0, err
    assert "(diffusers) -> " in out and "(peft): unet 48 modules, text_encoder 12 modules; rank 2-4, alpha 2-4" in out
    ours = lorakit.PeftModel.from_pretrained(copy.deepcopy(unet), tmp_path / "peft" / "unet")
    torch.testing.assert_close(run_unet(ours, inputs), run_unet(pipe.unet, inputs), **TIGHT)


def test_peft_to_kohya_needs_no_base(pipeline, tmp_path):
    _, _, unet, _, _ = pipeline
    model = lorakit.get_peft_model(copy.deepcopy(unet), lorakit.LoraConfig(
        r=4, lora_alpha=6, target_modules=["to_q", "conv1"], rank_pattern={"conv1": 2}, alpha_pattern={"to_q": 2},
        init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    code, out, err = cli("convert", tmp_path / "adapter", tmp_path / "k.safetensors", "--to", "kohya")
    assert code == 0, err
    layers = len(list(model.base_model.lora_layers()))
    assert "(peft) -> " in out and f"(kohya): unet {layers} modules; rank 2-4, alpha 2-6; {2 * layers} keys mapped" in out
    written, expected = load_file(str(tmp_path / "k.safetensors")), to_kohya(model)
    assert set(written) == set(expected) and all(torch.equal(written[k], expected[k]) for k in expected)
    back = quiet_load(unet, tmp_path / "k.safetensors")
    inputs = unet_inputs()
    torch.testing.assert_close(run_unet(back, inputs), run_unet(model, inputs), **TIGHT)


def test_convert_errors_are_one_line(pipeline, tmp_path):
    root, base, unet, _, state = pipeline
    code, _, err = cli("convert", root / "kohya.safetensors", tmp_path / "x", "--to", "peft")
    assert code == 1 and "pass --base" in err and err.count("\n") == 1
    bad = {**state, "lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(2, 8),
           "lora_unet_nowhere_to_q.lora_up.weight": torch.zeros(8, 2)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    code, _, err = cli("convert", tmp_path / "bad.safetensors", tmp_path / "y", "--to", "peft", "--base", base)
    assert code == 1 and "lora_unet_nowhere_to_q" in err
    assert not (tmp_path / "y").exists()
    (tmp_path / "taken.safetensors").write_bytes(b"mine")
    code, _, err = cli("convert", root / "kohya.safetensors", tmp_path / "taken.safetensors", "--to", "kohya", "--base",
                       base)
    assert code == 1 and "--overwrite" in err and (tmp_path / "taken.safetensors").read_bytes() == b"mine"
    code, _, err = cli("convert", root / "kohya.safetensors", tmp_path / "taken.safetensors", "--to", "kohya", "--base",
                       base, "--overwrite")
    assert code == 0 and load_file(str(tmp_path / "taken.safetensors")).keys() == state.keys()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    code, _, err = cli("convert", tmp_path / "nothing", tmp_path / "z", "--to", "peft")
    assert code == 1 and "no such file or folder" in err


def test_help_names_the_formats():
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()) as out:
        main(["convert", "--help"])
    assert e.value.code == 0
    for word in ("SRC", "DST", "--to", "--base", "peft", "kohya", "diffusers", "--overwrite"):
        assert word in out.getvalue()


def test_peft_itself_reads_the_converted_folders(pipeline, tmp_path):
    peft = pytest.importorskip("peft")
    root, base, unet, te, state = pipeline
    code, _, err = cli("convert", root / "kohya.safetensors", tmp_path / "peft", "--to", "peft", "--base", base)
    assert code == 0, err
    inputs = unet_inputs()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(unet), str(tmp_path / "peft" / "unet"))
    torch.testing.assert_close(run_unet(theirs, inputs),
                               run_unet(merged_by_hand(unet, state, "lora_unet", "unet", True), inputs), **TIGHT)
    theirs_te = peft.PeftModel.from_pretrained(copy.deepcopy(te), str(tmp_path / "peft" / "text_encoder"))
    torch.testing.assert_close(run_clip(theirs_te), run_clip(merged_by_hand(te, state, "lora_te", "te")), **TIGHT)


def test_an_sdxl_file_round_trips_through_peft_folders(tmp_path):
    from kohya_files import as_sgm, tiny_sdxl_unet

    unet, te1, te2 = tiny_sdxl_unet(), tiny_clip(), tiny_clip(projection=True, hidden=12, seed=1)
    base = tmp_path / "sdxl"
    unet.save_config(base / "unet")
    te1.config.save_pretrained(base / "text_encoder")
    te2.config.save_pretrained(base / "text_encoder_2")
    (base / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    plain = kohya_file({"lora_unet": (unet, "unet"), "lora_te1": (te1, "te"), "lora_te2": (te2, "te")}, conv=True)
    sgm = as_sgm({k: v for k, v in plain.items() if k.startswith("lora_unet_")}, unet)
    save_file({**sgm, **{k: v for k, v in plain.items() if not k.startswith("lora_unet_")}},
              str(tmp_path / "sdxl.safetensors"))
    code, out, err = cli("convert", tmp_path / "sdxl.safetensors", tmp_path / "peft", "--to", "peft", "--base", base)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["text_encoder", "text_encoder_2", "unet"]
    code, out, err = cli("convert", tmp_path / "peft", tmp_path / "back.safetensors", "--to", "kohya")
    assert code == 0, err
    back = load_file(str(tmp_path / "back.safetensors"))  # SDXL block names come back as the diffusers UNet's
    assert set(back) == set(plain) and all(torch.equal(back[k], plain[k]) for k in plain)


def test_a_pissa_folder_is_refused_naming_the_conversion(pipeline, tmp_path):
    _, _, unet, _, _ = pipeline
    model = lorakit.get_peft_model(copy.deepcopy(unet).float(), lorakit.LoraConfig(
        r=2, target_modules=["to_q"], init_lora_weights="pissa"))
    model.save_pretrained(tmp_path / "pissa")
    for to, dst in (("kohya", tmp_path / "k.safetensors"), ("diffusers", tmp_path / "d")):
        code, _, err = cli("convert", tmp_path / "pissa", dst, "--to", to)
        assert code == 1 and "init_lora_weights='pissa'" in err, err
    assert not (tmp_path / "k.safetensors").exists() and not (tmp_path / "d").exists()
