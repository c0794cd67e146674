"""add_weighted_adapter: cat and svd against the dense weighted sum in float64, every type against PEFT on the
same adapters, the cases where PEFT is wrong (each named), the pure merge functions against PEFT's, and bad
input."""

import contextlib
import copy
import math
import warnings

import peft
import pytest
import torch
from peft.utils import merge_utils
from torch import nn

import lorakit
from conftest import CustomNet, custom_inputs, tiny_gpt2, token_ids
from reference import dense_update, scale_of
from lorakit import combine

TARGETS = ["emb", "conv1d", "conv2d", "lin1", "lin2"]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def with_adapters(base, configs, lib=lorakit):
    """``base`` wrapped by ``lib`` with one adapter per ``configs`` entry (random A and B)."""
    names = list(configs)
    make = lambda n: lib.LoraConfig(**(dict(init_lora_weights=False) | configs[n]))  # noqa: E731
    model = lib.get_peft_model(base, make(names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, make(name))
    return model


def pair(base, configs):
    """The same adapters in lorakit and in PEFT (PEFT's A/B copied into lorakit's), on copies of ``base``."""
    twin = copy.deepcopy(base)
    ours, theirs = with_adapters(base, configs), with_adapters(twin, configs, peft)
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours.eval(), theirs.eval()


def layers(model):
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if isinstance(m, (lorakit.LoraLayer, PeftLoraLayer))}


def update(layer, adapter):
    """Independent dense reference: ``s·B@A`` as an ``out × in·k`` matrix in float64, ``s`` from alpha and r."""
    r, alpha = layer.r[adapter], layer.lora_alpha[adapter]
    return dense_update(*layer.factors(adapter), scale_of(alpha, r, layer.use_rslora[adapter]))


def weighted_sum(layer, adapters, weights):
    return sum(w * update(layer, a) for a, w in zip(adapters, weights) if a in layer.r)


def snapshot(model):
    return (list(model.peft_config), {k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()])


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][k], before[1][k]) for k in before[1])


@contextlib.contextmanager
def float64_default():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def fixed_bernoulli(probs, generator=None, **kwargs):
    """A deterministic stand-in for torch.bernoulli: the same mask for the same shape and probability, whoever
    asks (PEFT or lorakit), so DARE can be compared entry by entry."""
    index = torch.arange(probs.numel(), device=probs.device)
    uniform = ((index * 2654435761) % 10007).to(probs.dtype) / 10007
    return (uniform < probs.flatten()).to(probs.dtype).view_as(probs)


DIFFERENT = {  # different ranks, alphas, rsLoRA, rank and alpha patterns, partly different targets
    "x": dict(r=2, lora_alpha=4, target_modules=TARGETS),
    "y": dict(r=3, lora_alpha=5, use_rslora=True, target_modules=["emb", "conv1d", "lin1"],
              rank_pattern={"lin1": 4}, alpha_pattern={"conv1d": 7}),
    "z": dict(r=1, lora_alpha=0.5, target_modules=["conv2d", "lin1", "lin2"]),
}


# ----------------------------------------------------------------------------------------------------------------
# exactness: cat and svd against the dense weighted sum
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_cat_and_full_rank_svd_equal_the_dense_weighted_sum(combination_type):
    torch.manual_seed(0)
    model = with_adapters(CustomNet().double(), DIFFERENT)
    adapters, weights = ["x", "y", "z"], [0.7, -1.3, 2.0]
    extra = dict(svd_rank=8) if combination_type == "svd" else {}  # 8 = the largest Σ rᵢ of any layer
    model.add_weighted_adapter(adapters, weights, "mix", combination_type, **extra)
    for name, layer in layers(model).items():
        expected = weighted_sum(layer, adapters, weights)
        torch.testing.assert_close(update(layer, "mix"), expected, atol=1e-10, rtol=0, msg=name)
        assert layer.scaling["mix"] == 1.0
        present = [a for a in adapters if a in layer.r]
        if combination_type == "cat":
            assert layer.r["mix"] == sum(layer.r[a] for a in present)
    assert model.active_adapters == ["x"]  # the new adapter is added, not activated


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_unit_weights_give_the_outputs_of_both_adapters_active(combination_type):
    torch.manual_seed(0)
    model = with_adapters(CustomNet().double(), DIFFERENT).eval()
    extra = dict(svd_rank=8) if combination_type == "svd" else {}
    model.add_weighted_adapter(["x", "y", "z"], [1, 1, 1], "mix", combination_type, **extra)
    x = custom_inputs()
    model.set_adapter(["x", "y", "z"])
    together = model(x)
    model.set_adapter("mix")
    torch.testing.assert_close(model(x), together, atol=1e-10, rtol=0)


def test_gpt2_conv1d_and_tied_embedding_float32():
    configs = {"x": dict(r=4, lora_alpha=8, target_modules=["wte", "c_attn", "c_fc"]),
               "y": dict(r=2, lora_alpha=3, target_modules=["c_attn", "c_proj"])}
    model = with_adapters(tiny_gpt2(), configs)
    for t in ("cat", "svd"):
        model.add_weighted_adapter(["x", "y"], [0.5, 1.5], t, t, **(dict(svd_rank=6) if t == "svd" else {}))
        for name, layer in layers(model).items():
            torch.testing.assert_close(update(layer, t), weighted_sum(layer, ["x", "y"], [0.5, 1.5]),
                                       atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("combination_type", ["cat", "svd", "linear"])
def test_plus_and_minus_the_same_adapter_is_zero(combination_type):
    torch.manual_seed(0)
    model = with_adapters(CustomNet().double(), {"x": DIFFERENT["x"]})
    model.add_weighted_adapter(["x", "x"], [1.0, -1.0], "zero", combination_type)
    for name, layer in layers(model).items():
        assert update(layer, "x").abs().max() > 0.1
        assert update(layer, "zero").abs().max() < 1e-12, name


@pytest.mark.parametrize("k", [1, 2, 3])
def test_truncated_svd_is_the_best_rank_k_approximation(k):
    torch.manual_seed(0)
    model = with_adapters(CustomNet().double(), DIFFERENT)
    adapters, weights = ["x", "y", "z"], [0.7, -1.3, 2.0]
    model.add_weighted_adapter(adapters, weights, "low", "svd", svd_rank=k)
    for name, layer in layers(model).items():
        full = weighted_sum(layer, adapters, weights)
        singular = torch.linalg.svdvals(full)
        approx = update(layer, "low")
        assert layer.r["low"] == min(k, *full.shape)
        assert torch.linalg.matrix_rank(approx) <= k
        # Eckart–Young: no rank-k matrix is closer, and the best one misses exactly the tail singular values
        torch.testing.assert_close(torch.linalg.norm(full - approx), singular[k:].square().sum().sqrt(),
                                   atol=1e-10, rtol=0, msg=name)
        # and it is the projection of the sum onto its top-k singular subspace
        U, _, Vh = torch.linalg.svd(full)
        torch.testing.assert_close(approx, U[:, :k] @ U[:, :k].T @ full @ Vh[:k].T @ Vh[:k], atol=1e-10, rtol=0)


def test_svd_default_rank_is_the_largest_rank_and_capped_by_the_layer():
    torch.manual_seed(0)
    model = with_adapters(CustomNet().double(), DIFFERENT)
    model.add_weighted_adapter(["x", "y", "z"], [1, 1, 1], "mix", "svd")
    for layer in layers(model).values():
        A, _ = layer.factors("x")
        assert layer.r["mix"] == min(4, layer.factors("x")[1].shape[0], A.flatten(1).shape[1])


# ----------------------------------------------------------------------------------------------------------------
# the same numbers as PEFT
# ----------------------------------------------------------------------------------------------------------------
EQUAL_RANKS = {  # factor-wise types need equal ranks; alphas differ, so do the scalings
    "x": dict(r=3, lora_alpha=4, target_modules=["emb", "conv2d", "lin1", "lin2"]),
    "y": dict(r=3, lora_alpha=9, target_modules=["emb", "conv2d", "lin1"]),
    "z": dict(r=3, lora_alpha=2, target_modules=["conv2d", "lin1", "lin2"], alpha_pattern={"lin1": 5}),
}
MIXED_RANKS = {  # PEFT's svd family fails on Conv1d, and on lin2 (3 outputs) at rank 4: see the tests below
    "x": dict(r=2, lora_alpha=4, target_modules=["emb", "conv2d", "lin1"]),
    "y": dict(r=4, lora_alpha=3, target_modules=["emb", "conv2d", "lin1"], rank_pattern={"lin1": 3}),
    "z": dict(r=1, lora_alpha=6, target_modules=["conv2d", "lin1"], alpha_pattern={"lin1": 5}),
}
CASES = [
    ("cat", MIXED_RANKS, {}),
    ("svd", MIXED_RANKS, {}),
    ("svd", MIXED_RANKS, dict(svd_rank=2)),
    ("svd", MIXED_RANKS, dict(svd_rank=3, svd_clamp=0.9)),
    ("svd", MIXED_RANKS, dict(svd_full_matrices=False)),
    ("linear", EQUAL_RANKS, {}),
    ("ties", EQUAL_RANKS, dict(density=0.5)),
    ("ties", EQUAL_RANKS, dict(density=0.3, majority_sign_method="frequency")),
    ("dare_linear", EQUAL_RANKS, dict(density=0.6)),
    ("dare_ties", EQUAL_RANKS, dict(density=0.4)),
    ("dare_ties", EQUAL_RANKS, dict(density=0.4, majority_sign_method="frequency")),
    ("magnitude_prune", EQUAL_RANKS, dict(density=0.5)),
    ("ties_svd", MIXED_RANKS, dict(density=0.5)),
    ("ties_svd", MIXED_RANKS, dict(density=0.5, svd_rank=2, majority_sign_method="frequency")),
    ("dare_linear_svd", MIXED_RANKS, dict(density=0.7)),
    ("dare_ties_svd", MIXED_RANKS, dict(density=0.7, svd_clamp=0.95)),
    ("magnitude_prune_svd", MIXED_RANKS, dict(density=0.3)),
]


@pytest.mark.parametrize("combination_type, configs, options", CASES,
                         ids=[f"{t}-{'-'.join(map(str, o.values()))}" for t, _, o in CASES])
def test_matches_peft(combination_type, configs, options, monkeypatch):
    monkeypatch.setattr(torch, "bernoulli", fixed_bernoulli)  # DARE with a fixed mask, the same for both
    torch.manual_seed(0)
    ours, theirs = pair(CustomNet(dilation=(1, 1)).double(), configs)
    adapters, weights = list(configs), [0.8, -0.6, 1.3]
    ours.add_weighted_adapter(adapters, weights, "mix", combination_type, **options)
    with float64_default():  # PEFT makes its weight tensors with torch.tensor(list): float64 here, as our maths
        theirs.add_weighted_adapter(adapters, weights, "mix", combination_type, **options)
    peft_layers = layers(theirs)
    for name, layer in layers(ours).items():
        expected = peft_layers[name].get_delta_weight("mix")
        torch.testing.assert_close(layer.delta_weight("mix"), expected, atol=1e-9, rtol=0, msg=name)
    ours.set_adapter("mix"), theirs.set_adapter("mix")
    x = custom_inputs()
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-9, rtol=0)


@pytest.mark.parametrize("combination_type, options", [("cat", {}), ("svd", {}), ("linear", {}),
                                                       ("ties", dict(density=0.5)),
                                                       ("dare_ties_svd", dict(density=0.5))])
def test_matches_peft_on_gpt2(combination_type, options, monkeypatch):
    """GPT-2's Conv1D (weights stored in × out) and its embedding (tied to the LM head)."""
    monkeypatch.setattr(torch, "bernoulli", fixed_bernoulli)
    configs = {"x": dict(r=4, lora_alpha=8, target_modules=["wte", "c_attn", "c_fc"], fan_in_fan_out=True),
               "y": dict(r=4, lora_alpha=3, target_modules=["wte", "c_attn", "c_proj"], fan_in_fan_out=True)}
    ours, theirs = pair(tiny_gpt2(), configs)
    ours.add_weighted_adapter(["x", "y"], [1.2, 0.4], "mix", combination_type, **options)
    theirs.add_weighted_adapter(["x", "y"], [1.2, 0.4], "mix", combination_type, **options)
    peft_layers = layers(theirs)
    for name, layer in layers(ours).items():
        torch.testing.assert_close(layer.delta_weight("mix"), peft_layers[name].get_delta_weight("mix"),
                                   atol=1e-5, rtol=0, msg=name)
    ours.set_adapter("mix"), theirs.set_adapter("mix")
    torch.testing.assert_close(ours(token_ids()).logits, theirs(token_ids()).logits, atol=1e-4, rtol=0)


def test_linear_with_several_adapters_is_not_the_weighted_sum_but_is_peft():
    """PEFT's ``linear`` combines A's and B's separately: cross terms make it differ from Σ wᵢ·ΔWᵢ (documented);
    it is PEFT's number all the same (test_matches_peft)."""
    torch.manual_seed(0)
    model = with_adapters(CustomNet().double(), EQUAL_RANKS)
    model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "lin", "linear")
    layer = layers(model)["lin1"]
    cw = [math.sqrt(layer.scaling[a]) for a in "xy"]
    (A1, B1), (A2, B2) = [[t.double().flatten(1) for t in layer.factors(a)] for a in "xy"]
    expected = (cw[0] * B1 + cw[1] * B2) @ (cw[0] * A1 + cw[1] * A2)  # with cross terms
    torch.testing.assert_close(update(layer, "lin"), expected, atol=1e-10, rtol=0)
    assert (update(layer, "lin") - weighted_sum(layer, "xy", [1, 1])).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------------------------
# where PEFT is wrong (named), and lorakit is right
# ----------------------------------------------------------------------------------------------------------------
def test_peft_bug_rslora_on_the_first_adapter_scales_the_combination_twice():
    """PEFT copies ``use_rslora`` into the new config with ``lora_alpha = r``: its scaling becomes √r instead
    of 1, so the combination comes out √r times too large. lorakit: scaling 1, the exact weighted sum."""
    torch.manual_seed(0)
    configs = {"x": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["lin1", "lin2"]),
               "y": dict(r=5, lora_alpha=2, target_modules=["lin1"])}
    ours, theirs = pair(CustomNet().double(), configs)
    for model in (ours, theirs):
        model.add_weighted_adapter(["x", "y"], [1.0, 0.5], "mix", "cat")
    for name, layer in layers(ours).items():
        expected = weighted_sum(layer, ["x", "y"], [1.0, 0.5])
        torch.testing.assert_close(update(layer, "mix"), expected, atol=1e-10, rtol=0)
        peft_layer = layers(theirs)[name]
        torch.testing.assert_close(peft_layer.get_delta_weight("mix"), math.sqrt(peft_layer.r["mix"]) * expected,
                                   atol=1e-9, rtol=0)


def test_peft_quirk_one_adapter_ignores_the_combination_type():
    """PEFT switches to ``linear`` whenever one adapter is given, so ``svd_rank`` (and ``density``) are silently
    ignored. lorakit applies what was asked: here the best rank-1 approximation."""
    torch.manual_seed(0)
    ours, theirs = pair(CustomNet(dilation=(1, 1)).double(), {"x": dict(r=3, lora_alpha=6, target_modules=["lin1"])})
    for model in (ours, theirs):
        model.add_weighted_adapter(["x"], [2.0], "low", "svd", svd_rank=1)
    ours_layer, peft_layer = layers(ours)["lin1"], layers(theirs)["lin1"]
    full = 2.0 * update(ours_layer, "x")
    assert peft_layer.r["low"] == 3
    torch.testing.assert_close(peft_layer.get_delta_weight("low"), full, atol=1e-10, rtol=0)  # not truncated
    assert ours_layer.r["low"] == 1
    singular = torch.linalg.svdvals(full)
    torch.testing.assert_close(torch.linalg.norm(full - update(ours_layer, "low")), singular[1:].square().sum().sqrt(),
                               atol=1e-10, rtol=0)


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, padding=1)
        self.c3 = nn.Conv3d(2, 3, (1, 2, 2))
        self.pw = nn.Conv2d(3, 5, 1)

    def forward(self, x1, x3, x2):
        return self.c1(x1).sum() + self.c3(x3).sum() + self.pw(x2).sum()


def test_peft_bug_svd_rank_above_a_layers_size_gives_a_broken_adapter():
    """Where the rank exceeds a layer's size (``lin2`` has 3 outputs), PEFT writes a 3×3 B and a 4×10 A: an
    adapter that fails when used. lorakit caps the rank per layer (exact there)."""
    torch.manual_seed(0)
    configs = {"x": dict(r=4, lora_alpha=3, target_modules=["lin1", "lin2"]),
               "y": dict(r=2, lora_alpha=5, target_modules=["lin2"])}
    ours, theirs = pair(CustomNet().double(), configs)
    theirs.add_weighted_adapter(["x", "y"], [1.0, 2.0], "mix", "svd")
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        layers(theirs)["lin2"].get_delta_weight("mix")
    ours.add_weighted_adapter(["x", "y"], [1.0, 2.0], "mix", "svd")
    lin1, lin2 = layers(ours)["lin1"], layers(ours)["lin2"]
    assert (lin1.r["mix"], lin2.r["mix"]) == (4, 3)
    torch.testing.assert_close(update(lin2, "mix"), weighted_sum(lin2, "xy", [1.0, 2.0]), atol=1e-10, rtol=0)


@pytest.mark.parametrize("combination_type", ["svd", "magnitude_prune_svd", "dare_linear_svd"])
def test_peft_bug_svd_family_fails_on_conv1d_and_conv3d(combination_type):
    """PEFT's svd family reshapes only Conv2d deltas and fails on Conv1d/Conv3d; lorakit flattens every kernel.
    (At density 1 these types are the plain weighted sum.)"""
    torch.manual_seed(0)
    configs = {"x": dict(r=2, lora_alpha=3, target_modules=["c1", "c3", "pw"]),
               "y": dict(r=3, lora_alpha=2, target_modules=["c1", "c3", "pw"])}
    ours, theirs = pair(Convs().double(), configs)
    options = dict(density=1.0) if combination_type != "svd" else {}
    with pytest.raises(RuntimeError):
        theirs.add_weighted_adapter(["x", "y"], [1.0, -0.5], "mix", combination_type, **options)
    ours.add_weighted_adapter(["x", "y"], [1.0, -0.5], "mix", combination_type, svd_rank=5, **options)
    for name, layer in layers(ours).items():
        torch.testing.assert_close(update(layer, "mix"), weighted_sum(layer, "xy", [1.0, -0.5]), atol=1e-10,
                                   rtol=0, msg=name)


def test_peft_bug_modules_to_save_loses_the_trained_module():
    """PEFT gives the combined adapter a fresh copy of the original module, dropping what the source adapter
    trained; lorakit copies the one adapter's trained module. Several owners: refused (as in PEFT)."""
    torch.manual_seed(0)
    configs = {"x": dict(r=2, target_modules=["lin1"], modules_to_save=["lin2"]),
               "y": dict(r=2, target_modules=["lin1"])}
    ours, theirs = pair(CustomNet().double(), configs)
    for model in (ours, theirs):
        with torch.no_grad():
            model.base_model.model.lin2.modules_to_save["x"].weight.add_(1.0)  # "training"
        model.add_weighted_adapter(["x", "y"], [0.5, 0.5], "mix", "cat")
    ours_wrapper, peft_wrapper = ours.base_model.model.lin2, theirs.base_model.model.lin2
    assert torch.equal(peft_wrapper.modules_to_save["mix"].weight, peft_wrapper.original_module.weight)
    for key, value in ours_wrapper.modules_to_save["x"].state_dict().items():
        assert torch.equal(ours_wrapper.modules_to_save["mix"].state_dict()[key], value)
    assert ours.peft_config["mix"].modules_to_save == ["lin2"]
    x = custom_inputs()
    ours.set_adapter("mix")
    mixed = ours(x)
    ours.set_adapter(["x", "y"])
    ours.base_model.model.lin1.scaling["x"] *= 0.5  # the adapters at weight 0.5 each, lin2 as "x" trained it
    ours.base_model.model.lin1.scaling["y"] *= 0.5
    torch.testing.assert_close(mixed, ours(x), atol=1e-10, rtol=0)


def test_modules_to_save_in_several_adapters_is_refused():
    torch.manual_seed(0)
    configs = {"x": dict(r=2, target_modules=["lin1"], modules_to_save=["lin2"]),
               "y": dict(r=2, target_modules=["lin1"], modules_to_save=["lin2"])}
    model = with_adapters(CustomNet().double(), configs)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\['x', 'y'\].*'lin2'"):
        model.add_weighted_adapter(["x", "y"], [1, 1], "mix", "cat")
    assert_unchanged(model, before)
    model.add_weighted_adapter(["x", "x"], [1, 1], "twice", "cat")  # one owner, named twice: fine


# ----------------------------------------------------------------------------------------------------------------
# the new adapter's config reproduces it, in lorakit and in PEFT
# ----------------------------------------------------------------------------------------------------------------
class Suffixes(nn.Module):
    """``fc`` and ``sub.fc``: a plain list entry or pattern key ``fc`` would also match ``sub.fc``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.sub = nn.Module()
        self.sub.fc = nn.Linear(6, 3)
        self.other = nn.Linear(3, 3)

    def forward(self, x):
        return self.other(self.sub.fc(self.fc(x)))


@pytest.mark.parametrize("make_base, configs", [
    (lambda: CustomNet().double(), DIFFERENT),
    # the new adapter wraps fc but not sub.fc: its target list must not pick up sub.fc
    (Suffixes, {"x": dict(r=2, target_modules="fc"), "y": dict(r=3, target_modules=["other"])}),
    # fc alone has a rank other than the most common one: its rank_pattern key must not match sub.fc
    (Suffixes, {"x": dict(r=2, target_modules="fc"), "y": dict(r=3, target_modules=["sub.fc", "other"])}),
])
def test_new_config_rebuilds_the_same_ranks_and_scalings(make_base, configs):
    torch.manual_seed(0)
    model = with_adapters(make_base(), configs)
    model.add_weighted_adapter(list(configs), [1.0] * len(configs), "mix", "cat")
    expected = {n: (layer.r["mix"], layer.scaling["mix"]) for n, layer in layers(model).items()
                if any(a in layer.r for a in configs)}
    assert {n for n, layer in layers(model).items() if "mix" in layer.r} == set(expected)
    config = model.peft_config["mix"].to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every target entry matches
        again = lorakit.get_peft_model(make_base(), lorakit.LoraConfig.from_dict(config))
    assert {n: (l.r["default"], l.scaling["default"]) for n, l in layers(again).items()} == expected
    theirs = peft.get_peft_model(make_base(), peft.LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"}))
    assert {n: (l.r["default"], l.scaling["default"]) for n, l in layers(theirs).items()} == expected


# ----------------------------------------------------------------------------------------------------------------
# DARE's randomness
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties", "dare_ties_svd"])
def test_dare_is_reproducible_with_a_seed_or_generator(combination_type):
    torch.manual_seed(0)
    model = with_adapters(CustomNet().double(), EQUAL_RANKS)
    run = lambda name, **kw: model.add_weighted_adapter(["x", "y"], [1.0, 0.5], name, combination_type,  # noqa
                                                        density=0.5, **kw)
    torch.manual_seed(1)
    run("s1", seed=7)
    torch.manual_seed(2)  # the global generator does not matter
    run("s2", seed=7)
    run("g", generator=torch.Generator().manual_seed(7))
    run("other", seed=8)
    for layer in layers(model).values():
        first = update(layer, "s1")
        assert torch.equal(first, update(layer, "s2")) and torch.equal(first, update(layer, "g"))
        assert not torch.equal(first, update(layer, "other"))


def test_random_prune_keeps_density_and_the_expectation():
    tensor = torch.ones(200_000, dtype=torch.float64)
    pruned = combine.random_prune(tensor, 0.3, torch.Generator().manual_seed(0))
    kept = pruned != 0
    assert abs(kept.double().mean().item() - 0.3) < 0.005  # ~5 standard deviations
    assert torch.equal(pruned[kept], torch.full_like(pruned[kept], 1 / 0.3))
    assert combine.random_prune(tensor, 1.0) is tensor


# ----------------------------------------------------------------------------------------------------------------
# the pure merge functions against PEFT's merge_utils
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, theirs", [
    ("linear", lambda t, w, d, s: merge_utils.task_arithmetic(t, w)),
    ("magnitude_prune", lambda t, w, d, s: merge_utils.magnitude_prune(t, w, d)),
    ("ties", lambda t, w, d, s: merge_utils.ties(t, w, d, s)),
    ("dare_linear", lambda t, w, d, s: merge_utils.dare_linear(t, w, d)),
    ("dare_ties", lambda t, w, d, s: merge_utils.dare_ties(t, w, d, s)),
])
@pytest.mark.parametrize("density, sign_method", [(0.2, "total"), (0.5, "frequency"), (1.0, "total")])
def test_merge_tensors_matches_peft_merge_utils(method, theirs, density, sign_method, monkeypatch):
    monkeypatch.setattr(torch, "bernoulli", fixed_bernoulli)
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(6, 5, 2, generator=g, dtype=torch.float64) for _ in range(3)]
    weights = [0.7, -1.1, 0.4]
    ours = combine.merge_tensors(method, tensors, weights, density=density, majority_sign_method=sign_method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns at density 1
        expected = theirs(tensors, torch.tensor(weights, dtype=torch.float64), density, sign_method)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# bad input: a clear error, and the model unchanged
# ----------------------------------------------------------------------------------------------------------------
BAD = [
    (dict(adapters=["x", "nope"]), ValueError, ["nope", "this model has"]),
    (dict(adapters=[]), ValueError, ["empty"]),
    (dict(adapters="x"), TypeError, ["list of adapter names"]),
    (dict(weights=[1.0]), ValueError, ["2 adapters", "1 weights"]),
    (dict(weights=[1.0, float("nan")]), ValueError, ["finite"]),
    (dict(adapter_name="x"), ValueError, ["'x' already exists"]),
    (dict(adapter_name="x.y"), ValueError, ["x.y"]),
    (dict(combination_type="average"), ValueError, ["'average'", "ties_svd"]),
    (dict(combination_type="ties"), ValueError, ["needs density"]),
    (dict(combination_type="ties", density=0), ValueError, ["density=0", "(0, 1]"]),
    (dict(combination_type="dare_linear", density=1.5), ValueError, ["density=1.5"]),
    (dict(combination_type="ties_svd", density=-0.1), ValueError, ["density=-0.1"]),
    (dict(combination_type="svd", density=0.5), ValueError, ["density=0.5", "no effect"]),
    (dict(combination_type="cat", svd_rank=4), ValueError, ["svd_rank=4", "no effect"]),
    (dict(combination_type="svd", svd_rank=0), ValueError, ["svd_rank=0"]),
    (dict(combination_type="svd", svd_clamp=1.5), ValueError, ["svd_clamp=1.5"]),
    (dict(combination_type="svd", svd_driver="magic"), ValueError, ["svd_driver='magic'"]),
    (dict(combination_type="ties", density=0.5, majority_sign_method="max"), ValueError, ["'max'"]),
    (dict(combination_type="ties", density=0.5, seed=1), ValueError, ["seed=1", "dare"]),
    (dict(combination_type="dare_ties", density=0.5, seed=1, generator=torch.Generator()), ValueError, ["not both"]),
    (dict(combination_type="linear"), ValueError, ["'lin1'", "equal ranks", "{'x': 2, 'y': 3}"]),
    (dict(combination_type="dare_linear", density=0.5), ValueError, ["'lin1'", "equal ranks"]),
]


@pytest.mark.parametrize("kwargs, error, words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_raises_and_changes_nothing(kwargs, error, words):
    torch.manual_seed(0)
    model = with_adapters(CustomNet().double(), {"x": dict(r=2, target_modules=["lin1", "lin2"]),
                                                 "y": dict(r=3, target_modules=["lin1"])})
    call = dict(adapters=["x", "y"], weights=[1.0, 1.0], adapter_name="mix", combination_type="cat") | kwargs
    before = snapshot(model)
    with pytest.raises(error) as info:
        model.add_weighted_adapter(**call)
    for word in words:
        assert word in str(info.value)
    assert_unchanged(model, before)


def test_grouped_conv_is_refused_and_nothing_changes():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Linear(2, 2))
    model = with_adapters(base, {"x": dict(r=2, target_modules=["0", "1"]), "y": dict(r=2, target_modules=["0"])})
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layer '0'.*groups=2"):
        model.add_weighted_adapter(["x", "y"], [1, 1], "mix", "cat")
    assert_unchanged(model, before)


def test_a_failure_while_filling_the_new_adapter_removes_it(monkeypatch):
    torch.manual_seed(0)
    model = with_adapters(CustomNet().double(), DIFFERENT)
    before = snapshot(model)
    layer = layers(model)["lin1"]
    real = type(layer).factors
    monkeypatch.setattr(layer, "factors", lambda name: tuple(t.clone() for t in real(layer, name)))  # not views
    with pytest.raises(RuntimeError, match="views"):
        model.add_weighted_adapter(["x", "y"], [1, 1], "mix", "cat")
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------------------------------
# save → reload: the same outputs, in lorakit and in PEFT
# ----------------------------------------------------------------------------------------------------------------
SAVED = {  # per-layer ranks differ after combining; a trained modules_to_save copy; biases trained ("lora_only")
    "x": dict(r=2, lora_alpha=4, target_modules=["emb", "conv1d", "conv2d", "lin1"], modules_to_save=["lin2"]),
    "y": dict(r=3, lora_alpha=5, use_rslora=True, target_modules=["emb", "lin1"], rank_pattern={"lin1": 4},
              bias="lora_only"),
}


@pytest.mark.parametrize("combination_type, options", [("cat", {}), ("svd", dict(svd_rank=3)),
                                                       ("dare_ties_svd", dict(density=0.5, seed=0))])
def test_save_and_reload_gives_the_same_outputs_in_lorakit_and_peft(combination_type, options, tmp_path):
    torch.manual_seed(0)
    base = CustomNet(dilation=(1, 1)).double().eval()  # PEFT cannot load dilated convs (see the core tests)
    fresh = copy.deepcopy(base)
    model = with_adapters(base, SAVED).eval()
    with torch.no_grad():  # "training": the x's copy of lin2 and the biases y trains
        model.base_model.model.lin2.modules_to_save["x"].weight.add_(0.5)
        model.base_model.model.lin1.base_layer.bias.add_(1.0)
    model.add_weighted_adapter(["x", "y"], [0.6, -1.4], "mix", combination_type, **options)
    assert model.peft_config["mix"].bias == "lora_only"
    model.set_adapter("mix")
    x = custom_inputs()
    expected = model(x)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])

    ours = lorakit.PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path / "mix")
    torch.testing.assert_close(ours(x), expected, atol=1e-10, rtol=0)
    assert {n: l.r["default"] for n, l in layers(ours).items()} == {
        n: l.r["mix"] for n, l in layers(model).items() if "mix" in l.r}
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(fresh), str(tmp_path / "mix")).eval()
    torch.testing.assert_close(theirs(x), expected, atol=1e-10, rtol=0)
