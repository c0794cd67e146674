"""What lorakit needs to know about ``torch.distributed``, in one place.

Data parallel training (DDP, ``torchrun``) needs nothing from lorakit: every rank holds whole tensors, and only
the trainable adapter parameters take part in the gradient all-reduce. FSDP2 (``fully_shard``) is different:
it replaces each parameter by a ``DTensor`` of which a rank holds one shard, so saving an adapter must first
gather the shards. That gather is a collective (every rank must take part, or the others wait forever) and its
result lands on rank 0's CPU only, so rank 0 alone writes the files.

``lorakit finetune`` under ``torchrun`` uses no wrapper: :func:`torchrun_group` joins the group torchrun sets up,
and :func:`sum_over_ranks` sums the gradients of each rank's share of a batch.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator, Optional

import torch
from torch import Tensor, nn


def rank() -> int:
    """This process's rank in the default process group; 0 when not running distributed."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the default process group; 1 when not running distributed."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ``DTensor`` (FSDP2's ``fully_shard``, tensor parallelism): such a
    module's tensors are only whole after :func:`gather_full`."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support cannot shard
        return False
    return any(isinstance(p, DTensor) for p in module.parameters())


def gather_full(module: nn.Module, keys: Iterable[str]) -> dict[str, Tensor]:
    """Whole CPU copies of ``module``'s state-dict entries named ``keys``, on rank 0; ``{}`` on the other ranks.

    A collective: every rank must call it, with the same module and keys.
    Frozen parameters (a sharded base model, usually nearly all of it) are gathered only when one of them is
    asked for, since gathering means holding them whole in rank 0's memory.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    keys = list(keys)
    trainable = {name for name, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    # Every rank decides alike: they hold the same adapters, trainable alike, and ask for the same keys.
    skip_frozen = all(k in trainable for k in keys)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=skip_frozen)
    full = get_model_state_dict(module, options=options)
    if rank() != 0:
        return {}
    missing = [k for k in keys if k not in full]
    if missing:
        raise RuntimeError(
            f"gathering the sharded model's state did not return {missing[:5]}: their names differ from the "
            "model's state_dict() keys (a wrapper other than FSDP2's fully_shard around part of the model?)"
        )
    return {k: full[k] for k in keys}


def sum_over_ranks(params: Iterable[Tensor], *numbers: float) -> list[float]:
    """Sum every parameter's gradient (a missing one counts as zeros) and ``numbers`` over all ranks, in one
    collective; returns the summed numbers. With one process the numbers come back as they are and the
    gradients are left alone.

    Data-parallel training without a DDP wrapper: each rank backpropagates its share of the batch, and after
    this every rank holds the gradient of the whole batch (in float64 while summed, so the order of the ranks
    does not matter beyond rounding).
    """
    if world_size() == 1:
        return [float(n) for n in numbers]
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    device = params[0].device if params else torch.device("cpu")
    extra = torch.tensor(numbers, dtype=torch.float64, device=device)
    flat = torch.cat([p.grad.reshape(-1).double() for p in params] + [extra])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()
    return flat[offset:].tolist()


@contextlib.contextmanager
def torchrun_group(backend: Optional[str] = None) -> Iterator[None]:
    """Inside the block, the default process group that ``torchrun`` asks for (``WORLD_SIZE`` > 1 and the
    rendezvous address in the environment), unless one exists already; outside ``torchrun``, nothing.
    ``backend`` None: torch's default (gloo for CPU tensors, and NCCL for CUDA ones where there is CUDA)."""
    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        yield
        return
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()
