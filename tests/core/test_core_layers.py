"""Each layer kind against the dense reference in float64: base(x) with W replaced by W + s·B@A."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import LoraLayer, lora_delta, register_lora_layer
from lorakit.layers import Conv, Embedding, Linear, lora_layer_for
from lorakit.layers.rows import WatchedTable
from reference import dense_delta


def adapt(module, r=3, alpha=7.0, init=False, rslora=False):
    layer = lora_layer_for(module)(module)
    layer.update_layer("default", r, alpha, 0.0, init, rslora)
    layer.set_adapter("default")
    return layer.double()


def reference(module, delta, x):
    ref = module  # a copy with W + delta
    with torch.no_grad():
        ref.weight += delta
    return ref(x)


CASES = {
    "linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(4, 3, 6)),
    "linear-no-bias": (lambda: nn.Linear(6, 5, bias=False), lambda: torch.randn(2, 6)),
    "embedding": (lambda: nn.Embedding(11, 4, padding_idx=0), lambda: torch.randint(0, 11, (2, 5))),
    "conv1d": (lambda: nn.Conv1d(3, 4, 5, stride=2, padding=3, dilation=2), lambda: torch.randn(2, 3, 17)),
    "conv2d": (lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 3)),
               lambda: torch.randn(2, 3, 9, 8)),
    "conv2d-1x1": (lambda: nn.Conv2d(3, 6, 1), lambda: torch.randn(2, 3, 5, 5)),
    "conv2d-reflect": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), lambda: torch.randn(1, 2, 6, 6)),
    "conv3d": (lambda: nn.Conv3d(2, 3, (2, 3, 1), stride=(1, 2, 1), padding=(1, 0, 0)),
               lambda: torch.randn(2, 2, 4, 6, 3)),
}


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_equals_dense_reference_float64(kind, rslora):
    torch.manual_seed(0)
    make, inputs = CASES[kind]
    module = make().double()
    x = inputs()
    x = x.double() if x.is_floating_point() else x
    import copy

    twin = copy.deepcopy(module)
    layer = adapt(module, rslora=rslora)
    assert layer.scaling["default"] == pytest.approx(7.0 / (math.sqrt(3) if rslora else 3))
    expected = reference(twin, dense_delta(layer), x)
    assert torch.isfinite(expected).all() and dense_delta(layer).abs().max() > 1e-3
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(layer.delta_weight("default"), dense_delta(layer), atol=1e-12, rtol=1e-12)


def test_gpt2_conv1d_dense_reference():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    module = Conv1D(5, 6).double()  # nf=5 outputs, nx=6 inputs; weight 6×5
    import copy

    twin = copy.deepcopy(module)
    layer = adapt(module)
    assert layer.fan_in_fan_out and layer.delta_weight("default").shape == (6, 5)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(twin, dense_delta(layer), x), atol=1e-12, rtol=1e-12)


class SamePadConv2d(nn.Conv2d):
    """A conv subclass with its own forward ("same" padding computed from the input), as EfficientNet has."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


@pytest.mark.parametrize("groups", [1, 4])
def test_conv_subclass_with_own_forward_sees_the_same_padding(groups):
    torch.manual_seed(0)
    module = SamePadConv2d(4, 8, 3, stride=2, groups=groups).double()
    import copy

    twin = copy.deepcopy(module)
    layer = adapt(module, r=4)
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64)
    # reference: the dense update through the same padding, as a dense (groups=1) conv added to the base
    delta = dense_delta(layer)
    ih, iw = 7, 9
    ph = max((math.ceil(ih / 2) - 1) * 2 + 3 - ih, 0)
    pw = max((math.ceil(iw / 2) - 1) * 2 + 3 - iw, 0)
    xp = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    expected = twin(x) + F.conv2d(xp, delta, None, 2)
    assert torch.isfinite(expected).all() and (expected - twin(x)).abs().max() > 1e-3
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=1e-12)
    if groups > 1:
        with pytest.raises(ValueError, match="groups=4"):
            layer.merge()
        torch.testing.assert_close(layer.base_layer.weight, twin.weight)


def test_grouped_conv_rank_must_divide_groups():
    layer = Conv(nn.Conv2d(4, 8, 3, groups=4))
    with pytest.raises(ValueError, match="groups=4"):
        layer.update_layer("default", 3, 3)


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_initialisations(init):
    torch.manual_seed(0)
    lin = Linear(nn.Linear(16, 8))
    lin.update_layer("default", 4, 4, init_lora_weights=init)
    emb = Embedding(nn.Embedding(10, 6))
    emb.update_layer("default", 4, 4, init_lora_weights=init)
    A, B = lin.factors("default")
    eA, eB = emb.factors("default")
    if init is False:
        assert A.abs().sum() > 0 and B.abs().sum() > 0 and eA.abs().sum() > 0 and eB.abs().sum() > 0
        return
    assert torch.count_nonzero(B) == 0 and torch.count_nonzero(eA) == 0  # the update starts at zero
    assert torch.count_nonzero(eB) == eB.numel()
    if init is True:
        bound = 1 / math.sqrt(16)  # kaiming-uniform with a=sqrt(5) on fan_in 16
        assert A.abs().max() <= bound and A.std() > bound / 3
    else:
        assert abs(A.std().item() - 1 / 4) < 0.1


def test_half_precision_base_trains_float32_adapters():
    layer = Linear(nn.Linear(8, 8).to(torch.bfloat16))
    layer.update_layer("default", 2, 2, init_lora_weights=False)
    layer.set_adapter("default")
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = layer.base_layer(x).float() + (x.float() @ layer.delta_weight("default").T)
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)  # bf16 output rounding only


class Scale(nn.Module):
    """A custom module type: y = x * weight (elementwise over the last dim)."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, n))

    def forward(self, x):
        return x * self.weight


class LoraScale(LoraLayer):
    def _create_factors(self, adapter_name, r, dtype, device):
        n = self.base_layer.weight.shape[1]
        self.lora_A[adapter_name] = nn.Linear(n, r, bias=False, dtype=dtype, device=device)
        self.lora_B[adapter_name] = nn.Linear(r, 1, bias=False, dtype=dtype, device=device)

    def _add_adapter_output(self, out, x, adapter_name):
        return out + x * (self.delta_weight(adapter_name)).to(x.dtype)


def test_register_a_custom_layer_type():
    with pytest.raises(TypeError):
        register_lora_layer(int, LoraScale)
    with pytest.raises(TypeError):
        register_lora_layer(Scale, nn.Linear)
    register_lora_layer(Scale, LoraScale)
    torch.manual_seed(0)
    model = nn.Sequential(Scale(4), nn.Linear(4, 2))
    peft_model = lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules=["0"], init_lora_weights=False))
    x = torch.randn(3, 4)
    out = peft_model(x)
    peft_model.merge_adapter()
    torch.testing.assert_close(peft_model(x), out, atol=1e-6, rtol=0)
    plain = peft_model.merge_and_unload()
    assert type(plain[0]) is Scale
    torch.testing.assert_close(plain(x), out, atol=1e-6, rtol=0)


def test_parts_built_without_module_init_are_ordinary_independent_modules():
    """The layer and its parts skip ``nn.Module.__init__`` for speed: each must still hold the fields an ordinary
    module holds, with tables of its own (a hook on one part stays on that part), and copy, save and load."""
    import pickle

    torch.manual_seed(0)
    layer = Linear(nn.Linear(4, 3))
    layer.update_layer("a", 2, 2, init_lora_weights=False)
    layer.update_layer("b", 2, 2, init_lora_weights=False)
    parts = [layer, layer.lora_A, layer.lora_B, layer.lora_dropout, layer.lora_A["a"], layer.lora_B["b"],
             layer.lora_dropout["a"]]
    reference = vars(nn.Module())
    tables = []
    for part in parts:
        # the same fields and table types (tables that count their writes for the mixed-batch stack cache are
        # dict subclasses: lorakit.layers.rows.WatchedTable)
        assert {k: type(vars(part)[k]) for k in reference} == {
            k: WatchedTable if type(vars(part)[k]) is WatchedTable and type(v) is dict else type(v)
            for k, v in reference.items()}
        tables += [id(vars(part)[k]) for k, v in reference.items() if isinstance(v, (dict, set))]
    assert len(tables) == len(set(tables))
    hook = layer.lora_A["a"].register_forward_hook(lambda *args: None)
    assert len(layer.lora_A["a"]._forward_hooks) == 1 and not layer.lora_A["b"]._forward_hooks
    hook.remove()
    assert sorted(layer.state_dict()) == ["base_layer.bias", "base_layer.weight", "lora_A.a.weight",
                                          "lora_A.b.weight", "lora_B.a.weight", "lora_B.b.weight"]
    layer.set_adapter("a")
    x = torch.randn(2, 4)
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        torch.testing.assert_close(twin(x), layer(x), atol=0, rtol=0)
        for key, value in layer.state_dict().items():
            assert torch.equal(twin.state_dict()[key], value)


def test_lora_delta_shapes():
    A, B = torch.randn(2, 3), torch.randn(5, 2)
    assert lora_delta(A, B, 1.0, (5, 3)).shape == (5, 3)
    assert lora_delta(A, B, 1.0, (3, 5), transpose=True).shape == (3, 5)
    torch.testing.assert_close(lora_delta(A, B, 2.0, (5, 3)), 2 * B @ A)
