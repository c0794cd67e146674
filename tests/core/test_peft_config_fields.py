"""Every field of PEFT 0.21.2's LoraConfig, at representative non-default values, on tiny models: a PEFT adapter
(with every adapter tensor moved off its init) loads in lorakit with PEFT's outputs, or the load is refused with an
error naming the field. Never loaded with other outputs. For the supported values, lorakit's file loads in PEFT with
lorakit's outputs."""

import copy
import dataclasses
import json
import warnings

import peft
import pytest
import torch

import lorakit
from conftest import CustomNet, custom_inputs, tiny_gpt2, tiny_llama, token_ids

LLAMA_TARGETS = dict(target_modules=["q_proj", "v_proj"])


def custom_net():
    return CustomNet(dilation=(1, 1))  # PEFT's conv LoRA ignores dilation


def llama_bias():
    return tiny_llama(attention_bias=True)


# (case id, model factory, config kwargs); every PEFT LoraConfig field appears in at least one case
SUPPORTED = [
    ("r", tiny_llama, dict(LLAMA_TARGETS, r=6)),
    ("lora_alpha", tiny_llama, dict(LLAMA_TARGETS, lora_alpha=21)),
    ("lora_dropout", tiny_llama, dict(LLAMA_TARGETS, lora_dropout=0.3)),
    ("target_modules-regex", tiny_llama, dict(target_modules=r".*\.(k|o)_proj")),
    ("target_modules-all-linear", tiny_llama, dict(target_modules="all-linear")),
    ("exclude_modules", tiny_llama, dict(target_modules="all-linear", exclude_modules=["gate_proj", "up_proj"])),
    ("fan_in_fan_out-linear", tiny_llama, dict(LLAMA_TARGETS, fan_in_fan_out=True)),
    ("fan_in_fan_out-gpt2", tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    ("bias-all", llama_bias, dict(LLAMA_TARGETS, bias="all")),
    ("bias-lora_only", llama_bias, dict(LLAMA_TARGETS, bias="lora_only")),
    ("use_rslora", tiny_llama, dict(LLAMA_TARGETS, use_rslora=True, r=4, lora_alpha=6)),
    ("modules_to_save", tiny_llama, dict(LLAMA_TARGETS, modules_to_save=["lm_head"])),
    ("init_lora_weights-False", tiny_llama, dict(LLAMA_TARGETS, init_lora_weights=False)),
    ("init_lora_weights-gaussian", tiny_llama, dict(LLAMA_TARGETS, init_lora_weights="gaussian")),
    ("init_lora_weights-orthogonal", tiny_llama, dict(LLAMA_TARGETS, init_lora_weights="orthogonal")),
    ("init_lora_weights-pissa", tiny_llama, dict(LLAMA_TARGETS, init_lora_weights="pissa")),
    ("init_lora_weights-pissa-gpt2", tiny_gpt2, dict(target_modules=["c_attn"], init_lora_weights="pissa")),
    ("init_lora_weights-olora", tiny_llama, dict(LLAMA_TARGETS, init_lora_weights="olora")),
    ("init_lora_weights-embedding-pissa", tiny_llama,
     dict(target_modules=["embed_tokens", "q_proj"], init_lora_weights="pissa")),
    ("layers_to_transform", tiny_llama, dict(LLAMA_TARGETS, layers_to_transform=[0, 2])),
    ("layers_pattern", tiny_llama, dict(LLAMA_TARGETS, layers_to_transform=1, layers_pattern="layers")),
    ("rank_pattern", tiny_llama, dict(target_modules="all-linear", rank_pattern={"q_proj": 2, "down_proj": 6})),
    ("alpha_pattern", tiny_llama, dict(target_modules="all-linear", alpha_pattern={"v_proj": 3})),
    ("task_type", tiny_llama, dict(LLAMA_TARGETS, task_type="CAUSAL_LM")),
    ("inference_mode", tiny_llama, dict(LLAMA_TARGETS, inference_mode=True)),
    ("base_model_name_or_path+revision", tiny_llama,
     dict(LLAMA_TARGETS, base_model_name_or_path="some/model", revision="v1")),
    ("megatron_core", tiny_llama, dict(LLAMA_TARGETS, megatron_core="my.megatron")),
    ("qalora_group_size", tiny_llama, dict(LLAMA_TARGETS, qalora_group_size=32)),
    ("loftq_config-ignored", tiny_llama, dict(LLAMA_TARGETS, loftq_config={"loftq_bits": 4, "loftq_iter": 1})),
    ("eva_config-ignored", tiny_llama, dict(LLAMA_TARGETS, eva_config={"rho": 2.0})),
    ("corda_config-ignored", tiny_llama, dict(LLAMA_TARGETS, corda_config={"cache_file": None})),
    ("lora_ga_config-ignored", tiny_llama, dict(LLAMA_TARGETS, lora_ga_config={"direction": "ArB2r"})),
    ("runtime_config", tiny_llama, dict(LLAMA_TARGETS, runtime_config={"ephemeral_gpu_offload": False})),
    ("conv-and-embedding", custom_net, dict(target_modules=["emb", "conv1d", "conv2d", "lin1"], r=2)),
    ("lora_bias", llama_bias, dict(LLAMA_TARGETS, lora_bias=True)),
    ("target_parameters", tiny_llama, dict(target_modules=[], target_parameters=["q_proj.weight"])),
    ("trainable_token_indices", tiny_llama, dict(LLAMA_TARGETS, trainable_token_indices=[1, 3])),
    ("trainable_token_indices-dict", tiny_llama, dict(LLAMA_TARGETS, trainable_token_indices={"embed_tokens": [2]})),
]

# (field named in the error, model factory, config kwargs)
REFUSED = [
    ("use_dora", tiny_llama, dict(LLAMA_TARGETS, use_dora=True)),
    ("alora_invocation_tokens", tiny_llama, dict(LLAMA_TARGETS, alora_invocation_tokens=[5, 6],
                                                  task_type="CAUSAL_LM")),
    ("layer_replication", tiny_llama, dict(LLAMA_TARGETS, layer_replication=[[0, 2], [1, 3]])),
    ("megatron_config", tiny_llama, dict(LLAMA_TARGETS, megatron_config={"tensor_model_parallel_size": 1})),
    ("use_qalora", tiny_llama, dict(LLAMA_TARGETS, use_qalora=True)),
    ("velora_config", tiny_llama, dict(LLAMA_TARGETS, velora_config={})),
    ("monteclora_config", tiny_llama, dict(LLAMA_TARGETS, monteclora_config={})),
    ("use_bdlora", tiny_llama, dict(LLAMA_TARGETS, use_bdlora={"target_modules_bd_a": ["q_proj"],
                                                                 "target_modules_bd_b": ["v_proj"], "nblocks": 2})),
    ("arrow_config", tiny_llama, dict(LLAMA_TARGETS, arrow_config={"top_k": 2})),
    ("kasa_config", tiny_llama, dict(LLAMA_TARGETS, kasa_config={})),
    ("ensure_weight_tying", tiny_llama, dict(target_modules=["embed_tokens"], ensure_weight_tying=True)),
    ("init_lora_weights", tiny_llama, dict(LLAMA_TARGETS, init_lora_weights="eva")),
    ("init_lora_weights", tiny_llama, dict(LLAMA_TARGETS, init_lora_weights="corda")),
    ("init_lora_weights", tiny_llama, dict(LLAMA_TARGETS, init_lora_weights="loftq",
                                           loftq_config={"loftq_bits": 4, "loftq_iter": 1})),
    ("init_lora_weights", tiny_llama, dict(LLAMA_TARGETS, init_lora_weights="lora_ga")),
    ("init_lora_weights", tiny_llama, dict(LLAMA_TARGETS, init_lora_weights="mica")),
]

METADATA = {"peft_type", "auto_mapping", "peft_version"}  # describe the file; written by PEFT itself


def inputs_for(make):
    return custom_inputs() if make is custom_net else token_ids()


def output(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def fresh(make):
    torch.manual_seed(0)
    return make().eval()


def move_off_init(model, seed=5):
    """Every adapter tensor, trained copy and trained bias moves: a file whose every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_", "modules_to_save", "trainable_tokens_delta")) or (
                    p.requires_grad and name.endswith("bias")):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def peft_config(kw):
    kw = copy.deepcopy(kw)
    if "runtime_config" in kw:  # PEFT wants its object here (its other sub-configs take dicts)
        kw["runtime_config"] = peft.tuners.lora.config.LoraRuntimeConfig(**kw["runtime_config"])
    return peft.LoraConfig(**kw)


def peft_file(make, kw, path):
    """A PEFT adapter built with ``kw`` on ``make()``, moved off its init and saved; its outputs."""
    model = peft.get_peft_model(fresh(make), peft_config(kw))
    move_off_init(model)
    model.eval()
    model.save_pretrained(path)
    return output(model, inputs_for(make))


def test_cases_cover_every_peft_field():
    named = {case.split("-")[0].split("+")[0] for case, _, _ in SUPPORTED} | {"base_model_name_or_path", "revision"}
    named |= {kw for _, _, kws in SUPPORTED for kw in kws}
    named |= {field for field, _, _ in REFUSED}
    peft_fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert peft_fields - named - METADATA == set()


@pytest.mark.parametrize("case, make, kw", SUPPORTED, ids=[c for c, _, _ in SUPPORTED])
def test_peft_file_loads_with_peft_outputs(tmp_path, case, make, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own warnings about ignored sub-configs, fan_in_fan_out, ...
        expected = peft_file(make, kw, tmp_path)
        ours = lorakit.PeftModel.from_pretrained(fresh(make), tmp_path)
    torch.testing.assert_close(output(ours, inputs_for(make)), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case, make, kw", SUPPORTED, ids=[c for c, _, _ in SUPPORTED])
def test_lorakit_file_loads_in_peft_with_lorakit_outputs(tmp_path, case, make, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = lorakit.get_peft_model(fresh(make), lorakit.LoraConfig(**copy.deepcopy(kw)))
        move_off_init(ours)
        ours.eval()
        expected = output(ours, inputs_for(make))
        ours.save_pretrained(tmp_path)
        theirs = peft.PeftModel.from_pretrained(fresh(make), tmp_path).eval()
    torch.testing.assert_close(output(theirs, inputs_for(make)), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("field, make, kw", REFUSED, ids=[f"{f}={v}" for f, _, kw in REFUSED for v in [kw[f]]])
def test_peft_file_with_unsupported_value_is_refused_naming_the_field(tmp_path, field, make, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # the real PEFT adapter where PEFT can build it on this machine ...
            peft_file(make, kw, tmp_path)
        except Exception:  # ... else (a backend or data pass it needs) a plain one whose config says so
            peft_file(tiny_llama, LLAMA_TARGETS, tmp_path)
            data = json.loads((tmp_path / "adapter_config.json").read_text())
            data.update({k: v for k, v in kw.items() if k not in LLAMA_TARGETS})
            (tmp_path / "adapter_config.json").write_text(json.dumps(data))
        model = fresh(make)
        before = copy.deepcopy(model.state_dict())
        with pytest.raises((ValueError, NotImplementedError)) as info:
            lorakit.PeftModel.from_pretrained(model, tmp_path)
    assert f"{field}=" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing changed
    with pytest.raises((ValueError, NotImplementedError), match=f"{field}="):
        lorakit.LoraConfig(**kw)  # and at config build


def test_readme_table_names_every_peft_field():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## PEFT LoraConfig fields", 1)[1].split("\n## ", 1)[0]
    missing = [f.name for f in dataclasses.fields(peft.LoraConfig) if f"`{f.name}`" not in section]
    assert missing == [] or missing == ["peft_type"], missing
