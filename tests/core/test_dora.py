"""DoRA (``use_dora=True``): the output is ``m / ‖W + s·B@A‖ ⊙ (W x + s·B A x) + b`` for every layer kind (float64
dense reference, and PEFT itself for outputs, gradients and files both ways); merge → unmerge gives back the
weights bit for bit in three dtypes, also with several DoRA adapters and DoRA/LoRA mixes in one layer; the places
where lorakit deliberately differs from PEFT (dropout, zero-norm rows, merging several adapters) each have a test
that names them."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import CustomNet, custom_inputs, lorakit_and_peft, tiny_gpt2, tiny_llama, token_ids
from reference import dense_dora_weight

import lorakit
from lorakit import LoraConfig, LoraLayer, PeftModel, get_peft_model
from lorakit.layers import Conv, Embedding, Linear

INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def perturb_magnitudes(model, factor=0.3, seed=0):
    """Move every magnitude away from its initial norm (else ``g = 1`` and DoRA equals LoRA)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_magnitude_vector" in name:
                p.mul_(1 + factor * torch.randn(p.shape, generator=g, dtype=p.dtype))


def copy_magnitudes(src, dst):
    theirs = dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "lora_magnitude_vector" in name:
                theirs[name].copy_(p)


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv3d = nn.Conv3d(2, 3, kernel_size=(2, 3, 3), padding=1)

    def forward(self, x):
        return self.conv3d(x)


# -- the formula ---------------------------------------------------------------------------------------------------
def _layers_float64():
    torch.manual_seed(0)
    from transformers.pytorch_utils import Conv1D

    gpt2 = Conv1D(5, 7)  # in 7, out 5, weight stored 7 × 5
    nn.init.normal_(gpt2.bias)
    return {
        "linear": (Linear(nn.Linear(7, 5)), torch.randn(3, 4, 7)),
        "linear-no-bias": (Linear(nn.Linear(7, 5, bias=False)), torch.randn(3, 7)),
        "gpt2-conv1d": (Linear(gpt2), torch.randn(3, 4, 7)),
        "embedding": (Embedding(nn.Embedding(11, 6)), torch.randint(0, 11, (3, 4))),
        "conv1d": (Conv(nn.Conv1d(4, 5, 3, padding=1)), torch.randn(2, 4, 9)),
        "conv2d": (Conv(nn.Conv2d(3, 4, (3, 2), stride=(1, 2), padding=1)), torch.randn(2, 3, 6, 6)),
        "conv3d": (Conv(nn.Conv3d(2, 3, 2)), torch.randn(2, 2, 4, 4, 4)),
    }


def _dense_output(layer, x, weight):
    base = layer.base_layer
    if isinstance(layer, Embedding):
        return F.embedding(x, weight)
    if isinstance(layer, Conv):
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
        bias = None if base.bias is None else base.bias.double()
        return conv(x, weight, bias, base.stride, base.padding, base.dilation)
    weight = weight.T if layer.fan_in_fan_out else weight
    return F.linear(x, weight, None if base.bias is None else base.bias.double())


@pytest.mark.parametrize("kind", list(_layers_float64()))
def test_output_is_the_dense_float64_dora_formula(kind):
    layer, x = _layers_float64()[kind]
    layer = layer.double()
    layer.update_layer("default", 3, 6, init_lora_weights=False, use_dora=True)
    layer.set_adapter("default")
    layer.eval()
    perturb_magnitudes(layer)
    x = x if not x.is_floating_point() else x.double()
    expected = _dense_output(layer, x, dense_dora_weight(layer))
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kind", list(_layers_float64()))
def test_fresh_dora_adapter_changes_nothing_bit_for_bit(kind):
    layer, x = _layers_float64()[kind]
    before = layer.base_layer(x)
    layer.update_layer("default", 3, 6, use_dora=True)  # B (embeddings: A) starts at zero; m = ‖W‖
    layer.set_adapter("default")
    assert torch.equal(layer(x), before)


# -- against PEFT: outputs, gradients, files -----------------------------------------------------------------------
def seeded(make):
    def build():
        torch.manual_seed(0)
        return make().eval()
    return build


MODELS = {
    "custom (Embedding, Conv1d, Conv2d, Linear)": (seeded(lambda: CustomNet(dilation=(1, 1))), custom_inputs,
                                                   ["emb", "conv1d", "conv2d", "lin1", "lin2"]),
    "conv3d": (seeded(Conv3dNet), lambda: torch.randn(2, 2, 4, 5, 5), ["conv3d"]),
    "gpt2 (Conv1D, Embedding)": (lambda: tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), token_ids, ["c_attn", "c_proj", "c_fc", "wte"]),
    "llama all-linear": (tiny_llama, token_ids, "all-linear"),
}


def _logits(out):
    return getattr(out, "logits", out)


@pytest.mark.parametrize("case", list(MODELS))
@pytest.mark.parametrize("training", [False, True])
def test_outputs_and_gradients_equal_peft(case, training):
    make, inputs, targets = MODELS[case]
    torch.manual_seed(0)
    ours, theirs = lorakit_and_peft(make(), dict(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True,
                                                 target_modules=targets))
    perturb_magnitudes(ours)
    copy_magnitudes(ours, theirs)
    ours.train(training), theirs.train(training)
    x = inputs()
    a, b = _logits(ours(x)), _logits(theirs(x))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    a.square().sum().backward()
    b.square().sum().backward()
    theirs_params = dict(theirs.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            expected = theirs_params[name].grad
            size = float(expected.abs().max())
            assert size > 1e-3, name  # a gradient worth comparing
            # atol 1e-5 on gradients scaled to at most 1 (conv3d's reach 50, where float32 rounding is 1.5e-5)
            torch.testing.assert_close(p.grad, expected, atol=1e-5 * max(1.0, size), rtol=0)
            checked += "lora_magnitude_vector" in name
    assert checked >= 1


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_half_precision_bases_match_peft_to_rounding(dtype, atol):
    """Adapters (magnitudes included) stay float32 on a half-precision base, in both libraries; the outputs agree
    to the base dtype's rounding (bf16: 2⁻⁸ relative)."""
    ours, theirs = lorakit_and_peft(tiny_llama().to(dtype), dict(r=4, lora_alpha=8, init_lora_weights=False,
                                                                 use_dora=True, target_modules="all-linear"))
    perturb_magnitudes(ours)
    copy_magnitudes(ours, theirs)
    assert {p.dtype for n, p in ours.named_parameters() if "magnitude" in n} == {torch.float32}
    ids = token_ids()
    a, b = ours(ids).logits, theirs(ids).logits
    assert a.dtype == b.dtype == dtype
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=0)


def test_magnitudes_have_peft_shapes_and_start_at_the_norm():
    torch.manual_seed(0)
    ours, theirs = lorakit_and_peft(CustomNet(dilation=(1, 1)).eval(), dict(r=2, use_dora=True,
                                    target_modules=["emb", "conv1d", "conv2d", "lin1"]))
    mine = {k: v for k, v in ours.state_dict().items() if "magnitude" in k}
    peft = {k: v for k, v in theirs.state_dict().items() if "magnitude" in k}
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in peft.items()}
    assert {k: tuple(v.shape) for k, v in mine.items()}["base_model.model.conv2d.lora_magnitude_vector.default.weight"] \
        == (1, 4, 1, 1)
    torch.manual_seed(0)
    fresh = get_peft_model(CustomNet(dilation=(1, 1)), LoraConfig(r=2, use_dora=True,
                           target_modules=["emb", "conv1d", "conv2d", "lin1"]))
    for key, value in {k: v for k, v in fresh.state_dict().items() if "magnitude" in k}.items():
        torch.testing.assert_close(value, peft[key], atol=1e-6, rtol=1e-6)  # ‖W‖ per output, as PEFT
    assert dict(fresh.base_model.model.lin1.use_dora) == {"default": True}


@pytest.mark.parametrize("case", ["custom (Embedding, Conv1d, Conv2d, Linear)", "gpt2 (Conv1D, Embedding)",
                                  "conv3d"])
def test_files_both_ways_with_peft(case, tmp_path):
    import peft

    make, inputs, targets = MODELS[case]
    torch.manual_seed(0)
    kw = dict(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True, target_modules=targets)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**kw))
    perturb_magnitudes(theirs, seed=1)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    x = inputs()
    expected = _logits(theirs(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing of the file is dropped
        ours = PeftModel.from_pretrained(make(), tmp_path / "peft")
    torch.testing.assert_close(_logits(ours(x)), expected, atol=1e-5, rtol=0)

    perturb_magnitudes(ours, seed=2)  # lorakit's own values now
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(1.5)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(back(x)), _logits(ours(x)), atol=1e-5, rtol=0)
    from safetensors.torch import load_file

    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == sorted(
        load_file(tmp_path / "peft" / "adapter_model.safetensors"))


def test_two_active_dora_adapters_and_a_lora_one_compose_as_in_peft():
    import peft

    torch.manual_seed(0)
    base = tiny_llama()
    kw = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(use_dora=True, **kw))
    theirs = peft.get_peft_model(base, peft.LoraConfig(use_dora=True, **kw))
    for name, dora in (("b", True), ("c", False), ("d", True)):
        ours.add_adapter(name, LoraConfig(use_dora=dora, **kw))
        theirs.add_adapter(name, peft.LoraConfig(use_dora=dora, **kw))
    perturb_magnitudes(ours)
    ours.load_state_dict(theirs.state_dict() | {k: v for k, v in ours.state_dict().items() if "magnitude" in k})
    copy_magnitudes(ours, theirs)
    ids = token_ids()
    for active in (["default", "b"], ["b", "c", "d"], ["c", "default"], ["d"]):
        ours.base_model.set_adapter(active)
        theirs.base_model.set_adapter(active)
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)


# -- merging -------------------------------------------------------------------------------------------------------
ARCHS = {  # model, targets: every layer kind, fan_in_fan_out and a tied embedding among them
    "llama": (tiny_llama, ["q_proj", "v_proj", "embed_tokens", "down_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc", "wte"]),
    "convs": (lambda: CustomNet(dilation=(1, 1)), ["emb", "conv1d", "conv2d", "lin1"]),
}


def _model_with_adapters(dtype, dora_flags, arch="llama"):
    make, targets = ARCHS[arch]
    torch.manual_seed(0)
    base = make().to(dtype)
    kw = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=list(targets))
    model = get_peft_model(base, LoraConfig(use_dora=dora_flags[0], **kw), adapter_name="a0")
    for i, dora in enumerate(dora_flags[1:], start=1):
        model.add_adapter(f"a{i}", LoraConfig(use_dora=dora, **kw))
    perturb_magnitudes(model, factor=0.2)
    return model


def _bits(model):
    return {n: p.detach().clone().view(INT[p.dtype]) for n, p in model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flags", [(True,), (True, True), (True, False, True), (False, True)],
                         ids=["one-dora", "two-dora", "dora-lora-dora", "lora-dora"])
def test_merge_unmerge_restores_the_weights_bit_for_bit_over_many_cycles(dtype, flags, arch):
    model = _model_with_adapters(dtype, flags, arch)
    names = [f"a{i}" for i in range(len(flags))]
    original = _bits(model)
    for cycle in range(6):
        order = names if cycle % 2 == 0 else names[::-1]
        model.merge_adapter(order[: 1 + cycle % len(order)])
        model.merge_adapter(order)  # the rest in a second call
        assert sorted(model.merged_adapter_names()) == sorted(names)
        model.unmerge_adapter()
        now = _bits(model)
        assert all(torch.equal(now[k], original[k]) for k in original), cycle


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("flags", [(True, True), (True, False), (False, True), (True, False, True)])
def test_merged_adapters_give_the_unmerged_outputs(flags, arch):
    """PEFT issue 3608: two DoRA adapters merged into one layer gave 2.6–13.9 % output error."""
    model = _model_with_adapters(torch.float32, flags, arch).eval()
    names = [f"a{i}" for i in range(len(flags))]
    model.base_model.set_adapter(names)
    ids = custom_inputs() if arch == "convs" else token_ids()
    unmerged = _logits(model(ids))
    model.merge_adapter(names)
    torch.testing.assert_close(_logits(model(ids)), unmerged, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    model.merge_adapter(names[:1])  # one now, the others later: still the outputs the forward gave
    model.merge_adapter(names[1:])
    torch.testing.assert_close(_logits(model(ids)), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("targets", [["c_attn", "c_fc"], ["wte"]])
def test_fan_in_fan_out_and_embedding_merge_rescale_the_output_axis(targets, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, init_lora_weights=False, use_dora=True,
                                                   target_modules=targets))
    perturb_magnitudes(model)
    ids = token_ids()
    unmerged = model(ids).logits
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(ids).logits, unmerged, atol=1e-5, rtol=0)
    for name, module in model.named_modules():  # nothing of lorakit left
        assert not isinstance(module, LoraLayer), name


def test_merged_weight_equals_the_dense_dora_weight():
    layer = Linear(nn.Linear(16, 12))
    layer.update_layer("default", 4, 8, init_lora_weights=False, use_dora=True)
    perturb_magnitudes(layer)
    expected = dense_dora_weight(layer)
    layer.merge(["default"])
    torch.testing.assert_close(layer.base_layer.weight.double(), expected, atol=1e-6, rtol=1e-6)
    assert layer.merge_records["default"].nbytes > 0


def test_non_finite_magnitude_is_refused_before_any_layer_changes():
    model = _model_with_adapters(torch.float32, (True,))
    before = _bits(model)
    layer = model.base_model.model.model.layers[2].mlp.down_proj  # the last adapted layer
    with torch.no_grad():
        layer.lora_magnitude_vector["a0"].weight[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite magnitude"):
        model.merge_adapter(["a0"])
    assert not model.merged_adapter_names()
    now = _bits(model)
    assert all(torch.equal(now[k], before[k]) for k in before)


def test_safe_merge_refuses_a_non_finite_result_and_changes_nothing():
    layer = Linear(nn.Linear(8, 6))
    layer.update_layer("default", 2, 4, init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        layer.lora_B["default"].weight[2] = 1e38
        layer.lora_A["default"].weight.fill_(1e38)  # s·B@A overflows
    before = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(["default"], safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged


# -- PEFT's DoRA bugs, not copied ------------------------------------------------------------------------------------
def test_norm_of_huge_rows_does_not_overflow():
    """‖W + s·B@A‖ of a row near 1e38 is finite although its square is not: the merged row is ``m`` times a unit
    direction, as in the dense reference."""
    layer = Linear(nn.Linear(8, 6))
    layer.update_layer("default", 2, 4, init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        layer.lora_B["default"].weight[2] = 1e37
    expected = dense_dora_weight(layer)
    layer.merge(["default"])
    torch.testing.assert_close(layer.base_layer.weight.double(), expected, atol=1e-6, rtol=1e-5)


def test_zero_norm_row_gives_no_nan():
    """PEFT issue 2049: a row of ``W + s·B@A`` that is exactly zero divides by zero in PEFT. Here its norm counts
    as 1, so the row's output is its bias."""
    base = nn.Linear(6, 4)
    with torch.no_grad():
        base.weight[1] = 0
    layer = Linear(base)
    layer.update_layer("default", 2, 4, use_dora=True)  # B = 0, so row 1 of W + s·B@A is zero
    layer.set_adapter("default")
    x = torch.randn(3, 6)
    y = layer(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, 1], base.bias[1].expand(3))
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    layer.merge(["default"])
    assert torch.isfinite(layer.base_layer.weight).all()
    layer.unmerge()


def test_dropout_acts_on_the_lora_branch_only():
    """PEFT issue 2107: with dropout PEFT runs the base layer a second time on the dropped input, so its output is
    ``W x + b + (g − 1)·W·dropout(x) + g·s·B A dropout(x)``. Here it is ``g ⊙ (W x + s·B A dropout(x)) + b``: with a
    zero ``B`` it is exactly ``g ⊙ W x + b`` whatever the mask."""
    torch.manual_seed(0)
    layer = Linear(nn.Linear(16, 8))
    layer.update_layer("default", 4, 8, lora_dropout=0.5, use_dora=True)  # B = 0
    layer.set_adapter("default")
    perturb_magnitudes(layer)
    layer.train()
    x = torch.randn(5, 16)
    with torch.no_grad():
        g = layer.lora_magnitude_vector["default"].weight / layer.base_layer.weight.norm(dim=1)
    expected = g * (x @ layer.base_layer.weight.T) + layer.base_layer.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)


def test_dropout_training_matches_the_formula_in_expectation():
    torch.manual_seed(0)
    layer = Linear(nn.Linear(6, 4).double())
    layer.update_layer("default", 2, 4, lora_dropout=0.3, init_lora_weights=False, use_dora=True)
    layer.set_adapter("default")
    perturb_magnitudes(layer)
    x = torch.randn(1, 6, dtype=torch.float64)
    layer.eval()
    expected = layer(x)
    layer.train()
    with torch.no_grad():
        mean = torch.stack([layer(x) for _ in range(20000)]).mean(0)
    torch.testing.assert_close(mean, expected, atol=0.02, rtol=0)


# -- caching ---------------------------------------------------------------------------------------------------------
def test_eval_cache_follows_changes_of_factors_magnitude_and_weight():
    layer = Linear(nn.Linear(8, 6)).double()
    layer.update_layer("default", 2, 4, init_lora_weights=False, use_dora=True)
    layer.set_adapter("default")
    layer.eval()
    x = torch.randn(3, 8, dtype=torch.float64)

    def check():
        torch.testing.assert_close(layer(x), F.linear(x, dense_dora_weight(layer), layer.base_layer.bias.double()),
                                   atol=1e-12, rtol=1e-10)

    check()
    check()  # from the cache
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(2)
    check()
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.add_(0.5)
    check()
    with torch.no_grad():
        layer.base_layer.weight.mul_(0.5)
    check()
    layer.lora_A["default"].weight = nn.Parameter(torch.randn(2, 8, dtype=torch.float64))
    check()
    layer.merge(["default"])
    layer.unmerge()
    check()


# -- the rest of the API ---------------------------------------------------------------------------------------------
def test_disable_delete_and_trainable_parameters():
    model = _model_with_adapters(torch.float32, (True, False))
    ids = token_ids()
    with model.disable_adapter():
        bare = model(ids).logits
    base = copy.deepcopy(model).base_model.unload()
    torch.testing.assert_close(bare, base(ids).logits, atol=0, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_magnitude_vector.a0.weight" in n for n in trainable)
    model.base_model.set_adapter("a1")
    assert not any("lora_magnitude_vector" in n for n, p in model.named_parameters() if p.requires_grad)
    model.delete_adapter("a0")
    assert not any("lora_magnitude_vector" in n for n, _ in model.named_parameters())


def test_mixed_batch_rows_with_dora_adapters():
    model = _model_with_adapters(torch.float32, (True, False, True)).eval()
    ids = token_ids(n=4)
    rows = ["a0", "a1", "__base__", "a2"]
    mixed = model(ids, adapter_names=rows).logits
    for i, name in enumerate(rows):
        if name == "__base__":
            with model.disable_adapter():
                single = model(ids[i:i + 1]).logits
        else:
            model.base_model.set_adapter(name)
            single = model(ids[i:i + 1]).logits
        torch.testing.assert_close(mixed[i:i + 1], single, atol=1e-5, rtol=0)


def test_training_step_moves_the_magnitude_and_save_load_round_trip(tmp_path):
    model = _model_with_adapters(torch.float32, (True,)).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "magnitude" in n}
    ids = token_ids()
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    model.eval()
    expected = model(ids).logits
    model.save_pretrained(tmp_path, selected_adapters=["a0"])
    import json

    assert json.loads((tmp_path / "a0" / "adapter_config.json").read_text())["use_dora"] is True
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a0")
    torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-6, rtol=0)


def test_refusals_name_the_problem():
    model = _model_with_adapters(torch.float32, (True, False))
    with pytest.raises(ValueError, match=r"\['a0'\].*DoRA"):
        model.add_weighted_adapter(["a0", "a1"], [0.5, 0.5], "mix", combination_type="cat")
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=2"):
        get_peft_model(grouped, LoraConfig(r=2, target_modules=["0"], use_dora=True))
    assert isinstance(grouped[0], nn.Conv2d)  # rolled back
    with pytest.raises(TypeError, match="use_dora"):
        LoraConfig(use_dora="yes")

    class Custom(LoraLayer):
        pass

    layer = Custom(nn.Linear(3, 3))
    with pytest.raises(NotImplementedError, match="use_dora=True is not supported for Custom"):
        layer.set_dora("default", True)


def test_config_round_trip_keeps_use_dora():
    config = LoraConfig(use_dora=True)
    assert LoraConfig.from_dict(config.to_dict()).use_dora is True
    assert lorakit.LoraConfig().use_dora is False


def test_overwriting_a_lora_adapter_with_a_dora_file_is_refused(tmp_path):
    dora = _model_with_adapters(torch.float32, (True,))
    dora.save_pretrained(tmp_path, selected_adapters=["a0"])
    plain = _model_with_adapters(torch.float32, (False,))
    with pytest.raises(ValueError, match="use_dora"):
        plain.load_adapter(tmp_path / "a0", adapter_name="a0")
    assert not any("magnitude" in n for n, _ in plain.named_parameters())


def test_functional_state_dict_api_has_peft_keys_for_magnitudes():
    import peft

    ours, theirs = lorakit_and_peft(tiny_llama(), dict(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True,
                                                       target_modules=["q_proj", "embed_tokens"]))
    mine, reference = lorakit.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert sorted(mine) == sorted(reference)
    assert "base_model.model.model.embed_tokens.lora_magnitude_vector" in mine
    assert all(torch.equal(mine[k], reference[k]) for k in mine)
    moved = {k: v * 1.1 for k, v in reference.items()}
    lorakit.set_peft_model_state_dict(ours, moved)
    peft.set_peft_model_state_dict(theirs, moved)
    ids = token_ids()
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)


def test_exports_that_cannot_carry_magnitudes_refuse_dora_adapters():
    from lorakit.convert_kohya import peft_to_kohya, to_kohya

    model = _model_with_adapters(torch.float32, (True,), arch="llama")
    with pytest.raises(ValueError, match="DoRA"):
        to_kohya(model, "a0")
    state = lorakit.get_peft_model_state_dict(model, adapter_name="a0")
    with pytest.raises(ValueError, match="DoRA"):
        peft_to_kohya(state, model.peft_config["a0"])
    from lorakit.integrations.diffusers_export import to_diffusers

    with pytest.raises(ValueError, match="DoRA"):
        to_diffusers(model, "a0")


def test_layers_without_dora_refuse_it_by_name():
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(NotImplementedError, match="use_dora=True is not supported for nn.MultiheadAttention"):
        get_peft_model(mha, LoraConfig(r=2, target_modules=["0"], use_dora=True))
    assert isinstance(mha[0], nn.MultiheadAttention)  # rolled back
    with pytest.raises(NotImplementedError, match="use_dora=True cannot be used with target_parameters"):
        get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=[], target_parameters=["q_proj.weight"],
                                                use_dora=True))
    with pytest.raises(ValueError, match="lora_bias"):
        LoraConfig(use_dora=True, lora_bias=True)


def test_torch_compile_traces_dora_without_graph_breaks():
    """Under ``torch.compile`` the norms are recomputed in the graph (no caches, no data-dependent branch)."""
    import torch._dynamo

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, init_lora_weights=False, use_dora=True,
                                                    target_modules="all-linear")).eval()
    perturb_magnitudes(model)
    ids = token_ids()
    expected = model(ids).logits
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_break_count == 0, explained.break_reasons[:3]
    torch.testing.assert_close(torch.compile(model)(ids).logits, expected, atol=1e-5, rtol=0)


def test_set_scale_moves_the_norm_with_the_update():
    layer = Linear(nn.Linear(8, 6)).double()
    layer.update_layer("default", 2, 4, init_lora_weights=False, use_dora=True)
    layer.set_adapter("default")
    layer.eval()
    x = torch.randn(3, 8, dtype=torch.float64)
    layer(x)  # the norm is cached now
    layer.set_scale("default", 0.5)
    expected = F.linear(x, dense_dora_weight(layer), layer.base_layer.bias.double())
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=1e-10)


def test_hotswap_replaces_factors_and_magnitudes(tmp_path):
    from lorakit.hotswap import hotswap_adapter

    first = _model_with_adapters(torch.float32, (True,)).eval()
    second = _model_with_adapters(torch.float32, (True,)).eval()
    perturb_magnitudes(second, seed=7)
    with torch.no_grad():
        for name, p in second.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(2)
    second.save_pretrained(tmp_path, selected_adapters=["a0"])
    ids = token_ids()
    first(ids)  # caches filled
    hotswap_adapter(first, tmp_path / "a0", adapter_name="a0")
    torch.testing.assert_close(first(ids).logits, second(ids).logits, atol=1e-5, rtol=0)
