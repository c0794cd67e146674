"""``lorakit finetune --eval-only --adapter DIR``: an existing adapter scored as the run that trained it scored
it, without training or writing anything; and the errors around it."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

from lorakit.cli import finetune as FT

from .helpers import cli, make_assets, settings_from

RUN = ["--steps", 4, "--batch-size", 4, "--eval-split", 4, "--r", 4, "--alpha", 8, "--lr", 1e-2, "--samples", 2,
       "--max-new-tokens", 4, "--max-length", 100, "--save-every", 0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model, data, tok = make_assets(root)
    out = root / "run"
    metrics = FT.run(FT.Settings(model=str(model), data=str(data), out=str(out),
                                 **{k.lstrip("-").replace("-", "_"): v for k, v in zip(RUN[::2], RUN[1::2])}),
                     log=lambda line: None)
    return SimpleNamespace(root=root, model=model, data=data, out=out, metrics=metrics)


def _files(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_eval_only_gives_the_runs_after_numbers(trained):
    """With only --adapter, the settings come from the recipe.yaml beside it: the same held-out examples, the same
    scoring, so the same numbers and answers as the run's own "after"."""
    before = _files(trained.out)
    settings, origin = settings_from(["--eval-only", "--adapter", trained.out])
    assert (settings.model, settings.data, settings.max_length) == (str(trained.model), str(trained.data), 100)
    assert origin["max_length"] == str(trained.out / FT.RECIPE_FILE)
    lines = []
    result = FT.run(settings, log=lines.append, explicit=origin)
    assert result["eval"] == trained.metrics["after"]  # perplexity, accuracy and token count, exactly
    assert result["answers"] and len(result["answers"]) == 2
    assert (result["device"], result["dtype"]) == ("cpu", "float32")
    assert any(line.startswith("eval      held-out perplexity") for line in lines)
    assert not any(line.startswith(("train", "before", "merged", "saved")) for line in lines)
    assert _files(trained.out) == before  # nothing written, nothing trained


def test_eval_only_from_the_command_line(trained):
    code, stdout, stderr = cli("finetune", "--eval-only", "--adapter", trained.out)
    assert code == 0, stderr
    after = trained.metrics["after"]
    assert (f"eval      held-out perplexity {after['perplexity']:.2f}, token accuracy {after['token_accuracy']:.3f} "
            f"({after['tokens']} answer tokens)") in stdout
    assert f"adapter   {trained.out}: r=4 alpha=8 on 14 modules" in stdout and "scored without training" in stdout
    assert "adapter:   " in stdout  # its sample answers


def test_eval_only_without_a_recipe_uses_the_recorded_base(trained, tmp_path):
    """An adapter from elsewhere (no recipe.yaml): the base model its config records, the data and split given."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(trained.out / name, bare / name)
    settings, origin = settings_from(["--eval-only", "--adapter", bare, "--data", trained.data, "--eval-split", 4,
                                      "--max-length", 100])
    assert settings.model == str(trained.model) and origin["model"].endswith("adapter_config.json")
    result = FT.run(settings, log=lambda line: None, explicit=origin)
    assert result["eval"] == trained.metrics["after"]


@pytest.mark.parametrize("args, message", [
    (["--eval-only"], "--eval-only scores an existing adapter: pass --adapter DIR"),
    (["--adapter", "{out}"], "--adapter DIR is scored with --eval-only"),
    (["--eval-only", "--adapter", "{root}/nothing"], "--adapter {root}/nothing: no adapter_config.json there"),
    (["--eval-only", "--adapter", "{out}", "--steps", "5", "--lr", "0.1"],
     "--eval-only trains nothing, so --lr, --steps would change nothing: drop them"),
    (["--eval-only", "--adapter", "{out}", "--resume"], "--eval-only trains nothing: --resume does not apply"),
])
def test_eval_only_errors(trained, args, message):
    fill = {"out": trained.out, "root": trained.root}
    code, stdout, stderr = cli("finetune", *[a.format(**fill) for a in args])
    assert code == 1 and stdout == "" and stderr.count("\n") == 1
    assert stderr.startswith("lorakit finetune: error: ") and message.format(**fill) in stderr, stderr


def test_eval_only_on_a_checkpoint_uses_the_runs_recipe(trained):
    checkpoint = FT.latest_checkpoint(trained.out)
    settings, origin = settings_from(["--eval-only", "--adapter", checkpoint])
    assert origin["data"] == str(trained.out / FT.RECIPE_FILE) and settings.max_length == 100
    assert FT.run(settings, log=lambda line: None, explicit=origin)["eval"] == trained.metrics["after"]


def test_training_keys_of_a_recipe_are_ignored_by_eval_only(trained, tmp_path):
    """The recipe that trained the adapter can be given with --eval-only: its training keys describe the run."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text((trained.out / FT.RECIPE_FILE).read_text().replace("steps: 4", "steps: 400"))
    settings, origin = settings_from(["-c", recipe, "--eval-only", "--adapter", trained.out])
    assert settings.steps == FT.Settings().steps and "steps" not in origin
    assert origin["data"] == str(recipe)
