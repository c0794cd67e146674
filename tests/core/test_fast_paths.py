"""The per-call shortcuts of the forward keep its meaning: a base layer is still called normally wherever calling it
does more than ``F.linear`` (hooks, subclasses, patched forwards), replaced and updated parameters are picked up,
and the mixed-batch stack cache never serves stale factors. Every check is against dense float64 maths."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lorakit.layers import Linear
from reference import dense_linear


def make_layer(adapters=("a",), base=None, r=3, alpha=5.0):
    torch.manual_seed(0)
    base = nn.Linear(6, 5).double() if base is None else base
    layer = Linear(base)
    for i, name in enumerate(adapters):
        layer.update_layer(name, r + i, alpha + i, 0.0, init_lora_weights=False)
    layer.set_adapter(adapters[0])
    return layer.double()


class Doubled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def calls_of(module):
    """Count the calls that go through ``module.__call__`` (``Module._call_impl``, found on the instance first)."""
    calls = []
    plain = module._call_impl
    module._call_impl = lambda *args, **kwargs: calls.append(1) or plain(*args, **kwargs)
    return calls


def test_plain_linear_base_takes_the_shortcut_and_equals_the_reference():
    layer = make_layer()
    base_calls = calls_of(layer.base_layer)
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_linear(layer, x, "a"), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(layer(x), dense_linear(layer, x, "a"), atol=1e-12, rtol=1e-12)
    assert base_calls == []


@pytest.mark.parametrize("how", ["forward_hook", "forward_pre_hook", "global_forward_hook", "patched_forward",
                                 "patched_class_forward", "subclass"])
def test_base_layer_with_hooks_or_own_forward_is_called_normally(how, monkeypatch):
    base = (Doubled(6, 5) if how == "subclass" else nn.Linear(6, 5)).double()
    layer = make_layer(base=base)
    base_calls = calls_of(base)
    x = torch.randn(3, 6, dtype=torch.float64)
    handle = None
    if how == "forward_hook":
        handle = base.register_forward_hook(lambda m, args, out: out * 3)
    elif how == "forward_pre_hook":
        handle = base.register_forward_pre_hook(lambda m, args: (args[0] * 3,))
    elif how == "global_forward_hook":
        handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: out * 3 if m is base else None)
    elif how == "patched_forward":
        plain = base.forward
        base.forward = lambda inp: plain(inp) * 3
    elif how == "patched_class_forward":
        plain = nn.Linear.forward
        monkeypatch.setattr(nn.Linear, "forward", lambda self, inp: plain(self, inp) * 3)
    try:
        with torch.no_grad():
            out = layer(x)
    finally:
        if handle is not None:
            handle.remove()
    lora = dense_linear(layer, x, "a") - dense_linear(layer, x, None)
    plain_base = dense_linear(layer, x, None)
    expected = {"forward_pre_hook": dense_linear(layer, 3 * x, None), "subclass": 2 * plain_base}.get(how, 3 * plain_base)
    torch.testing.assert_close(out, expected + lora, atol=1e-12, rtol=1e-12)
    assert base_calls == [1]


def test_base_tensors_that_are_not_parameters_are_read_by_the_base_layer():
    """FSDP-style: the base weight deleted as a parameter and set as a plain tensor attribute."""
    layer = make_layer()
    weight = layer.base_layer.weight.detach().clone() * 2
    del layer.base_layer.weight
    layer.base_layer.weight = weight
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_linear(layer, x, "a"), atol=1e-12, rtol=1e-12)


def test_replaced_parameters_are_picked_up():
    layer = make_layer()
    x = torch.randn(4, 6, dtype=torch.float64)
    layer(x)  # anything computed on the first call must not outlive the parameters
    state = {k: torch.randn_like(v) for k, v in layer.state_dict().items()}
    layer.load_state_dict(state, assign=True)
    for key, value in state.items():
        assert layer.get_parameter(key) is not None and torch.equal(layer.get_parameter(key), value)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_linear(layer, x, "a"), atol=1e-12, rtol=1e-12)
    layer.lora_A["a"].weight = nn.Parameter(torch.randn(3, 6, dtype=torch.float64))
    layer.base_layer.weight = nn.Parameter(torch.randn(5, 6, dtype=torch.float64))
    layer.base_layer.bias = None
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_linear(layer, x, "a"), atol=1e-12, rtol=1e-12)


def test_parametrized_factor_is_read_through_its_parametrization():
    layer = make_layer(adapters=("a", "b"))

    class Tripled(nn.Module):
        def forward(self, w):
            return 3 * w

    parametrize.register_parametrization(layer.lora_A["a"], "weight", Tripled())
    x = torch.randn(2, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_linear(layer, x, "a"), atol=1e-12, rtol=1e-12)
        layer.set_row_adapters(_rows(["b", "a"]))
        try:
            mixed = layer(x)
        finally:
            layer.set_row_adapters(None)
    expected = torch.stack([dense_linear(layer, x[0], "b"), dense_linear(layer, x[1], "a")])
    torch.testing.assert_close(mixed, expected, atol=1e-12, rtol=1e-12)


# ---- mixed batches ------------------------------------------------------------------------------------------------
def _rows(names):
    from lorakit.layers import RowAdapters

    return RowAdapters.from_names(names, "__base__", torch.device("cpu"))


def mixed(layer, x, names):
    layer.set_row_adapters(_rows(names))
    try:
        with torch.no_grad():
            return layer(x)
    finally:
        layer.set_row_adapters(None)


def per_row(layer, x, names):
    return torch.stack([dense_linear(layer, x[i], None if n == "__base__" else n) for i, n in enumerate(names)])


@pytest.mark.parametrize("names", [["a", "b", "c"],  # in order: a view of the stacks
                                   ["b", "__base__", "b", "a", "__base__", "c", "a"]])  # repeated and base rows
def test_mixed_rows_equal_per_adapter_runs_and_the_cache_follows_updates(names):
    layer = make_layer(adapters=("a", "b", "c"))
    x = torch.randn(len(names), 2, 6, dtype=torch.float64)
    for _ in range(2):  # the second call is served from the cache
        torch.testing.assert_close(mixed(layer, x, names), per_row(layer, x, names), atol=1e-12, rtol=1e-12)

    # an optimizer step updates the factors in place
    params = [p for n, p in layer.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=0.5)
    layer.set_row_adapters(_rows(names))
    try:
        layer(x).square().sum().backward()
    finally:
        layer.set_row_adapters(None)
    opt.step()
    torch.testing.assert_close(mixed(layer, x, names), per_row(layer, x, names), atol=1e-12, rtol=1e-12)

    # load_state_dict copies in place; assign=True replaces the parameters; scaling changes
    layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})
    torch.testing.assert_close(mixed(layer, x, names), per_row(layer, x, names), atol=1e-12, rtol=1e-12)
    layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()}, assign=True)
    torch.testing.assert_close(mixed(layer, x, names), per_row(layer, x, names), atol=1e-12, rtol=1e-12)
    layer.lora_B["b"].weight = nn.Parameter(torch.randn_like(layer.lora_B["b"].weight))
    layer.scaling["c"] = -1.5
    torch.testing.assert_close(mixed(layer, x, names), per_row(layer, x, names), atol=1e-12, rtol=1e-12)


def test_mixed_cache_follows_adapters_added_and_deleted():
    layer = make_layer(adapters=("a", "b"))
    x = torch.randn(2, 6, dtype=torch.float64)
    torch.testing.assert_close(mixed(layer, x, ["a", "b"]), per_row(layer, x, ["a", "b"]), atol=1e-12, rtol=1e-12)
    layer.delete_adapter("b")
    layer.update_layer("b", 5, 2.0, 0.0, init_lora_weights=False)  # same name, new rank and factors
    layer.double()
    torch.testing.assert_close(mixed(layer, x, ["a", "b"]), per_row(layer, x, ["a", "b"]), atol=1e-12, rtol=1e-12)
    layer.delete_adapter("a")
    torch.testing.assert_close(mixed(layer, x, ["a", "b"]), per_row(layer, x, ["__base__", "b"]), atol=1e-12,
                               rtol=1e-12)
