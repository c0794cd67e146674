"""LoRA on quantized bases (QLoRA): bitsandbytes nf4 / fp4 (double quantization) / int8 and torchao int8, against
PEFT 0.21.2 on the same quantized tiny Llama and against dense float64 maths (tests/reference.py).

The Llama is built from a config, saved to a temporary folder and loaded with transformers' BitsAndBytesConfig /
TorchAoConfig, as a user loads a quantized model (nothing is downloaded). Comparisons of the unmerged model run in
train mode (no dropout anywhere): in eval mode without gradients, bitsandbytes 4-bit on a CPU with AVX512-BF16
repacks the weight and computes in bf16, so "the unmerged computation" is itself only bf16-accurate there; the
tests that need the repacked state say so.
"""

import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

import peft  # noqa: E402
from conftest import token_ids  # noqa: E402
from reference import dense_update  # noqa: E402

import lorakit  # noqa: E402
from lorakit.layers import QuantizedLinear, RequantizationWarning, is_quantized_linear  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = ["nf4", "fp4", "int8", "torchao"]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny Llama in float32, saved like a Hub checkpoint. Sizes: 4-bit blocks of 64, bitsandbytes' CPU kernel
    layout needs out_features % 32 == 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def load(folder, kind):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM, TorchAoConfig

    if kind == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig

        config = TorchAoConfig(Int8WeightOnlyConfig())
    elif kind == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:  # fp4 with double quantization, nf4 without: both settings of each flag are covered
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.float32,
                                    bnb_4bit_use_double_quant=kind == "fp4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM.from_pretrained(folder, quantization_config=config).train()


def from_pretrained(module, base, folder):
    """``module.PeftModel.from_pretrained`` (lorakit or PEFT), in train mode: loading puts the model in eval."""
    return module.PeftModel.from_pretrained(base, folder).train()


def peft_adapter(folder, kind, tmp_path):
    """A non-zero PEFT adapter trained on nothing, saved; returns (PEFT model, folder)."""
    torch.manual_seed(1)
    theirs = peft.get_peft_model(load(folder, kind), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                    init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    return theirs, tmp_path / "peft"


def logits(model, ids=None):
    with torch.no_grad():
        return model(token_ids(t=9) if ids is None else ids).logits


def quantized_layers(peft_model):
    """(name in the user's model, layer) of every adapted quantized layer."""
    return [(n, m) for n, m in peft_model.base_model.model.named_modules() if isinstance(m, QuantizedLinear)]


@pytest.mark.parametrize("kind", KINDS)
def test_peft_adapter_loads_with_peft_outputs(llama_folder, kind, tmp_path):
    theirs, saved = peft_adapter(llama_folder, kind, tmp_path)
    ours = from_pretrained(lorakit, load(llama_folder, kind), saved)
    layers = quantized_layers(ours)
    assert len(layers) == 2 * len(TARGETS)
    for _, layer in layers:  # sizes from the declared features, not the packed weight
        A, B = layer.factors("default")
        assert A.shape == (4, layer.base_layer.in_features) and B.shape == (layer.base_layer.out_features, 4)
        assert A.dtype == torch.float32
    trained_mode = logits(theirs)
    torch.testing.assert_close(logits(ours), trained_mode, atol=1e-5, rtol=0)
    # eval mode: lorakit keeps bitsandbytes' float path (PEFT's 4-bit layers switch to a bf16 CPU kernel here)
    ours.eval()
    torch.testing.assert_close(logits(ours), trained_mode, atol=1e-5 if kind != "int8" else 0.1, rtol=0)
    if kind != "int8":  # LLM.int8() quantizes the activations at inference: its eval outputs differ by design
        theirs.eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(token_ids(t=9)).logits, theirs(token_ids(t=9)).logits,
                                       atol=1e-5 if kind == "torchao" else 0.1, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_trained_adapter_loads_in_peft_and_only_adapters_get_gradients(llama_folder, kind, tmp_path):
    torch.manual_seed(0)
    ours = lorakit.get_peft_model(load(llama_folder, kind), lorakit.LoraConfig(r=4, lora_alpha=8,
                                                                                 target_modules=TARGETS))
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    ids = token_ids(t=9)
    for _ in range(2):
        loss = ours(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    with_grad = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    assert all(p.grad is None for n, p in ours.named_parameters() if "base_layer" in n)
    assert any(float(layer.factors("default")[1].abs().max()) > 0 for _, layer in quantized_layers(ours))  # trained
    ours.save_pretrained(tmp_path / "ours")
    theirs = from_pretrained(peft, load(llama_folder, kind), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=0)
    # and the same adapter on the float base: it loads, with the float model's outputs plus the update
    from transformers import LlamaForCausalLM

    on_float = from_pretrained(lorakit, LlamaForCausalLM.from_pretrained(llama_folder), tmp_path / "ours")
    assert torch.isfinite(logits(on_float)).all()


def merge_error(model, unmerged):
    return float((logits(model) - unmerged).abs().max())


@pytest.mark.parametrize("repacked", [False, True], ids=["before-forward", "after-inference-forward"])
@pytest.mark.parametrize("kind", KINDS)
def test_requantized_merge_no_further_than_peft_and_reported(llama_folder, kind, repacked, tmp_path):
    theirs, saved = peft_adapter(llama_folder, kind, tmp_path)
    ours = from_pretrained(lorakit, load(llama_folder, kind), saved)
    if repacked:  # one inference forward: PEFT's 4-bit layers switch to bitsandbytes' bf16 CPU kernel
        ours.eval(), theirs.eval()
        logits(ours), logits(theirs)
        ours.train(), theirs.train()
    unmerged, theirs_unmerged = logits(ours), logits(theirs)
    if not repacked:
        torch.testing.assert_close(theirs_unmerged, unmerged, atol=1e-5, rtol=0)
    originals = {n: (layer.dequantized_weight().double(), dense_update(*layer.factors("default"),
                                                                       layer.scaling["default"]))
                 for n, layer in quantized_layers(ours)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = ours.merge_and_unload()
    reports = [w.message for w in caught if isinstance(w.message, RequantizationWarning)]
    assert len(reports) == 1 and len(reports[0].report) == len(originals)
    from lorakit.layers.quantized import dequantized_linear

    for name, error in reports[0].report.items():  # the reported error is the merged weight's distance from W + Δ
        W, delta = originals[name]
        merged_layer = merged.get_submodule(name)
        diff = (dequantized_linear(merged_layer).weight.double() - (W + delta)).abs()
        assert error.max_weight_change == pytest.approx(float(diff.max()), rel=1e-4, abs=1e-6)
        assert error.max_output_change == pytest.approx(float(diff.sum(1).max()), rel=1e-4, abs=1e-6)
    assert all(is_quantized_linear(m) for n, m in merged.named_modules() if n.endswith("_proj"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_merged = theirs.merge_and_unload()
    ours_error, peft_error = merge_error(merged, unmerged), merge_error(theirs_merged, theirs_unmerged)
    assert ours_error <= peft_error * (1 + 1e-6) + 1e-6, (ours_error, peft_error)


@pytest.mark.parametrize("kind", KINDS)
def test_dequantized_merge_is_the_exact_sum(llama_folder, kind, tmp_path):
    _, saved = peft_adapter(llama_folder, kind, tmp_path)
    ours = from_pretrained(lorakit, load(llama_folder, kind), saved)
    ours.merge_adapter()  # a requantized merge first: the dequantized one must still start from the original
    ours.unmerge_adapter()
    unmerged = logits(ours)
    expected = {n: layer.dequantized_weight().double() + dense_update(*layer.factors("default"),
                                                                     layer.scaling["default"])
                for n, layer in quantized_layers(ours)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RequantizationWarning)  # nothing is rounded
        merged = ours.merge_and_unload(dequantize=True)
    assert not any(is_quantized_linear(m) for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None
    for name, weight in expected.items():
        layer = merged.get_submodule(name)
        assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32
        torch.testing.assert_close(layer.weight.double(), weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(merged), unmerged, atol=1e-4, rtol=0)


def raw_state(layer):
    """Every tensor that defines a quantized base layer's weight, as bytes-exact copies."""
    w = layer.weight
    tensors = [w.data] if not hasattr(w, "qdata") else [w.qdata, w.scale]
    state = getattr(w, "quant_state", None)
    if state is not None:
        tensors += [t for t in (state.absmax, getattr(state, "offset", None)) if isinstance(t, torch.Tensor)]
    scb = getattr(w, "SCB", None)
    if scb is None and hasattr(layer, "state"):
        scb = layer.state.SCB
    if scb is not None:
        tensors.append(scb)
    return [t.detach().clone() for t in tensors]


@pytest.mark.parametrize("kind", KINDS)
def test_merge_then_unmerge_restores_the_quantized_weights_bit_for_bit(llama_folder, kind, tmp_path):
    _, saved = peft_adapter(llama_folder, kind, tmp_path)
    ours = from_pretrained(lorakit, load(llama_folder, kind), saved)
    before = logits(ours)
    raw = {n: raw_state(layer.base_layer) for n, layer in quantized_layers(ours)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        ours.merge_adapter()
    assert all(layer.merged for _, layer in quantized_layers(ours))
    merged = logits(ours)
    assert not torch.equal(merged, before)  # it did merge (and round)
    ours.unmerge_adapter()
    for name, layer in quantized_layers(ours):
        for a, b in zip(raw_state(layer.base_layer), raw[name]):
            assert torch.equal(a, b), name
    assert torch.equal(logits(ours), before)
    with ours.disable_adapter():
        base = logits(ours)
    assert not torch.equal(base, before)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merging_two_adapters_one_by_one_rounds_once(llama_folder, kind, tmp_path):
    """Merging adapters in separate calls requantizes W + Δ1 + Δ2 from the original W, as one call does."""
    model = load(llama_folder, kind)
    ours = lorakit.get_peft_model(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    ours.add_adapter("other", lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        ours.merge_adapter(["default"])
        ours.merge_adapter(["other"])
        one_by_one = [layer.dequantized_weight().clone() for _, layer in quantized_layers(ours)]
        ours.unmerge_adapter()
        ours.merge_adapter(["default", "other"])
    for (_, layer), w in zip(quantized_layers(ours), one_by_one):
        assert torch.equal(layer.dequantized_weight(), w)


def test_irreversible_merge_refuses_to_unmerge_by_name(llama_folder, tmp_path):
    _, saved = peft_adapter(llama_folder, "nf4", tmp_path)
    ours = from_pretrained(lorakit, load(llama_folder, "nf4"), saved)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        ours.merge_adapter(reversible=False)
    with pytest.raises(ValueError, match=r"\['default'\].*reversible=False"):
        ours.unmerge_adapter()


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_counts_are_peft_s(llama_folder, kind):
    """A 4-bit weight stores two weights per byte: counted as the weights it holds, as PEFT counts them."""
    config = dict(r=4, target_modules=TARGETS)
    ours = lorakit.get_peft_model(load(llama_folder, kind), lorakit.LoraConfig(**config))
    theirs = peft.get_peft_model(load(llama_folder, kind), peft.LoraConfig(**config))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_quantized_layers_are_recognised_without_registering(llama_folder):
    model = load(llama_folder, "nf4")
    layer = model.model.layers[0].self_attn.q_proj
    from lorakit.layers import Linear, lora_layer_for

    assert lora_layer_for(layer) is QuantizedLinear
    assert lora_layer_for(torch.nn.Linear(2, 2)) is Linear
    ours = lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules="all-linear"))
    assert len(quantized_layers(ours)) == 2 * len(TARGETS)  # the float lm_head is the output head: left out


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_saving_an_adapter_leaves_the_4bit_base_as_it_was(llama_folder, kind, tmp_path):
    """Reading the adapter's tensors must not call bitsandbytes' _save_to_state_dict, which moves a 4-bit weight
    out of the CPU kernel's layout (and re-quantizes its absmax): after PEFT's save the outputs change."""
    ours = lorakit.get_peft_model(load(llama_folder, kind), lorakit.LoraConfig(target_modules=["q_proj", "v_proj"],
                                                                                 init_lora_weights=False)).eval()
    before = logits(ours)  # the inference forward puts the unwrapped 4-bit layers into the CPU kernel's layout
    ours.save_pretrained(tmp_path / "ours")
    assert torch.equal(logits(ours), before)
    reloaded = from_pretrained(lorakit, load(llama_folder, kind), tmp_path / "ours")
    for (_, a), (_, b) in zip(quantized_layers(ours), quantized_layers(reloaded)):
        assert torch.equal(a.factors("default")[0], b.factors("default")[0])


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_training_after_an_inference_forward_keeps_the_gradients(llama_folder, kind):
    """bitsandbytes' bf16 CPU kernel (switched to at a 4-bit layer's first inference forward) has no backward, so
    training after scoring in eval mode would silently lose the gradient through the base layers. lorakit keeps
    the float path: the gradients are those of a model that never ran in eval mode, and PEFT's on a fresh model."""
    ids = token_ids(t=9)

    def grads(module, inference_first):
        torch.manual_seed(0)
        config = module.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
        model = module.get_peft_model(load(llama_folder, kind), config)
        if inference_first:
            model.eval()
            logits(model)
            model.train()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    fresh, after_eval, theirs = grads(lorakit, False), grads(lorakit, True), grads(peft, False)
    assert fresh.keys() == after_eval.keys() == theirs.keys() and len(fresh) == 4 * len(TARGETS)
    for name in fresh:
        torch.testing.assert_close(after_eval[name], fresh[name], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(theirs[name], fresh[name], atol=1e-6, rtol=1e-5)


def test_dequantizing_a_layer_in_bitsandbytes_cpu_kernel_layout(llama_folder):
    """A 4-bit layer lorakit does not wrap may have been repacked by an inference forward; dequantizing it reads
    the repacked weight as the kernel does."""
    import bitsandbytes.functional as bnbF

    from lorakit.layers.quantized import dequantized_linear

    layer = load(llama_folder, "nf4").model.layers[0].mlp.up_proj.eval()
    stored = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        y = layer(x)
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes keeps the stored layout")
    weight = dequantized_linear(layer).weight.double()
    # the kernel rounds absmax, the code and their product to bf16: each weight moves by well under 2^-6 of its
    # size (a misread layout would move weights by their own size)
    assert float(((weight - stored).abs() - stored.abs() * 2 ** -6).max()) <= 1e-9
    torch.testing.assert_close(x.double() @ weight.T, y.double(), atol=2e-2, rtol=2e-2)  # y is bf16 arithmetic


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_on_a_quantized_base(llama_folder, kind, tmp_path):
    """adapter_names=[…]: each row gets its own adapter, as when that adapter alone is active."""
    _, saved = peft_adapter(llama_folder, kind, tmp_path)
    ours = from_pretrained(lorakit, load(llama_folder, kind), saved)
    ours.add_adapter("other", lorakit.LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    ours.eval()
    ids = token_ids(n=3, t=9)
    with torch.no_grad():
        mixed = ours(ids, adapter_names=["default", "other", "__base__"]).logits
        expected = []
        for row, name in enumerate(["default", "other"]):
            ours.set_adapter(name)
            expected.append(ours(ids[row:row + 1]).logits)
        with ours.disable_adapter():
            expected.append(ours(ids[2:]).logits)
    torch.testing.assert_close(mixed, torch.cat(expected), atol=1e-5, rtol=0)


def test_dora_on_a_quantized_base_is_refused_by_name(llama_folder):
    """DoRA's norms need the dequantized weight at every step; lorakit does not implement that (yet)."""
    model = load(llama_folder, "nf4")
    with pytest.raises(NotImplementedError, match="use_dora=True is not supported for QuantizedLinear"):
        lorakit.get_peft_model(model, lorakit.LoraConfig(r=4, target_modules=TARGETS, use_dora=True))
    assert not any(isinstance(m, lorakit.LoraLayer) for m in model.modules())  # rolled back
