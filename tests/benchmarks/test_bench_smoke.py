"""The benchmark (benchmarks/) runs end to end and reports what it should; no timing is asserted anywhere.

One smoke run of the quick mode on tiny models, in a subprocess as ``make bench`` would run it, plus checks of the
harness's bookkeeping (round order, per-round ratios, verdicts) on made-up numbers.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks/ lives next to tests/, not in the installed package

from benchmarks.harness import Group, Stats, Target, Unsupported, interleave, per_round_ratio  # noqa: E402
RATIO = r"\d+\.\d\d×( \(\d+\.\d\d–\d+\.\d\d\))?"


def _table(stdout: str) -> dict[str, list[str]]:
    """{item: [lorakit, PEFT, ratio, target]} from the printed Markdown table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] != "item":
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def quick_run() -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "benchmarks.bench", "--quick", "--tiny", "--rounds", "1", "--heavy-rounds", "1",
           "--decode-rounds", "2"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_quick_mode_prints_the_table_with_ratios(quick_run):
    assert quick_run.returncode == 0, quick_run.stdout[-4000:] + quick_run.stderr[-4000:]
    out = quick_run.stdout
    assert "threads: 1" in out and "load average at start" in out and "command: python -m benchmarks.bench" in out
    rows = _table(out)
    compared = [
        "training step, batch 2×16", "training step, batch 2×16, dropout 0.1", "prefill, batch 2×16", "decode step, batch 1, cache 8, unmerged",
        "decode step, merged", "merge_adapter", "unmerge_adapter", "save_pretrained",
        "from_pretrained (PEFT's files)", "get_peft_model, 4-layer model", "add_adapter, 2nd adapter",
        "add_adapter, 4th adapter", "mixed decode, 2 adapters (batch 2, cache 8)",
        "mixed decode, 4 adapters (batch 4, cache 8)", "mixed prefill, 2 adapters (batch 2×4)",
        "mixed prefill, 4 adapters (batch 4×4)", "peak memory rise, training step 2×16, dropout 0.1",
        "tensors saved for backward, same step", "QLoRA training step, nf4 base, batch 2×16",
        "QLoRA peak resident memory, nf4 base, training step 2×16, dropout 0.1",
        "DoRA training step, batch 2×16", "DoRA training step, batch 2×16, dropout 0.1",
        "DoRA eval forward, batch 2×16", "DoRA decode step, batch 1, cache 8", "DoRA merge_adapter",
        "DoRA peak memory rise, training step, dropout 0.1",
    ]
    for item in compared:
        assert item in rows, f"{item!r} missing from the table:\n{out}"
        assert re.fullmatch(RATIO, rows[item][2]), f"{item!r}: no lorakit/PEFT ratio in {rows[item]}"
    for item in ["DoRA / LoRA training step", "DoRA / LoRA training step, dropout 0.1"]:
        assert all(re.fullmatch(RATIO, cell) for cell in rows[item][:2]), f"{item!r}: {rows[item]}"
    assert rows["DoRA merge→unmerge, largest weight error (bf16, 1 cycle)"][0] == "0"
    for item in ["decode unmerged / merged", "QLoRA training step, nf4 / float base", "mixed / single adapter, decode, 4 adapters", "add_adapter 4th / 2nd"]:
        assert all(re.fullmatch(RATIO, cell) for cell in rows[item][:2]), f"{item!r}: {rows[item]}"
    references = ["reference: hand-written minimal LoRA, decode unmerged / merged",
                  "reference: hand-written gather + 2 bmm / lorakit single, decode, 4 adapters",
                  "reference: hand-written 2 bmm without gather / lorakit single, decode, 4 adapters"]
    for item in references:
        assert re.fullmatch(RATIO, rows[item][0]), f"{item!r}: {rows[item]}"
    records = [item for item in rows if "exactness record" in item]
    assert len(records) == 6 and all(re.fullmatch(r"\d[\d.]* %", rows[item][0]) for item in records), records
    for dtype in ("bf16", "fp16", "fp32"):
        for cycles in ("1 cycle", "3 cycles"):
            item = f"{dtype} merge→unmerge, largest weight error, {cycles}"
            assert item in rows, f"{item!r} missing from the table:\n{out}"
    assert "FAILURES" not in out


def test_interleave_rotates_the_order_each_round():
    calls = []
    variants = {k: (lambda k=k: calls.append(k) or 1.0) for k in "ABC"}
    times = interleave(variants, rounds=3, warmup=0)
    assert calls == list("ABC" "BCA" "CAB")
    assert times == {k: [1.0, 1.0, 1.0] for k in "ABC"}


def test_per_round_ratio_pairs_rounds():
    stats = per_round_ratio([2.0, 3.0, 8.0], [1.0, 3.0, 2.0])  # ratios 2, 1, 4
    assert (stats.median, stats.lo, stats.hi, stats.n) == (2.0, 1.0, 4.0, 3)
    with pytest.raises(ValueError, match="different lengths"):
        per_round_ratio([1.0], [1.0, 2.0])


def test_verdicts():
    at_most = Target("ratio", "<=", 1.0, "≤ 1")
    assert at_most.verdict(Stats.of([0.9, 0.95], "ratio")) == "met"
    assert at_most.verdict(Stats.of([1.1, 1.2], "ratio")) == "missed"
    assert at_most.verdict(Stats.of([0.9, 1.0, 1.3], "ratio")) == "met (range straddles it)"
    assert at_most.verdict("not supported yet") == "not measured"
    exact = Target("lorakit", "==", 0.0, "exactly 0")
    assert exact.verdict(Stats.of([0.0], "error")) == "met"
    assert exact.verdict(Stats.of([1e-4], "error")) == "missed"


def test_group_reports_failures_per_variant():
    errors: list[str] = []
    g = Group(errors)
    g.add("ok", lambda: (lambda: 2.0))
    g.add("missing", lambda: (_ for _ in ()).throw(Unsupported("no adapter_names")))
    g.add("broken", lambda: (lambda: 1 / 0))
    g.run(rounds=2, warmup=0)
    assert str(g.cell("ok")) == "2 s"
    assert g.cell("missing") == "not supported yet (no adapter_names)"
    assert g.cell("broken").startswith("ERROR ZeroDivisionError")
    assert g.ratio("ok", "broken") is None
    assert errors == ["broken: ERROR ZeroDivisionError: division by zero"]  # Unsupported is not an error


def test_quick_mode_reports_hotswap_and_compiled_decode(quick_run):
    rows = _table(quick_run.stdout)
    for item in ["hotswap_adapter (r 4↔2, prepared)", "load_adapter, new name (same file)",
                 "decode step, compiled (inductor), batch 1, cache 8"]:
        assert item in rows, f"{item!r} missing from the table"
        assert re.fullmatch(RATIO, rows[item][2]), f"{item!r}: no lorakit/PEFT ratio in {rows[item]}"
    for item in ["hotswap / load_adapter", "decode compiled / eager"]:
        assert all(re.fullmatch(RATIO, cell) for cell in rows[item][:2]), f"{item!r}: {rows[item]}"


def test_quick_mode_reports_decode_overhead_at_one_and_two_threads(quick_run):
    rows = _table(quick_run.stdout)
    for clock in ("1 thread, CPU time", "2 threads, wall-clock"):
        for item in [f"decode step, batch 1, cache 8, unmerged, {clock}", f"decode step, merged, {clock}"]:
            assert item in rows, f"{item!r} missing from the table"
            assert re.fullmatch(RATIO, rows[item][2]), f"{item!r}: no lorakit/PEFT ratio in {rows[item]}"
        item = f"decode unmerged / merged, {clock}"
        assert all(re.fullmatch(RATIO, cell) for cell in rows[item][:2]), f"{item!r}: {rows[item]}"
        assert rows[item][3].startswith("≤ 1.10: "), rows[item]
        item = f"decode unmerged / merged, {clock}, fastest tenth of rounds"
        assert all(re.fullmatch(RATIO, cell) for cell in rows[item][:2]), f"{item!r}: {rows[item]}"
        item = f"reference: hand-written minimal LoRA, decode unmerged / merged, {clock}, fastest tenth of rounds"
        assert re.fullmatch(RATIO, rows[item][0]), f"{item!r}: {rows[item]}"
    for clock in ("1 thread, CPU time", "1 thread, wall-clock", "2 threads, wall-clock", "2 threads, CPU time"):
        item = f"reference: hand-written minimal LoRA, decode unmerged / merged, {clock}"
        assert re.fullmatch(RATIO, rows[item][0]), f"{item!r}: {rows[item]}"
    item = "decode step 2 threads / 1 thread, merged, wall-clock"
    assert all(re.fullmatch(RATIO, cell) for cell in rows[item][:2]), f"{item!r}: {rows[item]}"
