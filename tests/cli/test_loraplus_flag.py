"""``lorakit finetune --loraplus-ratio``: the optimizer's groups are LoRA+'s (PEFT's create_loraplus_optimizer as the
reference), their learning rates follow the schedule together, and the flag is validated."""

import pytest
import torch

import lorakit
from cli.helpers import cli, make_assets, make_llama
from lorakit.cli.finetune import Settings
from lorakit.cli.finetune.train import build_optimizer, learning_rate


def adapted():
    model = make_llama(64)
    return lorakit.get_peft_model(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def lrs_by_name(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}


def test_groups_and_rates_equal_peft():
    import peft
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    model = adapted()
    params = [p for p in model.parameters() if p.requires_grad]
    ours = build_optimizer(model, params, Settings(lr=1e-3, loraplus_ratio=16.0))
    twin = peft.get_peft_model(make_llama(64), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    theirs = peft_loraplus(twin, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0, weight_decay=0.0)
    assert lrs_by_name(model, ours) == lrs_by_name(twin, theirs)
    assert all(lr == pytest.approx(16e-3) for n, lr in lrs_by_name(model, ours).items() if "lora_B" in n)
    # the schedule scales every group by the same factor, so B stays 16x A at every step
    for group in ours.param_groups:
        group["lr"] = learning_rate(3, 10, 1e-3) * group["lr_factor"]
    rates = lrs_by_name(model, ours)
    a = next(lr for n, lr in rates.items() if "lora_A" in n)
    assert all(lr == pytest.approx(16 * a) for n, lr in rates.items() if "lora_B" in n)


def test_without_the_flag_one_plain_group():
    model = adapted()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, params, Settings(lr=1e-3))
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["lr"] == 1e-3


def test_bad_ratio_is_refused(tmp_path):
    model_dir, data, _ = make_assets(tmp_path)
    code, _, err = cli("finetune", "--model", model_dir, "--data", data, "--loraplus-ratio", "-2",
                       "--out", tmp_path / "run", "--steps", "1")
    assert code != 0 and "--loraplus-ratio=-2" in err
