"""Recipe files for ``lorakit finetune -c FILE``: every setting of a run as a key of a YAML or JSON mapping.

The schema is :class:`~lorakit.cli.finetune.settings.Settings` itself: its recipe keys (every field but the
actions ``resume``, ``overwrite``, ``eval_only``, ``adapter``), typed by their annotations, so a new setting is
a recipe key the moment it is a field. Keys are written as the field (``batch_size``) or as the flag
(``batch-size``). A key that is not a setting is an error naming it (and the nearest known key); so is a value
of the wrong type. Numbers written as text (PyYAML reads ``2e-3`` as a string) are converted as the flag would
convert them; ``targets`` may be a list. Relative paths are taken from the working directory, as on the command
line.

Order of precedence: the defaults, then the file, then the flags given on the command line
(:func:`resolve_settings`). A run saves its resolved recipe beside the adapter (:data:`RECIPE_FILE`), so
``-c runs/x/recipe.yaml`` repeats it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Mapping, Optional, Union

from lorakit.config import read_config

from .finetune.checkpoints import CHECKPOINTS, RECIPE_FILE
from .finetune.settings import EVAL_IGNORES, Settings

SUFFIXES = (".yaml", ".yml", ".json")
COMMAND_LINE = "the command line"


def schema(settings_class: type = Settings) -> dict[str, tuple[type, bool, Mapping[str, Any]]]:
    """Recipe key → (its type, whether it may be null, its field's metadata), read from the dataclass
    ``settings_class``: every field whose metadata does not exclude it (``recipe: False``, the actions).
    ``Optional[T]`` and ``T | None`` may be null; a ``Literal[...]`` is text with those choices."""
    hints = typing.get_type_hints(settings_class)
    types = {}
    for f in dataclasses.fields(settings_class):
        if not f.metadata.get("recipe", True):
            continue
        hint, optional, metadata = hints[f.name], False, dict(f.metadata)
        if typing.get_origin(hint) in (Union, UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional, hint = len(args) < len(typing.get_args(hint)), args[0]
        if typing.get_origin(hint) is Literal:
            metadata.setdefault("choices", typing.get_args(hint))
            hint = type(typing.get_args(hint)[0])
        types[f.name] = (hint, optional, metadata)
    return types


def read_recipe(path: Union[str, os.PathLike], settings_class: type = Settings) -> dict[str, Any]:
    """The settings in a recipe file, checked and typed; ``ValueError``/``FileNotFoundError`` naming the file and
    what is wrong in it."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{path}: expected a recipe file ending in {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text) if text.strip() else {}
        else:
            import yaml

            raw = yaml.safe_load(text)
    except ImportError:
        raise ImportError(f"{path}: reading YAML needs pyyaml (pip install pyyaml), or write the recipe as JSON") from None
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError: say where
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {first}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of settings (key: value), got a {type(raw).__name__}")
    return check_recipe(raw, str(path), settings_class)


def check_recipe(raw: Mapping[Any, Any], source: str, settings_class: type = Settings) -> dict[str, Any]:
    """``raw`` (keys as fields or flags) as typed settings of ``settings_class``; unknown keys and wrong types
    are a ``ValueError`` naming ``source``."""
    types = schema(settings_class)
    settings: dict[str, Any] = {}
    unknown = []
    for key, value in raw.items():
        name = str(key).strip().lstrip("-").replace("-", "_")
        if name not in types:
            unknown.append(str(key))
            continue
        if name in settings:
            raise ValueError(f"{source}: {name} is given twice (as {name!r} and as {name.replace('_', '-')!r})")
        settings[name] = _typed(name, value, *types[name], source)
    if unknown:
        actions = [k for k in unknown if k.replace("-", "_") in {f.name for f in dataclasses.fields(settings_class)}]
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key.replace("-", "_"), types, n=1)
            if key in actions:
                hints.append(f"{key} is an action: pass --{key.replace('_', '-')} on the command line")
            elif close:
                hints.append(f"did you mean {close[0]!r} for {key!r}?")
        raise ValueError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
                         + (f" ({'; '.join(hints)})" if hints else "")
                         + f"; a recipe's keys are: {', '.join(types)}")
    return settings


def _typed(name: str, value: Any, kind: type, optional: bool, metadata: Mapping[str, Any], source: str) -> Any:
    def wrong(expected: str) -> ValueError:
        return ValueError(f"{source}: {name}: {value!r} is not {expected}")

    if value is None:
        if optional:
            return None
        raise wrong(f"allowed to be empty (expected {_kind_name(kind)})")
    sep = metadata.get("sep")
    if kind is str and sep and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return sep.join(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise wrong("true or false")
    if isinstance(value, bool) or isinstance(value, (list, tuple, dict)):
        raise wrong(f"{_kind_name(kind)}")
    if kind is str:
        value = str(value)
        choices = metadata.get("choices")
        if choices and value not in choices:
            raise wrong(f"one of {', '.join(map(str, choices))}")
        return value
    try:
        converted = kind(value)  # int("8"), float("2e-3"), float(8): as the flag converts its text
    except (TypeError, ValueError):
        raise wrong(_kind_name(kind)) from None
    if kind is int and isinstance(value, float) and value != converted:
        raise wrong("a whole number")
    return converted


def _kind_name(kind: type) -> str:
    return {int: "a whole number", float: "a number", str: "text", bool: "true or false"}.get(kind, kind.__name__)


def resolve_settings(flags: Mapping[str, Any],
                     config: Optional[Union[str, os.PathLike]] = None) -> tuple[Settings, dict[str, str]]:
    """The settings of a run, and where each one not left at its default came from (a file, or
    :data:`COMMAND_LINE`).

    Later sources win: the defaults, the recipe file ``config``, then ``flags`` (the options given on the command
    line: a value of ``None`` or ``False`` means not given). With ``--eval-only --adapter DIR`` the recipe saved
    beside the adapter comes first (or, without one, the base model its config records), and a training flag
    on the command line (:data:`EVAL_IGNORES`) is an error: it would change nothing.
    """
    given = {k: v for k, v in flags.items() if v is not None and v is not False}
    layers = []
    if given.get("eval_only") and given.get("adapter"):
        layers.append(adapter_defaults(given["adapter"]))
    if config is not None:
        layers.append((read_recipe(config), str(config)))
    layers.append((given, COMMAND_LINE))
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for layer, source in layers:
        values.update(layer)
        origin.update(dict.fromkeys(layer, source))
    if values.get("eval_only"):
        pointless = [f"--{k.replace('_', '-')}" for k in EVAL_IGNORES if origin.get(k) == COMMAND_LINE]
        if pointless:
            raise ValueError(f"--eval-only trains nothing, so {', '.join(pointless)} would change nothing: drop "
                             f"{'it' if len(pointless) == 1 else 'them'}")
        for key in EVAL_IGNORES:  # from a recipe: describe the training, which is not repeated
            values.pop(key, None)
            origin.pop(key, None)
    return Settings(**values), origin


def adapter_defaults(adapter: Union[str, os.PathLike]) -> tuple[dict[str, Any], str]:
    """The settings that score ``adapter`` as the run that trained it did: its ``recipe.yaml`` (for a checkpoint,
    ``RUN/checkpoints/step-N``, the run's), else the base model its ``adapter_config.json`` records."""
    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter {adapter}: no adapter_config.json there (expected an adapter folder: "
                                "adapter_config.json + adapter_model.safetensors)")
    for recipe in (folder / RECIPE_FILE, folder.parent.parent / RECIPE_FILE):
        if recipe.is_file() and (recipe.parent == folder or folder.parent.name == CHECKPOINTS):
            return read_recipe(recipe), str(recipe)
    base = read_config(folder).base_model_name_or_path
    return ({"model": base} if base else {}), str(folder / "adapter_config.json")
