"""Where ``lorakit finetune`` runs and in what precision: ``--device`` and ``--dtype``, and out-of-memory errors.

``--device auto`` takes the first of CUDA, Apple's MPS and the CPU that this torch build can use; a device asked
for by name that is not there is a ``ValueError`` saying what is. ``--dtype`` is the base model's precision:
``auto`` is bfloat16 on a device that computes in it (CUDA with bf16 support; MPS on macOS 14 or later) and
float32 otherwise, the CPU included (bf16 matmuls on a CPU are slow and lossy). The adapters stay in float32
whatever the base's dtype (PEFT's ``autocast_adapter_dtype``: lorakit's layers compute the LoRA branch in the
adapter's dtype and add it in the output's).

Running out of memory on the device becomes a one-line :class:`DeviceOutOfMemoryError` naming the settings that
lower the peak (see :func:`out_of_memory_hint`).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

DEVICES = "auto, cpu, cuda, cuda:N or mps"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)

#: settings that lower the peak memory of a run, in the order an out-of-memory error suggests them, with the
#: value to try (``None``: half the current one); a setting the command does not have is left out
MEMORY_SETTINGS = (("batch_size", None), ("chunk_tokens", None), ("quantize", "nf4"))


class DeviceOutOfMemoryError(RuntimeError):
    """The device ran out of memory; the message is one line that names what to lower."""


@dataclass(frozen=True)
class Placement:
    """A resolved ``--device`` and ``--dtype``."""

    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> str:
        """One line for the run's header, e.g. ``cuda:0 (NVIDIA H100), base model in bfloat16, adapters in float32``."""
        name = ""
        if self.device.type == "cuda":
            name = f" ({torch.cuda.get_device_name(self.device)})"
        return f"{self.device}{name}, base model in {self.dtype_name}, adapters in float32"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``--device`` as a ``torch.device``. ``auto``: CUDA (GPU ``local_rank``: one per process under torchrun),
    else MPS, else the CPU. A device that is not available is a ``ValueError`` saying which are."""
    text = str(spec).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match:
        if not torch.cuda.is_available():
            built = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {spec}: {built} (torch {torch.__version__}); available: {_available()}")
        index = int(match[1]) if match[1] is not None else local_rank
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"--device {spec}: there {'is' if count == 1 else 'are'} {count} CUDA device(s), "
                             f"numbered from 0; available: {_available()}")
        return torch.device("cuda", index)
    if text == "mps":
        if not _mps_available():
            raise ValueError(f"--device mps: Apple's Metal (MPS) backend is not available here (it needs an "
                             f"Apple-silicon Mac and a torch built with MPS); available: {_available()}")
        return torch.device("mps")
    raise ValueError(f"--device {spec}: expected {DEVICES}")


def _available() -> str:
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return ", ".join(found)


def supports_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (CUDA with compute capability 8 and above, MPS on
    macOS 14+). The CPU can, but slowly, so it does not count here."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "mps":
        check = getattr(torch.backends.mps, "is_macos_or_newer", None)
        return bool(check is not None and check(14, 0))
    return False


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``--dtype`` for the base model on ``device``; ``auto``: bfloat16 where it is native, else float32."""
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.bfloat16 if supports_bfloat16(device) else torch.float32
    if text not in DTYPES:
        raise ValueError(f"--dtype {spec}: expected one of {', '.join(DTYPE_CHOICES)}")
    dtype = DTYPES[text]
    if dtype == torch.bfloat16 and device.type == "cuda" and not supports_bfloat16(device):
        raise ValueError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} does not compute in bfloat16; "
                         "use --dtype float16 or float32")
    return dtype


def resolve(device: str, dtype: str, local_rank: Optional[int] = None) -> Placement:
    """``--device`` and ``--dtype`` resolved; ``local_rank`` (default: torchrun's ``LOCAL_RANK``, else 0) picks
    the GPU of this process when the device is ``auto`` or ``cuda``."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    where = resolve_device(device, local_rank)
    return Placement(where, resolve_dtype(dtype, where))


def peak_device_memory_mb(device: torch.device) -> Optional[float]:
    """The most memory tensors held on a CUDA ``device`` at once, in MB; ``None`` elsewhere (the CPU's is the
    process's peak; MPS keeps no peak, only what is allocated now)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's ``torch.OutOfMemoryError``, or the ``RuntimeError`` that MPS and the CPU allocator raise."""
    if isinstance(error, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def out_of_memory_hint(error: BaseException, settings: Any, fields: Sequence[str]) -> str:
    """The one-line message for ``error`` (the device's out-of-memory error): its first two sentences, then each
    of :data:`MEMORY_SETTINGS` that ``fields`` (the command's settings) has, with a smaller value to try."""
    sentences = " ".join(str(error).split()).split(". ")
    cause = ". ".join(sentences[:2]).rstrip(".") or "out of memory"
    tries = []
    for name, value in MEMORY_SETTINGS:
        if name not in fields:
            continue
        current = getattr(settings, name, None)
        if value is None and isinstance(current, int) and current > 1:
            tries.append(f"--{name.replace('_', '-')} {current // 2} (now {current})")
        elif value is not None and current in (None, False):
            tries.append(f"--{name.replace('_', '-')} {value}")
    return f"{cause}: try {', or '.join(tries)}" if tries else cause


@contextlib.contextmanager
def out_of_memory_as_error(settings: Any, fields: Sequence[str]) -> Iterator[None]:
    """Inside the block, running out of memory raises :class:`DeviceOutOfMemoryError` with
    :func:`out_of_memory_hint`'s message (the device's own error stays in ``__cause__``)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised unless it is an out-of-memory error
        if not is_out_of_memory(e):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise DeviceOutOfMemoryError(out_of_memory_hint(e, settings, fields)) from e
