"""Tiny models built from configs (nothing is downloaded) and helpers shared by the tests."""

import copy
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from torch import nn

torch.set_num_threads(1)


class CustomNet(nn.Module):
    """Every layer kind lorakit adapts, in one small model: Embedding, Linear, Conv1d, Conv2d."""

    def __init__(self, dilation=(2, 1)):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv1d = nn.Conv1d(8, 6, kernel_size=3, padding=1)
        self.conv2d = nn.Conv2d(1, 4, kernel_size=(3, 2), stride=(1, 2), padding=(dilation[0], 0), dilation=dilation)
        self.lin1 = nn.Linear(6 * 5 + 4 * 4, 10)
        self.relu = nn.ReLU()
        self.lin2 = nn.Linear(10, 3)

    def forward(self, ids):  # ids: (N, 5)
        h = self.emb(ids).transpose(1, 2)  # N, 8, 5
        a = self.conv1d(h).flatten(1)  # N, 30
        img = self.emb(ids)[:, None, :, :]  # N, 1, 5, 8
        b = self.conv2d(img).mean(dim=(2,))  # N, 4, 4
        return self.lin2(self.relu(self.lin1(torch.cat([a, b.flatten(1)], dim=1))))


def custom_inputs(n=3):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 20, (n, 5), generator=g)


def tiny_llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(**kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, **kw)).eval()


def tiny_bert_cls(**kw):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32, num_labels=3, **kw)
    return BertForSequenceClassification(cfg).eval()


def token_ids(n=2, t=7, vocab=64):
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, vocab, (n, t), generator=g)


def lorakit_and_peft(base, lk_config_kwargs, task_type=None):
    """The same base wrapped by lorakit and by PEFT with the same config; lorakit gets PEFT's A/B weights."""
    import peft

    import lorakit

    twin = copy.deepcopy(base)
    kw = dict(lk_config_kwargs)
    if task_type:
        kw["task_type"] = task_type
    ours = lorakit.get_peft_model(base, lorakit.LoraConfig(**kw))
    theirs = peft.get_peft_model(twin, peft.LoraConfig(**copy.deepcopy(kw)))
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours, theirs


class PeftTestMLP(nn.Module):
    """The model of PEFT's own custom-model tests: lin0, ReLU, Dropout, lin1, LogSoftmax; input under ``X``."""

    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):  # PEFT's casts X to float32; here to the weights' dtype, so half-precision copies run
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.to(self.lin0.weight.dtype))))))


def peft_test_mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return PeftTestMLP().to(dtype).eval()


def mlp_input():
    """PEFT's test input for the MLP: 9 rows."""
    return torch.arange(90).view(9, 10).float()


@pytest.fixture
def custom_net():
    torch.manual_seed(0)
    return CustomNet().eval()


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    """Import ``examples/<name>.py`` (and its ``common`` helpers) as a module."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"lorakit_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
