"""Peak memory of one training step with ``lora_dropout=0.1``, each library in its own fresh process.

Separate processes, because a process's memory high-water mark only ever grows and the allocator keeps freed
memory: measured in one shared process, whichever library ran second would look better or worse by accident.

The worker builds the model, runs one warm-up step (optimizer state, lazily allocated buffers), resets the
kernel's high-water mark (``/proc/self/clear_refs``), runs one more step and reports how far the resident set
rose above where it stood before that step. glibc is told to serve every large allocation with ``mmap``
(``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the resident set at once instead of being cached.

A second figure, measured on a third step, is the size of the tensors autograd saved for backward (distinct
storages, parameters excluded): it shows directly whether a dropped copy of each input is kept.

With ``--folder FOLDER`` the base is the Llama checkpoint in FOLDER, loaded with ``from_pretrained``, in 4-bit
with ``--nf4`` (QLoRA, see :mod:`benchmarks.qlora`).

With ``--dora`` the model and batch are those of the DoRA section (:mod:`benchmarks.dora`), ``use_dora=True``.

Run as ``python -m benchmarks.memory --lib lorakit|peft [--threads N] [--tiny] [--folder FOLDER [--nf4]] [--dora]``;
prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

MIB = 1024 * 1024
DROPOUT = 0.1


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def _reset_peak() -> bool:
    """Set the high-water mark to the current resident set (Linux ≥ 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def saved_for_backward(step) -> int:
    """Bytes of distinct non-parameter storages autograd saves during ``step()``."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in step.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


status_kib = _status_kib  # public names for other benchmark workers (benchmarks.moe)
reset_peak = _reset_peak


def worker(lib_name: str, tiny: bool, threads: int, folder: str | None = None, nf4: bool = False,
           dora: bool = False) -> dict:
    import torch

    from . import workloads as w
    from .qlora import load_llama

    torch.set_num_threads(threads)
    scale = w.TINY if tiny else w.FULL
    if dora:  # the DoRA section's model and batch (benchmarks.dora)
        from . import dora as d

        model = d.wrap(w.library(lib_name), w.llama(scale.model if tiny else d.MODEL), scale, dropout=DROPOUT)
        ids = w.token_ids(scale, *(scale.train if tiny else d.TRAIN))
    else:
        base = load_llama(folder, nf4) if folder else w.llama(scale.model)
        model = w.wrap(w.library(lib_name), base, scale, dropout=DROPOUT)
        ids = w.token_ids(scale, *scale.train)
    model.train()
    step = w.TrainStep(model, ids)
    step()
    gc.collect()
    exact = _reset_peak()
    before = _status_kib("VmRSS") if exact else 0
    seconds = step()
    peak = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    saved = saved_for_backward(step)
    return {
        "lib": lib_name,
        "step_peak_mib": (peak - before) / 1024,
        "rss_before_mib": before / 1024,
        "peak_mib": peak / 1024,
        "saved_mib": saved / MIB,
        "step_seconds": seconds,
        "method": "VmHWM reset before the step" if exact else "ru_maxrss (whole process; no reset possible)",
    }


def measure(lib_name: str, tiny: bool, threads: int, timeout: float = 900, folder: str | None = None,
            nf4: bool = False, dora: bool = False) -> dict:
    """Run :func:`worker` in a fresh interpreter and return its result."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    cmd = [sys.executable, "-m", "benchmarks.memory", "--lib", lib_name, "--threads", str(threads)]
    if tiny:
        cmd.append("--tiny")
    if folder:
        cmd += ["--folder", folder] + (["--nf4"] if nf4 else [])
    if dora:
        cmd.append("--dora")
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory worker for {lib_name} exited with {done.returncode}: {tail[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", required=True, choices=["lorakit", "peft"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--folder", help="the base: the checkpoint in FOLDER (from_pretrained)")
    parser.add_argument("--nf4", action="store_true", help="with --folder: loaded in 4-bit nf4 (bitsandbytes)")
    parser.add_argument("--dora", action="store_true", help="the DoRA section's model, use_dora=True")
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    print(json.dumps(worker(args.lib, args.tiny, args.threads, args.folder, args.nf4, args.dora)))


if __name__ == "__main__":
    main()
