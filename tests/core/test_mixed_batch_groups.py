"""Mixed batches with rows grouped by adapter (repeated adapters, ``__base__`` rows, beam copies) equal running
each row with its own adapter, in inference and training, against the float64 dense reference."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers import Embedding, Linear, RowAdapters
from lorakit.layers.rows import RowGroups
from reference import dense_delta, dense_update

ADAPTERS = ("a", "b", "c")
CASES = [
    ["b", "__base__", "b", "a", "__base__", "c", "a"],  # repeated and base rows, unequal groups
    ["a", "a", "a", "b"],  # one large group: the small one is padded
    ["c", "b", "a"],  # distinct, not in row order
    ["__base__", "__base__"],  # nothing to add
    ["b", "b", "c", "c"],  # equal groups, no base row
]


def linear_layer(dropout=0.0):
    torch.manual_seed(0)
    layer = Linear(nn.Linear(6, 5))
    for i, name in enumerate(ADAPTERS):
        layer.update_layer(name, 2 + i, 3.0 + i, dropout, init_lora_weights=False)
    layer.set_adapter("a")
    return layer.double()


def embedding_layer():
    torch.manual_seed(0)
    layer = Embedding(nn.Embedding(11, 5))
    for i, name in enumerate(ADAPTERS):
        layer.update_layer(name, 2 + i, 3.0 + i, 0.0, init_lora_weights=False)
    layer.set_adapter("a")
    return layer.double()


def routed(layer, x, rows):
    layer.set_row_adapters(rows)
    try:
        return layer(x)
    finally:
        layer.set_row_adapters(None)


def dense_rows(layer, x, names, factors=None):
    """Row ``n``: ``x[n] @ (W + s·B@A).T + b`` in float64 with adapter ``names[n]`` (``factors``: leaf copies)."""
    W, bias = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    out = []
    for xn, name in zip(x, names):
        Wn = W
        if name != "__base__":
            A, B = factors[name] if factors else layer.factors(name)
            Wn = W + layer.scaling[name] * B.double() @ A.double() if factors else W + dense_update(
                A, B, layer.scaling[name])
        out.append(xn @ Wn.T + bias)
    return torch.stack(out)


@pytest.mark.parametrize("per_row", [[0, 2, 2, 1, 0, 3, 1], [1, 1, 1, 2], [0, 0], [3, 2, 1], [2, 2, 3, 3, 0]])
def test_groups_cover_every_adapted_row_once(per_row):
    groups = RowGroups.of(per_row, torch.device("cpu"))
    adapted = [n for n, s in enumerate(per_row) if s]
    if not adapted:
        assert groups is None
        return
    slots = list(range(4))[groups.slots] if isinstance(groups.slots, slice) else groups.slots.tolist()
    take = groups.take.tolist()
    src = list(range(len(take))) if groups.src is None else groups.src.tolist()
    assert sorted(groups.dest.tolist()) == adapted
    for j, n in zip(src, groups.dest.tolist()):
        assert take[j] == n and per_row[n] == slots[j // groups.size]
    assert all(per_row[n] == slots[j // groups.size] for j, n in enumerate(take))  # padding repeats a group's row


@pytest.mark.parametrize("names", CASES)
def test_grouped_linear_inference_equals_per_adapter_runs(names):
    layer = linear_layer()
    x = torch.randn(len(names), 3, 6, dtype=torch.float64)
    rows = RowAdapters.from_names(names, "__base__", torch.device("cpu"))
    with torch.no_grad():
        for _ in range(2):  # the second call reuses the cached stacks and grouping
            torch.testing.assert_close(routed(layer, x, rows), dense_rows(layer, x, names), atol=1e-12, rtol=1e-12)
    assert list(rows.groupings) == ([] if rows.in_order or not rows.names else [len(names)])  # once per batch


@pytest.mark.parametrize("names", CASES)
def test_grouped_embedding_equals_per_adapter_runs(names):
    layer = embedding_layer()
    ids = torch.randint(0, 11, (len(names), 4))
    rows = RowAdapters.from_names(names, "__base__", torch.device("cpu"))
    W = layer.base_layer.weight.detach().double()
    expected = torch.stack([F.embedding(i, W if n == "__base__" else W + dense_delta(layer, n))
                            for i, n in zip(ids, names)])
    with torch.no_grad():
        torch.testing.assert_close(routed(layer, ids, rows), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("copies", [2, 3])
def test_beam_copies_keep_each_prompts_adapter(copies):
    """``generate``'s beams: each prompt's row repeated ``copies`` times in a row, grouped like any other rows."""
    names = ["b", "__base__", "a", "b"]
    layer = linear_layer()
    x = torch.randn(len(names) * copies, 2, 6, dtype=torch.float64)
    rows = RowAdapters.from_names(names, "__base__", torch.device("cpu"), copies=True)
    expanded = [n for n in names for _ in range(copies)]
    with torch.no_grad():
        torch.testing.assert_close(routed(layer, x, rows), dense_rows(layer, x, expanded), atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="adapter_names has 4 entries"):
        rows.groups(len(names) * copies + 1)


@pytest.mark.parametrize("names", CASES)
def test_grouped_training_gradients_equal_the_dense_reference(names):
    layer = linear_layer()
    layer.train()
    for name in ADAPTERS:
        for p in layer.factors(name):
            p.requires_grad_(True)
    leaves = {n: tuple(p.detach().clone().requires_grad_(True) for p in layer.factors(n)) for n in ADAPTERS}
    x = torch.randn(len(names), 3, 6, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    weights = torch.randn(len(names), 3, 5, dtype=torch.float64)
    rows = RowAdapters.from_names(names, "__base__", torch.device("cpu"))
    out = routed(layer, x, rows)
    (out * weights).sum().backward()
    expected = dense_rows(layer, x_ref, names, factors=leaves)
    (expected * weights).sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-12, rtol=1e-12)
    for name in ADAPTERS:
        for p, ref in zip(layer.factors(name), leaves[name]):
            grad, ref_grad = (torch.zeros_like(p) if t.grad is None else t.grad for t in (p, ref))  # unused: none
            torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-12, msg=name)


def test_grouped_training_with_dropout_drops_each_rows_input_at_its_adapters_rate():
    """Dropout in a mixed training batch: row ``n``'s adapter sees ``x[n]·mask/(1-p)`` with its adapter's ``p``
    (the mask drawn over the whole batch, as before grouping), the base part sees ``x[n]`` untouched."""
    names = ["b", "__base__", "a", "b", "c", "a"]
    layer = linear_layer(dropout=0.0)
    rates = {"a": 0.25, "b": 0.5, "c": 0.0}
    layer.dropout_p.update(rates)
    layer.train()
    x = torch.randn(len(names), 3, 6, dtype=torch.float64)
    rows = RowAdapters.from_names(names, "__base__", torch.device("cpu"))
    torch.manual_seed(7)
    with torch.no_grad():
        out = routed(layer, x, rows)
    torch.manual_seed(7)
    p = torch.tensor([0.0 if n == "__base__" else rates[n] for n in names], dtype=torch.float64).view(-1, 1, 1)
    dropped = x * torch.bernoulli((1 - p).expand_as(x)) / (1 - p)
    base = x @ layer.base_layer.weight.detach().double().T + layer.base_layer.bias.detach().double()
    expected = base + dense_rows(layer, dropped, names) - dense_rows(layer, dropped, ["__base__"] * len(names))
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    assert not torch.equal(dropped, x)  # the rates above do drop something


def test_random_batches_equal_per_adapter_runs():
    """Many random mixes of repeated adapters and base rows, in inference."""
    layer = linear_layer()
    rng = random.Random(0)
    for _ in range(30):
        names = [rng.choice(ADAPTERS + ("__base__",)) for _ in range(rng.randint(1, 9))]
        x = torch.randn(len(names), rng.randint(1, 3), 6, dtype=torch.float64)
        rows = RowAdapters.from_names(names, "__base__", torch.device("cpu"))
        with torch.no_grad():
            torch.testing.assert_close(routed(layer, x, rows), dense_rows(layer, x, names), atol=1e-12, rtol=1e-12,
                                       msg=str(names))
