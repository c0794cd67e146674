"""Mixed-adapter batches equal per-adapter runs row by row; the dropout path equals the reference."""

import pytest
import torch
from torch import nn

from conftest import CustomNet, custom_inputs, tiny_gpt2, tiny_llama, token_ids
from lorakit import LoraConfig, get_peft_model
from lorakit.ops import add_dropped_lora, keep_mask, pack_bits, unpack_bits


def three_adapter_llama():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    model.add_adapter("wide", LoraConfig(r=7, lora_alpha=3, target_modules="all-linear", init_lora_weights=False))
    model.add_adapter("emb", LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "o_proj"],
                                        modules_to_save=["lm_head"], init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["emb"].weight.mul_(1.5)
    return model


def per_row_reference(model, ids, names, **kw):
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(model(input_ids=ids[i:i + 1], **kw).logits)
        else:
            model.set_adapter(name)
            rows.append(model(input_ids=ids[i:i + 1], **kw).logits)
    return torch.cat(rows)


def test_llama_mixed_batch_equals_per_adapter_runs():
    model = three_adapter_llama()
    names = ["wide", "default", "__base__", "emb", "wide", "emb"]
    ids = token_ids(n=len(names))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        expected = per_row_reference(model, ids, names)
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=0)


def test_one_distinct_adapter_per_row_in_order_uses_no_gather():
    """The multi-tenant decode batch (row n runs the n-th adapter) reads the stacked factors without copying."""
    model = three_adapter_llama()
    names = ["default", "wide", "emb"]
    ids = token_ids(n=3)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    seen = []
    original = layer._add_row_outputs

    def spy(out, x, rows):
        seen.append(rows.in_order)
        return original(out, x, rows)

    layer._add_row_outputs = spy
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        expected = per_row_reference(model, ids, names)
    assert seen == [True]
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=0)


def test_gpt2_conv1d_and_custom_convs_mixed():
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=3, target_modules=["c_attn", "wte"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=5, target_modules=["c_fc"], init_lora_weights=False))
    names = ["b", "default", "__base__"]
    ids = token_ids(n=3)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, adapter_names=names).logits,
                                   per_row_reference(model, ids, names), atol=1e-5, rtol=0)
    net = get_peft_model(CustomNet().eval(), LoraConfig(r=2, target_modules=["emb", "conv1d", "conv2d", "lin1"],
                                                        init_lora_weights=False, modules_to_save=["lin2"]))
    net.add_adapter("b", LoraConfig(r=4, target_modules=["conv2d", "lin1"], init_lora_weights=False,
                                    modules_to_save=["lin2"]))
    net.base_model.model.lin2.modules_to_save["b"].weight.data.mul_(-1)
    x = custom_inputs(4)
    names = ["b", "default", "__base__", "b"]
    with torch.no_grad():
        mixed = net(x, adapter_names=names)
        rows = []
        for i, name in enumerate(names):
            if name == "__base__":
                with net.disable_adapter():
                    rows.append(net(x[i:i + 1]))
            else:
                net.set_adapter(name)
                rows.append(net(x[i:i + 1]))
    torch.testing.assert_close(mixed, torch.cat(rows), atol=1e-5, rtol=0)


def test_mixed_batch_training_gradients_equal_per_row_runs():
    model = three_adapter_llama()
    model.train()
    for p in model.parameters():  # train every adapter at once
        p.requires_grad_(False)
    params = {n: p for n, p in model.named_parameters() if "lora_" in n or ".modules_to_save.emb." in n}
    for p in params.values():
        p.requires_grad_(True)
    names = ["wide", "emb", "default", "__base__"]
    ids = token_ids(n=4, t=5)
    model(input_ids=ids, labels=ids, adapter_names=names).logits.square().mean().backward()
    mixed = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    model.zero_grad()
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(model(input_ids=ids[i:i + 1]).logits)
        else:
            model.set_adapter(name)
            for p in params.values():  # set_adapter freezes the inactive adapters; the reference needs them all
                p.requires_grad_(True)
            rows.append(model(input_ids=ids[i:i + 1]).logits)
    torch.cat(rows).square().mean().backward()
    reference = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    assert mixed.keys() == reference.keys() and len(mixed) > 10
    for n in mixed:
        torch.testing.assert_close(mixed[n], reference[n], atol=1e-6, rtol=1e-4, msg=n)


def test_generate_with_beams_keeps_each_prompts_adapter():
    model = three_adapter_llama()
    ids = token_ids(n=3, t=4)
    names = ["emb", "__base__", "wide"]
    kw = dict(max_new_tokens=5, num_beams=2, do_sample=False, pad_token_id=0)
    mixed = model.generate(input_ids=ids, adapter_names=names, **kw)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                single = model.generate(input_ids=ids[i:i + 1], **kw)
        else:
            model.set_adapter(name)
            single = model.generate(input_ids=ids[i:i + 1], **kw)
        assert torch.equal(mixed[i], single[0])


def test_mixed_batch_errors():
    model = three_adapter_llama()
    ids = token_ids(n=2)
    with pytest.raises(ValueError, match="nope"):
        model(input_ids=ids, adapter_names=["default", "nope"])
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        model(input_ids=ids, adapter_names=["default"] * 3)
    with pytest.raises(ValueError, match="list of adapter names"):
        model(input_ids=ids, adapter_names="default")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model(input_ids=ids, adapter_names=["default", "wide"])
    model.unmerge_adapter()
    model(input_ids=ids, adapter_names=["default", "wide"])  # fine again
    model.get_base_model().gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids=ids, adapter_names=["default", "wide"])
    with torch.no_grad():
        model(input_ids=ids, adapter_names=["default", "wide"])  # inference recomputes nothing
    assert all(getattr(m, "_rows", None) is None for m in model.modules())  # nothing left behind


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_path_equals_reference_with_same_mask(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=dtype, requires_grad=True)
    A = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    B = torch.randn(6, 4, dtype=dtype, requires_grad=True)
    base = torch.randn(3, 5, 6, dtype=dtype, requires_grad=True)
    torch.manual_seed(123)
    out = add_dropped_lora(base, x, A, B, 0.7, 0.3)
    g = torch.randn_like(out)
    out.backward(g)
    ours = [t.grad.clone() for t in (x, A, B, base)]
    for t in (x, A, B, base):
        t.grad = None
    torch.manual_seed(123)
    mask = keep_mask(x, 0.3).to(dtype) / 0.7  # the mask add_dropped_lora drew
    assert 0 < (mask == 0).float().mean() < 0.6
    expected = base + 0.7 * (x * mask) @ A.T @ B.T
    torch.testing.assert_close(out, expected)
    expected.backward(g)
    for got, want in zip(ours, (t.grad for t in (x, A, B, base))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 13), (2, 64)])
def test_dropout_mask_bits_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape))) < 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


def test_keep_mask_keeps_about_1_minus_p():
    torch.manual_seed(0)
    kept = keep_mask(torch.empty(200_000), 0.1).float().mean().item()
    assert abs(kept - 0.9) < 0.005  # 7 standard deviations of the binomial mean


def test_training_with_dropout_saves_no_copy_of_the_input():
    """The autograd graph of a dropout-0.1 LoRA layer holds x itself and rank-sized tensors, no x-sized copy."""
    model = get_peft_model(nn.Sequential(nn.Linear(64, 64)), LoraConfig(r=2, target_modules=["0"], lora_dropout=0.1))
    model.train()
    x = torch.randn(16, 64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x).sum().backward()
    big = [t for t in saved if t.numel() >= x.numel() and t.data_ptr() != x.data_ptr()]
    assert not big, [tuple(t.shape) for t in big]
