"""lorakit.merge_kernel: the compiled (numba) exact merge gives the same merged bits and the same record as the eager
PyTorch passes, unmerges bit-exactly (its own records and the eager path's), and hands non-finite cases to the eager
path with the weight untouched; for every layer kind, dtype and many random cycles."""

import copy

import pytest
import torch

pytest.importorskip("numba")

from conftest import CustomNet, custom_inputs, tiny_gpt2, tiny_llama  # noqa: E402
from test_exact_merge import added, bits, delta_of, factors, weights  # noqa: E402

from lorakit import LoraConfig, get_peft_model  # noqa: E402
from lorakit import merge_kernel  # noqa: E402
from lorakit.exact_merge import MergeRecord, Scratch, compiled, merge_exact, unmerge_exact  # noqa: E402

FIELDS = ["counts", "offsets", "steps", "escape_index", "escape_bits"]
HALF_AND_SINGLE = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True, scope="module")
def compiled_passes_loaded():
    """The compiled passes load in the background (compiling the first time after installation); wait for them so
    that every test here compares the two paths."""
    assert merge_kernel.ready(timeout=600), "numba is installed but the compiled passes did not load"


def same_record(a: MergeRecord, b: MergeRecord) -> bool:
    return all(getattr(a, f).dtype == getattr(b, f).dtype and torch.equal(getattr(a, f), getattr(b, f))
               for f in FIELDS)


def merge_both(W, left, right, scale):
    """Merge a copy of ``W`` by each path; both merged weights and records."""
    fused, eager = W.clone(), W.clone()
    with compiled(True):
        fused_record = merge_exact(fused, left, right, scale, Scratch())
    with compiled(False):
        eager_record = merge_exact(eager, left, right, scale, Scratch())
    return fused, fused_record, eager, eager_record


def test_the_compiled_path_applies_to_what_it_claims():
    assert merge_kernel.available() and merge_kernel.ready(0)
    for dtype in HALF_AND_SINGLE:
        assert merge_kernel.supports(torch.zeros(3, dtype=dtype), torch.zeros(3))
    assert not merge_kernel.supports(torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    assert not merge_kernel.supports(torch.zeros(3), torch.zeros(3, dtype=torch.float64))
    assert not merge_kernel.supports(torch.zeros(4, 3).T, torch.zeros(3, 4))  # not contiguous


@pytest.mark.parametrize("shape", [(1, 5), (64, 48), (700, 600), (3, 100_003)])
@pytest.mark.parametrize("dtype", HALF_AND_SINGLE + [torch.float64])
def test_compiled_and_eager_merge_give_the_same_bits_and_records_over_many_cycles(dtype, shape):
    W = weights(shape, dtype, seed=20)
    original = W.clone()
    for cycle, (ratio, scale) in enumerate([(1.0, 1.0), (0.1, 1 / 3), (0.01, -2.5), (1e-3, 1.0), (3.0, 0.7),
                                            (0.16, 1.0), (1e-4, 3.0), (0.5, 1.0), (0.05, 0.1), (30.0, 1.0)]):
        left, right = factors(shape, ratio, seed=100 + cycle, spikes=cycle % 3)
        fused, fused_record, eager, eager_record = merge_both(W, left, right, scale)
        assert torch.equal(bits(fused), bits(eager)), cycle
        if scale == 1:  # PEFT's `W += Δ`, from the float64 reference
            assert torch.equal(bits(fused), bits(added(original, delta_of(left, right, shape)))), cycle
        assert same_record(fused_record, eager_record), cycle
        for record, enabled in [(fused_record, True), (eager_record, True), (fused_record, False)]:
            back = fused.clone()
            with compiled(enabled):
                unmerge_exact(back, left, right, scale, record)
            assert torch.equal(bits(back), bits(original)), (cycle, enabled)


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
def test_many_random_merge_unmerge_cycles_of_several_adapters_stay_exact(dtype):
    shape = (257, 300)
    W = weights(shape, dtype, seed=21)
    original = W.clone()
    g = torch.Generator().manual_seed(21)
    for cycle in range(30):
        count = 1 + cycle % 3
        pairs = [factors(shape, float(10 ** torch.empty(1).uniform_(-4, 1, generator=g)), seed=1000 * cycle + i,
                         spikes=i) for i in range(count)]
        scales = [float(torch.empty(1).uniform_(-3, 3, generator=g)) for _ in pairs]
        records, eager = [], W.clone()
        for (left, right), scale in zip(pairs, scales):
            records.append(merge_exact(W, left, right, scale))
            with compiled(False):
                eager_record = merge_exact(eager, left, right, scale)
            assert torch.equal(bits(W), bits(eager)) and same_record(records[-1], eager_record), cycle
        for (left, right), scale, record in reversed(list(zip(pairs, scales, records))):
            unmerge_exact(W, left, right, scale, record)
        assert torch.equal(bits(W), bits(original)), cycle


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
@pytest.mark.parametrize("where", [5, 70_000, 199_999])  # first chunk, a later block, the last element
@pytest.mark.parametrize("bad", ["nan weight", "inf weight", "inf delta", "overflow"])
def test_non_finite_merges_go_the_eager_way_and_the_kernel_leaves_the_weight_alone(dtype, where, bad):
    shape = (200, 1000)
    W = weights(shape, dtype, seed=22)
    left, right = factors(shape, 0.5, seed=22)
    flat = W.view(-1)
    if bad == "nan weight":
        flat[where] = float("nan")
    elif bad == "inf weight":
        flat[where] = float("-inf")
    elif bad == "inf delta":
        left[where // shape[1], 0] = float("inf")
    else:
        flat[where] = torch.finfo(dtype).max
        right[:, where % shape[1]] = 0
        left[where // shape[1]] = 0
        left[where // shape[1], 0], right[0, where % shape[1]] = 1.0, torch.finfo(dtype).max
    product = left @ right
    untouched = W.clone().view(-1)
    assert merge_kernel.merge(untouched, product.view(-1), 1.0) is None
    assert torch.equal(bits(untouched), bits(W.view(-1)))
    fused, fused_record, eager, eager_record = merge_both(W, left, right, 1.0)
    assert torch.equal(bits(fused), bits(eager)) and same_record(fused_record, eager_record)
    kept = fused.clone()
    assert not merge_kernel.unmerge(kept.view(-1), product.view(-1), 1.0, *(getattr(fused_record, f) for f in FIELDS))
    assert torch.equal(bits(kept), bits(fused))
    unmerge_exact(fused, left, right, 1.0, fused_record)
    assert torch.equal(bits(fused), bits(W))


def _models():
    return [
        (tiny_llama, ["q_proj", "down_proj", "embed_tokens"], None),  # Linear and Embedding
        (tiny_gpt2, ["c_attn", "c_fc"], None),  # Conv1D: weights stored in × out
        (CustomNet, ["emb", "conv1d", "conv2d", "lin1"], custom_inputs()),  # Embedding, Conv1d, Conv2d, Linear
    ]


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
@pytest.mark.parametrize("index", range(3))
def test_every_layer_kind_merges_the_same_by_both_paths(index, dtype):
    make, targets, _ = _models()[index]
    model = get_peft_model(make().to(dtype), LoraConfig(r=4, lora_alpha=6, target_modules=targets,
                                                       init_lora_weights=False))
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    eager = copy.deepcopy(model)
    g = torch.Generator().manual_seed(index)
    for cycle in range(6):
        size = float(10 ** torch.empty(1).uniform_(-3, 0.5, generator=g))  # a new update size every cycle
        with torch.no_grad():
            for m in (model, eager):
                for name, p in m.named_parameters():
                    if "lora_B" in name or "lora_embedding_B" in name:
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(cycle)) * size)
        model.merge_adapter()
        with compiled(False):
            eager.merge_adapter()
        merged, eager_merged = dict(model.named_parameters()), dict(eager.named_parameters())
        for name, p in merged.items():
            assert torch.equal(bits(p.detach()), bits(eager_merged[name].detach())), (cycle, name)
        layers = dict(model.base_model.lora_layers())
        checked = 0
        for name, layer in eager.base_model.lora_layers():
            for adapter, record in layer.merge_records.items():
                assert same_record(layers[name].merge_records[adapter], record), (cycle, name)
                checked += record.steps.numel() + record.escape_index.numel()
        assert checked > 0
        model.unmerge_adapter()
        with compiled(False):
            eager.unmerge_adapter()
        for name, p in model.named_parameters():
            if "lora_" not in name:
                assert torch.equal(bits(p.detach()), bits(original[name])), (cycle, name)


def test_import_lorakit_does_not_import_numba_and_a_merge_does_not_wait_for_it():
    """numba loads in the background on the first merge; until then merges take the eager path."""
    import subprocess
    import sys

    code = (
        "import sys, torch, lorakit\n"
        "assert 'numba' not in sys.modules\n"
        "from lorakit.exact_merge import merge_exact, unmerge_exact\n"
        "W = torch.randn(64, 48); original = W.clone()\n"
        "left, right = torch.randn(64, 4) * 0.02, torch.randn(4, 48)\n"
        "record = merge_exact(W, left, right)\n"
        "unmerge_exact(W, left, right, 1.0, record)\n"
        "assert torch.equal(W, original)\n"
        "from lorakit import merge_kernel\n"
        "assert merge_kernel.ready(600)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
@pytest.mark.parametrize("ratio", [0.02, 0.3, 2.0])  # few steps per chunk (visited one by one) to most (packed)
def test_sparse_and_dense_chunks_with_escapes_record_as_the_eager_path(dtype, ratio):
    """Chunks with many non-zero steps are packed 16 at a time, a quarter with an escape element by element;
    either way the record is the eager path's, and unmerging restores the weight."""
    shape = (5, 4096 + 37)  # five chunks, the last one short
    W = weights(shape, dtype, seed=23)  # edge values (tiny next to the update: escapes) all over
    left, right = factors(shape, ratio, seed=23, spikes=1)
    fused, fused_record, eager, eager_record = merge_both(W, left, right, 1.0)
    assert torch.equal(bits(fused), bits(eager)) and same_record(fused_record, eager_record)
    assert fused_record.steps.numel() > 0 and fused_record.escape_index.numel() > 0
    unmerge_exact(fused, left, right, 1.0, fused_record)
    assert torch.equal(bits(fused), bits(W))
