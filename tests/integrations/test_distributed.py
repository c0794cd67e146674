"""Distributed training (issue 8): DDP and FSDP2 in two real processes (gloo on 127.0.0.1), the transformers
Trainer, gradient checkpointing.

References: single-process runs of the same maths. With the same global batch split into equal halves, DDP and
FSDP2 average the ranks' gradients, which is the whole batch's gradient, so the adapters must agree up to the
order of float additions (the models are float64, so that is ~1e-15). Saved files are read back by lorakit and
by PEFT.

Processes are forked, not spawned: a child starts in milliseconds instead of importing torch and transformers
again, which matters on a small shared CPU. Every run has a hard deadline, and the gloo group a timeout, so a
collective that hangs fails the test instead of stalling the suite.
"""

import datetime
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaForCausalLM  # noqa: F401  imported once here, not again in each forked process

from conftest import tiny_llama
from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.convert import to_peft

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch was built without torch.distributed")

WORLD = 2
SAFE = "adapter_model.safetensors"
STEPS = 3


# ----------------------------------------------------------------------------------------------------------------
# Running WORLD processes
# ----------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _member(rank: int, fn, port: int, torchrun: bool, args: tuple) -> None:
    torch.set_num_threads(1)
    if torchrun:  # what torchrun puts in the environment; fn joins the group itself
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
        fn(rank, *args)
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def launch(fn, *args, timeout: float = 90, torchrun: bool = False) -> None:
    """Run ``fn(rank, *args)`` in WORLD forked processes joined in one gloo group (or, with ``torchrun``, given
    torchrun's environment to join it themselves); a failure in any of them (its traceback) or the deadline fails
    the test, and no process outlives the call."""
    ctx = mp.start_processes(_member, args=(fn, free_port(), torchrun, args), nprocs=WORLD, join=False,
                             start_method="fork")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{fn.__name__}: {WORLD} processes still running after {timeout} s (a collective hung?)")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
            process.join()


# ----------------------------------------------------------------------------------------------------------------
# The model, the data, the training
# ----------------------------------------------------------------------------------------------------------------
def model64() -> PeftModel:
    """Tiny Llama in float64: adapter ``default`` (every linear layer, and lm_head trained in full) is trained;
    ``other`` is inactive and frozen, so DDP and FSDP see frozen and trainable adapter tensors side by side."""
    base = tiny_llama().double()
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["lm_head"])
    model = get_peft_model(base, config)
    torch.manual_seed(2)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    return model.train()


def global_batch() -> torch.Tensor:
    return torch.randint(0, 64, (2 * WORLD, 8), generator=torch.Generator().manual_seed(3))


def my_rows(rank: int) -> torch.Tensor:
    return global_batch().chunk(WORLD)[rank]


def sgd(model: nn.Module):
    """``train(ids, steps)``: SGD on the mean token loss; every trainable parameter must get a gradient at every
    step. Under FSDP2 make it right after sharding: after a forward the root unit's parameters stay unsharded
    until the next backward, and an optimizer made then would hold those instead of the sharded ones."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(params.values(), lr=0.5)

    def train(ids: torch.Tensor, steps: int) -> None:
        for _ in range(steps):
            model(input_ids=ids, labels=ids).loss.backward()
            assert not [n for n, p in params.items() if p.grad is None]
            optimizer.step()
            optimizer.zero_grad()

    return train


def train(model: nn.Module, ids: torch.Tensor, steps: int) -> None:
    sgd(model)(ids, steps)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def shard(model: PeftModel) -> None:
    """FSDP2 on a 2-process CPU mesh: one unit per decoder block, the rest in the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.get_base_model().model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def assert_saved(folder: Path, model: PeftModel, adapter: str) -> None:
    """The file in ``folder`` holds exactly ``adapter`` of ``model`` (PEFT's keys), up to float64 rounding."""
    saved = load_file(folder / SAFE)
    expected = to_peft(model.base_model.adapter_state(adapter), adapter)
    assert sorted(saved) == sorted(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(saved[key], tensor, rtol=0, atol=1e-12, msg=key)


def assert_trained(model: PeftModel) -> None:
    """Training moved the adapter away from its start (so equality with a reference is not trivial)."""
    start = model64().base_model.adapter_state("default")
    moved = [k for k, v in model.base_model.adapter_state("default").items() if not torch.equal(v, start[k])]
    assert len(moved) == len(start)


# ----------------------------------------------------------------------------------------------------------------
# DDP
# ----------------------------------------------------------------------------------------------------------------
def _ddp_member(rank: int, out: str) -> None:
    model = model64()
    # find_unused_parameters=False (the default): a trainable parameter left out of the graph fails the next step
    train(nn.parallel.DistributedDataParallel(model), my_rows(rank), STEPS)
    if rank == 0:
        model.save_pretrained(out)


def test_ddp_equals_one_process_and_rank0_saves_a_peft_adapter(tmp_path):
    import peft

    launch(_ddp_member, str(tmp_path))
    reference = model64()
    train(reference, global_batch(), STEPS)
    assert_trained(reference)
    assert_saved(tmp_path, reference, "default")
    assert_saved(tmp_path / "other", reference, "other")

    theirs = peft.PeftModel.from_pretrained(tiny_llama().double(), tmp_path)
    ids = global_batch()
    torch.testing.assert_close(logits(theirs, ids), logits(reference, ids), rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# FSDP2
# ----------------------------------------------------------------------------------------------------------------
def _fsdp_member(rank: int, out: Path) -> None:
    import torch.distributed.checkpoint.state_dict as dcp_state

    from lorakit.distributed import is_sharded

    gathers = []
    original = dcp_state.get_model_state_dict

    def recording(module, **kwargs):  # what each gather fetched: frozen parameters skipped or not, tensor count
        state = original(module, **kwargs)
        gathers.append((kwargs["options"].ignore_frozen_params, len(state)))
        return state

    dcp_state.get_model_state_dict = recording
    model = model64()
    shard(model)
    assert is_sharded(model)
    train(model, my_rows(rank), STEPS)
    model.save_pretrained(out / "trained" / f"rank{rank}", selected_adapters=["default"])  # every rank calls
    model.save_pretrained(out / "all")
    probe = logits(model, global_batch())  # a collective too: every rank runs the forward
    if rank == 0:
        torch.save(probe, out / "logits.pt")
    (out / f"gathers{rank}.json").write_text(json.dumps(gathers))


def test_fsdp2_save_gathers_on_rank0_and_loads_back_equal(tmp_path):
    launch(_fsdp_member, tmp_path)
    reference = model64()
    train(reference, global_batch(), STEPS)
    assert_trained(reference)

    # Only rank 0 writes; the adapter equals the one-process run's.
    assert not (tmp_path / "trained" / "rank1").exists()
    assert sorted(os.listdir(tmp_path / "trained" / "rank0")) == ["README.md", "adapter_config.json", SAFE]
    assert_saved(tmp_path / "trained" / "rank0", reference, "default")
    assert_saved(tmp_path / "all", reference, "default")
    assert_saved(tmp_path / "all" / "other", reference, "other")

    # Frozen parameters are gathered only when a frozen tensor (adapter "other") is saved; rank 1 receives none.
    trainable = sum(p.requires_grad for p in reference.parameters())
    assert json.loads((tmp_path / "gathers0.json").read_text()) == [[True, trainable],
                                                                    [False, len(reference.state_dict())]]
    assert json.loads((tmp_path / "gathers1.json").read_text()) == [[True, 0], [False, 0]]

    # Save -> load: the file loads back into an unsharded model that computes what the sharded one computed.
    loaded = PeftModel.from_pretrained(tiny_llama().double(), tmp_path / "all")
    torch.testing.assert_close(logits(loaded, global_batch()), torch.load(tmp_path / "logits.pt"), rtol=0, atol=1e-10)


def _fsdp_load_member(rank: int, adapter: Path, out: Path) -> None:
    model = PeftModel.from_pretrained(tiny_llama().double(), adapter, is_trainable=True)
    shard(model)
    step = sgd(model)
    probe = logits(model, global_batch())
    model.train()
    step(my_rows(rank), 1)
    model.save_pretrained(out / "after")
    if rank == 0:
        torch.save(probe, out / "logits.pt")


def test_fsdp2_adapter_loaded_before_sharding_computes_and_trains(tmp_path):
    start = model64()
    train(start, global_batch(), 1)  # a non-zero adapter
    start.save_pretrained(tmp_path / "start", selected_adapters=["default"])
    launch(_fsdp_load_member, tmp_path / "start", tmp_path)

    reference = PeftModel.from_pretrained(tiny_llama().double(), tmp_path / "start", is_trainable=True)
    sharded = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(sharded, logits(reference, global_batch()), rtol=0, atol=1e-10)
    reference.train()
    train(reference, global_batch(), 1)
    assert_saved(tmp_path / "after", reference, "default")


# ----------------------------------------------------------------------------------------------------------------
# save_pretrained(state_dict=...): what accelerate hands over after gathering an FSDP model
# ----------------------------------------------------------------------------------------------------------------
def test_save_takes_tensors_from_a_given_state_dict(tmp_path):
    trained = model64()
    train(trained, global_batch(), 1)
    fresh = model64()
    fresh.save_pretrained(tmp_path, state_dict=trained.state_dict())
    assert_saved(tmp_path, trained, "default")
    assert_saved(tmp_path / "other", trained, "other")

    state = trained.state_dict()
    key = next(k for k in state if "lora_A.default" in k)
    before = (tmp_path / SAFE).read_bytes()
    with pytest.raises(KeyError, match="state_dict lacks 1 tensor"):
        fresh.save_pretrained(tmp_path, state_dict={k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match=rf"state_dict\['{key}'\] is a tensor of shape \(3,\)"):
        fresh.save_pretrained(tmp_path, state_dict={**state, key: torch.zeros(3)})
    with pytest.raises(TypeError, match="state_dict must be a dict of tensors"):
        fresh.save_pretrained(tmp_path, state_dict=[1, 2])
    assert (tmp_path / SAFE).read_bytes() == before


# ----------------------------------------------------------------------------------------------------------------
# The transformers Trainer
# ----------------------------------------------------------------------------------------------------------------
class Rows(torch.utils.data.Dataset):
    """Token rows as dicts, with a column the model does not take (the Trainer must drop it)."""

    def __init__(self):
        self.ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "source": "synthetic"}


def adapter_trainer(out: Path, **kwargs):
    from transformers import TrainingArguments

    from lorakit.integrations.trainer import AdapterTrainer

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    args = TrainingArguments(str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=5e-2, use_cpu=True,
                             report_to=[], save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1,
                             disable_tqdm=True, seed=0, **kwargs)
    return AdapterTrainer(model=model, args=args, train_dataset=Rows(), eval_dataset=Rows())


def file_state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / SAFE)


def model_state(model: PeftModel) -> dict[str, torch.Tensor]:
    return to_peft(model.base_model.adapter_state("default"), "default")


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_trainer_checkpoints_are_adapters_best_model_and_resume_load_them(tmp_path):
    import peft

    # The best checkpoint is the one with the higher eval loss, so it is the first, not the last.
    trainer = adapter_trainer(tmp_path / "run", load_best_model_at_end=True, metric_for_best_model="loss",
                              greater_is_better=True)
    trainer.train()
    first, second = tmp_path / "run" / "checkpoint-1", tmp_path / "run" / "checkpoint-2"
    eval_losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(eval_losses) == 2 and eval_losses[1] < eval_losses[0]
    assert Path(trainer.state.best_model_checkpoint) == first

    for checkpoint in (first, second):
        files = set(os.listdir(checkpoint))
        assert {"adapter_config.json", SAFE} <= files and not files & {"model.safetensors", "pytorch_model.bin"}
    with pytest.raises(AssertionError):
        assert_same_state(file_state(first), file_state(second))  # the second step changed the adapter
    model = trainer.model
    assert_same_state(model_state(model), file_state(first))  # load_best_model_at_end put the first one back

    # A checkpoint is a PEFT adapter: PEFT and lorakit load it and compute the same; the best one is the model.
    ids = Rows().ids[:2]
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), second)
    ours = PeftModel.from_pretrained(tiny_llama(), second)
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids))
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(), first), ids), logits(model, ids))

    # Resuming from the first checkpoint reaches the second one.
    resumed = adapter_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(first))
    assert_same_state(model_state(resumed.model), file_state(second))


def test_trainer_refuses_label_smoothing(tmp_path):
    """transformers picks the label shift of a causal LM by the model's class name, which lorakit's is not."""
    with pytest.raises(ValueError, match="label_smoothing_factor is not supported"):
        adapter_trainer(tmp_path, label_smoothing_factor=0.1)


def test_load_adapter_weights_checks_before_changing(tmp_path):
    from lorakit.integrations.trainer import load_adapter_weights

    model = model64()
    model.save_pretrained(tmp_path / "ok")
    smaller = get_peft_model(tiny_llama().double(), LoraConfig(r=2, target_modules="all-linear",
                                                               modules_to_save=["lm_head"]))
    smaller.save_pretrained(tmp_path / "r2")
    target = model64()
    train(target, global_batch(), 1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="has shape"):
        load_adapter_weights(target, tmp_path / "r2")
    with pytest.raises(FileNotFoundError):
        load_adapter_weights(target, tmp_path / "missing")
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), key
    load_adapter_weights(target, tmp_path / "ok")
    assert_saved(tmp_path / "ok", target, "default")
    assert_saved(tmp_path / "ok" / "other", target, "other")


# ----------------------------------------------------------------------------------------------------------------
# Gradient checkpointing on a transformers base
# ----------------------------------------------------------------------------------------------------------------
def lora_gradients(make_base, config: LoraConfig, inputs: dict, checkpointing: dict | None) -> dict:
    base = make_base().double().train()
    if checkpointing is not None:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    torch.manual_seed(1)
    model = get_peft_model(base, config).train()
    torch.manual_seed(5)  # the same dropout masks with and without checkpointing
    model(**inputs).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    return grads


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=48, num_labels=3))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 renames it activation_checkpointing_enable
@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("case", ["llama_dropout", "vit"])
def test_gradient_checkpointing_gives_the_same_gradients(case, reentrant):
    """The base checkpoints its blocks (enabled before wrapping); the adapters inside get the gradients they get
    without checkpointing, dropout masks included. ViT is the case transformers does not make inputs require
    grad for (its input is pixel_values): with reentrant checkpointing lorakit must."""
    if case == "vit":
        make, config = tiny_vit, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        g = torch.Generator().manual_seed(0)
        inputs = dict(pixel_values=torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64),
                      labels=torch.tensor([0, 2]))
    else:
        make = tiny_llama
        config = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1, init_lora_weights=False)
        ids = global_batch()
        inputs = dict(input_ids=ids, labels=ids)
    plain = lora_gradients(make, config, inputs, None)
    checkpointed = lora_gradients(make, config, inputs, {"use_reentrant": reentrant})
    assert sorted(plain) == sorted(checkpointed)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# lorakit finetune under torchrun
# ----------------------------------------------------------------------------------------------------------------
def _finetune_member(rank: int, argv: list, rows_file: Path) -> None:
    from lorakit.cli.finetune import train as finetune
    from lorakit.cli import main

    rows, original = [], finetune.answer_logits

    def recording(model, batch, *args):  # the rows each training step of this process sees
        if model.training:
            rows.append(len(batch["input_ids"]))
        return original(model, batch, *args)

    finetune.answer_logits = recording
    assert main(argv) == 0
    Path(f"{rows_file}{rank}").write_text(json.dumps(rows))


def test_finetune_under_torchrun_equals_one_process(tmp_path, capfd):
    """Two processes with torchrun's environment run ``lorakit finetune`` as one: each trains on its share of
    every batch (one batch has a single row, so one process gets none), the adapter equals a one-process run's,
    and only rank 0 logs and writes."""
    from cli.helpers import QA, make_llama, make_tokenizer

    from lorakit.cli import main

    tok = make_tokenizer()
    make_llama(len(tok)).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in QA), encoding="utf-8")
    # 16 examples - 5 held out = 11: batches of 5, 5 and 1 in the 3 steps
    argv = ["finetune", "--model", tmp_path / "llama", "--data", data, "--eval-split", 5, "--batch-size", 5,
            "--steps", 3, "--save-every", 2, "--samples", 0, "--r", 4, "--alpha", 8, "--lr", 1e-2, "--seed", 1]
    argv = [str(a) for a in argv]

    launch(_finetune_member, argv + ["--out", str(tmp_path / "two")], tmp_path / "rows", torchrun=True)
    two = capfd.readouterr()
    rows = [json.loads(Path(f"{tmp_path / 'rows'}{rank}").read_text()) for rank in range(WORLD)]
    assert sorted(rows[0]) == [1, 3, 3] and rows[1] == [2, 2]  # each step's batch split, 11 examples in all
    assert main(argv + ["--out", str(tmp_path / "one")]) == 0
    one = capfd.readouterr()

    assert two.out.count("held-out perplexity") == one.out.count("held-out perplexity") > 0
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
    assert os.listdir(tmp_path / "two" / "checkpoints") == os.listdir(tmp_path / "one" / "checkpoints")
    saved_one, saved_two = load_file(tmp_path / "one" / SAFE), load_file(tmp_path / "two" / SAFE)
    assert sorted(saved_one) == sorted(saved_two)
    for key in saved_one:
        torch.testing.assert_close(saved_two[key], saved_one[key], msg=key)
    losses_one = json.loads((tmp_path / "one" / "metrics.json").read_text())["losses"]
    losses_two = json.loads((tmp_path / "two" / "metrics.json").read_text())["losses"]
    torch.testing.assert_close(losses_two, losses_one)
