"""``--device`` and ``--dtype`` (lorakit.cli.device): what ``auto`` picks where, the errors for a device that is
not there, out-of-memory as a one-line error, and a half-precision run on the CPU (the device code path)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.cli import data as D
from lorakit.cli import device as DV
from lorakit.cli import finetune as FT
from lorakit.cli.finetune.score import agreement

from .helpers import QA, cli, make_assets, make_llama, make_tokenizer


def _machine(monkeypatch, cuda: int = 0, mps: bool = False, bf16: bool = True, macos14: bool = True) -> None:
    """Pretend this machine has ``cuda`` CUDA GPUs and/or Apple's MPS."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos14, raising=False)


@pytest.mark.parametrize("cuda, mps, expected", [
    (2, True, "cuda:0"),  # CUDA first
    (1, False, "cuda:0"),
    (0, True, "mps"),  # then MPS
    (0, False, "cpu"),  # then the CPU
])
def test_auto_picks_what_exists(monkeypatch, cuda, mps, expected):
    _machine(monkeypatch, cuda=cuda, mps=mps)
    assert DV.resolve_device("auto") == torch.device(expected)
    assert DV.resolve_device("AUTO ") == torch.device(expected)


def test_auto_and_cuda_follow_the_local_rank(monkeypatch):
    """Under torchrun each process takes its own GPU (LOCAL_RANK)."""
    _machine(monkeypatch, cuda=2)
    assert DV.resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert DV.resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert DV.resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert DV.resolve("auto", "float32").device == torch.device("cuda", 1)


def test_named_devices(monkeypatch):
    _machine(monkeypatch, cuda=2, mps=True)
    assert DV.resolve_device("cpu") == torch.device("cpu")
    assert DV.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert DV.resolve_device("mps") == torch.device("mps")


@pytest.mark.parametrize("machine, spec, message", [
    ({}, "cuda", "--device cuda: "),
    ({}, "cuda:0", "available: cpu"),
    ({"cuda": 2}, "cuda:2", "there are 2 CUDA device(s), numbered from 0; available: cpu, cuda:0, cuda:1"),
    ({}, "mps", "--device mps: Apple's Metal (MPS) backend is not available here"),
    ({"mps": True}, "cuda", "available: cpu, mps"),
    ({}, "tpu", "--device tpu: expected auto, cpu, cuda, cuda:N or mps"),
    ({}, "cuda:x", "expected auto, cpu, cuda, cuda:N or mps"),
])
def test_a_device_that_is_not_there_is_a_clear_error(monkeypatch, machine, spec, message):
    _machine(monkeypatch, **machine)
    with pytest.raises(ValueError) as e:
        DV.resolve_device(spec)
    assert message in str(e.value)


def test_dtype_resolution(monkeypatch):
    _machine(monkeypatch, cuda=1, mps=True, bf16=True, macos14=True)
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda", 0), torch.device("mps")
    assert DV.resolve_dtype("auto", cpu) == torch.float32  # bf16 on a CPU is slow: auto stays in float32
    assert DV.resolve_dtype("auto", cuda) == torch.bfloat16
    assert DV.resolve_dtype("auto", mps) == torch.bfloat16
    for name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)]:
        for where in (cpu, cuda, mps):
            assert DV.resolve_dtype(name, where) == dtype
    _machine(monkeypatch, cuda=1, mps=True, bf16=False, macos14=False)  # an older GPU, an older macOS
    assert DV.resolve_dtype("auto", cuda) == torch.float32
    assert DV.resolve_dtype("auto", mps) == torch.float32
    assert DV.resolve_dtype("float16", cuda) == torch.float16
    with pytest.raises(ValueError, match="Fake GPU does not compute in bfloat16; use --dtype float16 or float32"):
        DV.resolve_dtype("bfloat16", cuda)
    with pytest.raises(ValueError, match="--dtype float64: expected one of auto, float32, bfloat16, float16"):
        DV.resolve_dtype("float64", cpu)
    # the flag's choices, the recipe's and the resolver's are the same list
    assert DV.DTYPE_CHOICES == tuple(f.metadata["choices"] for f in dataclasses.fields(FT.Settings)
                                     if f.name == "dtype")[0]


def test_placement_describes_itself(monkeypatch):
    _machine(monkeypatch, cuda=1)
    assert DV.resolve("auto", "auto").describe() == "cuda:0 (Fake GPU), base model in bfloat16, adapters in float32"
    assert DV.resolve("cpu", "auto").describe() == "cpu, base model in float32, adapters in float32"


# ------------------------------------------------------------------------------------------------------------------
# out of memory
# ------------------------------------------------------------------------------------------------------------------
CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.1 GiB of which 1.2 "
            "GiB is free. Including non-PyTorch memory, this process has 77.9 GiB memory in use. If reserved but "
            "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
MPS_OOM = ("MPS backend out of memory (MPS allocated: 17.2 GB, other allocations: 1.1 GB, max allowed: 18.1 GB). "
           "Tried to allocate 256.0 MB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable the "
           "upper limit for memory allocations (may cause system failure).")


def test_out_of_memory_is_recognised():
    assert DV.is_out_of_memory(torch.OutOfMemoryError(CUDA_OOM))
    assert DV.is_out_of_memory(RuntimeError(MPS_OOM))
    assert not DV.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not DV.is_out_of_memory(ValueError("out of memory"))  # not an error torch raises for memory


def test_out_of_memory_hint_names_what_to_lower():
    settings = FT.Settings(batch_size=8, chunk_tokens=512)
    fields = [f.name for f in dataclasses.fields(settings)]
    hint = DV.out_of_memory_hint(torch.OutOfMemoryError(CUDA_OOM), settings, fields)
    assert hint == "CUDA out of memory. Tried to allocate 2.00 GiB: try --batch-size 4 (now 8), or --chunk-tokens " \
                   "256 (now 512)" + (", or --quantize nf4" if "quantize" in fields else "")
    # once the command has --quantize (issue 16), the hint names it too
    WithQuantize = dataclasses.make_dataclass("WithQuantize", [("quantize", Optional[str], None)], bases=(FT.Settings,))
    quantized = WithQuantize(batch_size=1, chunk_tokens=64)
    hint = DV.out_of_memory_hint(RuntimeError(MPS_OOM), quantized, [f.name for f in dataclasses.fields(quantized)])
    assert hint.startswith("MPS backend out of memory (MPS allocated: 17.2 GB, other allocations: 1.1 GB, max "
                           "allowed: 18.1 GB). Tried to allocate 256.0 MB on private pool: try ")
    assert hint.endswith("try --chunk-tokens 32 (now 64), or --quantize nf4")  # batch size 1 cannot be halved
    assert "\n" not in hint


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    model, data, tok = make_assets(root)
    return SimpleNamespace(root=root, model=model, data=data, tok=tok)


TINY = ["--steps", 2, "--batch-size", 4, "--eval-split", 4, "--r", 4, "--alpha", 8, "--samples", 1,
        "--max-new-tokens", 2, "--save-every", 0]


@pytest.mark.parametrize("error", [torch.OutOfMemoryError(CUDA_OOM), RuntimeError(MPS_OOM)])
def test_finetune_out_of_memory_is_one_line(assets, monkeypatch, error):
    import lorakit.cli.finetune.train as train

    def oom(*args, **kwargs):
        raise error

    monkeypatch.setattr(train, "answer_logits", oom)  # the training step's forward runs out of memory
    code, stdout, stderr = cli("finetune", "--model", assets.model, "--data", assets.data, "--out",
                               assets.root / "oom", "--overwrite", *TINY)
    assert code == 1, stderr
    assert "before" in stdout  # it happened in training, after the first scoring
    lines = [line for line in stderr.splitlines() if line.startswith("lorakit")]
    assert lines == [stderr.strip().splitlines()[-1]] and "Traceback" not in stderr
    assert lines[0].startswith("lorakit finetune: error: ") and "out of memory" in lines[0]
    assert "try --batch-size 2 (now 4), or --chunk-tokens 256 (now 512)" in lines[0]
    # with --debug the device's own error is there to read
    with pytest.raises(DV.DeviceOutOfMemoryError) as e:
        cli("finetune", "--model", assets.model, "--data", assets.data, "--out", assets.root / "oom", "--overwrite",
            "--debug", *TINY)
    assert e.value.__cause__ is error


def test_other_runtime_errors_are_not_dressed_as_memory(assets, monkeypatch):
    import lorakit.cli.finetune.train as train

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(train, "answer_logits", broken)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        cli("finetune", "--model", assets.model, "--data", assets.data, "--out", assets.root / "other", *TINY)


def test_unavailable_device_stops_the_command_before_loading(assets, monkeypatch):
    _machine(monkeypatch)
    code, stdout, stderr = cli("finetune", "--model", assets.model, "--data", assets.data, "--out",
                               assets.root / "nocuda", "--device", "cuda", *TINY)
    assert code == 1 and stderr.startswith("lorakit finetune: error: --device cuda: ") and stdout == ""
    code, _, stderr = cli("finetune", "--device", "mps", "--out", assets.root / "nomps", *TINY)
    assert code == 1 and "--device mps: Apple's Metal (MPS) backend is not available here" in stderr


# ------------------------------------------------------------------------------------------------------------------
# half precision (runs here on the CPU: the same code path as on a GPU)
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunks_stay_exact_in_half_precision(dtype):
    """A chunked step gives the whole batch's loss and gradients to the precision of a half-precision base
    (adapters in float32)."""
    tok = make_tokenizer()
    examples = [D.encode(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], 100)
                for q, a in QA[:5]]
    model = lorakit.get_peft_model(make_llama(len(tok)).to(dtype),
                                   lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      init_lora_weights=False))
    params = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in params} == {torch.float32}  # adapters in float32 on a half base

    def loss_and_grads(chunk_tokens=None):
        model.zero_grad()
        chunks = [examples] if chunk_tokens is None else D.token_chunks(examples, chunk_tokens)
        assert len(chunks) == 1 if chunk_tokens is None else len(chunks) > 1
        total = 0.0
        for chunk in chunks:
            logits, targets = FT.answer_logits(model, D.collate(chunk, D.pad_id_of(tok)))
            loss = F.cross_entropy(logits.float(), targets, reduction="sum")
            loss.backward()
            total += loss.item()
        return total, [p.grad.clone() for p in params]

    plain_loss, plain_grads = loss_and_grads()
    loss, grads = loss_and_grads(chunk_tokens=40)
    tol = agreement(dtype)
    assert loss == pytest.approx(plain_loss, rel=tol)
    for a, b in zip(grads, plain_grads):
        assert float((a - b).norm() / b.norm()) <= tol


def test_bfloat16_run_on_the_cpu(assets):
    """--dtype bfloat16: the base in bf16, the adapter trained and saved in float32, the merged model agreeing,
    device and dtype in the header, metrics.json and the checkpoint; --resume on a float32 base refused."""
    from safetensors.torch import load_file

    out, data = assets.root / "bf16", assets.root / "qa.jsonl"  # prompt/completion rows: a shared opening
    data.write_text("\n".join(json.dumps({"prompt": q, "completion": a}) for q, a in QA), encoding="utf-8")
    code, stdout, stderr = cli("finetune", "--model", assets.model, "--data", data, "--out", out, *TINY,
                               "--device", "cpu", "--dtype", "bfloat16")
    assert code == 0, stderr
    assert "device    cpu, base model in bfloat16, adapters in float32" in stdout
    assert "equal to the adapter" in stdout
    assert "4 opening tokens shared" in stdout  # not run once per batch in half precision (the plain computation)
    assert "(the shared opening is recomputed per row: its check needs float32, not bfloat16)" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["device"], metrics["dtype"], metrics["settings"]["dtype"]) == ("cpu", "bfloat16", "bfloat16")
    assert "peak_device_memory_mb" not in metrics  # the CPU's peak is peak_memory_mb
    assert metrics["after"]["perplexity"] < metrics["before"]["perplexity"]
    assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {torch.float32}
    state = torch.load(out / "checkpoints" / "step-000002" / FT.STATE_FILE, weights_only=True)
    assert state["dtype"] == "bfloat16"
    code, _, stderr = cli("finetune", "--out", out, "--resume", "--dtype", "float32")
    assert code == 1 and "--dtype was 'bfloat16', now 'float32'" in stderr


def test_resume_refuses_auto_resolving_to_another_dtype(assets):
    """A run started with --dtype auto on a GPU (bf16) and resumed with auto on a CPU (float32) is refused."""
    out = assets.root / "auto"
    code, _, stderr = cli("finetune", "--model", assets.model, "--data", assets.data, "--out", out, *TINY)
    assert code == 0, stderr
    path = out / "checkpoints" / "step-000002" / FT.STATE_FILE
    state = torch.load(path, weights_only=True)
    assert state["dtype"] == "float32" and state["settings"]["dtype"] == "auto"
    state["dtype"] = "bfloat16"  # as the GPU machine would have written it
    torch.save(state, path)
    code, _, stderr = cli("finetune", "--out", out, "--resume")
    assert code == 1 and "trained its base model in bfloat16, here it would be float32: pass --dtype bfloat16" in stderr
