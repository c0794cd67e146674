"""The decode section (``--only decode``): what an unmerged adapter costs a batch-1 decode step, at 1 and at 2
torch threads, measured in one process.

One decode step (batch 1, the main model's KV cache) for each of: lorakit and PEFT with the adapter unmerged and
merged, and the hand-written minimal LoRA (a floor for any unmerged layer). Every round runs every variant once at
each thread count: the thread count alternates between rounds (1 then 2, 2 then 1, …) and is switched with
``torch.set_num_threads``, with one untimed step after each switch; the variants' order rotates from round to round.
Each step is timed on both clocks at once, whatever ``--clock`` says: with one thread the process's CPU time (the
benchmark's usual clock, which leaves out time the OS gives to other processes) and elapsed time; with two threads
elapsed time (CPU time then adds up both threads, and an idle OpenMP thread spins for a while after each parallel
region) with CPU time shown beside it. Ratios are taken within each round, as everywhere in the benchmark; each
round keeps every variant's fastest of three steps, and the "fastest tenth of rounds" rows divide the variants'
10th-percentile times: with two threads on a machine whose cores are busy, most steps wait for the OS to run the
second thread, and these rows show the step without that wait.

At batch 1 the projections are matrix-vector products, which the BLAS runs on one thread whatever the thread
count; only attention and the cache update are split across threads. So a second thread barely shortens the step,
and on a machine whose cores are busy it mostly adds waiting at those parallel regions: that waiting, not the
adapter, is what moves the two-thread figures (compare the medians with the ranges).
"""

from __future__ import annotations

import copy
import gc
import time
from typing import Callable

import torch
from torch import nn

from . import workloads as w
from .harness import Row, Stats, Target, per_round_ratio

THREADS = (1, 2)
#: steps of each variant per round and thread count, the fastest kept: with two threads a step waits at every
#: parallel region for the second thread, so on a busy machine many steps mostly measure the OS's scheduling
REPEATS = 3
AT_MOST_110 = Target("lorakit", "<=", 1.10, "≤ 1.10")


def _log(message: str) -> None:
    from .items import log

    log(message)


class _Step:
    """One decode step of one model, timed on the wall and CPU clocks together (see :class:`workloads.Decode`:
    same fixed-length cache, cut back after each step)."""

    def __init__(self, model: nn.Module, cache) -> None:
        self.model, self.cache = model, copy.deepcopy(cache)
        self.token = torch.full((1, 1), 7, dtype=torch.long)

    def __call__(self) -> tuple[float, float]:
        gc.collect(1)
        gc.disable()
        try:
            with torch.no_grad():
                wall, cpu = time.perf_counter(), time.process_time()
                self.model(input_ids=self.token, cache=self.cache, use_cache=True)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        finally:
            gc.enable()
        self.cache.crop(-1)
        return wall, cpu


def measure(steps: dict[str, Callable[[], tuple[float, float]]], rounds: int, threads: tuple[int, ...] = THREADS,
            repeats: int = REPEATS) -> dict[tuple[int, str, str], list[float]]:
    """``{(threads, "wall" | "cpu", variant): [seconds per round]}``. Every round runs, at every thread count,
    ``repeats`` passes over the variants and keeps each variant's fastest step (per clock); the thread counts'
    order is reversed and the variants' order rotated from one round to the next."""
    names = list(steps)
    times: dict[tuple[int, str, str], list[float]] = {
        (t, clock, n): [] for t in threads for clock in ("wall", "cpu") for n in names}
    for t in threads:  # warm-up: two untimed steps of every variant at every thread count
        torch.set_num_threads(t)
        for n in names:
            steps[n]()
            steps[n]()
    for r in range(rounds):
        for t in threads if r % 2 == 0 else threads[::-1]:
            torch.set_num_threads(t)
            steps[names[-1]]()  # untimed: the first parallel region after a switch resizes the thread team
            k = r % len(names)
            best = {n: [float("inf"), float("inf")] for n in names}
            for _ in range(repeats):
                for n in names[k:] + names[:k]:
                    wall, cpu = steps[n]()
                    best[n] = [min(best[n][0], wall), min(best[n][1], cpu)]
            for n in names:
                times[t, "wall", n].append(best[n][0])
                times[t, "cpu", n].append(best[n][1])
    return times


def _label(threads: int, clock: str) -> str:
    return f"{threads} thread{'s' if threads > 1 else ''}, {'CPU time' if clock == 'cpu' else 'wall-clock'}"


def section_decode(ctx) -> list[Row]:
    s = ctx.scale
    probe = w.token_ids(s, 1, 8)
    models = {n: w.wrap(w.library(n), copy.deepcopy(ctx.base), s) for n in w.LIB_NAMES}
    w.check_same_outputs(models["lorakit"], models["peft"], probe, "one adapter")
    variants: dict[str, nn.Module] = {}
    for n, m in models.items():
        variants[n] = m
        variants[f"{n} merged"] = w.merged_copy(m, probe)
    variants["minimal"] = w.minimal_lora(ctx.base, models["lorakit"], s)
    w.check_same_outputs(variants["minimal"], models["lorakit"], probe, "hand-written minimal LoRA")
    cache = w.make_cache(ctx.base, 1, s.cache, s)
    rounds = ctx.decode_rounds
    _log(f"decode, batch 1, cache {s.cache}, threads {' and '.join(map(str, THREADS))}, {rounds} rounds of "
         f"{REPEATS} steps each")
    try:
        times = measure({n: _Step(m, cache) for n, m in variants.items()}, rounds)
    finally:
        torch.set_num_threads(ctx.threads)

    def cell(t: int, clock: str, n: str) -> Stats:
        return Stats.of(times[t, clock, n], "time")

    def ratio(t: int, clock: str, num: str, den: str) -> Stats:
        return per_round_ratio(times[t, clock, num], times[t, clock, den])

    def tenth_ratio(t: int, clock: str, num: str, den: str) -> Stats:
        """The ratio of the two variants' 10th-percentile times (each over all rounds)."""
        a, b = sorted(times[t, clock, num]), sorted(times[t, clock, den])
        return Stats.of([a[len(a) // 10] / b[len(b) // 10]], "ratio")

    rows: list[Row] = []
    for t, clock in ((1, "cpu"), (1, "wall"), (2, "wall"), (2, "cpu")):
        label = _label(t, clock)
        if (t, clock) in ((1, "cpu"), (2, "wall")):  # the two clocks that are a latency
            rows += [
                Row(f"decode step, batch 1, cache {s.cache}, unmerged, {label}", cell(t, clock, "lorakit"),
                    cell(t, clock, "peft"), ratio(t, clock, "lorakit", "peft")),
                Row(f"decode step, merged, {label}", cell(t, clock, "lorakit merged"),
                    cell(t, clock, "peft merged"), ratio(t, clock, "lorakit merged", "peft merged")),
            ]
        target = AT_MOST_110 if (t, clock) in ((1, "cpu"), (2, "wall")) else None
        rows += [
            Row(f"decode unmerged / merged, {label}", ratio(t, clock, "lorakit", "lorakit merged"),
                ratio(t, clock, "peft", "peft merged"), None, target),
            Row(f"reference: hand-written minimal LoRA, decode unmerged / merged, {label}",
                ratio(t, clock, "minimal", "lorakit merged"), "—"),
        ]
    for t, clock in ((1, "cpu"), (2, "wall")):  # the rounds least disturbed by other work, for a busy machine
        label = _label(t, clock)
        rows += [
            Row(f"decode unmerged / merged, {label}, fastest tenth of rounds",
                tenth_ratio(t, clock, "lorakit", "lorakit merged"), tenth_ratio(t, clock, "peft", "peft merged")),
            Row(f"reference: hand-written minimal LoRA, decode unmerged / merged, {label}, fastest tenth of rounds",
                tenth_ratio(t, clock, "minimal", "lorakit merged"), "—"),
        ]
    rows.append(Row("decode step 2 threads / 1 thread, merged, wall-clock",
                    per_round_ratio(times[2, "wall", "lorakit merged"], times[1, "wall", "lorakit merged"]),
                    per_round_ratio(times[2, "wall", "peft merged"], times[1, "wall", "peft merged"])))
    return rows
