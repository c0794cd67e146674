"""``trainable_token_indices``: PEFT's modules, keys and outputs on tied and untied Llamas, a dense float64
reference (rows replaced by hand), files both ways, exact merge → unmerge, a head's bias kept, file size
growing with the tokens and not the vocabulary."""

import copy
import os

import pytest
import torch
from torch import nn

import lorakit
from lorakit.convert import to_peft_key
from conftest import tiny_llama, token_ids

TOKENS = [3, 5, 7]


def ids_with_tokens():
    ids = token_ids()
    ids[0, :3] = torch.tensor(TOKENS)
    ids[1, -1] = 5
    return ids


def randomize_tokens(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=g))


def both(base, **kw):
    import peft

    kw = dict(r=2, target_modules=["q_proj"], init_lora_weights=False, trainable_token_indices=TOKENS) | kw
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(kw)))
    randomize_tokens(theirs)
    ours = lorakit.get_peft_model(base, lorakit.LoraConfig(**kw))
    own = ours.state_dict()
    # PEFT's tied head also lists the shared rows under its own name; lorakit keeps them once
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if k in own}, strict=True)
    return ours.eval(), theirs.eval()


def dense_reference(ours, ids, adapter="default"):
    """The base model (float64) with the adapter's rows written into the tables by hand, LoRA on q_proj included."""
    ref = copy.deepcopy(ours).double()
    with torch.no_grad():
        for _, layer in ref.base_model.lora_layers():
            if type(layer).__name__ == "TrainableTokensLayer" and adapter in layer.r:
                values = layer.trainable_tokens_delta[adapter]
                layer.base_layer.weight[layer.token_indices[adapter]] = values.to(torch.float64)
        with ref.disable_adapter():  # tokens off: the hand-written tables stand alone ...
            for _, layer in ref.base_model.lora_layers():  # ... but keep LoRA's q_proj update, densely
                if type(layer).__name__ == "Linear":
                    A, B = layer.factors(adapter)
                    layer.base_layer.weight += layer.scaling[adapter] * B @ A
            return ref(ids).logits


@pytest.mark.parametrize("tied", [False, True])
def test_matches_peft_and_dense_reference(tied):
    ours, theirs = both(tiny_llama(tie_word_embeddings=tied))
    model = ours.get_base_model()
    assert type(model.model.embed_tokens).__name__ == "TrainableTokensWrapper"
    assert (type(model.lm_head).__name__ == "TrainableTokensWrapper") == tied
    ids = ids_with_tokens()
    with torch.no_grad():
        out = ours(ids).logits
        torch.testing.assert_close(out, theirs(ids).logits, atol=1e-5, rtol=0)
        with ours.disable_adapter():
            plain = ours(ids).logits
    torch.testing.assert_close(out.double(), dense_reference(ours, ids), atol=1e-5, rtol=0)
    assert not torch.allclose(out, plain, atol=1e-3)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("tied", [False, True])
def test_merge_unmerge_bit_exact_and_unload(tied):
    ours, _ = both(tiny_llama(tie_word_embeddings=tied))
    ids = ids_with_tokens()
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_" not in n and "tokens_delta" not in n}
    with torch.no_grad():
        live = ours(ids).logits
        ours.merge_adapter()
        torch.testing.assert_close(ours(ids).logits, live, atol=1e-5, rtol=0)
        ours.unmerge_adapter()
    for n, p in ours.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    plain = ours.merge_and_unload()
    assert not any("TrainableTokens" in type(m).__name__ for m in plain.modules())
    assert (plain.lm_head.weight is plain.model.embed_tokens.weight) == tied  # tied partners stay tied
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, live, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_files_both_ways(tmp_path, tied):
    import peft

    ours, theirs = both(tiny_llama(tie_word_embeddings=tied))
    ids = ids_with_tokens()
    with torch.no_grad():
        expected = theirs(ids).logits
    ours.save_pretrained(tmp_path / "lk")
    theirs.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file

    ours_keys = load_file(tmp_path / "lk" / "adapter_model.safetensors")
    theirs_keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours_keys.items()} == {k: v.shape for k, v in theirs_keys.items()}
    from_peft = lorakit.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=tied), tmp_path / "peft").eval()
    into_peft = peft.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=tied), tmp_path / "lk").eval()
    with torch.no_grad():
        torch.testing.assert_close(from_peft(ids).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(into_peft(ids).logits, expected, atol=1e-5, rtol=0)


def test_file_grows_with_tokens_not_vocabulary(tmp_path):
    sizes = {}
    for vocab, tokens in ((64, 3), (4096, 3), (4096, 30)):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
        model = lorakit.get_peft_model(base, lorakit.LoraConfig(target_modules=["q_proj"],
                                                                 trainable_token_indices=list(range(tokens))))
        model.save_pretrained(tmp_path / f"{vocab}-{tokens}")
        sizes[vocab, tokens] = os.path.getsize(tmp_path / f"{vocab}-{tokens}" / "adapter_model.safetensors")
    assert sizes[64, 3] == sizes[4096, 3]
    grown = sizes[4096, 30] - sizes[4096, 3] - 27 * 32 * 4  # 27 more rows of 32 float32 values ...
    assert 0 <= grown < 64  # ... and a few bytes of the file's JSON header (longer numbers in the shape)


class BiasHeadLM(nn.Module):
    """An untied output head with a bias (PEFT drops that bias for trainable tokens, PEFT issue 3649)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(20, 8)
        self.lm_head = nn.Linear(8, 20, bias=True)

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.embed_tokens(ids)))


def test_untied_head_keeps_its_bias_and_dense_reference():
    base = BiasHeadLM()
    ref = copy.deepcopy(base).double()
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(
        target_modules=[], trainable_token_indices={"embed_tokens": [1, 2], "lm_head": [4, 9, 11]}))
    randomize_tokens(model)
    ids = torch.tensor([[1, 4, 2, 9, 0, 11]])
    tables = {type(m.base_layer).__name__: m for _, m in model.base_model.lora_layers()}
    with torch.no_grad():
        ref.embed_tokens.weight[[1, 2]] = tables["Embedding"].trainable_tokens_delta["default"].double()
        ref.lm_head.weight[[4, 9, 11]] = tables["Linear"].trainable_tokens_delta["default"].double()
        torch.testing.assert_close(model(ids).double(), ref(ids), atol=1e-6, rtol=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.merge_adapter()
    model.unmerge_adapter()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_two_adapters_switch_disable_delete_and_overlap():
    base = tiny_llama()
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3]))
    model.add_adapter("other", lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[5, 7]))
    model.add_adapter("clash", lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3, 9]))
    randomize_tokens(model)
    ids = ids_with_tokens()
    with torch.no_grad():
        model.set_adapter("other")
        other = model(ids).logits
        model.set_adapter(["default", "other"])
        both_on = model(ids).logits
        model.set_adapter(["default", "clash"])
        with pytest.raises(ValueError, match="disjoint"):
            model(ids)
        model.delete_adapter("clash")
        model.set_adapter("other")
        torch.testing.assert_close(model(ids).logits, other, atol=0, rtol=0)
    assert not torch.allclose(both_on, other)
    # the embedding's trainable parameters: only the active adapter's rows
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "token" in n]
    assert trainable == ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.other"]


def test_gradients_reach_only_the_listed_rows():
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"],
                                                                    trainable_token_indices=TOKENS)).train()
    ids = ids_with_tokens()
    model(ids, labels=ids).loss.backward()
    delta = model.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    assert model.base_model.model.model.embed_tokens.token_adapter.base_layer.weight.grad is None


def test_refusals():
    with pytest.raises(TypeError, match="trainable_token_indices"):
        lorakit.LoraConfig(trainable_token_indices=["a"])
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"],
                                                                trainable_token_indices=[70]))
    with pytest.raises(ValueError, match="matches no module"):
        lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"],
                                                                trainable_token_indices={"nope": [1]}))
    with pytest.raises(ValueError, match="modules_to_save"):
        lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                                trainable_token_indices=[1]))
    base = tiny_llama()
    names = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match="LoRA target"):
        lorakit.get_peft_model(base, lorakit.LoraConfig(target_modules=["embed_tokens"], trainable_token_indices=[1]))
    assert [n for n, _ in base.named_modules()] == names  # rolled back
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1]))
    model.add_adapter("b", lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[2]))
    with pytest.raises(NotImplementedError, match="TrainableTokensLayer"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "sum", combination_type="cat")
    assert "sum" not in model.peft_config


def test_tied_head_named_with_the_same_tokens_follows_the_embedding():
    import peft

    kw = dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": TOKENS, "lm_head": TOKENS})
    ours = lorakit.get_peft_model(tiny_llama(tie_word_embeddings=True), lorakit.LoraConfig(**kw))
    theirs = peft.get_peft_model(tiny_llama(tie_word_embeddings=True), peft.LoraConfig(**kw))
    from peft.utils import get_peft_model_state_dict

    head = ours.base_model.model.lm_head.token_adapter
    assert head.trainable_tokens_delta is ours.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta
    ours_tokens = {"base_model.model." + to_peft_key(k, "default")
                   for k in ours.base_model.adapter_state("default") if "tokens_delta" in k}
    theirs_tokens = {k for k in get_peft_model_state_dict(theirs) if "tokens_delta" in k}
    assert ours_tokens == theirs_tokens == {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"}


def test_mixed_batch_rows_get_their_tokens():
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"],
                                                                    trainable_token_indices=TOKENS)).eval()
    model.add_adapter("b", lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[5, 9]))
    randomize_tokens(model)
    ids = ids_with_tokens()
    names = ["b", "default"]
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
        rows = []
        for i, name in enumerate(names):
            model.set_adapter(name)
            rows.append(model(ids[i:i + 1]).logits[0])
    torch.testing.assert_close(mixed, torch.stack(rows), atol=1e-5, rtol=0)


class ScaledEmbedding(nn.Embedding):
    """An embedding subclass with its own forward (as Gemma 3's scaled word embedding)."""

    def forward(self, ids):
        return super().forward(ids) * 3.0


def test_embedding_subclass_with_its_own_forward():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed_tokens = ScaledEmbedding(20, 8)
            self.out = nn.Linear(8, 3)

        def forward(self, ids):
            return self.out(self.embed_tokens(ids))

    base = Net()
    ref = copy.deepcopy(base).double()
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(target_modules=[], trainable_token_indices={
        "embed_tokens": [2, 6]}))
    randomize_tokens(model)
    with torch.no_grad():
        ref.embed_tokens.weight[[2, 6]] = model.base_model.model.embed_tokens.token_adapter.trainable_tokens_delta[
            "default"].double()
        ids = torch.tensor([[2, 3, 6, 6, 0]])
        torch.testing.assert_close(model(ids).double(), ref(ids), atol=1e-6, rtol=0)
