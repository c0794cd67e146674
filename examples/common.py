"""What every example does besides its own task: time its steps, check that merging the adapter changes nothing,
save it in PEFT's format and check that it loads back with the same outputs.

The examples import this file as ``common`` (Python puts the script's folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent


def parse_args(name: str, doc: str, **extra: tuple[type, object, str]) -> argparse.Namespace:
    """``--output-dir`` (where the adapter goes), ``--threads``, ``--seed`` and the example's own options
    (``extra``: ``option=(type, default, help)``)."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=HERE / "output" / name,
                        help="folder for the saved adapter (default: examples/output/%(prog)s's name)")
    threads = int(os.environ.get("OMP_NUM_THREADS", 0)) or torch.get_num_threads()
    parser.add_argument("--threads", type=int, default=threads,
                        help="torch CPU threads (default: $OMP_NUM_THREADS, else all cores; 1 is faster when busy)")
    parser.add_argument("--seed", type=int, default=0)
    for option, (kind, default, text) in extra.items():
        parser.add_argument(f"--{option.replace('_', '-')}", type=kind, default=default, help=text)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


class Clock:
    """Seconds per named phase, printed at the end so the README's numbers come from one place."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def phase(self, name: str):
        clock = self

        class _Phase:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                clock.seconds[name] = clock.seconds.get(name, 0.0) + time.perf_counter() - self.t

        return _Phase()

    def report(self) -> str:
        parts = [f"{name} {s:.1f} s" for name, s in self.seconds.items()]
        return ", ".join(parts + [f"total {time.perf_counter() - self._start:.1f} s"])


@torch.no_grad()
def check_merge(model: nn.Module, forward: Callable[[nn.Module], Tensor], rel_tol: float = 1e-4) -> float:
    """Merged outputs equal unmerged ones up to float rounding, and unmerging restores them bit for bit.

    Returns the largest absolute difference between merged and unmerged outputs; raises ``AssertionError`` if it
    exceeds ``rel_tol`` times the outputs' scale (merging reorders float32 sums, nothing more).
    """
    unmerged = forward(model)
    model.merge_adapter()
    merged = forward(model)
    model.unmerge_adapter()
    restored = forward(model)
    if not torch.equal(restored, unmerged):
        raise AssertionError("outputs after merge → unmerge differ from the original outputs")
    err = (merged.double() - unmerged.double()).abs().max().item()
    scale = max(unmerged.double().abs().max().item(), 1.0)
    if err > rel_tol * scale:
        raise AssertionError(f"merged outputs differ from unmerged ones by {err:.3g} (scale {scale:.3g})")
    return err


@torch.no_grad()
def save_and_reload(
    model: nn.Module,
    output_dir: Path,
    fresh_base: Callable[[], nn.Module],
    forward: Callable[[nn.Module], Tensor],
) -> tuple[dict[str, int], float]:
    """``model.save_pretrained(output_dir)``, then ``PeftModel.from_pretrained`` on a fresh copy of the base model:
    the reloaded model's outputs must equal the trained model's. Returns the files written and their sizes, and the
    largest output difference.

    Equal up to the last bit is not guaranteed even for equal weights: torch's matmul may group a batched product
    differently when a weight requires grad (trained model) than when it doesn't (reloaded, frozen), which rounds
    differently. So the check allows float32 rounding.
    """
    from lorakit import PeftModel

    model.save_pretrained(output_dir)
    reloaded = PeftModel.from_pretrained(fresh_base(), output_dir)
    expected, got = forward(model), forward(reloaded)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg="the reloaded adapter gives other outputs")
    files = {p.name: p.stat().st_size for p in sorted(Path(output_dir).iterdir()) if p.is_file()}
    return files, (got.double() - expected.double()).abs().max().item()


def describe_files(files: dict[str, int]) -> str:
    return ", ".join(f"{name} ({size / 1024:.1f} KiB)" for name, size in files.items())
