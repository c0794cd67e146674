"""Recipe files (``lorakit finetune -c``, lorakit.cli.recipe): the schema is ``Settings``; file and flags give the
same run; flags override the file; unknown keys and wrong types are errors naming them; the resolved recipe is
saved beside the adapter and ``--resume`` refuses a changed one."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace
from typing import Literal, Optional

import pytest
import torch
import yaml

from lorakit.cli import build_parser
from lorakit.cli import finetune as FT
from lorakit.cli import recipe as R

from .helpers import cli, make_assets, settings_from

# the same run as flags and as a recipe (some keys written as flags are, as YAML would read them)
FLAGS = ["--steps", "3", "--batch-size", "4", "--eval-split", "4", "--r", "4", "--alpha", "8", "--dropout", "0.1",
         "--lr", "1e-2", "--targets", "q_proj,v_proj", "--samples", "1", "--max-new-tokens", "3", "--seed", "5",
         "--save-every", "2", "--dtype", "float32", "--device", "cpu"]
RECIPE_YAML = """
# a recipe as people write them: numbers as YAML reads them, a list of targets, flag spellings
steps: 3
batch-size: 4
eval_split: 4
r: 4
alpha: 8
dropout: 0.1
lr: 1e-2          # PyYAML reads this as the string '1e-2'
targets: [q_proj, v_proj]
samples: 1
max_new_tokens: 3
seed: 5
save-every: 2
dtype: float32
device: cpu
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    model, data, tok = make_assets(root)
    recipe = root / "recipe.yaml"
    recipe.write_text(f"model: {model}\ndata: {data}\n" + RECIPE_YAML, encoding="utf-8")
    return SimpleNamespace(root=root, model=model, data=data, tok=tok, recipe=recipe)


def test_recipe_file_and_flags_give_the_same_settings(assets, tmp_path):
    by_flags, origin_flags = settings_from(["--model", assets.model, "--data", assets.data, *FLAGS])
    by_file, origin_file = settings_from(["-c", assets.recipe])
    assert by_file == by_flags
    assert set(origin_file) == set(origin_flags) and set(origin_file.values()) == {str(assets.recipe)}
    assert set(origin_flags.values()) == {R.COMMAND_LINE}
    as_json = tmp_path / "recipe.json"
    as_json.write_text(json.dumps(yaml.safe_load(assets.recipe.read_text())), encoding="utf-8")
    assert settings_from(["--config", as_json])[0] == by_flags


def test_flags_override_the_file(assets):
    settings, origin = settings_from(["-c", assets.recipe, "--lr", "0.5", "--steps", "7", "--targets", "all-linear"])
    assert (settings.lr, settings.steps, settings.targets) == (0.5, 7, "all-linear")
    assert (settings.r, settings.batch_size, settings.seed) == (4, 4, 5)  # from the file
    assert settings.chunk_tokens == FT.Settings().chunk_tokens  # in neither: the default
    assert origin["lr"] == R.COMMAND_LINE and origin["r"] == str(assets.recipe) and "chunk_tokens" not in origin


def test_every_setting_is_a_flag_and_every_recipe_key_a_setting(capsys):
    """The recipe schema is Settings: each field a flag of `finetune`, each non-action field a recipe key."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--help"])
    help_text = capsys.readouterr().out
    for f in dataclasses.fields(FT.Settings):
        assert f"--{f.name.replace('_', '-')}" in help_text, f.name
    actions = {"resume", "overwrite", "eval_only", "adapter"}
    assert set(R.schema()) == {f.name for f in dataclasses.fields(FT.Settings)} - actions
    assert set(FT.RECIPE_KEYS) == set(R.schema())
    assert set(FT.RUN_IDENTITY) <= set(FT.RECIPE_KEYS) and "dtype" in FT.RUN_IDENTITY
    assert not {"out", "threads", "device", "save_every", "chunk_tokens"} & set(FT.RUN_IDENTITY)


def test_a_new_setting_is_a_recipe_key_without_further_code():
    """Issue 16's --quantize (or --dora, --loraplus-ratio): a field is all it takes, typed by its annotation."""
    Later = dataclasses.make_dataclass("Later", [("quantize", Optional[str], dataclasses.field(
        default=None, metadata={"choices": ("nf4", "int8")})), ("dora", bool, False), ("loraplus_ratio", float, 0.0)],
        bases=(FT.Settings,))
    got = R.check_recipe({"quantize": "nf4", "dora": True, "loraplus-ratio": "16", "r": 8}, "r.yaml", Later)
    assert got == {"quantize": "nf4", "dora": True, "loraplus_ratio": 16.0, "r": 8}
    assert "quantize" in FT.RUN_IDENTITY or "quantize" not in {f.name for f in dataclasses.fields(FT.Settings)}
    with pytest.raises(ValueError, match=r"r.yaml: quantize: 'nf5' is not one of nf4, int8"):
        R.check_recipe({"quantize": "nf5"}, "r.yaml", Later)
    with pytest.raises(ValueError, match=r"dora: 'yes please' is not true or false"):
        R.check_recipe({"dora": "yes please"}, "r.yaml", Later)
    # the other ways of writing such a field
    Other = dataclasses.make_dataclass("Other", [("quantize", "str | None", None),
                                                 ("init", Literal["gaussian", "pissa"], "gaussian")],
                                       bases=(FT.Settings,))
    assert R.check_recipe({"quantize": None, "init": "pissa"}, "r.yaml", Other) == {"quantize": None, "init": "pissa"}
    with pytest.raises(ValueError, match=r"init: 'olora' is not one of gaussian, pissa"):
        R.check_recipe({"init": "olora"}, "r.yaml", Other)


@pytest.mark.parametrize("text, message", [
    ("lrr: 0.1\nbatchsize: 4\n", "unknown keys 'lrr', 'batchsize' (did you mean 'lr' for 'lrr'?; did you mean "
                                 "'batch_size' for 'batchsize'?); a recipe's keys are: model, data, r, alpha"),
    ("learning_rate: 0.1\n", "unknown key 'learning_rate'"),
    ("resume: true\n", "resume is an action: pass --resume on the command line"),
    ("r: eight\n", "r: 'eight' is not a whole number"),
    ("r: 8.5\n", "r: 8.5 is not a whole number"),
    ("steps: true\n", "steps: True is not a whole number"),
    ("lr: [0.1]\n", "lr: [0.1] is not a number"),
    ("r: null\n", "r: None is not allowed to be empty (expected a whole number)"),
    ("dtype: float64\n", "dtype: 'float64' is not one of auto, float32, bfloat16, float16"),
    ("batch_size: 4\nbatch-size: 8\n", "batch_size is given twice"),
    ("- r: 4\n", "expected a mapping of settings (key: value), got a list"),
    ("r: [\n", "not valid YAML"),
])
def test_bad_recipes_are_one_line_errors_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    code, stdout, stderr = cli("finetune", "-c", path, "--out", tmp_path / "out")
    assert code == 1 and stdout == ""
    assert stderr.startswith(f"lorakit finetune: error: {path}") and message in stderr, stderr
    assert stderr.count("\n") == 1


def test_recipe_file_errors(tmp_path):
    for name, content, message in [("r.toml", "r = 4", "expected a recipe file ending in .yaml, .yml, .json"),
                                   ("missing.yaml", None, "missing.yaml: no such file"),
                                   ("bad.json", "{'r': 4}", "not valid JSON")]:
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        code, _, stderr = cli("finetune", "-c", path)
        assert code == 1 and message in stderr, stderr
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set: the defaults\n")
    assert settings_from(["-c", empty])[0] == FT.Settings()


# ------------------------------------------------------------------------------------------------------------------
# end to end: the recipe gives the flags' adapter, is saved beside it, repeats it, and guards --resume
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(assets):
    by_flags, by_file = assets.root / "by-flags", assets.root / "by-file"
    code, _, stderr = cli("finetune", "--model", assets.model, "--data", assets.data, "--out", by_flags, *FLAGS)
    assert code == 0, stderr
    code, _, stderr = cli("finetune", "-c", assets.recipe, "--out", by_file)
    assert code == 0, stderr
    return SimpleNamespace(by_flags=by_flags, by_file=by_file)


def _same_adapter(a, b):
    from safetensors.torch import load_file

    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_recipe_run_equals_flags_run(runs):
    assert _same_adapter(runs.by_flags, runs.by_file)
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (runs.by_flags, runs.by_file))
    assert a["losses"] == b["losses"] and a["after"] == b["after"] and a["settings"] == b["settings"]


def test_resolved_recipe_is_saved_and_repeats_the_run(assets, runs):
    saved = runs.by_file / FT.RECIPE_FILE
    text = saved.read_text(encoding="utf-8")
    assert text.startswith("# lorakit finetune recipe") and f"lorakit finetune -c {saved}" in text
    recipe = yaml.safe_load(text)
    assert list(recipe) == list(FT.RECIPE_KEYS)  # every key, resolved: the file's, the flags', the defaults
    assert recipe == settings_from(["-c", assets.recipe, "--out", runs.by_file])[0].recipe()
    assert recipe["targets"] == "q_proj,v_proj" and recipe["lr"] == 0.01 and recipe["out"] == str(runs.by_file)
    # the saved recipe, given again (to another folder), trains the same adapter
    again = assets.root / "again"
    code, stdout, stderr = cli("finetune", "-c", saved, "--out", again)
    assert code == 0, stderr
    assert _same_adapter(again, runs.by_file)
    assert yaml.safe_load((again / FT.RECIPE_FILE).read_text()) == recipe | {"out": str(again)}


def test_resume_refuses_a_changed_recipe_naming_what_changed(assets, runs, tmp_path):
    changed = tmp_path / "changed.yaml"
    changed.write_text(assets.recipe.read_text().replace("lr: 1e-2", "lr: 2e-2").replace("r: 4\n", "r: 6\n"))
    code, _, stderr = cli("finetune", "-c", changed, "--out", runs.by_file, "--resume")
    assert code == 1 and stderr.count("\n") == 1
    assert f"--r was 4, now 6 (from {changed})" in stderr and f"--lr was 0.01, now 0.02 (from {changed})" in stderr
    code, _, stderr = cli("finetune", "-c", assets.recipe, "--out", runs.by_file, "--resume", "--lr", "0.3")
    assert code == 1 and "--lr was 0.01, now 0.3 (from the command line)" in stderr
    # what a resumed run may change (threads, samples, where it runs) is not a change of recipe
    free = tmp_path / "free.yaml"
    free.write_text(assets.recipe.read_text().replace("save-every: 2", "save-every: 1") + "threads: 1\nsamples: 0\n")
    code, stdout, stderr = cli("finetune", "-c", free, "--out", runs.by_file, "--resume")
    assert code == 0, stderr
    assert "resume    from" in stdout
    assert yaml.safe_load((runs.by_file / FT.RECIPE_FILE).read_text())["threads"] == 1


def test_help_mentions_the_recipe(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for words in ("-c RECIPE, --config RECIPE", "--device DEVICE", "--dtype {auto,float32,bfloat16,float16}",
                  "--eval-only", "--adapter DIR", "options given on the command line override it"):
        assert words in text, words
