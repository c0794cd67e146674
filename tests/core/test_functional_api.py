"""PEFT's functional API (get/set_peft_model_state_dict, inject_adapter_in_model, PeftConfig, AutoPeftModel*,
get_layer_status/get_model_status): same names, signatures and results as PEFT's."""

import copy
import dataclasses
import inspect
import json
import warnings

import peft
import pytest
import torch
from peft.peft_model import get_layer_status as peft_layer_status
from peft.peft_model import get_model_status as peft_model_status

import lorakit
from conftest import CustomNet, custom_inputs, lorakit_and_peft, tiny_bert_cls, tiny_llama, token_ids

KW = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "embed_tokens"])


@pytest.mark.parametrize("name, theirs", [
    ("get_peft_model_state_dict", peft.get_peft_model_state_dict),
    ("set_peft_model_state_dict", peft.set_peft_model_state_dict),
    ("inject_adapter_in_model", peft.inject_adapter_in_model),
    ("get_layer_status", peft_layer_status),
    ("get_model_status", peft_model_status),
])
def test_signatures_are_peft_s(name, theirs):
    ours = inspect.signature(getattr(lorakit, name))
    assert list(ours.parameters) == list(inspect.signature(theirs).parameters)
    for p, q in zip(ours.parameters.values(), inspect.signature(theirs).parameters.values()):
        assert p.default == q.default, p.name


def same_tensors(ours, theirs):
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


@pytest.mark.parametrize("kw", [KW, dict(KW, bias="all", modules_to_save=["lm_head"]),
                                dict(KW, target_modules=["embed_tokens"])])
def test_get_peft_model_state_dict_equals_peft(kw):
    ours, theirs = lorakit_and_peft(tiny_llama(), kw)
    same_tensors(lorakit.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs))
    for setting in (True, False):
        same_tensors(lorakit.get_peft_model_state_dict(ours, save_embedding_layers=setting),
                     peft.get_peft_model_state_dict(theirs, save_embedding_layers=setting))
    # state_dict=: the values come from there
    doubled = {k: v * 2 for k, v in ours.state_dict().items()}
    got = lorakit.get_peft_model_state_dict(ours, state_dict=doubled)
    want = peft.get_peft_model_state_dict(theirs, state_dict={k: v * 2 for k, v in theirs.state_dict().items()})
    same_tensors(got, want)


def test_set_peft_model_state_dict_round_trips_under_another_name_and_refuses_what_does_not_fit():
    ours, theirs = lorakit_and_peft(tiny_llama(), KW)
    state = peft.get_peft_model_state_dict(theirs)
    target = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(**dict(KW, init_lora_weights=True)),
                                    adapter_name="other")
    result = lorakit.set_peft_model_state_dict(target, state, adapter_name="other")
    assert result.missing_keys == [] and result.unexpected_keys == []
    ids = token_ids()
    torch.testing.assert_close(target(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)
    before = copy.deepcopy(target.state_dict())
    partial = dict(list(state.items())[1:])
    with pytest.raises(ValueError, match="lacks"):
        lorakit.set_peft_model_state_dict(target, partial, adapter_name="other")
    with pytest.raises(ValueError, match="fit nothing"):
        lorakit.set_peft_model_state_dict(target, state | {"base_model.model.nowhere.lora_A.weight": torch.ones(1)},
                                          adapter_name="other")
    with pytest.raises(ValueError, match="ignore_mismatched_sizes"):
        lorakit.set_peft_model_state_dict(target, state, adapter_name="other", ignore_mismatched_sizes=True)
    with pytest.raises(ValueError, match="unknown adapter"):
        lorakit.set_peft_model_state_dict(target, state)
    after = target.state_dict()
    assert all(torch.equal(before[k], v) for k, v in after.items())


def test_inject_adapter_in_model_like_peft_and_functional_round_trip():
    torch.manual_seed(0)
    net = CustomNet(dilation=(1, 1)).eval()
    twin = copy.deepcopy(net)
    kw = dict(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["emb", "conv1d", "lin1"])
    ours = lorakit.inject_adapter_in_model(lorakit.LoraConfig(**kw), net)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**kw), twin)
    assert ours is net and type(ours) is CustomNet
    assert list(ours.peft_config) == ["default"]
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in theirs.named_parameters() if p.requires_grad}
    state = peft.get_peft_model_state_dict(theirs)
    assert not any(k.startswith("base_model.model.") for k in state)
    lorakit.set_peft_model_state_dict(ours, state)
    x = custom_inputs()
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)
    same_tensors(lorakit.get_peft_model_state_dict(ours), state)
    # a second adapter: injected and active, as in PEFT
    lorakit.inject_adapter_in_model(lorakit.LoraConfig(**kw), net, adapter_name="two")
    assert sorted(net.peft_config) == ["default", "two"]
    assert lorakit.get_model_status(net).active_adapters == ["two"]


def test_inject_by_state_dict_keys():
    torch.manual_seed(0)
    twin = CustomNet(dilation=(1, 1)).eval()
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["conv1d", "lin2"]), twin)
    state = peft.get_peft_model_state_dict(theirs)
    torch.manual_seed(0)
    net = lorakit.inject_adapter_in_model(lorakit.LoraConfig(r=2, target_modules=["lin1"]), CustomNet(dilation=(1, 1)),
                                          state_dict=state)
    assert sorted(n for n, m in net.named_modules() if isinstance(m, lorakit.LoraLayer)) == ["conv1d", "lin2"]


def test_peft_config_reads_the_file_as_lora_config(tmp_path):
    lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(**KW)).save_pretrained(tmp_path)
    config = lorakit.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, lorakit.LoraConfig) and isinstance(config, lorakit.PeftConfig)
    assert config.r == 4 and not config.is_prompt_learning
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(data | {"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="IA3"):
        lorakit.PeftConfig.from_pretrained(tmp_path)


def comparable(status, requires_grad=True):
    out = dataclasses.asdict(status)
    out.pop("quantization_backend", None)
    out.pop("adapter_weights", None)  # lorakit's addition (runtime scales), PEFT has no such field
    if not requires_grad:
        out.pop("requires_grad")
        out.pop("trainable_params", None)
    return out


@pytest.mark.parametrize("case", ["plain", "two-adapters-merged", "disabled"])
def test_layer_and_model_status_equal_peft(case):
    kw = dict(KW, modules_to_save=["lm_head"]) if case == "plain" else KW
    ours, theirs = lorakit_and_peft(tiny_llama(), kw)
    if case == "two-adapters-merged":
        for model, lib in ((ours, lorakit), (theirs, peft)):
            model.add_adapter("second", lib.LoraConfig(r=2, target_modules=["q_proj"]))
            model.merge_adapter(["default"])
    if case == "disabled":
        for model in (ours, theirs):
            model.base_model.disable_adapter_layers()
    # PEFT also stops disabled adapters from training; lorakit leaves requires_grad alone (a model behaviour, not
    # the status report's), so that field is compared only while adapters are enabled
    grads = case != "disabled"
    assert [comparable(s, grads) for s in lorakit.get_layer_status(ours)] == \
        [comparable(s, grads) for s in peft_layer_status(theirs)]
    assert comparable(lorakit.get_model_status(ours), grads) == comparable(peft_model_status(theirs), grads)


def test_status_of_a_model_without_adapters_raises():
    with pytest.raises(ValueError, match="no adapter layers"):
        lorakit.get_layer_status(tiny_llama())


@pytest.mark.parametrize("auto, make, task", [
    ("AutoPeftModelForCausalLM", tiny_llama, "CAUSAL_LM"),
    ("AutoPeftModel", tiny_llama, None),
    ("AutoPeftModelForSequenceClassification", tiny_bert_cls, "SEQ_CLS"),
])
def test_auto_peft_model_loads_base_named_in_the_config(tmp_path, auto, make, task):
    base = make()
    base.save_pretrained(tmp_path / "base")
    base.name_or_path = str(tmp_path / "base")
    targets = ["q_proj", "v_proj"] if make is tiny_llama else ["query", "value"]
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, init_lora_weights=False, target_modules=targets,
                                                            task_type=task))
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    ids = token_ids()
    expected = model(ids).logits
    loaded = getattr(lorakit, auto).from_pretrained(tmp_path / "adapter")
    assert type(loaded) is type(model)
    torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-6, rtol=0)
    with warnings.catch_warnings():  # PEFT's AutoPeftModel reads lorakit's file the same way
        warnings.simplefilter("ignore")
        in_peft = getattr(peft, auto).from_pretrained(tmp_path / "adapter").eval()
    torch.testing.assert_close(in_peft(ids).logits, expected, atol=1e-6, rtol=0)


def test_auto_peft_model_refuses_a_mismatched_task_and_an_unlisted_library(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    base.name_or_path = str(tmp_path / "base")
    lorakit.get_peft_model(base, lorakit.LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM")
                           ).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="CAUSAL_LM"):
        lorakit.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="AutoPeftModelForCausalLM"):
        lorakit.AutoPeftModel.from_pretrained(tmp_path / "a")
    lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "b")
    data = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    data["auto_mapping"]["parent_library"] = "os"
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="import_allowlist"):
        lorakit.AutoPeftModel.from_pretrained(tmp_path / "b")
    with pytest.raises(EnvironmentError):
        lorakit.AutoPeftModelForCausalLM()
