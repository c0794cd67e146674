"""``Linear.forward`` adds a plain adapter itself at inference (no autograd, no active dropout, no ``lora_bias``, float
scaling, factors in the input's dtype and registered as parameters) instead of calling ``_add_adapter_output``.

That shortcut must give the dense float64 reference's value, and the general path's bits (its last bit where a
single row is added as ``out + s·y`` in one fused step), for inputs of every rank and layout, and must step aside for everything it does not handle: autograd (gradients checked), active
dropout, ``lora_bias``, a tensor scaling, an input in another dtype than the factors, a parametrized factor."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lorakit.layers import Linear
from reference import dense_update


def make_layer(adapters=("a",), dtype=torch.float64, dropout=0.0, lora_bias=False, bias=True):
    torch.manual_seed(0)
    layer = Linear(nn.Linear(6, 5, bias=bias))
    for i, name in enumerate(adapters):
        layer.update_layer(name, 3 + i, 5.0 + i, dropout, init_lora_weights=False, lora_bias=lora_bias)
    layer.set_adapter(list(adapters))
    return layer.to(dtype)


def general_path(layer, x):
    """What the forward computes without the shortcut: the base, then ``_add_adapter_output`` per adapter."""
    base = layer.base_layer
    out = F.linear(x, base.weight, base.bias)
    for name in layer.active_adapters:
        out = Linear._add_adapter_output(layer, out, x, name)
    return out


def spy_general_path(layer):
    """Count the adapters that go through ``_add_adapter_output`` (found on the instance first)."""
    calls = []
    general = layer._add_adapter_output
    layer._add_adapter_output = lambda out, x, name: calls.append(name) or general(out, x, name)
    return calls


def reference(layer, x):
    """Dense float64 ``x @ (W + Σ s·B@A).T + b (+ Σ s·b_B)`` over the active adapters."""
    W = layer.base_layer.weight.detach().double()
    bias = torch.zeros(W.shape[0], dtype=torch.float64)
    if layer.base_layer.bias is not None:
        bias += layer.base_layer.bias.detach().double()
    for name in layer.active_adapters:
        W = W + dense_update(*layer.factors(name), float(layer.scaling[name]))
        lora_bias = layer.lora_bias_of(name)
        if lora_bias is not None:
            bias += float(layer.scaling[name]) * lora_bias.detach().double()
    return x.double() @ W.T + bias


INPUTS = {  # every rank, a decode step's (1, 1, in), non-contiguous inputs
    "1-D": lambda: torch.randn(6),
    "decode step": lambda: torch.randn(1, 1, 6),
    "2-D": lambda: torch.randn(4, 6),
    "3-D": lambda: torch.randn(2, 3, 6),
    "3-D, batch-major view of a time-major tensor": lambda: torch.randn(3, 2, 6).transpose(0, 1),
    "4-D, strided": lambda: torch.randn(2, 3, 4, 12)[..., ::2],
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("adapters", [("a",), ("a", "b")])
@pytest.mark.parametrize("shape", list(INPUTS))
@pytest.mark.parametrize("bias", [True, False])
def test_shortcut_gives_the_general_paths_result_and_the_reference(shape, adapters, dtype, bias):
    layer = make_layer(adapters, dtype, bias=bias).eval()
    x = INPUTS[shape]().to(dtype)
    calls = spy_general_path(layer)
    with torch.no_grad():
        out = layer(x)
        expected = general_path(layer, x)
    assert calls == []  # every adapter took the shortcut
    assert out.shape == expected.shape
    if x.numel() == x.shape[-1]:  # one row: out + s·y as one fused multiply-add instead of addmm's own rounding
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(out, expected, atol=4 * eps * expected.abs().max().item(), rtol=0)
    else:
        assert torch.equal(out, expected)  # more rows: add_lora's in-place addmm, the same bits
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), reference(layer, x), atol=tol, rtol=tol)


def test_shortcut_in_training_mode_without_dropout():
    layer = make_layer(dropout=0.0).train()
    calls = spy_general_path(layer)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(layer, x), atol=1e-12, rtol=1e-12)
    assert calls == []


def test_dropout_is_skipped_in_eval_and_applied_in_training():
    layer = make_layer(dropout=0.5).eval()
    calls = spy_general_path(layer)
    x = torch.randn(8, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(layer, x), atol=1e-12, rtol=1e-12)
        assert calls == []
        layer.train()
        torch.manual_seed(3)
        dropped = layer(x)
        torch.manual_seed(3)
        expected = general_path(layer, x)
    assert calls == ["a"]
    assert torch.equal(dropped, expected)
    assert not torch.allclose(dropped, reference(layer, x))  # dropout acted


def test_autograd_takes_the_general_path_with_right_gradients():
    layer = make_layer(("a", "b")).eval()
    calls = spy_general_path(layer)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert calls == ["a", "b"]
    params = [x] + [p for n in ("a", "b") for p in layer.factors(n)]
    grads = torch.autograd.grad(out.square().sum(), params)

    def dense(x, Aa, Ba, Ab, Bb):
        W = layer.base_layer.weight.detach() + layer.scaling["a"] * Ba @ Aa + layer.scaling["b"] * Bb @ Ab
        return x @ W.T + layer.base_layer.bias.detach()

    leaves = [p.detach().clone().requires_grad_() for p in params]
    expected = torch.autograd.grad(dense(*leaves).square().sum(), leaves)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_lora_bias_takes_the_general_path():
    layer = make_layer(lora_bias=True).eval()
    with torch.no_grad():
        layer.lora_B["a"].bias.uniform_(-1, 1)
    calls = spy_general_path(layer)
    x = torch.randn(1, 1, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(layer, x), atol=1e-12, rtol=1e-12)
    assert calls == ["a"]


def test_tensor_scaling_takes_the_general_path():
    """A tensor scaling (a model prepared for compiled hotswap) on one adapter; the other keeps the shortcut."""
    layer = make_layer(("a", "b")).eval()
    layer.scaling["a"] = torch.tensor(0.75, dtype=torch.float64)
    calls = spy_general_path(layer)
    x = torch.randn(1, 1, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(layer, x), atol=1e-12, rtol=1e-12)
    assert calls == ["a"]


def test_input_in_another_dtype_than_the_factors_takes_the_general_path():
    """A bfloat16 base with float32 adapters (PEFT's autocast_adapter_dtype): the general path casts the input."""
    layer = make_layer(dtype=torch.float32).eval()
    layer.base_layer.to(torch.bfloat16)
    calls = spy_general_path(layer)
    x = torch.randn(1, 1, 6).to(torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        expected = general_path(layer, x)
    assert calls == ["a"]
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    torch.testing.assert_close(out.double(), reference(layer, x), atol=0.05, rtol=0.02)


def test_parametrized_factor_takes_the_general_path():
    layer = make_layer(("a", "b")).eval()

    class Tripled(nn.Module):
        def forward(self, w):
            return 3 * w

    parametrize.register_parametrization(layer.lora_B["b"], "weight", Tripled())
    calls = spy_general_path(layer)
    x = torch.randn(1, 1, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(layer, x), atol=1e-12, rtol=1e-12)
    assert calls == ["b"]
