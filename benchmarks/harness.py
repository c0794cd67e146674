"""Interleaved timing, summary statistics and the results table; knows nothing about LoRA.

The machine the benchmark runs on is shared, so its speed drifts while the benchmark runs. Measuring every
variant once per round, in an order rotated from round to round (A B, B A, A B, …), exposes all variants to the
same drift, and a ratio taken *within* a round (lorakit's time over PEFT's from the same round) cancels most of it.
That per-round ratio is what the table reports, as a median with its min–max.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union


class Unsupported(Exception):
    """A variant that cannot run because the library lacks the feature (shown as "not supported yet")."""


class BenchError(Exception):
    """A variant that ran but gave a wrong answer, or failed unexpectedly (shown, and the exit status is 1)."""


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------
#: "wall": elapsed time. "cpu": this process's CPU time, which leaves out the time the OS hands to other
#: processes — on a shared, oversubscribed machine that waiting is most of the noise. With several torch threads
#: CPU time adds the threads up, so it is only a latency with one thread.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
_clock: list[Callable[[], float]] = [time.perf_counter]


def use_clock(name: str) -> None:
    if name not in CLOCKS:
        raise ValueError(f"unknown clock {name!r}: expected one of {sorted(CLOCKS)}")
    _clock[0] = CLOCKS[name]


def now() -> float:
    """The benchmark's clock (see :data:`CLOCKS`)."""
    return _clock[0]()


def timed(fn: Callable[[], object], wall: bool = False) -> float:
    """Seconds one call of ``fn`` takes on the benchmark's clock; ``wall``: elapsed time whatever the clock (for
    work that waits on the disk, which CPU time would not see)."""
    clock = time.perf_counter if wall else now
    start = clock()
    fn()
    return clock() - start


def interleave(variants: dict[str, Callable[[], float]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every variant once per round, rotating the order each round; returns ``{name: [seconds per round]}``.

    Each variant measures itself (returns seconds), so untimed preparation such as copying a fresh model stays
    out of the number. The garbage collector is kept off during each measurement.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            _measure(variants[name])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            times[name].append(_measure(variants[name]))
    return times


def _measure(variant: Callable[[], float]) -> float:
    gc.collect(1)  # the young generations only: a full collection takes up to a second with transformers loaded
    gc.disable()
    try:
        return float(variant())
    finally:
        gc.enable()


# ----------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stats:
    """Median and range of some samples; ``kind`` says how to print them (time, ratio, mib, error)."""

    median: float
    lo: float
    hi: float
    n: int
    kind: str
    detail: str = ""  # printed after the numbers, e.g. "(12 elements changed)"

    @classmethod
    def of(cls, samples: Sequence[float], kind: str, detail: str = "") -> "Stats":
        if not samples:
            raise ValueError("no samples")
        return cls(statistics.median(samples), min(samples), max(samples), len(samples), kind, detail)

    def __str__(self) -> str:
        fmt = _FORMATS[self.kind]
        text = fmt(self.median)
        lo, hi = fmt(self.lo, like=self.median), fmt(self.hi, like=self.median)
        if self.n > 1 and lo != hi:
            text += f" ({lo}–{hi})"
        return f"{text} {self.detail}" if self.detail else text


def per_round_ratio(num: Sequence[float], den: Sequence[float]) -> Stats:
    """Ratio of two variants measured in the same rounds, round by round."""
    if len(num) != len(den):
        raise ValueError(f"ratio of series of different lengths ({len(num)} vs {len(den)})")
    return Stats.of([a / b for a, b in zip(num, den)], "ratio")


def _fmt_time(seconds: float, like: float | None = None) -> str:
    """``1.23 ms``; with ``like``, the bare number in the unit ``like`` would be printed in (for ranges)."""
    ref = seconds if like is None else like
    scale, unit = next((s, u) for s, u in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")) if ref >= s or u == "µs")
    value = seconds / scale
    text = f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return text if like is not None else f"{text} {unit}"


def _fmt_ratio(value: float, like: float | None = None) -> str:
    return f"{value:.2f}" if like is not None else f"{value:.2f}×"


def _fmt_mib(value: float, like: float | None = None) -> str:
    text = f"{value:.0f}" if abs(value) >= 10 else f"{value:.2g}"
    return text if like is not None else f"{text} MiB"


def _fmt_error(value: float, like: float | None = None) -> str:
    return "0" if value == 0 else f"{value:.1e}"


def _fmt_percent(value: float, like: float | None = None) -> str:
    return f"{100 * value:.3g} %" if like is None else f"{100 * value:.3g}"


_FORMATS = {"time": _fmt_time, "ratio": _fmt_ratio, "mib": _fmt_mib, "error": _fmt_error, "percent": _fmt_percent}

# ----------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------
Cell = Union[Stats, str, None]


@dataclass(frozen=True)
class Target:
    """A goal on one column of a row: ``column`` ("lorakit" or "ratio") compared with ``op`` to ``value``."""

    column: str
    op: str  # "<=", "<" or "=="
    value: float
    text: str

    def verdict(self, cell: Cell) -> str:
        if not isinstance(cell, Stats):
            return "not measured"
        ok = _compare(cell.median, self.op, self.value)
        if self.op != "==" and _compare(cell.lo, self.op, self.value) != _compare(cell.hi, self.op, self.value):
            return f"{'met' if ok else 'missed'} (range straddles it)"
        return "met" if ok else "missed"


def _compare(x: float, op: str, value: float) -> bool:
    return {"<=": x <= value, "<": x < value, "==": x == value}[op]


@dataclass
class Row:
    item: str
    lorakit: Cell
    peft: Cell
    ratio: Cell = None
    target: Optional[Target] = None
    note: str = ""

    def cells(self) -> list[str]:
        goal = ""
        if self.target is not None:
            goal = f"{self.target.text}: {self.target.verdict(getattr(self, self.target.column))}"
        return [self.item, _cell(self.lorakit), _cell(self.peft), _cell(self.ratio), goal]


def _cell(cell: Cell) -> str:
    return "—" if cell is None else str(cell)


HEADER = ["item", "lorakit", "PEFT", "lorakit/PEFT (per round)", "target"]


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table (readable as plain text too)."""
    lines = [HEADER] + [row.cells() for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]

    def fmt(line: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |"

    return "\n".join([fmt(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(l) for l in lines[1:]])


def failure_text(exc: BaseException) -> str:
    """A short, one-line description of why a variant has no number."""
    if isinstance(exc, Unsupported):
        return f"not supported yet ({exc})" if str(exc) else "not supported yet"
    message = str(exc).splitlines()[0] if str(exc) else ""
    if len(message) > 90:
        message = message[:87] + "…"
    return f"ERROR {type(exc).__name__}: {message}"


# ----------------------------------------------------------------------------------------------------------------
# A group of variants measured together
# ----------------------------------------------------------------------------------------------------------------
class Group:
    """Variants measured in the same rounds. A variant whose setup or run fails is dropped from the rounds and
    its cell says why; the others are still measured. Failures other than :class:`Unsupported` are appended to
    ``errors`` (the benchmark then exits with status 1)."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        self.variants: dict[str, Callable[[], float]] = {}
        self.failed: dict[str, BaseException] = {}
        self.times: dict[str, list[float]] = {}

    def add(self, key: str, setup: Callable[[], Callable[[], float]]) -> None:
        """``setup()`` prepares the variant (untimed) and returns the callable that measures one round."""
        try:
            self.variants[key] = setup()
        except Exception as exc:  # noqa: BLE001 — recorded, shown in the table
            self._fail(key, exc)

    def _fail(self, key: str, exc: BaseException) -> None:
        self.failed[key] = exc
        if not isinstance(exc, Unsupported):
            self.errors.append(f"{key}: {failure_text(exc)}")

    def _guarded(self, key: str, fn: Callable[[], float]) -> Callable[[], float]:
        def run() -> float:
            if key in self.failed:
                return float("nan")
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001
                self._fail(key, exc)
                return float("nan")

        return run

    def run(self, rounds: int, warmup: int = 1) -> "Group":
        guarded = {k: self._guarded(k, fn) for k, fn in self.variants.items()}
        self.times = interleave(guarded, rounds, warmup)
        return self

    def cell(self, key: str, kind: str = "time") -> Cell:
        if key in self.failed:
            return failure_text(self.failed[key])
        return Stats.of(self.times[key], kind)

    def ratio(self, num: str, den: str) -> Cell:
        """Per-round ratio of two variants; ``None`` (a dash) if either has no numbers."""
        if num in self.failed or den in self.failed:
            return None
        return per_round_ratio(self.times[num], self.times[den])
