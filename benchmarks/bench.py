"""lorakit vs PEFT, side by side in one process: ``python -m benchmarks.bench [--quick] [--tiny] [--threads N]``.

Prints what it runs on (versions, threads, CPU, load), then one Markdown table: medians with min–max over the
rounds for each library, the per-round ratio lorakit/PEFT, and the issue's target with a verdict. Exits with
status 1 if anything gave a wrong answer or failed unexpectedly (features lorakit lacks show as "not supported
yet" and do not count as failures).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

from . import items
from . import workloads as w
from .harness import markdown_table, use_clock

_CLOCK_TEXT = {
    "cpu": "this process's CPU time: time the OS gives to other processes on a shared machine is left out",
    "wall": "elapsed time",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds (smoke test; numbers are rough)")
    parser.add_argument("--tiny", action="store_true", help="tiny models instead of the issue's (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                        help="cpu: process CPU time (leaves out time the OS gives other processes); wall: elapsed; "
                             "auto (default): cpu with one thread, wall with more")
    parser.add_argument("--rounds", type=int, help="rounds for cheap items (default 7, quick 2)")
    parser.add_argument("--heavy-rounds", type=int, help="rounds for training step and prefills (default 5, quick 2)")
    parser.add_argument("--decode-rounds", type=int, help="rounds of one decode step each (default 60, quick 3)")
    parser.add_argument("--only", default=",".join(items.SECTIONS),
                        help=f"comma-separated sections to run (default all: {','.join(items.SECTIONS)})")
    args = parser.parse_args(argv)
    sections = [s for s in args.only.split(",") if s]
    unknown = [s for s in sections if s not in items.SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(items.SECTIONS)}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    args.sections = sections
    return args


def environment(args: argparse.Namespace) -> list[str]:
    import peft
    import torch
    import transformers

    import lorakit

    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    s = args.scale
    model = ", ".join(f"{k}={v}" for k, v in s.model.items())
    narrow = ", ".join(f"{k}={v}" for k, v in s.narrow.items())
    return [
        f"command: python -m benchmarks.bench {' '.join(args.argv)}".rstrip(),
        f"lorakit {lorakit.__version__} vs peft {peft.__version__}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, python {platform.python_version()}",
        f"threads: {torch.get_num_threads()} (torch.set_num_threads; --threads)",
        f"clock: {args.clock} ({_CLOCK_TEXT[args.clock]}); save/load always wall-clock",
        f"CPU: {cpu}, {os.cpu_count()} cores; load average at start: {_load()}",
        f"model: LlamaConfig({model}); LoRA r={s.r} alpha={s.alpha} on {','.join(w.TARGETS)}",
        f"injection model: LlamaConfig({narrow})",
        f"rounds: {args.ctx.rounds} (training steps and prefills: {args.ctx.heavy_rounds}; decode: "
        f"{args.ctx.decode_rounds} of one step each, mixed decode ¾ of that); round trip: {args.ctx.cycles} cycles; memory: "
        f"{args.ctx.memory_runs} fresh process(es) per library",
    ]


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    if args.clock == "auto":
        args.clock = "cpu" if args.threads == 1 else "wall"
    use_clock(args.clock)
    args.scale = w.TINY if args.tiny else w.FULL
    args.ctx = items.Context(
        scale=args.scale,
        rounds=args.rounds or (2 if args.quick else 7),
        heavy_rounds=args.heavy_rounds or (2 if args.quick else 5),
        decode_rounds=args.decode_rounds or (3 if args.quick else 60),
        cycles=3 if args.quick else 10,
        threads=args.threads,
        memory_runs=1 if args.quick else 2,
    )
    header = environment(args)
    for line in header:
        items.log(line)
    start = time.time()
    rows = []
    for name in args.sections:
        rows += items.run_section(name, args.ctx)
    print("\n".join(header))
    print(f"load average at end: {_load()}; wall time {time.time() - start:.0f} s")
    print()
    print(markdown_table(rows))
    print()
    print("Times are medians over rounds with (min–max); lorakit/PEFT is the ratio within each round (median, min–max);"
          " below 1 means lorakit is faster or smaller.")
    if args.ctx.errors:
        print("\nFAILURES:")
        for error in args.ctx.errors:
            print(f"- {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
