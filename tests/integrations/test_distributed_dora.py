"""DoRA adapters under DDP and FSDP2 (two forked gloo processes, as in test_distributed.py): the magnitude vectors
train like the factors, and rank 0 saves the same adapter a one-process run trains, which PEFT loads with the same
outputs."""

from pathlib import Path

import torch
from torch import nn

from conftest import tiny_llama
from lorakit import LoraConfig, PeftModel, get_peft_model
from test_distributed import SAFE, STEPS, assert_saved, global_batch, launch, logits, my_rows, shard, train


def dora64() -> PeftModel:
    """Tiny Llama in float64 with a DoRA adapter on every linear layer (non-zero B, so the norms move)."""
    base = tiny_llama().double()
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    return get_peft_model(base, config).train()


def _ddp_member(rank: int, out: str) -> None:
    model = dora64()
    train(nn.parallel.DistributedDataParallel(model), my_rows(rank), STEPS)
    if rank == 0:
        model.save_pretrained(out)


def _fsdp_member(rank: int, out: Path) -> None:
    model = dora64()
    shard(model)
    train(model, my_rows(rank), STEPS)
    model.save_pretrained(out)  # a collective: every rank calls it, rank 0 writes


def _reference() -> PeftModel:
    reference = dora64()
    start = {k: v.clone() for k, v in reference.base_model.adapter_state("default").items()}
    train(reference, global_batch(), STEPS)
    moved = [k for k, v in reference.base_model.adapter_state("default").items() if not torch.equal(v, start[k])]
    assert any("lora_magnitude_vector" in k for k in moved) and len(moved) == len(start)
    return reference


def test_ddp_and_fsdp2_train_and_save_dora_like_one_process(tmp_path):
    import peft

    launch(_ddp_member, str(tmp_path / "ddp"))
    launch(_fsdp_member, tmp_path / "fsdp")
    reference = _reference()
    ids = global_batch()
    for kind in ("ddp", "fsdp"):
        assert (tmp_path / kind / SAFE).is_file()
        assert_saved(tmp_path / kind, reference, "default")
        theirs = peft.PeftModel.from_pretrained(tiny_llama().double(), tmp_path / kind)
        torch.testing.assert_close(logits(theirs, ids), logits(reference, ids), rtol=0, atol=1e-10)
