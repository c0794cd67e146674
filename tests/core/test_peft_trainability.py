"""Which parameters train, as PEFT 0.21.2 decides it, step by step through a session on PEFT's test MLP; and the
model-level rules PEFT's own tests assert: unload keeps the trained modules_to_save copy, two active adapters
cannot share one modules_to_save module, only one adapter may train biases."""

import copy

import pytest
import torch

from conftest import mlp_input, peft_test_mlp


def trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def config(lib, **kw):
    return lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"], **kw)


def session(lib, folder):
    """The same calls on either library; the trainable parameter names after each."""
    steps = []
    model = lib.get_peft_model(peft_test_mlp().train(), config(lib))
    steps.append(("get_peft_model", trainable(model)))
    model.add_adapter("other", config(lib))
    steps.append(("add_adapter: inactive, frozen", trainable(model)))
    model.set_adapter("other")
    steps.append(("set_adapter", trainable(model)))
    model.set_adapter("default", inference_mode=True)
    steps.append(("set_adapter(inference_mode=True)", trainable(model)))
    model.set_requires_grad("other")
    steps.append(("set_requires_grad of an inactive adapter", trainable(model)))
    model.set_requires_grad("other", False)
    model.set_adapter("default")
    steps.append(("set_adapter again", trainable(model)))
    with model.disable_adapter():
        steps.append(("inside disable_adapter()", trainable(model)))
    steps.append(("after disable_adapter()", trainable(model)))
    model.base_model.disable_adapter_layers()
    steps.append(("disable_adapter_layers()", trainable(model)))
    model.base_model.enable_adapter_layers()
    steps.append(("enable_adapter_layers()", trainable(model)))
    model.add_adapter("frozen", config(lib, inference_mode=True))
    steps.append(("add_adapter(inference_mode=True)", trainable(model)))
    model.set_adapter("frozen")
    steps.append(("set_adapter of it", trainable(model)))
    model.delete_adapter("frozen")
    steps.append(("delete the active adapter", trainable(model)))
    model.save_pretrained(folder)
    loaded = lib.PeftModel.from_pretrained(peft_test_mlp(), folder, is_trainable=True)
    steps.append(("from_pretrained(is_trainable=True)", trainable(loaded)))
    loaded.load_adapter(folder / "other", "x", is_trainable=True)
    steps.append(("load_adapter(is_trainable=True): inactive and trainable", trainable(loaded)))
    loaded.load_adapter(folder / "other", "y")
    steps.append(("load_adapter(): frozen", trainable(loaded)))
    frozen = lib.PeftModel.from_pretrained(peft_test_mlp(), folder)
    steps.append(("from_pretrained()", trainable(frozen)))
    return steps


def test_requires_grad_as_peft_sets_it_through_a_session(tmp_path):
    import peft

    import lorakit

    ours = session(lorakit, tmp_path / "ours")
    theirs = session(peft, tmp_path / "theirs")
    for (step, got), (_, expected) in zip(ours, theirs):
        assert got == expected, step
    assert any(".x." in n for n in dict(ours)["load_adapter(is_trainable=True): inactive and trainable"])
    assert dict(ours)["inside disable_adapter()"] == [] and dict(ours)["get_peft_model"]


def test_disabling_gives_back_exactly_what_trained_before():
    """A deliberate difference: PEFT's re-enabling makes the active adapter trainable even where it was frozen
    (loaded for inference, or set with inference_mode=True) and freezes inactive adapters made trainable with
    set_requires_grad; lorakit restores what trained before."""
    import lorakit

    model = lorakit.get_peft_model(peft_test_mlp(), config(lorakit))
    model.add_adapter("other", config(lorakit))
    model.set_adapter("default", inference_mode=True)
    model.set_requires_grad("other")
    before = trainable(model)
    assert before and all(".other." in n for n in before)
    with model.disable_adapter():
        assert trainable(model) == []
        model.base_model.disable_adapter_layers()  # nested: still frozen, and still restored once
    assert trainable(model) == before
    model.base_model.disable_adapter_layers()
    assert trainable(model) == []
    model.base_model.enable_adapter_layers()
    assert trainable(model) == before

    import peft  # the same calls in PEFT: the frozen active adapter trains afterwards, the other one does not

    theirs = peft.get_peft_model(peft_test_mlp(), config(peft))
    theirs.add_adapter("other", config(peft))
    theirs.set_adapter("default", inference_mode=True)
    theirs.set_requires_grad("other")
    assert trainable(theirs) == before
    with theirs.disable_adapter():
        pass
    assert trainable(theirs) and all(".default." in n for n in trainable(theirs))


def test_set_adapter_freezes_every_part_of_the_inactive_adapters(tmp_path):
    """PEFT 0.21.2 leaves an adapter's modules_to_save copy trainable after switching away from it (while freezing
    its LoRA factors); lorakit freezes both."""
    import lorakit

    import peft

    for lib in (lorakit, peft):
        model = lib.get_peft_model(peft_test_mlp(), config(lib))
        model.add_adapter("other", config(lib))
        model.set_requires_grad("other")
        model.set_adapter("default")
        left = [n for n in trainable(model) if ".other." in n]
        if lib is lorakit:
            assert trainable(model) and not left
        else:
            assert left == ["base_model.model.lin1.modules_to_save.other.bias",
                            "base_model.model.lin1.modules_to_save.other.weight"]


@pytest.mark.parametrize("merge", [False, True])
def test_unload_keeps_the_active_adapters_trained_copy_as_peft(merge):
    import peft

    import lorakit

    base = peft_test_mlp()
    results = []
    for lib in (lorakit, peft):
        model = lib.get_peft_model(copy.deepcopy(base), config(lib, init_lora_weights=False))
        model.add_adapter("other", config(lib, init_lora_weights=False))
        with torch.no_grad():
            for i, name in enumerate(("default", "other")):
                model.base_model.model.lin1.modules_to_save[name].weight.add_(i + 1)
        model.set_adapter("other")
        expected = model(mlp_input())
        plain = model.merge_and_unload() if merge else model.unload()
        assert type(plain.lin1) is torch.nn.Linear
        if merge:
            torch.testing.assert_close(plain(mlp_input()), expected, rtol=1e-5, atol=1e-5)
        results.append(plain.lin1.weight)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    torch.testing.assert_close(results[0], base.lin1.weight + 2, rtol=0, atol=0)


def test_two_active_adapters_cannot_share_a_modules_to_save_module():
    import peft

    import lorakit

    for lib in (lorakit, peft):
        model = lib.get_peft_model(peft_test_mlp(), config(lib))
        model.add_adapter("other", config(lib))
        with pytest.raises(ValueError):
            model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match=r"\['default', 'other'\].*cannot be active together"):
        model = lorakit.get_peft_model(peft_test_mlp(), config(lorakit))
        model.add_adapter("other", config(lorakit))
        before = trainable(model)
        model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default"] and trainable(model) == before  # nothing changed
    # adapters that do not share one may be active together
    model.add_adapter("lin0_only", lorakit.LoraConfig(target_modules=["lin0"]))
    model.base_model.set_adapter(["default", "lin0_only"])
    assert model.active_adapters == ["default", "lin0_only"]


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_only_one_adapter_may_train_biases(bias):
    import peft

    import lorakit

    for lib in (lorakit, peft):
        model = lib.get_peft_model(peft_test_mlp(), lib.LoraConfig(target_modules=["lin0"], bias=bias))
        model.add_adapter("plain", lib.LoraConfig(target_modules=["lin0"]))  # bias="none": fine in both
        with pytest.raises(ValueError, match="bias"):
            model.add_adapter("second", lib.LoraConfig(target_modules=["lin1"], bias="all"))
    assert "second" not in model.peft_config and not any(".second" in n for n, _ in model.named_parameters())
