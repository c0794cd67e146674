"""Adapter files: PEFT's on-disk format both ways, the Hub cache, safety and atomicity (issue 3).

References: PEFT itself (its files and its outputs), and a dense float64 model built from a file's tensors by
the format's definition (``W + s·B@A``; modules_to_save and biases replace the base's), independent of lorakit.
"""

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from conftest import CustomNet, custom_inputs, tiny_bert_cls, tiny_gpt2, tiny_llama, token_ids
from reference import dense_update, scale_of
from lorakit import LoraConfig, LoraLayer, PeftModel, get_peft_model

SAFE, BIN, CONFIG, CARD = "adapter_model.safetensors", "adapter_model.bin", "adapter_config.json", "README.md"


def custom_net():
    torch.manual_seed(0)
    return CustomNet().eval()


def custom_net_undilated():
    """PEFT 0.21.2's conv LoRA ignores the base conv's dilation (lorakit does not): interop uses dilation 1."""
    torch.manual_seed(0)
    return CustomNet(dilation=(1, 1)).eval()


# (factory, inputs, LoraConfig kwargs) for round trips; every case trains something different.
CASES = {
    "list": (tiny_llama, token_ids, dict(target_modules=["q_proj", "v_proj"])),
    "regex": (tiny_llama, token_ids, dict(target_modules=r".*\.mlp\.(gate|up)_proj")),
    "all-linear": (tiny_llama, token_ids, dict(target_modules="all-linear")),
    "layers_to_transform": (tiny_llama, token_ids, dict(target_modules=["q_proj", "o_proj"], layers_to_transform=[0, 2],
                                                        layers_pattern="layers")),
    "rank_alpha_pattern": (tiny_llama, token_ids, dict(target_modules=["q_proj", "v_proj"], r=4, rank_pattern={"q_proj": 2},
                                                       alpha_pattern={r"layers\.1\.self_attn\.v_proj": 32}, use_rslora=True)),
    "modules_to_save": (tiny_llama, token_ids, dict(target_modules=["k_proj"], modules_to_save=["lm_head"])),
    "embedding": (tiny_llama, token_ids, dict(target_modules=["embed_tokens", "down_proj"])),
    "gpt2_conv1d_bias_all": (tiny_gpt2, token_ids, dict(target_modules=["c_attn", "c_fc"], bias="all")),
    "bert_seq_cls_lora_only": (tiny_bert_cls, token_ids, dict(target_modules=["query", "value"], bias="lora_only",
                                                              task_type="SEQ_CLS")),
    "conv_embedding_linear": (custom_net, custom_inputs, dict(target_modules=["emb", "conv1d", "conv2d", "lin1"],
                                                              modules_to_save=["lin2"], r=2, lora_alpha=6)),
}


def run(model, x):
    """Outputs of a lorakit/PEFT-wrapped or plain model: logits for transformers models."""
    from transformers import PreTrainedModel

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        out = model(input_ids=x) if isinstance(base, PreTrainedModel) else model(x)
    return out.logits if hasattr(out, "logits") else out


def train_a_little(model):
    """Stand-in for training: move every trainable tensor (factors, biases, modules_to_save copies)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def lorakit_source(make, kw, adapter_name="default"):
    model = get_peft_model(make(), LoraConfig(**dict(kw, init_lora_weights=False)), adapter_name=adapter_name)
    return train_a_little(model).eval()


def peft_source(make, kw):
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(make(), peft.LoraConfig(**copy.deepcopy(dict(kw, init_lora_weights=False))))
    return train_a_little(model).eval()


def fingerprint(model):
    """Everything a failed load must not change: module classes, tensors (by value), flags."""
    return (
        [(n, type(m).__name__) for n, m in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        model.training,
    )


def assert_same_fingerprint(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k
    assert a[2] == b[2] and a[3] == b[3]


def dense_reference(make, folder, alpha_of=None):
    """The base model with the file's adapter applied by the format's definition, in float64.

    ``alpha_of(module_path)`` gives a module's alpha when the config has an alpha_pattern (computed by hand in the
    test); the rank is read off the tensors.
    """
    base = make().double()
    config = json.loads((folder / CONFIG).read_text())
    assert alpha_of is not None or not config["alpha_pattern"]
    tensors = {k.removeprefix("base_model.model."): v.double() for k, v in load_file(folder / SAFE).items()}
    with torch.no_grad():
        for key, value in tensors.items():
            if ".lora_" not in key:  # modules_to_save, biases, base tensors replace the base's
                base.get_parameter(key.replace("base_layer.", "")).copy_(value)
        for key, A in tensors.items():
            module, _, kind = key.rpartition(".lora_")
            if kind not in ("A.weight", "embedding_A"):
                continue
            B = tensors[key.replace("_A", "_B")]
            r = A.shape[0]
            alpha = alpha_of(module) if alpha_of else config["lora_alpha"]
            scale = scale_of(alpha, r, config["use_rslora"])
            layer = base.get_submodule(module)
            delta = dense_update(A, B, scale)
            if kind == "embedding_A" or type(layer).__name__ == "Conv1D":  # weights stored (in, out)
                delta = delta.T
            layer.weight.add_(delta.reshape(layer.weight.shape))
    return base


# ----------------------------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_gives_identical_outputs(case, tmp_path):
    make, inputs, kw = CASES[case]
    source = lorakit_source(make, kw)
    x = inputs()
    expected = run(source, x)
    source.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CARD, CONFIG, SAFE]

    loaded = PeftModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(run(loaded, x), expected, rtol=0, atol=0)
    assert type(loaded) is type(source)
    # ... and the file means what the format says: dense W + s·B@A in float64 gives the same outputs
    alpha_of = (lambda m: 32 if m.endswith("layers.1.self_attn.v_proj") else 8) if kw.get("alpha_pattern") else None
    torch.testing.assert_close(run(dense_reference(make, tmp_path, alpha_of), x).float(), expected, rtol=0, atol=1e-5)


def test_rank_and_alpha_patterns_survive_the_round_trip(tmp_path):
    """rank_pattern/alpha_pattern/rslora: ranks in the file and scalings after loading, computed here by hand."""
    make, inputs, kw = CASES["rank_alpha_pattern"]
    source = lorakit_source(make, kw)
    source.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / SAFE)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 2
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].shape[0] == 4
    loaded = PeftModel.from_pretrained(make(), tmp_path)
    layers = dict(loaded.base_model.lora_layers())
    assert layers["model.layers.0.self_attn.q_proj"].scaling["default"] == pytest.approx(8 / math.sqrt(2))
    assert layers["model.layers.1.self_attn.v_proj"].scaling["default"] == pytest.approx(32 / 2)
    assert layers["model.layers.0.self_attn.v_proj"].scaling["default"] == pytest.approx(8 / 2)
    torch.testing.assert_close(run(loaded, token_ids()), run(source, token_ids()), rtol=0, atol=0)


def test_saved_config_has_every_field_and_inference_mode(tmp_path):
    make, _, kw = CASES["gpt2_conv1d_bias_all"]
    source = lorakit_source(make, kw)
    assert source.peft_config["default"].inference_mode is False
    source.save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG).read_text())
    assert {f for f in LoraConfig().to_dict()} <= set(data)
    assert data["peft_type"] == "LORA" and data["inference_mode"] is True
    assert "lorakit_version" not in data  # PEFT would warn about a field it does not know
    from safetensors import safe_open

    with safe_open(str(tmp_path / SAFE), "pt") as f:
        assert f.metadata() == {"format": "pt", "lorakit_version": lorakit.__version__}
    assert data["fan_in_fan_out"] is True  # GPT-2's Conv1D, as PEFT records it
    assert source.peft_config["default"].inference_mode is False  # saving changed nothing in the model


def test_several_adapters_and_selected_adapters(tmp_path):
    make, x = tiny_llama, token_ids()
    source = lorakit_source(make, dict(target_modules=["q_proj"]))
    source.add_adapter("other", LoraConfig(target_modules=["v_proj", "embed_tokens"], r=3, init_lora_weights=False))
    source.set_adapter("other")  # only the active adapter trains
    train_a_little(source)
    out_other = run(source, x)
    source.set_adapter("default")
    out_default = run(source, x)

    source.save_pretrained(tmp_path / "all")
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == [CARD, CONFIG, SAFE, "other"]
    assert sorted(p.name for p in (tmp_path / "all" / "other").iterdir()) == [CONFIG, SAFE]
    source.save_pretrained(tmp_path / "sel", selected_adapters=["other"])
    assert sorted(p.name for p in (tmp_path / "sel").iterdir()) == [CARD, "other"]  # the card: at the top

    loaded = PeftModel.from_pretrained(make(), tmp_path / "all")
    loaded.load_adapter(tmp_path / "all", "other", subfolder="other")
    loaded.load_adapter(tmp_path / "sel" / "other", "third")
    assert loaded.active_adapter == "default"  # loading does not activate
    torch.testing.assert_close(run(loaded, x), out_default, rtol=0, atol=0)
    for name in ("other", "third"):
        loaded.set_adapter(name)
        torch.testing.assert_close(run(loaded, x), out_other, rtol=0, atol=0)

    with pytest.raises(ValueError, match=r"\['nope'\]"):
        source.save_pretrained(tmp_path / "x", selected_adapters=["default", "nope"])
    assert not (tmp_path / "x").exists()
    source.save_pretrained(tmp_path / "bin", False)  # PEFT's argument order: the second one is safe_serialization
    assert (tmp_path / "bin" / "adapter_model.bin").is_file() and not (tmp_path / "bin" / SAFE).exists()


def test_loaded_adapters_are_frozen_unless_trainable(tmp_path):
    lorakit_source(tiny_llama, dict(target_modules=["q_proj"])).save_pretrained(tmp_path)
    base = tiny_llama().train()
    frozen = PeftModel.from_pretrained(base, tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert frozen.peft_config["default"].inference_mode is True and not frozen.training

    trainable = PeftModel.from_pretrained(tiny_llama().train(), tmp_path, is_trainable=True)
    grads = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert grads and all(".lora_" in n for n in grads) and trainable.training
    trainable.load_adapter(tmp_path, "second")
    assert not any(p.requires_grad for n, p in trainable.named_parameters() if ".second." in n)
    trainable.load_adapter(tmp_path, "third", is_trainable=True)
    trainable.set_adapter("third")
    assert all(p.requires_grad for n, p in trainable.named_parameters() if ".lora_A.third." in n)


# ----------------------------------------------------------------------------------------------------------------
# Interoperability with PEFT
# ----------------------------------------------------------------------------------------------------------------
INTEROP = {
    "llama_embedding_modules_to_save": (tiny_llama, token_ids,
                                        dict(target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"],
                                             r=4, lora_alpha=8)),
    "llama_all_linear_patterns": (tiny_llama, token_ids, dict(target_modules="all-linear", rank_pattern={"o_proj": 2},
                                                              alpha_pattern={"gate_proj": 3}, use_rslora=True)),
    "gpt2_conv1d_bias_all": CASES["gpt2_conv1d_bias_all"],
    "bert_seq_cls_lora_only": CASES["bert_seq_cls_lora_only"],
    "bert_seq_cls_bias_all": (tiny_bert_cls, token_ids, dict(target_modules=["query"], bias="all", task_type="SEQ_CLS")),
    "conv_embedding_linear": (custom_net_undilated, *CASES["conv_embedding_linear"][1:]),
}

# PEFT stores, with bias="all", a modules_to_save copy's bias a second time and the untouched original's bias;
# lorakit reads both (the first as an alias, the second into the original module) and writes neither.
PEFT_ONLY_KEYS = {"bert_seq_cls_bias_all": {"base_model.model.classifier.modules_to_save.bias",
                                            "base_model.model.classifier.original_module.bias"}}


@pytest.mark.parametrize("case", list(INTEROP))
def test_peft_adapter_loads_in_lorakit_and_back(case, tmp_path):
    import peft

    make, inputs, kw = INTEROP[case]
    x = inputs()
    theirs = peft_source(make, kw)
    expected = run(theirs, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "peft")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a PEFT 0.21.2 config loads without a warning
        ours = PeftModel.from_pretrained(make(), tmp_path / "peft")
    torch.testing.assert_close(run(ours, x), expected, rtol=0, atol=1e-5)

    ours.save_pretrained(tmp_path / "lorakit")
    peft_file, our_file = load_file(tmp_path / "peft" / SAFE), load_file(tmp_path / "lorakit" / SAFE)
    assert set(peft_file) - set(our_file) == PEFT_ONLY_KEYS.get(case, set())
    assert set(our_file) <= set(peft_file)
    for key, tensor in our_file.items():
        assert peft_file[key].shape == tensor.shape and torch.equal(peft_file[key], tensor), key

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(make(), tmp_path / "lorakit").eval()
    torch.testing.assert_close(run(back, x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["llama_embedding_modules_to_save", "gpt2_conv1d_bias_all", "conv_embedding_linear"])
def test_lorakit_adapter_loads_in_peft(case, tmp_path):
    """Trained in lorakit, loaded by PEFT: equal outputs; PEFT re-saving it writes exactly our keys and shapes."""
    import peft

    make, inputs, kw = INTEROP[case]
    x = inputs()
    ours = lorakit_source(make, kw)
    expected = run(ours, x)
    ours.save_pretrained(tmp_path / "lorakit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "lorakit").eval()
        theirs.save_pretrained(tmp_path / "peft")
    torch.testing.assert_close(run(theirs, x), expected, rtol=0, atol=1e-5)
    peft_file, our_file = load_file(tmp_path / "peft" / SAFE), load_file(tmp_path / "lorakit" / SAFE)
    assert {k: v.shape for k, v in peft_file.items()} == {k: v.shape for k, v in our_file.items()}


def test_bias_of_a_layer_another_adapter_wraps(tmp_path):
    """A PEFT bias="all" adapter names c_attn's bias ``c_attn.bias``; in a lorakit model where another adapter
    wraps c_attn it is ``c_attn.base_layer.bias``. It loads there, with PEFT's outputs."""
    make, x = tiny_gpt2, token_ids()
    theirs = peft_source(make, dict(target_modules=["c_fc"], bias="all"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path)
    assert "base_model.model.transformer.h.0.attn.c_attn.bias" in load_file(tmp_path / SAFE)
    ours = get_peft_model(make(), LoraConfig(target_modules=["c_attn"]))
    ours.load_adapter(tmp_path, "peft_bias")
    ours.set_adapter("peft_bias")
    torch.testing.assert_close(run(ours, x), run(theirs, x), rtol=0, atol=1e-5)


def test_convert_names_both_ways():
    from lorakit import convert

    state = {
        "model.q_proj.lora_A.default.weight": torch.ones(2, 4),
        "model.q_proj.lora_B.default.weight": torch.ones(4, 2),
        "emb.lora_embedding_A.default": torch.ones(2, 9),
        "head.modules_to_save.default.weight": torch.ones(3, 4),
        "model.q_proj.base_layer.bias": torch.ones(4),
        "default.weight": torch.ones(1),  # a module named like the adapter is left alone
    }
    peft_state = convert.to_peft(state, "default")
    assert sorted(peft_state) == sorted(convert.PEFT_PREFIX + k for k in [
        "model.q_proj.lora_A.weight", "model.q_proj.lora_B.weight", "emb.lora_embedding_A", "head.weight",
        "model.q_proj.base_layer.bias", "default.weight"])
    # back, under another adapter name, from prefixed and from unprefixed dicts alike
    renamed = {k.replace(".default", ".x") if "lora" in k or "modules_to_save" in k else k: v for k, v in state.items()}
    for source in (peft_state, convert.strip_peft_prefix(peft_state)):
        loaded, rest = convert.from_peft(source, renamed, "x")
        assert loaded.keys() == renamed.keys() and rest == {}
    with pytest.raises(ValueError, match="lack the 'base_model.model.' prefix"):
        convert.from_peft({**peft_state, "stray.weight": torch.ones(1)}, renamed, "x")
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*head\.weight"):
        convert.from_peft({k: v for k, v in peft_state.items() if not k.endswith("head.weight")}, renamed, "x")
    clash = {**peft_state, convert.PEFT_PREFIX + "head.modules_to_save.weight": torch.zeros(3, 4)}
    with pytest.raises(ValueError, match="hold the same tensor but differ"):
        convert.from_peft(clash, renamed, "x")


def test_saving_merged_embedding_weights_is_refused(tmp_path):
    model = lorakit_source(tiny_llama, dict(target_modules=["embed_tokens"]))
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model.save_pretrained(tmp_path)
    assert not tmp_path.joinpath(SAFE).exists()
    model.unmerge_adapter()
    model.save_pretrained(tmp_path)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(tmp_path / SAFE)


def test_config_files_both_ways(tmp_path):
    import peft

    theirs = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, bias="lora_only",
                             modules_to_save=["lm_head"], layers_to_transform=[0, 1], layers_pattern="layers",
                             rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 4}, use_rslora=True, task_type="CAUSAL_LM")
    theirs.save_pretrained(tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = LoraConfig.from_pretrained(tmp_path / "peft")
    for field, value in ours.to_dict().items():
        assert same_field(value, getattr(theirs, field)), field

    ours.save_pretrained(tmp_path / "lorakit")
    back = peft.LoraConfig.from_pretrained(tmp_path / "lorakit")
    for field, value in ours.to_dict().items():
        assert same_field(value, getattr(back, field)), field


def same_field(ours, theirs):
    """PEFT keeps target lists as sets (written in arbitrary order) and task types as enums."""
    if isinstance(theirs, set):
        return set(ours) == theirs
    return ours == getattr(theirs, "value", theirs)


def test_unknown_config_fields_are_refused_by_name_unless_empty(tmp_path):
    """A field lorakit does not know may change the forward: refused naming it, never dropped with a warning; a
    newer PEFT's feature left off (empty value) and PEFT fields at their defaults pass quietly."""
    lorakit_source(tiny_llama, dict(target_modules=["q_proj"])).save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG).read_text())
    data.update(use_dora=False, some_future_option={"enabled": True})
    (tmp_path / CONFIG).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="some_future_option"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    data.update(some_future_option=None)
    (tmp_path / CONFIG).write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_resized_vocabulary_saves_embeddings_like_peft(tmp_path):
    """A resized vocabulary (new token rows initialised at random) travels with the adapter, as in PEFT."""
    import peft

    tiny_llama().config.save_pretrained(tmp_path / "base")  # the base model's config.json (vocab 64)

    def make():
        model = tiny_llama()
        torch.manual_seed(3 if make.first else 4)  # the new rows differ between the two "sessions"
        make.first = False
        model.resize_token_embeddings(70)
        model.name_or_path = str(tmp_path / "base")  # as if loaded from there
        return model

    make.first = True
    kw = dict(target_modules=["q_proj"])
    ours = lorakit_source(make, kw)
    x = token_ids(vocab=70)
    with pytest.warns(UserWarning, match="resized"):
        ours.save_pretrained(tmp_path / "lorakit")
    our_file = load_file(tmp_path / "lorakit" / SAFE)
    assert our_file["base_model.model.model.embed_tokens.weight"].shape == (70, 32)
    loaded = PeftModel.from_pretrained(make(), tmp_path / "lorakit")
    torch.testing.assert_close(run(loaded, x), run(ours, x), rtol=0, atol=0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make(), peft.LoraConfig(**kw))
        theirs.save_pretrained(tmp_path / "peft")
    assert set(load_file(tmp_path / "peft" / SAFE)) == set(our_file)


# ----------------------------------------------------------------------------------------------------------------
# The Hub, through a cache built here (offline: nothing goes to the network)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))

    def publish(folder, repo_id, commit="0123456789abcdef0123456789abcdef01234567", subfolder=None, root=cache):
        """Put ``folder``'s files into the cache as the Hub client lays them out (refs, snapshots)."""
        repo = root / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        snapshot = repo / "snapshots" / commit / (subfolder or "")
        snapshot.mkdir(parents=True, exist_ok=True)
        for f in folder.iterdir():
            (snapshot / f.name).write_bytes(f.read_bytes())
        return commit

    return publish


def test_hub_repo_id_resolves_through_the_offline_cache(tmp_path, offline_hub):
    source = lorakit_source(tiny_llama, dict(target_modules=["q_proj", "v_proj"]))
    x = token_ids()
    source.save_pretrained(tmp_path / "adapter")
    commit = offline_hub(tmp_path / "adapter", "someone/tiny-adapter")
    offline_hub(tmp_path / "adapter", "someone/tiny-adapter", commit=commit, subfolder="variant")

    loaded = PeftModel.from_pretrained(tiny_llama(), "someone/tiny-adapter")
    torch.testing.assert_close(run(loaded, x), run(source, x), rtol=0, atol=0)
    loaded.load_adapter("someone/tiny-adapter", "pinned", revision=commit, subfolder="variant")
    loaded.set_adapter("pinned")
    torch.testing.assert_close(run(loaded, x), run(source, x), rtol=0, atol=0)
    assert LoraConfig.from_pretrained("someone/tiny-adapter").target_modules == ["q_proj", "v_proj"]

    elsewhere = tmp_path / "other-cache"
    offline_hub(tmp_path / "adapter", "someone/elsewhere", root=elsewhere)
    PeftModel.from_pretrained(tiny_llama(), "someone/elsewhere", cache_dir=str(elsewhere))

    base = tiny_llama()
    before = fingerprint(base)
    with pytest.raises(FileNotFoundError, match="someone/absent"):
        PeftModel.from_pretrained(base, "someone/absent")
    with pytest.raises(FileNotFoundError, match="nope"):
        PeftModel.from_pretrained(base, "someone/tiny-adapter", subfolder="nope")
    with pytest.raises(FileNotFoundError, match="allow_pickle"):  # a repo with only a pickle is not fetched
        (tmp_path / "config-only").mkdir()
        (tmp_path / "config-only" / CONFIG).write_bytes((tmp_path / "adapter" / CONFIG).read_bytes())
        offline_hub(tmp_path / "config-only", "someone/pickle-only")
        PeftModel.from_pretrained(base, "someone/pickle-only")
    assert_same_fingerprint(before, fingerprint(base))


# ----------------------------------------------------------------------------------------------------------------
# Bad input: clear errors, and the model exactly as it was
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    """A saved Llama adapter (q_proj, v_proj, r=4) and the folder it is in."""
    folder = tmp_path / "adapter"
    lorakit_source(tiny_llama, dict(target_modules=["q_proj", "v_proj"], r=4)).save_pretrained(folder)
    return folder


def edit_tensors(folder, change):
    tensors = load_file(folder / SAFE)
    change(tensors)
    save_file(tensors, folder / SAFE, metadata={"format": "pt"})


def expect_untouched(folder, error, match, **kwargs):
    """Both loading paths fail with ``error`` matching ``match``, leaving the model exactly as it was."""
    base = tiny_llama()
    before = fingerprint(base)
    with pytest.raises(error, match=match):
        PeftModel.from_pretrained(base, folder, **kwargs)
    assert_same_fingerprint(before, fingerprint(base))

    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    before = fingerprint(model)
    with pytest.raises(error, match=match):
        model.load_adapter(folder, "loaded", **kwargs)
    assert_same_fingerprint(before, fingerprint(model))
    assert list(model.peft_config) == ["default"]


def test_missing_folder_and_missing_files(tmp_path, saved):
    expect_untouched(tmp_path / "does-not-exist", FileNotFoundError, "does-not-exist")
    expect_untouched("./does/not/exist", FileNotFoundError, "does/not/exist")
    (saved / SAFE).unlink()
    expect_untouched(saved, FileNotFoundError, SAFE)


def test_missing_key_names_it(saved):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    edit_tensors(saved, lambda t: t.pop(key))
    expect_untouched(saved, ValueError, key.replace(".", r"\."))


def test_unexpected_key_names_it(saved):
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    edit_tensors(saved, lambda t: t.__setitem__(key, torch.zeros(4, 32)))
    expect_untouched(saved, ValueError, key.replace(".", r"\."))


def test_shape_mismatch_names_key_and_both_shapes(saved):
    data = json.loads((saved / CONFIG).read_text())
    data["rank_pattern"] = {"v_proj": 2}
    (saved / CONFIG).write_text(json.dumps(data))
    expect_untouched(saved, ValueError, r"v_proj\.lora_A\.weight' has shape \(4, 32\), the model expects \(2, 32\)")


def test_truncated_or_corrupt_files_name_the_file(saved):
    raw = (saved / SAFE).read_bytes()
    (saved / SAFE).write_bytes(raw[: len(raw) // 2])
    expect_untouched(saved, ValueError, "adapter_model.safetensors.*(truncated or corrupt)")
    (saved / SAFE).write_bytes(b"\x00" * 64)
    expect_untouched(saved, ValueError, "adapter_model.safetensors")
    (saved / SAFE).write_bytes(raw)
    (saved / CONFIG).write_text('{"r": 4, "target_modules": ')
    expect_untouched(saved, ValueError, "adapter_config.json is not valid JSON")
    (saved / CONFIG).write_text(json.dumps({"r": 0, "target_modules": ["q_proj"]}))
    expect_untouched(saved, ValueError, r"adapter_config\.json.*LoraConfig\.r=0")


def test_wrong_adapter_name_or_arguments(saved):
    expect_untouched(saved, TypeError, "device_mapp", device_mapp="auto")
    expect_untouched(saved, TypeError, "device_map must be", device_map=["cpu"])
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"cannot overwrite adapter 'default': its \['r'\] differ"):
        model.load_adapter(saved, "default")  # r=8 here, r=4 in the file
    assert_same_fingerprint(before, fingerprint(model))
    with pytest.raises(TypeError, match="max_shard_size"):
        model.save_pretrained(saved, max_shard_size="1GB")
    with pytest.raises(ValueError, match="is a file"):
        model.save_pretrained(saved / CONFIG)


def test_pickle_only_with_explicit_opt_in(tmp_path):
    source = lorakit_source(tiny_llama, dict(target_modules=["q_proj"]))
    source.save_pretrained(tmp_path)
    source.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CARD, CONFIG, BIN]  # the older safetensors is gone
    expect_untouched(tmp_path, ValueError, "allow_pickle=True")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, allow_pickle=True)
    torch.testing.assert_close(run(loaded, token_ids()), run(source, token_ids()), rtol=0, atol=0)
    raw = (tmp_path / BIN).read_bytes()
    (tmp_path / BIN).write_bytes(raw[: len(raw) // 3])
    expect_untouched(tmp_path, ValueError, "adapter_model.bin.*(truncated or corrupt)", allow_pickle=True)
    source.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CARD, CONFIG, SAFE]


# ----------------------------------------------------------------------------------------------------------------
# Atomic saves
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("failing", ["write_bytes", "write_text"])  # the weights, or the config after the weights
def test_save_failing_midway_keeps_the_old_adapter(saved, monkeypatch, failing):
    import pathlib

    old = {p.name: p.read_bytes() for p in saved.iterdir()}

    def half_then_fail(self, data, *args, **kwargs):
        with open(self, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, failing, half_then_fail)
    bigger = lorakit_source(tiny_llama, dict(target_modules=["q_proj", "v_proj"], r=8))
    with pytest.raises(OSError, match="No space left"):
        bigger.save_pretrained(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == old  # no temp files either


def two_linears():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))


FULL_DISK = textwrap.dedent("""
    import os, resource, signal, sys
    import torch
    from lorakit import LoraConfig, get_peft_model

    folder = sys.argv[1]
    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)),
                           LoraConfig(target_modules=["0", "1"], r=64, init_lora_weights=False))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16000, 16000))  # no file may grow past 16 kB: a "full disk"
    try:  # Python ignores SIGXFSZ, so the oversized write fails with EFBIG
        model.save_pretrained(folder)
    except OSError as e:
        print("save failed:", e, flush=True)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # now the kernel kills the process mid-write
    model.save_pretrained(folder)
""")


def test_full_disk_in_a_subprocess_keeps_the_old_adapter(tmp_path):
    """Real short writes (RLIMIT_FSIZE) in a subprocess: one save fails with EFBIG, the next is killed by
    SIGXFSZ midway; the old adapter stays whole and loads."""
    folder = tmp_path / "adapter"
    get_peft_model(two_linears(), LoraConfig(target_modules=["0", "1"], r=2, init_lora_weights=False)).save_pretrained(folder)
    old = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert set(old) == {CARD, CONFIG, SAFE} and len(old[SAFE]) < 16_000

    script = tmp_path / "save.py"
    script.write_text(FULL_DISK)
    done = subprocess.run([sys.executable, str(script), str(folder)], env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=120)
    assert "save failed: " in done.stdout and "File too large" in done.stdout, done.stdout + done.stderr[-2000:]
    assert done.returncode < 0, done.stderr[-2000:]  # killed by SIGXFSZ
    # a killed writer can leave a hidden temporary file behind, never a broken adapter
    assert {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")} == old
    model = PeftModel.from_pretrained(two_linears(), folder)
    assert isinstance(model.base_model.model[0], LoraLayer) and model.base_model.model[0].r["default"] == 2


def test_load_adapter_into_an_existing_adapter_overwrites_its_weights(tmp_path):
    """PEFT's behaviour (trainers reload checkpoints this way): same name, same settings -> weights replaced."""
    kw = dict(target_modules=["q_proj", "v_proj"], r=4)
    source = lorakit_source(tiny_llama, kw)
    source.save_pretrained(tmp_path)
    model = get_peft_model(tiny_llama(), LoraConfig(**kw))
    model.add_adapter("other", LoraConfig(target_modules=["k_proj"]))
    x = token_ids()
    assert (run(model, x) - run(source, x)).abs().max() > 1e-3
    model.load_adapter(tmp_path, "default")
    torch.testing.assert_close(run(model, x), run(source, x), rtol=0, atol=0)
    assert list(model.peft_config) == ["default", "other"]


def test_saved_files_get_ordinary_permissions(tmp_path):
    import os
    import stat

    lorakit_source(tiny_llama, dict(target_modules=["q_proj"])).save_pretrained(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for name in (CONFIG, SAFE):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask
