"""``autocast_adapter_dtype`` both ways, on every entry point (get_peft_model, add_adapter, from_pretrained,
load_adapter): every parameter's dtype as PEFT 0.21.2 gives it, on PEFT's test MLP in float32, float16, bfloat16."""

import copy

import pytest
import torch

from conftest import mlp_input, peft_test_mlp

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dtypes(model):
    return {n: p.dtype for n, p in model.named_parameters()}


def config(lib, **kw):
    return lib.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False, **kw)


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_get_peft_model_and_add_adapter_give_peft_dtypes(dtype, autocast):
    import peft

    import lorakit

    base = peft_test_mlp(dtype)
    found = []
    for lib in (lorakit, peft):
        model = lib.get_peft_model(copy.deepcopy(base), config(lib), autocast_adapter_dtype=autocast)
        model.add_adapter("other", config(lib), autocast_adapter_dtype=not autocast)
        found.append(dtypes(model))
    assert found[0] == found[1]
    expected = torch.float32 if autocast else dtype
    assert found[0]["base_model.model.lin0.lora_A.default.weight"] == expected
    assert found[0]["base_model.model.lin0.base_layer.weight"] == dtype


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_from_pretrained_and_load_adapter_give_peft_dtypes_and_outputs(tmp_path, dtype, autocast):
    import peft

    import lorakit

    base = peft_test_mlp(dtype)
    lorakit.get_peft_model(copy.deepcopy(base), config(lorakit)).save_pretrained(tmp_path)
    found, outputs = [], []
    for lib in (lorakit, peft):
        model = lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, autocast_adapter_dtype=autocast)
        model.load_adapter(tmp_path, "other", autocast_adapter_dtype=not autocast)
        found.append(dtypes(model))
        with torch.no_grad():
            outputs.append(model(mlp_input().to(dtype)).float())
    assert found[0] == found[1]
    assert found[0]["base_model.model.lin1.lora_B.default.weight"] == (torch.float32 if autocast else dtype)
    assert found[0]["base_model.model.lin1.lora_B.other.weight"] == (dtype if autocast else torch.float32)
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(outputs[0], outputs[1], atol=tol, rtol=tol)


def test_half_precision_adapters_train_and_merge():
    """fp16 factors on an fp16 base: forward, backward and merge all run in the adapter's dtype."""
    import lorakit

    base = peft_test_mlp(torch.bfloat16)
    model = lorakit.get_peft_model(base, config(lorakit, lora_dropout=0.1), autocast_adapter_dtype=False).train()
    out = model(mlp_input().to(torch.bfloat16))
    out.float().sum().backward()
    A = model.base_model.model.lin0.lora_A["default"].weight
    assert A.dtype == torch.bfloat16 and A.grad is not None and A.grad.dtype == torch.bfloat16
    model.eval()
    with torch.no_grad():
        before = model(mlp_input().to(torch.bfloat16))
        model.merge_adapter()
        torch.testing.assert_close(model(mlp_input().to(torch.bfloat16)), before, atol=0.1, rtol=0.05)


def test_autocast_must_be_a_bool():
    import lorakit

    with pytest.raises(TypeError, match="autocast_adapter_dtype must be a bool"):
        lorakit.get_peft_model(peft_test_mlp(), config(lorakit), autocast_adapter_dtype="no")
