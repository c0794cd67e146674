"""Which modules get an adapter, and with what rank and alpha: pure functions over module names.

Nothing here touches a module. The caller lists the model's module names (and which of them are linear, and
which is the output head); these functions apply PEFT's matching rules to those names.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

from .config import LoraConfig

ALL_LINEAR = "all-linear"
Selector = Union[str, Sequence[str], None]


def name_matches(name: str, selector: Selector) -> bool:
    """PEFT's rule: a str is a regex that must match the whole name; a list entry matches the name or a ``.``-suffix."""
    if not selector:
        return False
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in selector)


def list_entry_matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def inside_any(name: str, roots: Optional[Sequence[str]]) -> bool:
    """True when ``name`` is one of the modules named by ``roots`` (list rule) or lies inside one."""
    if not roots:
        return False
    parts = name.split(".")
    prefixes = (".".join(parts[: i + 1]) for i in range(len(parts)))
    return any(list_entry_matches(prefix, root) for prefix in prefixes for root in roots)


def layer_index(name: str, layers_pattern: Union[str, Sequence[str], None]) -> Optional[int]:
    """Index of the layer a module lives in: the number after ``<pattern>.`` (or the first numbered segment).

    A layer list may sit at the model's root (``layers.3.proj``, ``0.attn``), which is matched too.
    """
    parts = name.split(".")[:-1]  # the module's own name is never the index
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    for i, part in enumerate(parts):
        if not part.isdigit():
            continue
        if not patterns:
            return int(part)
        prefix = ".".join(parts[:i])
        if prefix and any(re.fullmatch(rf"(?:.*\.)?(?:{p})", prefix) for p in patterns):
            return int(part)
    return None


def pattern_value(name: str, patterns: dict, default):
    """``rank_pattern``/``alpha_pattern`` lookup: the first key with ``re.match(rf"(.*\\.)?({key})$", name)`` wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@dataclass(frozen=True)
class Target:
    name: str
    r: int
    alpha: float


def select_targets(
    config: LoraConfig,
    module_names: Sequence[str],
    linear_names: Iterable[str] = (),
    head_names: Iterable[str] = (),
) -> list[Target]:
    """The modules ``config`` adapts, in model order, each with its rank and alpha.

    ``linear_names`` are the names ``"all-linear"`` may pick; ``head_names`` the output heads it must skip.
    Raises ``ValueError`` when nothing matches; warns, naming them, about list entries that matched nothing.
    """
    targets = config.target_modules
    if targets is None and config.target_parameters:
        return []  # only parameters are adapted (select_parameters)
    if targets is None:
        raise ValueError(
            "LoraConfig.target_modules is None and lorakit has no default target list for this model: "
            "pass a list of module names, a regex, or 'all-linear'"
        )
    all_linear = isinstance(targets, str) and targets.lower() == ALL_LINEAR
    if all_linear:
        heads = set(head_names)
        linear = set(linear_names)
        candidates = [n for n in module_names if n in linear and n not in heads]
    else:
        candidates = list(module_names)

    chosen: list[Target] = []
    used_entries: set[str] = set()
    for name in candidates:
        if not name:
            continue
        if not all_linear:
            if isinstance(targets, str):
                if re.fullmatch(targets, name) is None:
                    continue
            else:
                hits = [e for e in targets if list_entry_matches(name, e)]
                if not hits:
                    continue
                used_entries.update(hits)
        if name_matches(name, config.exclude_modules) or inside_any(name, config.modules_to_save):
            continue
        if config.layers_to_transform is not None and not _in_layers(name, config):
            continue
        r = pattern_value(name, config.rank_pattern, config.r)
        alpha = pattern_value(name, config.alpha_pattern, config.lora_alpha)
        chosen.append(Target(name, r, alpha))

    if not chosen and not (targets == [] and (config.target_parameters or config.trainable_token_indices)):
        sample = [n for n in module_names if n][:12]
        raise ValueError(
            f"target_modules={targets!r} matched no module of the model"
            + (f" (after exclude_modules={config.exclude_modules!r})" if config.exclude_modules else "")
            + (f" (layers_to_transform={config.layers_to_transform!r})" if config.layers_to_transform is not None else "")
            + f". Some of the model's module names: {sample}"
        )
    if isinstance(targets, list):
        unused = [e for e in targets if e not in used_entries]
        if unused:
            warnings.warn(
                f"target_modules entries matched no module and were ignored: {unused}", UserWarning, stacklevel=3
            )
    return chosen


def _in_layers(name: str, config: LoraConfig) -> bool:
    index = layer_index(name, config.layers_pattern)
    if index is None:
        return False
    wanted = config.layers_to_transform
    return index == wanted if isinstance(wanted, int) else index in wanted


#: modules_to_save entries PEFT adds for a task type; a model without them is normal, so they never warn
TASK_MODULES_TO_SAVE = frozenset({"classifier", "score", "qa_outputs"})


def modules_to_save_names(config: LoraConfig, module_names: Sequence[str]) -> list[str]:
    """Outermost modules named by ``config.modules_to_save`` (list rule), in model order; warns for user entries
    that match nothing (a task's defaults like "score" are expected to miss)."""
    entries = config.modules_to_save or []
    chosen, used = [], set()
    for name in module_names:
        hits = [e for e in entries if name and list_entry_matches(name, e)]
        if not hits or inside_any(name.rpartition(".")[0], chosen):
            continue
        used.update(hits)
        chosen.append(name)
    task_defaults = TASK_MODULES_TO_SAVE if config.task_type else set()
    missing = [e for e in entries if e not in used and e not in task_defaults]
    if missing:
        warnings.warn(f"modules_to_save entries matched no module and were ignored: {missing}", stacklevel=3)
    return chosen


def select_parameters(config: LoraConfig, parameter_names: Sequence[str]) -> list[Target]:
    """The parameters ``config.target_parameters`` adapts, in model order, each with its rank and alpha.

    ``parameter_names`` are ``"<module>.<parameter>"`` for the parameters registered directly on each module (PEFT's
    rule: a name matches an entry it equals or ends with ``.entry``; ``rank_pattern``/``alpha_pattern`` read the
    same name). Raises ``ValueError`` when entries are given and nothing matches; warns about entries that matched
    nothing.
    """
    entries = config.target_parameters or []
    chosen, used = [], set()
    for name in parameter_names:
        hits = [e for e in entries if list_entry_matches(name, e)]
        if not hits:
            continue
        used.update(hits)
        r = pattern_value(name, config.rank_pattern, config.r)
        alpha = pattern_value(name, config.alpha_pattern, config.lora_alpha)
        chosen.append(Target(name, r, alpha))
    if entries and not chosen:
        raise ValueError(
            f"target_parameters={entries!r} matched no parameter of the model; entries are '<module>.<parameter>' "
            f"names or suffixes of them. Some of the model's parameters: {list(parameter_names)[:8]}"
        )
    unused = [e for e in entries if e not in used]
    if unused:
        warnings.warn(f"target_parameters entries matched no parameter and were ignored: {unused}", stacklevel=3)
    return chosen


def unadapted_expert_parameters(config: LoraConfig, parameters: Sequence[tuple[str, int]]) -> list[str]:
    """With ``target_modules="all-linear"``: the 3-D parameters (MoE expert stacks, given as ``(name, ndim)``) that
    "all-linear" cannot reach and ``target_parameters`` does not name; the caller warns about them."""
    targets = config.target_modules
    if not (isinstance(targets, str) and targets.lower() == ALL_LINEAR):
        return []
    entries = config.target_parameters or []
    return [n for n, ndim in parameters if ndim == 3 and not any(list_entry_matches(n, e) for e in entries)]
