"""Every ``lorakit`` subcommand ends quietly when its output pipe closes (``lorakit inspect DIR | head -1``): no
``BrokenPipeError`` traceback, no "Exception ignored" at exit. Real processes and real pipes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lorakit.cli import finetune as FT

from .helpers import make_assets

SRC = str(Path(__file__).resolve().parents[2] / "src")
NOISE = ("Traceback", "BrokenPipeError", "Exception ignored")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")  # this checkout's lorakit
    return env


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    model, data, _ = make_assets(root)
    out = root / "run"
    FT.run(FT.Settings(model=str(model), data=str(data), out=str(out), steps=1, batch_size=4, eval_split=4, r=2,
                       samples=0, save_every=0), log=lambda line: None)
    return SimpleNamespace(root=root, model=model, data=data, out=out)


def _closed_reader(*args):
    """Run ``python -m lorakit.cli ARGS`` with its stdout a pipe whose reading end is closed at once, so its first
    write (or its final flush) meets a broken pipe; returns (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env())
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err.decode()


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_inspect_into_a_closed_pipe_exits_0_quietly(adapter, extra):
    code, err = _closed_reader("inspect", adapter.out, *extra)
    assert code == 0 and not any(n in err for n in NOISE), err


def test_inspect_piped_into_head(adapter):
    """The issue's own case, through a shell: with pipefail the pipeline's status is lorakit's as well as head's."""
    line = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m lorakit.cli inspect "
                           f"'{adapter.out}' | head -1"], capture_output=True, text=True, env=_env(), timeout=300)
    assert line.returncode == 0, line.stderr
    assert line.stdout == f"adapter      {adapter.out}\n"
    assert not any(n in line.stderr for n in NOISE), line.stderr


def test_finetune_into_a_closed_pipe_stops_with_a_note(adapter):
    """A run whose output closes stops as under Ctrl-C: one line saying so, status 141 (128 + SIGPIPE)."""
    code, err = _closed_reader("finetune", "--model", adapter.model, "--data", adapter.data, "--out",
                               adapter.root / "closed", "--steps", 1, "--batch-size", 4, "--eval-split", 4)
    assert code == 141 and not any(n in err for n in NOISE), err
    assert "lorakit finetune: output closed: stopped (continue with the same command and --resume)" in err


def test_eval_only_into_a_closed_pipe_exits_0_quietly(adapter):
    """Scoring has nothing to resume: a closed pipe ends it as it ends inspect."""
    code, err = _closed_reader("finetune", "--eval-only", "--adapter", adapter.out)
    assert code == 0 and not any(n in err for n in NOISE), err
    assert "--resume" not in err
