"""``lorakit finetune --dora``: trains a DoRA adapter (PEFT's ``use_dora=True``) that PEFT loads with the same
outputs (on test_commands.py's tiny model and data)."""

from __future__ import annotations

import json

import torch

from .test_commands import RUN, assets, held_out, peft_model  # noqa: F401 (assets is a fixture)
from .helpers import cli


def test_finetune_dora_trains_magnitudes_and_peft_loads_them(assets):  # noqa: F811
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lorakit import PeftModel

    out = assets.root / "dora-run"
    code, stdout, stderr = cli("finetune", "--model", assets.model, "--data", assets.data, "--out", out, "--dora",
                               *RUN)
    assert code == 0, stderr
    assert " DoRA on " in stdout
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    tensors = load_file(out / "adapter_model.safetensors")
    magnitudes = {k: v for k, v in tensors.items() if k.endswith(".lora_magnitude_vector")}
    assert magnitudes
    base = AutoModelForCausalLM.from_pretrained(assets.model)
    key = next(iter(magnitudes))  # it started at the row norms of the base weight; training moved it
    module = base.get_submodule(key.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector"))
    assert not torch.allclose(magnitudes[key], module.weight.detach().norm(dim=1), atol=1e-6)
    ids = torch.tensor(held_out(assets)[0].input_ids)[None]
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets.model), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, peft_model(assets, out)(ids).logits, atol=1e-5, rtol=0)
