"""The exact merge as one compiled pass per weight (numba, CPU), for :mod:`lorakit.exact_merge`.

Optional: ``pip install lorakit[fast]`` installs numba; without it (or on another device, or for dtypes other than
float32/bfloat16/float16 weights with a float32 update) :mod:`lorakit.exact_merge` does the same in eager PyTorch
passes. The two give the same bits: the arithmetic here is PyTorch's, element by element. ``W + Δ`` (and
``W − Δ``) is summed in float32 and rounded once to the weight's dtype (round to nearest even), ``Δ`` is the float32
product times ``float32(scale)``, and every difference of bit patterns wraps in the weight's integer width.

One pass reads each element of the weight and of the product once: it adds, subtracts again, compares the bit
patterns, writes the merged value and appends the element to the record when it does not come back (see
:class:`lorakit.exact_merge.MergeRecord`). It works in chunks of 4096 elements: a vectorized dense loop, then the
chunk's non-zero steps found through 64-bit masks, while the next chunk is prefetched from memory. Where a merged
value is not finite (inf/nan: PyTorch's NaN bit patterns depend on which of its loops produced them) the pass
stops, puts back what it changed (an original is the bits a plain subtraction gives back plus its step, so no copy
is kept) and says so; the caller then takes the eager path. Unmerging is one pass too (check a chunk, subtract,
add that chunk's recorded steps back while it is in cache), with the same rule for non-finite values.

numba is not imported with lorakit. The first merge starts a background thread that imports it and loads the
compiled passes (compiled once per installation and cached on disk by numba's ``cache=True``: tens of seconds of
one core the first time, 1–2 s afterwards); merges run the eager way until they are ready, so no merge waits for a
compiler.
:func:`ready` waits for them.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import Tensor

__all__ = ["available", "ready", "supports", "merge", "unmerge"]

BLOCK = 1 << 16  # positions are 16-bit offsets inside blocks of this many elements (as in exact_merge)
_KINDS = {torch.float32: (torch.int32, 0), torch.bfloat16: (torch.int16, 1), torch.float16: (torch.int16, 2)}
_state: dict = {}
_lock = threading.Lock()


def available() -> bool:
    """Whether the compiled passes are loaded (starts loading them in the background if nothing has yet)."""
    if "kernels" not in _state:
        _start_loading()
    return bool(_state.get("kernels"))


def ready(timeout: Optional[float] = None) -> bool:
    """Wait (at most ``timeout`` seconds) until the compiled passes are loaded or known to be unavailable (numba not
    installed); whether they can be used."""
    available()
    _state["loaded"].wait(timeout)
    return bool(_state.get("kernels"))


def supports(weight: Tensor, delta: Tensor) -> bool:
    """Whether the compiled pass handles this weight and product: plain contiguous CPU tensors (no subclass such as
    a DTensor), a float32/bfloat16/float16 weight, a float32 product."""
    return (type(weight) is Tensor and type(delta) is Tensor and weight.is_cpu and delta.is_cpu
            and weight.dtype in _KINDS and delta.dtype is torch.float32 and weight.is_contiguous()
            and delta.is_contiguous() and available())


def merge(weight: Tensor, delta: Tensor, scale: float) -> Optional[tuple]:
    """``weight += delta · scale`` in place (both contiguous, as many elements, read flat); returns ``(counts,
    offsets, steps, escape_index, escape_bits)`` as tensors (the fields of :class:`lorakit.exact_merge.MergeRecord`,
    arrays the pass allocated at their final sizes: nothing to copy), or ``None`` with ``weight`` unchanged where a
    merged value is not finite."""
    ints, kind = _KINDS[weight.dtype]
    found = _kernels()["merge"](_flat(weight.view(ints)), _flat(delta), _f32(scale), kind)
    if not found[0]:
        return None
    return tuple(map(torch.from_numpy, found[1:]))


def unmerge(weight: Tensor, delta: Tensor, scale: float, counts: Tensor, offsets: Tensor, steps: Tensor,
            escape_index: Tensor, escape_bits: Tensor) -> bool:
    """``weight −= delta · scale`` in place, then the record's steps and escapes; ``False`` with ``weight``
    unchanged where a merged value or the product is not finite."""
    ints, kind = _KINDS[weight.dtype]
    fn = _kernels()["unmerge"]
    return bool(fn(_flat(weight.view(ints)), _flat(delta), _f32(scale), kind, counts.numpy(), offsets.numpy(),
                   steps.numpy(), escape_index.numpy(), escape_bits.numpy()))


def _flat(t: Tensor):
    """A contiguous tensor as a flat numpy array (reshaped on the numpy side: a torch ``view`` costs more)."""
    array = t.numpy()
    return array if array.ndim == 1 else array.reshape(-1)


def _f32(x: float):
    return _state["float32"](x)  # numpy's float32, kept by _load (an import statement per call costs a microsecond)


def _kernels() -> dict:
    return _state["kernels"]


def _start_loading() -> None:
    with _lock:
        if "loaded" in _state:
            return
        _state["loaded"] = threading.Event()
        threading.Thread(target=_load, name="lorakit-merge-kernel", daemon=True).start()


def _load() -> None:
    """Import numba and the passes, and run each once on a few elements of every dtype (loads or compiles them)."""
    kernels = None
    try:
        import numpy as np

        from .merge_kernel_numba import merge_pass, unmerge_pass

        for ints, kind in ((np.int32, 0), (np.int16, 1), (np.int16, 2)):  # _KINDS, without torch in this thread
            bits, delta = np.zeros(8, ints), np.zeros(8, np.float32)
            found = merge_pass(bits, delta, np.float32(1), kind)
            unmerge_pass(bits, delta, np.float32(1), kind, *found[1:])
        kernels = {"merge": merge_pass, "unmerge": unmerge_pass}
        _state["float32"] = np.float32
    except ImportError:
        pass  # numba is not installed: the eager passes
    except Exception as exc:  # noqa: BLE001 - a compiler failure must not break merging
        _state["error"] = exc
    finally:
        _state["kernels"] = kernels
        _state["loaded"].set()
