"""add_weighted_adapter and modules_to_save with several source adapters: each saved module comes from the one
source that trained it (PEFT gives a fresh, untrained copy); the combination reloads with the same outputs in
lorakit and PEFT. Biases trained by a source travel with the combination."""

import copy

import pytest
import torch

import lorakit
from conftest import CustomNet, custom_inputs


def sources():
    torch.manual_seed(0)
    base = CustomNet(dilation=(1, 1)).double().eval()  # PEFT cannot load dilated convs
    model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(
        r=2, target_modules=["lin1"], modules_to_save=["lin2"], init_lora_weights=False, bias="lora_only"))
    model.add_adapter("y", lorakit.LoraConfig(r=3, target_modules=["lin1", "emb"], modules_to_save=["conv1d"],
                                              init_lora_weights=False))
    model.add_adapter("z", lorakit.LoraConfig(r=2, target_modules=["lin1"], init_lora_weights=False))
    with torch.no_grad():  # "training": each source's own copy, and the bias "default" trains
        model.base_model.model.lin2.modules_to_save["default"].weight.add_(0.5)
        model.base_model.model.conv1d.modules_to_save["y"].weight.mul_(-2.0)
        model.base_model.model.lin1.base_layer.bias.add_(1.0)
    return base, model.double().eval()


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_each_saved_module_comes_from_the_source_that_trained_it(combination_type, tmp_path):
    import peft

    base, model = sources()
    model.add_weighted_adapter(["default", "y", "z"], [0.6, -1.4, 0.3], "mix", combination_type)
    wrappers = model.base_model.model
    for module, owner in (("lin2", "default"), ("conv1d", "y")):
        mine = getattr(wrappers, module).modules_to_save
        for key, value in mine[owner].state_dict().items():
            assert torch.equal(mine["mix"].state_dict()[key], value), (module, key)
    assert sorted(model.peft_config["mix"].modules_to_save) == ["conv1d", "lin2"]
    assert model.peft_config["mix"].bias == "lora_only"  # the trained bias is saved with the combination

    model.set_adapter("mix")
    x = custom_inputs()
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    ours = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mix")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "mix")).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected, atol=1e-10, rtol=0)
        torch.testing.assert_close(theirs(x), expected, atol=1e-10, rtol=0)


def test_sources_that_both_trained_a_module_are_refused():
    _, model = sources()
    model.add_adapter("w", lorakit.LoraConfig(r=2, target_modules=["lin1"], modules_to_save=["lin2"]))
    with pytest.raises(ValueError, match=r"\['default', 'w'\].*'lin2'"):
        model.add_weighted_adapter(["default", "w"], [1, 1], "mix", "cat")
    assert "mix" not in model.peft_config


def test_combining_an_adapter_that_trains_biases():
    """PEFT refuses (its one-adapter-with-bias rule counts the combination as a second one); lorakit lets the
    combination take the source's biases over, and a further adapter with bias is still refused."""
    import peft

    from conftest import peft_test_mlp

    for lib in (lorakit, peft):
        model = lib.get_peft_model(peft_test_mlp(), lib.LoraConfig(target_modules=["lin0"], bias="all"))
        model.add_adapter("plain", lib.LoraConfig(target_modules=["lin0"]))
        if lib is peft:
            with pytest.raises(ValueError, match="only 1 adapter with bias"):
                model.add_weighted_adapter(["default", "plain"], [1.0, 1.0], "mix", "cat")
        else:
            model.add_weighted_adapter(["default", "plain"], [1.0, 1.0], "mix", "cat")
            assert model.peft_config["mix"].bias == "all"
            with pytest.raises(ValueError, match="only one adapter may train them"):
                model.add_adapter("third", lib.LoraConfig(target_modules=["lin1"], bias="lora_only"))
