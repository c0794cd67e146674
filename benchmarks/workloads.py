"""The models, inputs and operations the benchmark measures, written once for both libraries.

lorakit is a drop-in for PEFT, so every operation here is the same code with ``lib`` being either the ``lorakit``
or the ``peft`` module; only where lorakit may still lack a feature is the failure turned into
:class:`Unsupported`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from .harness import BenchError, Unsupported, now

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LIB_NAMES = ("lorakit", "peft")


@dataclass(frozen=True)
class Scale:
    """Model sizes and input shapes. ``FULL`` is the issue's setting; ``TINY`` runs in seconds (smoke test)."""

    model: dict  # LlamaConfig kwargs of the main model
    narrow: dict  # LlamaConfig kwargs of the 32-layer model used for injection
    train: tuple[int, int]  # batch × tokens of a training step
    prefill: tuple[int, int]
    cache: int  # tokens in the KV cache for decode steps
    mixed_tokens: int  # tokens per row of a mixed-adapter prefill
    adapters: tuple[int, int] = (8, 32)  # distinct adapters in the mixed batches
    r: int = 16
    alpha: int = 32


FULL = Scale(
    model=dict(vocab_size=16000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8),
    narrow=dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=32, num_attention_heads=4),
    train=(4, 256),
    prefill=(4, 256),
    cache=128,
    mixed_tokens=32,
)
TINY = Scale(
    model=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    narrow=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2),
    train=(2, 16),
    prefill=(2, 16),
    cache=8,
    mixed_tokens=4,
    adapters=(2, 4),
    r=4,
    alpha=8,
)


def library(name: str) -> ModuleType:
    if name == "lorakit":
        import lorakit

        return lorakit
    if name == "peft":
        import peft

        return peft
    raise ValueError(f"unknown library {name!r}: expected one of {LIB_NAMES}")


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
def llama(kwargs: dict, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A randomly initialised Llama (nothing downloaded), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).to(dtype).eval()


def lora_config(lib: ModuleType, scale: Scale, dropout: float = 0.0):
    return lib.LoraConfig(r=scale.r, lora_alpha=scale.alpha, lora_dropout=dropout, target_modules=list(TARGETS))


def wrap(lib: ModuleType, base: nn.Module, scale: Scale, adapters: int = 1, dropout: float = 0.0) -> nn.Module:
    """``get_peft_model`` on ``base`` (modified in place) with ``adapters`` adapters: ``a0`` (active), ``a1``, …

    The factors get deterministic non-zero values (see :func:`randomize_lora`), the same in both libraries.
    """
    model = lib.get_peft_model(base, lora_config(lib, scale, dropout), adapter_name="a0")
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", lora_config(lib, scale, dropout))
    randomize_lora(model)
    return model.eval()


def randomize_lora(model: nn.Module, seed: int = 1, b_std: float = 0.01) -> None:
    """Give every LoRA factor a deterministic value, so both libraries hold identical adapters and ``B ≠ 0``
    (a zero ``B`` would make merging trivially exact). Parameters are visited in name order; lorakit uses PEFT's
    parameter names, so the same name gets the same numbers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * b_std)


def lora_names(model: nn.Module) -> list[str]:
    return sorted(n for n, _ in model.named_parameters() if ".lora_" in n)


def token_ids(scale: Scale, batch: int, tokens: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, scale.model["vocab_size"], (batch, tokens), generator=g)


def logits(model: nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def check_same_outputs(a: nn.Module, b: nn.Module, ids: torch.Tensor, what: str) -> None:
    """Both models give the same logits (a guard: numbers for models that compute different things mean nothing)."""
    la, lb = logits(a, ids), logits(b, ids)
    if not torch.allclose(la, lb, rtol=1e-4, atol=1e-4):
        raise BenchError(f"{what}: outputs differ (max |Δ| {(la - lb).abs().max().item():.2e})")


def merged_copy(model: nn.Module, probe: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with its adapter merged (checked to compute what the unmerged one does)."""
    merged = copy.deepcopy(model)
    merged.merge_adapter()
    check_same_outputs(merged, model, probe, "merged copy")
    return merged


class MinimalLora(nn.Module):
    """The least an unmerged LoRA layer can do at inference: ``base(x)`` plus two small matmuls and a fused add.

    Not a library: a reference floor for the decode overhead, built from an adapted model's factors.
    """

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        super().__init__()
        self.base, self.A, self.B, self.scaling = base, A.detach().clone(), B.detach().clone(), scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = x @ self.A.T
        return y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), self.B.T, alpha=self.scaling).view(y.shape)


def minimal_lora(base: nn.Module, adapted: nn.Module, scale: Scale, adapter: str = "a0") -> nn.Module:
    """A copy of ``base`` whose targeted linears are :class:`MinimalLora` with ``adapted``'s factors (inference only)."""
    model = copy.deepcopy(base)
    params = dict(adapted.named_parameters())
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in TARGETS:
            A = params[f"base_model.model.{name}.lora_A.{adapter}.weight"]
            B = params[f"base_model.model.{name}.lora_B.{adapter}.weight"]
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, MinimalLora(module, A, B, scale.alpha / scale.r))
    return model


class MinimalMixedLora(nn.Module):
    """Reference for mixed batches: ``base(x)`` plus, per row, that row's adapter by two batched matmuls.

    ``A`` is the stack of every adapter's A (``K × r × in``), ``B`` of every ``s·B`` (``K × out × r``). With
    ``gather`` the factors are gathered per row (``A[rows]``: a copy, as any general mixed batch needs); without,
    row ``i`` simply uses adapter ``i`` (``A[:n]``, no copy): the least a mixed batch of distinct adapters costs.
    """

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.base, self.A, self.B = base, A, B
        self.rows: torch.Tensor = torch.arange(A.shape[0])
        self.gather = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        n = x.shape[0]
        A, B = (self.A[self.rows], self.B[self.rows]) if self.gather else (self.A[:n], self.B[:n])
        h = torch.bmm(x.reshape(n, -1, x.shape[-1]), A.transpose(1, 2))
        return y + torch.bmm(h, B.transpose(1, 2)).view(y.shape)


def minimal_mixed_lora(base: nn.Module, adapted: nn.Module, names: list[str], scale: Scale) -> nn.Module:
    """A copy of ``base`` whose targeted linears are :class:`MinimalMixedLora` over ``adapted``'s adapters
    ``names`` (row ``i`` of a batch gets ``names[i]``); inference only."""
    model = copy.deepcopy(base)
    params = dict(adapted.named_parameters())
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in TARGETS:
            key = f"base_model.model.{name}.lora_{{}}.{{}}.weight"
            A = torch.stack([params[key.format("A", a)].detach() for a in names])
            B = torch.stack([params[key.format("B", a)].detach() for a in names]) * (scale.alpha / scale.r)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, MinimalMixedLora(module, A, B))
    return model


def configure_mixed(model: nn.Module, rows: int, gather: bool) -> None:
    """Batches of ``rows`` rows, row ``i`` through adapter ``i``; gathered per row or sliced (see above)."""
    for module in model.modules():
        if isinstance(module, MinimalMixedLora):
            module.rows, module.gather = torch.arange(rows), gather


# ----------------------------------------------------------------------------------------------------------------
# Operations
# ----------------------------------------------------------------------------------------------------------------
class TrainStep:
    """forward with labels, backward, AdamW step over the trainable parameters."""

    def __init__(self, model: nn.Module, ids: torch.Tensor) -> None:
        self.model, self.ids = model, ids
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def __call__(self) -> float:
        start = now()
        self.model(input_ids=self.ids, labels=self.ids).loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return now() - start


def make_cache(base: nn.Module, batch: int, tokens: int, scale: Scale):
    """A KV cache holding ``tokens`` tokens for ``batch`` rows (its contents do not affect timing)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=base.config)
    with torch.no_grad():
        base(input_ids=token_ids(scale, batch, tokens, seed=3), cache=cache, use_cache=True, logits_to_keep=1)
    return cache


class Decode:
    """One single-token decode step against a cache of fixed length.

    One step per round, so that the variants' steps alternate closely and the per-round ratio compares steps
    taken moments apart. The cache is cut back by one token after the step (not timed), so every step sees the
    same cache length.
    """

    def __init__(self, model: nn.Module, cache, **kwargs) -> None:
        self.model, self.cache, self.kwargs = model, copy.deepcopy(cache), kwargs
        batch = self.cache.layers[0].keys.shape[0]
        self.token = torch.full((batch, 1), 7, dtype=torch.long)

    def __call__(self) -> float:
        with torch.no_grad():
            start = now()
            self.model(input_ids=self.token, cache=self.cache, use_cache=True, **self.kwargs)
            seconds = now() - start
        self.cache.crop(-1)
        return seconds


class Prefill:
    """One forward over a whole prompt, keeping only the last position's logits (as ``generate`` does)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, **kwargs) -> None:
        self.model, self.ids, self.kwargs = model, ids, kwargs

    def __call__(self) -> float:
        with torch.no_grad():
            start = now()
            self.model(input_ids=self.ids, logits_to_keep=1, **self.kwargs)
            return now() - start


def check_mixed(lib_name: str, model: nn.Module, names: list[str], ids: torch.Tensor) -> None:
    """A mixed batch (row ``i`` through adapter ``names[i]``) must equal running each row with its adapter set.

    For lorakit, a forward that refuses ``adapter_names`` or silently ignores it means the feature has not
    landed yet (:class:`Unsupported`); a forward that takes it and computes something else is a :class:`BenchError`.
    """
    try:
        mixed = logits(model, ids, adapter_names=names)
    except Exception as exc:  # noqa: BLE001 — any refusal means "not there yet"
        if lib_name == "lorakit":
            raise Unsupported(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:80]) from exc
        raise
    previous = list(model.active_adapters)
    try:
        rows = []
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    rows.append(logits(model, ids[i : i + 1])[0])
                continue
            model.set_adapter(name)
            rows.append(logits(model, ids[i : i + 1])[0])
    finally:
        model.set_adapter(previous[0] if len(previous) == 1 else previous)
    expected = torch.stack(rows)
    if torch.allclose(mixed, expected, rtol=1e-4, atol=1e-4):
        return
    if lib_name == "lorakit" and torch.allclose(mixed, logits(model, ids), rtol=1e-5, atol=1e-5):
        raise Unsupported("adapter_names is ignored")
    raise BenchError(f"{lib_name}: mixed-batch rows differ from per-adapter runs "
                     f"(max |Δ| {(mixed - expected).abs().max().item():.2e})")


def lorakit_feature(fn):
    """Run a lorakit setup step; a lorakit module that does not exist yet means "not supported yet"."""
    try:
        return fn()
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("lorakit"):
            raise Unsupported(f"{exc.name} missing") from exc
        raise
    except NotImplementedError as exc:
        raise Unsupported(str(exc)[:80]) from exc
