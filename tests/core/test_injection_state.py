"""The first adapter's injection leaves every layer it creates exactly as the full trainability rule would.

``get_peft_model`` does not run ``set_adapter`` again on the layers it has just created (``update_layer`` already
put them in that state; see ``lorakit.model._settled_layers``). Each case here injects, records the state, then
applies the whole rule (``mark_trainable`` visiting every layer) and checks that nothing changed: which
parameters train, each layer's active adapters and what its forward adds. PEFT's own answer for the trainable
names is compared in tests/core/test_core_peft_equivalence.py and test_peft_trainability.py.
"""

import pytest
import torch
from torch import nn

import lorakit
from conftest import CustomNet, tiny_gpt2, tiny_llama
from lorakit.layers import LoraLayer
from lorakit.trainability import mark_trainable


def state(model):
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    layers = {
        n: (list(m.active_adapters), m._live, m._dora_live)
        for n, m in model.named_modules() if isinstance(m, LoraLayer)
    }
    return grads, layers


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(self.attn(x, x, x)[0])


CASES = {
    "llama": (lambda: tiny_llama(), dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama all-linear, bias=all": (lambda: tiny_llama(), dict(target_modules="all-linear", bias="all")),
    "llama inference_mode": (lambda: tiny_llama(), dict(target_modules=["q_proj"], inference_mode=True)),
    "llama dora, lora_only": (lambda: tiny_llama(), dict(target_modules=["q_proj", "o_proj"], use_dora=True,
                                                        bias="lora_only")),
    "gpt2 conv1d, lora_bias": (lambda: tiny_gpt2(), dict(target_modules=["c_attn", "c_fc"], lora_bias=True)),
    "every layer kind, modules_to_save": (
        lambda: CustomNet(), dict(target_modules=["emb", "conv1d", "conv2d", "lin1"], modules_to_save=["lin2"])),
    "multihead attention": (lambda: Attention(), dict(target_modules=["attn", "lin"])),
    "trainable tokens": (lambda: tiny_llama(), dict(target_modules=["q_proj"], trainable_token_indices=[1, 2])),
    "target_parameters": (lambda: tiny_llama(), dict(target_modules=["q_proj"],
                                                      target_parameters=["mlp.up_proj.weight"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_injection_state_equals_full_rule(case):
    build, kwargs = CASES[case]
    torch.manual_seed(0)
    base = build()
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, **kwargs))
    before = state(model)
    assert any(isinstance(m, LoraLayer) for m in model.modules())
    mark_trainable(model.base_model, inference_mode=kwargs.get("inference_mode", False))
    assert state(model) == before


def test_injection_state_after_user_froze_adapter_parameters():
    """A second call of the rule (set_adapter) still resets what a user changed: the skip is for injection only."""
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    expected = state(model)
    for n, p in model.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)
    model.set_adapter("default")
    assert state(model) == expected


# -- add_child: ModuleDict insertion without add_module's hasattr -------------------------------------------------
@pytest.mark.parametrize("name", ["default", "a0", "other", "default"])
def test_add_child_is_setitem(name):
    from lorakit.layers.construction import add_child

    fast, slow = nn.ModuleDict(), nn.ModuleDict()
    first, second = nn.Identity(), nn.Identity()
    for holder in (fast, slow):
        holder["x"] = first
    add_child(fast, name, second)
    slow[name] = second
    add_child(fast, "x", second)  # replacing an existing child
    slow["x"] = second
    assert list(fast.items()) == list(slow.items())
    assert fast[name] is second and fast.x is second


@pytest.mark.parametrize("name", ["a.b", "", "keys", "training", "forward", 3])
def test_add_child_refuses_what_setitem_refuses(name):
    from lorakit.layers.construction import add_child

    holder = nn.ModuleDict()
    with pytest.raises((KeyError, TypeError)) as expected:
        holder[name] = nn.Identity()
    with pytest.raises(type(expected.value)) as got:
        add_child(holder, name, nn.Identity())
    assert str(got.value) == str(expected.value)
    assert len(holder) == 0


def test_add_child_runs_registration_hooks():
    from lorakit.layers.construction import add_child

    seen = []
    handle = torch.nn.modules.module.register_module_module_registration_hook(
        lambda parent, name, module: seen.append(name))
    try:
        add_child(nn.ModuleDict(), "default", nn.Identity())
    finally:
        handle.remove()
    assert seen == ["default"]


# -- init_module: nn.Module.__init__'s state ------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["init_module", "_init_looped"])
def test_init_module_gives_module_init_state(variant):
    from lorakit.layers import construction

    init = getattr(construction, variant)
    expected = vars(nn.Module())
    first, second = nn.Module.__new__(nn.Module), nn.Module.__new__(nn.Module)
    init(first)
    init(second)
    assert {k: type(v) for k, v in vars(first).items()} == {k: type(v) for k, v in expected.items()}
    for key, value in expected.items():
        if isinstance(value, (dict, set)):
            assert len(vars(first)[key]) == 0 and vars(first)[key] is not vars(second)[key], key  # fresh tables
        else:
            assert vars(first)[key] == value, key
    first.add_module("child", nn.Identity())
    assert list(second.children()) == [] and len(list(first.children())) == 1


# -- replace_child: swapping an adapted layer in ------------------------------------------------------------------
def test_replace_child_is_setattr():
    from lorakit.layers.construction import replace_child

    fast, slow = nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    new = nn.Identity()
    replace_child(fast, "0", new)
    setattr(slow, "0", new)
    assert [(n, type(m)) for n, m in fast.named_children()] == [(n, type(m)) for n, m in slow.named_children()]
    assert fast[0] is new and len(fast._modules) == 2
    holder = nn.Module()
    replace_child(holder, "missing", new)  # not a child yet: setattr's own path adds it
    assert holder.missing is new


def test_replace_child_runs_registration_hooks():
    from lorakit.layers.construction import replace_child

    seen, parent, child = [], nn.Sequential(nn.ReLU()), nn.Identity()
    handle = torch.nn.modules.module.register_module_module_registration_hook(
        lambda parent, name, module: seen.append(name))
    try:
        replace_child(parent, "0", child)
    finally:
        handle.remove()
    assert seen == ["0"]
