"""lorakit.exact_merge: merging gives exactly PEFT's ``W += Δ``; unmerging gives back W bit for bit, whatever the
values (±0.0, subnormals, binade edges, |W| ≪ |Δ|), sizes (several 65536-element blocks) and
dtypes; the record lists exactly the elements that a plain subtraction would get wrong."""

import math

import pytest
import torch

from lorakit.exact_merge import Scratch, merge_exact, unmerge_exact

INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(1, 5), (64, 48), (700, 600), (3, 100_003)]  # the last two: several 65536-element blocks


def bits(t):
    return t.view(INT[t.dtype])


def delta_of(left, right, shape):
    return (left @ right).reshape(shape)


def added(W, delta):
    """``W + Δ`` summed in float64 and rounded the way PEFT's in-place add rounds: to the computation dtype (the
    wider of the two), then to the weight's dtype."""
    return (W.double() + delta.double()).to(torch.promote_types(W.dtype, delta.dtype)).to(W.dtype)


def subtracted(W, delta):
    return (W.double() - delta.double()).to(torch.promote_types(W.dtype, delta.dtype)).to(W.dtype)


def edge_values(dtype):
    """Values where rounding is delicate: signed zeros, subnormals, the smallest normal, powers of two and their
    neighbours on both sides (binade edges), tiny values next to a much larger delta."""
    info = torch.finfo(dtype)
    powers = torch.tensor([2.0 ** -7, -(2.0 ** -5), 2.0 ** -9, 1.0], dtype=dtype)
    values = [torch.tensor([0.0, -0.0, info.tiny, -info.tiny, info.tiny / 4, -info.tiny / 8, info.tiny * 2 ** -3],
                           dtype=dtype), powers, (bits(powers) + 1).view(dtype), (bits(powers) - 1).view(dtype)]
    return torch.cat(values)


def weights(shape, dtype, seed, scale=0.02):
    """Gaussian weights with :func:`edge_values` sprinkled over them."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    flat = W.view(-1)
    edges = edge_values(dtype)
    where = torch.randperm(flat.numel(), generator=g)[: max(1, flat.numel() // 5)]
    flat[where] = edges[torch.arange(where.numel()) % edges.numel()]
    return W


def factors(shape, ratio, seed, rank=8, dtype=torch.float32, spikes=0):
    """``left @ right`` with entries about ``ratio · 0.02``; ``spikes`` rows get 1000× larger (|Δ| ≫ |W|)."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape[0], math.prod(shape[1:])
    left = torch.randn(rows, rank, generator=g, dtype=dtype) * (0.02 * ratio / math.sqrt(rank))
    right = torch.randn(rank, cols, generator=g, dtype=dtype)
    left[torch.randperm(rows, generator=g)[:spikes]] *= 1000
    return left, right


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_adds_like_peft_and_unmerge_restores_bits_over_many_cycles(dtype, shape):
    W = weights(shape, dtype, seed=0)
    original = W.clone()
    storage = W.data_ptr()
    scratch = Scratch()
    for cycle, ratio in enumerate([1.0, 0.1, 0.01, 1e-3, 3.0, 0.16, 1.0, 1e-4, 0.5, 0.05]):
        left, right = factors(shape, ratio, seed=cycle, spikes=cycle % 3)
        delta = delta_of(left, right, shape)
        record = merge_exact(W, left, right, 1.0, scratch)
        assert torch.equal(bits(W), bits(added(original, delta))), cycle
        assert torch.equal(bits(W), bits(original.clone().add_(delta))), cycle  # literally PEFT's `W += Δ`
        unmerge_exact(W, left, right, 1.0, record, scratch)
        assert torch.equal(bits(W), bits(original)), cycle
    assert W.data_ptr() == storage  # in place


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_same_adapter_merged_and_unmerged_many_times_stays_exact(dtype):
    W = weights((300, 257), dtype, seed=1)
    original = W.clone()
    left, right = factors(W.shape, 0.5, seed=1, spikes=2)
    merged = None
    for _ in range(25):
        record = merge_exact(W, left, right)
        merged = W.clone() if merged is None else merged
        assert torch.equal(bits(W), bits(merged))
        unmerge_exact(W, left, right, 1.0, record)
        assert torch.equal(bits(W), bits(original))


@pytest.mark.parametrize("dtype", DTYPES)
def test_several_deltas_merged_then_unmerged_in_reverse(dtype):
    shape = (129, 700)
    W = weights(shape, dtype, seed=2)
    original, expected = W.clone(), W.clone()
    pairs = [factors(shape, ratio, seed=10 + i, spikes=i) for i, ratio in enumerate([1.0, 0.01, 0.3])]
    records = []
    for left, right in pairs:
        records.append(merge_exact(W, left, right))
        expected = added(expected, delta_of(left, right, shape))
        assert torch.equal(bits(W), bits(expected))
    for (left, right), record in reversed(list(zip(pairs, records))):
        unmerge_exact(W, left, right, 1.0, record)
    assert torch.equal(bits(W), bits(original))


@pytest.mark.parametrize("ratio", [0.01, 1.0])  # few / many elements that do not come back
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_record_holds_exactly_the_elements_a_plain_subtraction_gets_wrong(dtype, ratio):
    shape = (700, 600)
    W = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.02).to(dtype)
    left, right = factors(shape, ratio, seed=3, spikes=3)
    delta = delta_of(left, right, shape)
    back = subtracted(added(W, delta), delta)  # what PEFT's unmerge would give
    k = (bits(W).long() - bits(back).long()).view(-1)
    wrong = k.nonzero().squeeze(1)
    assert wrong.numel() > 100
    record = merge_exact(W.clone(), left, right)
    escapes = record.escape_index
    assert torch.equal(record.escape_bits, bits(W).view(-1)[escapes])
    assert escapes.numel() > 0 and bool((k[escapes].abs() > 127).all())  # the spiked rows
    assert torch.equal(torch.cat([record.flat_index(), escapes]).sort().values, wrong)
    assert torch.equal(record.steps.long(), k[record.flat_index()])
    blocks = -(-W.numel() // 65536)
    assert record.nbytes == 3 * record.steps.numel() + 4 * blocks + escapes.numel() * (8 + W.element_size())


@pytest.mark.parametrize("scaling", [2.0, 0.25, 1.5, -3.0, 1 / 3])
@pytest.mark.parametrize("transpose", [False, True])
def test_factors_multiply_out_to_lora_delta_bit_for_bit(scaling, transpose):
    from lorakit.ops import lora_delta, lora_factors

    g = torch.Generator().manual_seed(7)
    A, B = torch.randn(8, 300, generator=g), torch.randn(200, 8, generator=g)
    shape = (300, 200) if transpose else (200, 300)
    left, right, scale = lora_factors(A, B, scaling, transpose)
    assert (scale == 1.0) == (scaling in (2.0, 0.25))  # powers of two are folded into B
    assert torch.equal((left @ right).mul_(scale), lora_delta(A, B, scaling, shape, transpose))
    W = weights(shape, torch.bfloat16, seed=7, scale=1.0)
    original = W.clone()
    record = merge_exact(W, left, right, scale)
    assert torch.equal(bits(W), bits(added(original, lora_delta(A, B, scaling, shape, transpose))))
    unmerge_exact(W, left, right, scale, record)
    assert torch.equal(bits(W), bits(original))


def test_record_is_small_for_small_updates():
    shape = (1408, 512)
    for dtype, limit in [(torch.float32, 0.01), (torch.bfloat16, 0.01)]:
        W = (torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 0.02).to(dtype)
        left, right = factors(shape, 0.002, seed=4)  # ‖ΔW‖/‖W‖ about 0.2 %
        record = merge_exact(W, left, right)
        assert record.nbytes / W.nbytes < limit


def test_non_contiguous_weight_is_merged_in_place():
    base = torch.randn(40, 30, dtype=torch.float64).to(torch.bfloat16)
    W = base.T  # 30 × 40 view, not contiguous
    original = W.clone()
    left, right = factors(W.shape, 1.0, seed=5)
    record = merge_exact(W, left, right)
    assert torch.equal(bits(base.T.contiguous()), bits(added(original, delta_of(left, right, W.shape))))
    unmerge_exact(W, left, right, 1.0, record)
    assert torch.equal(bits(base.T.contiguous()), bits(original))


def test_bad_inputs_name_the_problem():
    left, right = torch.randn(4, 2), torch.randn(2, 3)
    with pytest.raises(ValueError, match="torch.int64"):
        merge_exact(torch.zeros(4, 3, dtype=torch.int64), left, right)
    with pytest.raises(ValueError, match="meta"):
        merge_exact(torch.zeros(4, 3, device="meta"), left, right)
    with pytest.raises(ValueError, match=r"\(4, 2\) and \(2, 3\) does not fit a weight of shape \(3, 5\)"):
        merge_exact(torch.zeros(3, 5), left, right)


@pytest.mark.parametrize("alpha", [8, 6])  # scaling 2 (folded into B) and 1.5 (applied after the product)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("make, targets", [
    (lambda: __import__("conftest").tiny_llama(), ["q_proj", "down_proj"]),
    (lambda: __import__("conftest").tiny_gpt2(), ["c_attn", "c_fc"]),  # Conv1D: weights stored in × out
])
def test_merged_model_weights_equal_peft_merged_weights_bit_for_bit(make, targets, dtype, alpha):
    """After merging, every base weight is exactly PEFT's; after unmerging, exactly the original (PEFT's drifts).
    Not embeddings: PEFT rounds their Δ to the weight's dtype before adding (two roundings); lorakit rounds the
    sum once."""
    from conftest import lorakit_and_peft

    base = make().to(dtype)
    ours, theirs = lorakit_and_peft(base, dict(r=4, lora_alpha=alpha, target_modules=targets,
                                               init_lora_weights=False))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(0.3)
    ours.load_state_dict(theirs.state_dict())
    original = {n: p.detach().clone() for n, p in ours.get_base_model().named_parameters() if "lora_" not in n}
    ours.merge_adapter()
    theirs.merge_adapter()
    mine, peft_weights = dict(ours.get_base_model().named_parameters()), dict(theirs.get_base_model().named_parameters())
    changed = 0
    for name, p in peft_weights.items():
        if "lora_" not in name:
            assert torch.equal(bits(mine[name].detach()), bits(p.detach())), name
            changed += not torch.equal(p.detach(), original[name])
    assert changed >= 3
    ours.unmerge_adapter()
    for name, p in ours.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(bits(p.detach()), bits(original[name])), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_without_record_adds_the_same_bits(dtype):
    shape = (700, 600)
    left, right = factors(shape, 0.5, seed=8, spikes=2)
    W = weights(shape, dtype, seed=8)
    reference = added(W, delta_of(left, right, shape))
    recorded, plain = W.clone(), W.clone()
    merge_exact(recorded, left, right, 1.5)
    assert merge_exact(plain, left, right, 1.5, record=False) is None
    assert torch.equal(bits(plain), bits(recorded))
    plain_1 = W.clone()
    merge_exact(plain_1, left, right, record=False)
    assert torch.equal(bits(plain_1), bits(reference))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_and_unload_gives_the_reversible_merge_weights(dtype):
    """merge_and_unload skips the record (its layers are thrown away) and still gives the merged weights bit for
    bit; a layer merged without a record refuses to unmerge and keeps its weights."""
    import copy

    from conftest import tiny_llama
    from lorakit import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama().to(dtype), LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                              init_lora_weights=False))
    reversible = copy.deepcopy(model)
    reversible.merge_adapter()
    expected = {n.replace(".base_layer", ""): p for n, p in reversible.get_base_model().named_parameters()
                if "lora_" not in n}
    unloaded = copy.deepcopy(model).merge_and_unload()
    got = dict(unloaded.named_parameters())
    assert got.keys() == expected.keys()
    for name, p in got.items():
        assert torch.equal(bits(p.detach()), bits(expected[name].detach())), name
    model.merge_adapter(reversible=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="cannot be unmerged"):
        model.unmerge_adapter()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
