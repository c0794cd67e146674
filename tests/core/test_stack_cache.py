"""The mixed-batch stack cache never serves stale factors, whatever changed them between two batches.

The cache is checked at every step by one count of writes to watched tables (replaced factors, scalings, modules)
plus the factors' version counters (in-place updates), read through aliases (:class:`lorakit.layers.rows.
StackCache`). Each test changes the factors or scalings one way after a cached batch, then compares the next
batch row by row with the dense float64 reference (tests/reference.py)."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lorakit.layers import Embedding, Linear, RowAdapters
from lorakit.layers.rows import WatchedTable, note_data_swap, table_writes
from reference import dense_delta, dense_linear

NAMES = ["b", "__base__", "a", "c", "a"]  # grouped rows
IN_ORDER = ["a", "b", "c"]  # row i runs adapter i: a view of the stacks


def make_layer(lora_bias=False):
    torch.manual_seed(0)
    layer = Linear(nn.Linear(6, 5))
    for i, name in enumerate(("a", "b", "c")):
        layer.update_layer(name, 2 + i, 3.0 + i, 0.0, init_lora_weights=False, lora_bias=lora_bias)
    layer.set_adapter("a")
    if lora_bias:
        with torch.no_grad():
            for name in ("a", "b", "c"):
                layer.lora_B[name].bias.normal_()
    return layer.double()


def mixed(layer, x, names):
    layer.set_row_adapters(RowAdapters.from_names(names, "__base__", torch.device("cpu")))
    try:
        with torch.no_grad():
            return layer(x)
    finally:
        layer.set_row_adapters(None)


def per_row(layer, x, names):
    """Each row through its adapter, densely in float64 (``lora_bias``: plus ``s·b``)."""
    rows = []
    for xn, name in zip(x, names):
        name = None if name == "__base__" else name
        y = dense_linear(layer, xn.double(), name)
        bias = None if name is None else layer.lora_bias_of(name)
        rows.append(y if bias is None else y + layer.scaling[name] * bias.detach().double())
    return torch.stack(rows)


def check(layer, names, dtype=torch.float64):
    x = torch.randn(len(names), 2, 6, dtype=dtype)
    got = mixed(layer, x, names)
    assert got.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), per_row(layer, x, names), atol=tol, rtol=tol)


@pytest.fixture(params=[NAMES, IN_ORDER], ids=["grouped", "in-order"])
def names(request):
    return request.param


def cached(names, **kw):
    """A layer whose stacks for ``names`` are cached (two batches: built, then served)."""
    layer = make_layer(**kw)
    check(layer, names)
    stacks = layer._stack_cache.stacks
    check(layer, names)
    assert layer._stack_cache.stacks is stacks  # served from the cache
    return layer


def test_nothing_changed_serves_the_same_stacks_with_the_tables_watched(names):
    layer = cached(names)
    assert layer._stack_cache.watched
    assert type(layer.scaling) is WatchedTable and type(layer.lora_A._modules) is WatchedTable
    assert type(layer.lora_A["a"]._parameters) is WatchedTable


def test_in_place_write_by_hand_is_seen(names):
    layer = cached(names)
    with torch.no_grad():
        layer.lora_B["c"].weight.mul_(-3)
    check(layer, names)
    with torch.no_grad():
        layer.lora_A["a"].weight[0, 0] += 1  # a write through a view
    check(layer, names)


def test_writes_through_data_are_seen_after_note_data_swap(names):
    """``p.data.copy_(…)`` and ``p.data = …`` bypass PyTorch's version counters (nothing can see them cheaply): the
    documented remedy, :func:`note_data_swap`, makes the next batch rebuild its stacks."""
    layer = cached(names)
    layer.lora_B["c"].weight.data.copy_(torch.randn_like(layer.lora_B["c"].weight))
    note_data_swap()
    check(layer, names)
    layer.lora_A["a"].weight.data = torch.randn_like(layer.lora_A["a"].weight)
    note_data_swap()
    check(layer, names)


def test_optimizer_step_and_training_gradients_reach_each_adapter(names):
    layer = cached(names)
    layer.requires_grad_(False)
    params = [p.requires_grad_() for n, p in layer.named_parameters() if "lora_" in n]
    opt = torch.optim.Adam(params, lr=0.1)
    x = torch.randn(len(names), 2, 6, dtype=torch.float64)
    layer.set_row_adapters(RowAdapters.from_names(names, "__base__", torch.device("cpu")))
    try:
        layer(x).square().sum().backward()
    finally:
        layer.set_row_adapters(None)
    for name in ("a", "b", "c"):  # gradients reach each adapter's own factors, and only those in the batch
        grad = layer.lora_A[name].weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == (name in names)
    opt.step()
    check(layer, names)


def test_set_scale_rescale_and_scaling_dict_writes_are_seen(names):
    layer = cached(names)
    layer.set_scale("b", 0.25)
    check(layer, names)
    layer.scale_layer(3.0)
    check(layer, names)
    layer.unscale_layer(3.0)
    check(layer, names)
    layer.scaling["c"] = -1.5  # a direct write into the table
    check(layer, names)
    layer.scaling = dict(layer.scaling)  # a new, unwatched table: re-read at every step from now on
    check(layer, names)
    assert not layer._stack_cache.watched
    layer.scaling["a"] = 7.0
    check(layer, names)


def test_tensor_scalings_replaced_by_equal_ones_are_followed(names):
    """A scaling replaced by a new tensor of the same value: the stacks are still right, but the next in-place
    write (a compiled hotswap) goes to the new tensor, whose counter must be the one read."""
    layer = cached(names)
    layer.scaling["b"] = torch.tensor(layer.scaling["b"], dtype=torch.float64)
    check(layer, names)
    new = layer.scaling["b"].clone()
    layer.scaling["b"] = new
    check(layer, names)
    with torch.no_grad():
        new.mul_(-2)
    check(layer, names)


def test_replaced_factors_are_seen_by_every_route(names):
    layer = cached(names)
    layer.lora_B["b"].weight = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))  # register_parameter
    check(layer, names)
    layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()}, assign=True)
    check(layer, names)
    layer.lora_A["c"] = nn.Linear(6, 4, bias=False).double()  # a module that is not lorakit's: not watched
    check(layer, names)
    assert not layer._stack_cache.watched
    layer.lora_A["c"].weight = nn.Parameter(torch.randn(4, 6, dtype=torch.float64))
    check(layer, names)
    with torch.no_grad():
        layer.lora_A["c"].weight.add_(1)
    check(layer, names)
    layer.lora_A = nn.ModuleDict({k: copy.deepcopy(v) for k, v in layer.lora_A.items()})  # the whole table
    with torch.no_grad():
        layer.lora_A["a"].weight.mul_(2)
    check(layer, names)


def test_functional_call_and_parametrization_are_seen(names):
    layer = cached(names)
    other = torch.randn(4, 6, dtype=torch.float64)
    x = torch.randn(len(names), 2, 6, dtype=torch.float64)
    rows = RowAdapters.from_names(names, "__base__", torch.device("cpu"))
    layer.set_row_adapters(rows)
    try:
        with torch.no_grad():
            got = torch.func.functional_call(layer, {"lora_A.c.weight": other}, (x,))
    finally:
        layer.set_row_adapters(None)
    original = layer.lora_A["c"].weight
    layer.lora_A["c"].weight = nn.Parameter(other)
    torch.testing.assert_close(got, per_row(layer, x, names), atol=1e-12, rtol=1e-12)
    layer.lora_A["c"].weight = original
    check(layer, names)  # the original again

    class Tripled(nn.Module):
        def forward(self, w):
            return 3 * w

    parametrize.register_parametrization(layer.lora_B["a"], "weight", Tripled())
    check(layer, names)
    check(layer, names)
    with torch.no_grad():  # the tensor behind the parametrization, updated in place
        layer.lora_B["a"].parametrizations.weight.original.mul_(-2)
    check(layer, names)
    parametrize.remove_parametrizations(layer.lora_B["a"], "weight")
    check(layer, names)


def test_dtype_and_device_moves_are_seen(names):
    """``.to()``/``.float()`` swap ``.data`` (no table write, no version bump): the stacks follow."""
    layer = make_layer()
    with torch.no_grad():  # values that float32 cannot hold, so that the round trip below changes them
        for name, p in layer.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 1e-3)
    check(layer, names)
    check(layer, names)
    layer.float()
    check(layer, names, torch.float32)
    assert layer._stack_cache.stacks[0].dtype == torch.float32
    layer.double()
    check(layer, names)
    layer.lora_B.float()  # on the factors' holder alone
    layer.lora_B.double()
    with torch.no_grad():
        layer.lora_B["a"].weight.zero_()
    check(layer, names)


def test_lora_bias_replaced_and_updated(names):
    layer = cached(names, lora_bias=True)
    with torch.no_grad():
        layer.lora_B["a"].bias.add_(1)
    check(layer, names)
    layer.lora_B["c"].bias = nn.Parameter(torch.randn(5, dtype=torch.float64))
    check(layer, names)
    layer.set_scale("a", -2.0)
    check(layer, names)


def test_adapters_added_deleted_and_other_name_lists(names):
    layer = cached(names)
    check(layer, ["c", "b"])  # another list: rebuilt, then the first again
    check(layer, names)
    layer.delete_adapter("c")
    layer.update_layer("c", 5, 2.0, 0.0, init_lora_weights=False)
    layer.double()
    check(layer, names)


def test_copies_do_not_share_a_stale_cache(names):
    layer = cached(names)
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        with torch.no_grad():
            twin.lora_A["a"].weight.mul_(-1)
        check(twin, names)
        check(layer, names)


def test_embedding_tables_replaced_and_updated():
    torch.manual_seed(0)
    layer = Embedding(nn.Embedding(11, 5))
    for i, name in enumerate(("a", "b")):
        layer.update_layer(name, 2 + i, 3.0 + i, 0.0, init_lora_weights=False)
    layer.set_adapter("a")
    layer = layer.double()
    names = ["b", "a", "__base__"]
    ids = torch.randint(0, 11, (3, 4))

    def check_embedding():
        W = layer.base_layer.weight.detach().double()
        expected = torch.stack([F.embedding(i, W if n == "__base__" else W + dense_delta(layer, n))
                                for i, n in zip(ids, names)])
        torch.testing.assert_close(mixed(layer, ids, names), expected, atol=1e-12, rtol=1e-12)

    check_embedding()
    check_embedding()
    assert layer._stack_cache.watched
    writes = table_writes()
    check_embedding()
    assert table_writes() == writes  # serving from the cache writes nothing
    with torch.no_grad():
        layer.lora_embedding_B["b"].mul_(2)
    check_embedding()
    layer.lora_embedding_A["a"] = nn.Parameter(torch.randn(2, 11, dtype=torch.float64))
    check_embedding()
    layer.float()
    layer.double()
    with torch.no_grad():
        layer.lora_embedding_A["a"].zero_()
    check_embedding()


def test_whole_model_after_weights_hotswap_and_state_dict_loads(tmp_path):
    """End to end on a Llama: every change between two mixed batches of a PeftModel is seen (row by row against
    per-adapter runs)."""
    from conftest import tiny_llama, token_ids
    from lorakit import LoraConfig, get_peft_model
    from lorakit.functional import get_peft_model_state_dict, set_peft_model_state_dict
    from lorakit.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    model = get_peft_model(tiny_llama(), LoraConfig(**config))
    model.add_adapter("b", LoraConfig(**config))
    torch.manual_seed(2)
    donor = get_peft_model(tiny_llama(), LoraConfig(**{**config, "r": 2}))
    donor.save_pretrained(tmp_path)
    prepare_model_for_compiled_hotswap(model, target_rank=4)  # tensor scalings, ranks padded to 4
    rows = ["b", "default", "__base__", "b"]
    ids = token_ids(n=len(rows))

    def check_model():
        with torch.no_grad():
            mixed_logits = model(input_ids=ids, adapter_names=rows).logits
            expected = []
            for i, name in enumerate(rows):
                if name == "__base__":
                    with model.disable_adapter():
                        expected.append(model(input_ids=ids[i:i + 1]).logits)
                else:
                    model.set_adapter(name)
                    expected.append(model(input_ids=ids[i:i + 1]).logits)
        model.set_adapter("default")
        torch.testing.assert_close(mixed_logits, torch.cat(expected), atol=1e-5, rtol=0)
        return mixed_logits

    first = check_model()
    check_model()  # served from the caches
    model.set_adapter(["default", "b"], weights=[1.0, -0.5])  # weighted adapters: tensor scalings written in place
    model.set_adapter("default")
    check_model()
    hotswap_adapter(model, tmp_path, "b")  # factors copied in place, scalings filled in place
    swapped = check_model()
    assert not torch.allclose(swapped, first)
    state = get_peft_model_state_dict(model, adapter_name="b")
    set_peft_model_state_dict(model, {k: torch.randn_like(v) * 0.1 for k, v in state.items()}, adapter_name="b")
    check_model()
