"""Mixed batches as PEFT runs them: disabled adapters run the base on every row, and a list of the wrong length
raises whatever the input is called (each side by side with PEFT on PEFT's test MLP)."""

import copy

import pytest
import torch

from conftest import mlp_input, peft_test_mlp, tiny_llama, token_ids


def two_adapter_mlps():
    """The same two-adapter MLP (LoRA on lin0, lin1 saved in full) in lorakit and in PEFT, with equal weights."""
    import peft

    import lorakit

    base = peft_test_mlp()
    models = []
    for lib in (lorakit, peft):
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"],
                                                                      init_lora_weights=False))
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"],
                                                  init_lora_weights=False))
        models.append(model.eval())
    ours, theirs = models
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():  # the saved copies differ from the original, so the base output is distinguishable
        for model in models:
            for i, name in enumerate(("default", "other")):
                model.base_model.model.lin1.modules_to_save[name].weight.add_(i + 1)
    return base, ours, theirs


NAMES = ["default", "other", "__base__", "other", "default", "default", "__base__", "other", "default"]


@pytest.mark.parametrize("how", ["context", "layers"])
def test_adapter_names_while_disabled_run_the_base_model_on_every_row(how):
    base, ours, theirs = two_adapter_mlps()
    X = mlp_input()
    expected = base(X)
    with torch.no_grad():
        assert (ours(X=X, adapter_names=NAMES) - expected).abs().max() > 1e-3  # the adapters do change the rows
        for model in (ours, theirs):
            if how == "context":
                with model.disable_adapter():
                    out = model(X=X, adapter_names=NAMES)
            else:
                model.base_model.disable_adapter_layers()
                out = model(X=X, adapter_names=NAMES)
                model.base_model.enable_adapter_layers()
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
        # and enabled again, both give the mixed result
        torch.testing.assert_close(ours(X=X, adapter_names=NAMES), theirs(X=X, adapter_names=NAMES), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("names", [["__base__"] * 5, ["default", "other", "__base__"], ["default"] * 10, []])
@pytest.mark.parametrize("call", ["keyword", "positional"])
def test_wrong_length_adapter_names_raise_for_any_input(names, call):
    _, ours, theirs = two_adapter_mlps()
    X = mlp_input()
    before = ours(X)
    for model in (ours, theirs):
        with torch.no_grad(), pytest.raises(ValueError, match=rf"{len(names)}\b.*\b9\b"):
            model(X=X, adapter_names=names) if call == "keyword" else model(X, adapter_names=names)
    # nothing left behind (PEFT leaves its hooks on the layers after this error; lorakit resets them)
    torch.testing.assert_close(ours(X), before, rtol=0, atol=0)
    assert all(getattr(m, "_rows", None) is None for m in ours.modules())


def test_wrong_length_raises_while_disabled_too():
    """A deliberate difference: PEFT 0.21.2 ignores a wrong-length list while adapters are disabled (the output is
    the base's either way); lorakit raises, since the list is a bug in the caller's code either way."""
    _, ours, theirs = two_adapter_mlps()
    names = ["default", "other", "__base__"]
    with ours.disable_adapter(), torch.no_grad(), pytest.raises(ValueError, match="3 entries for a batch of 9"):
        ours(X=mlp_input(), adapter_names=names)
    with theirs.disable_adapter(), torch.no_grad():
        theirs(X=mlp_input(), adapter_names=names)  # accepted (the behaviour the README lists as a difference)


def test_wrong_length_raises_in_a_transformers_model_and_in_generate():
    import lorakit

    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    ids = token_ids(n=4)
    with torch.no_grad(), pytest.raises(ValueError, match="2 entries for a batch of 4"):
        model(input_ids=ids, adapter_names=["default", "__base__"])
    with torch.no_grad(), pytest.raises(ValueError, match="2 entries for a batch of 4"):
        model(ids, adapter_names=["default", "__base__"])
    with pytest.raises(ValueError, match="2 entries for a batch of 4 prompts"):
        model.generate(input_ids=ids, adapter_names=["default", "__base__"], max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="needs the prompts as a tensor"):
        model.generate(adapter_names=["default"], max_new_tokens=2)
    # the right length with beams: each prompt's copies keep its adapter
    out = model.generate(input_ids=ids, adapter_names=["default", "__base__"] * 2, max_new_tokens=2, num_beams=2,
                         do_sample=False, pad_token_id=0)
    assert out.shape[0] == 4
