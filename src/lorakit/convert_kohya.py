"""kohya's sd-scripts LoRA format (what A1111 and ComfyUI load): key maps to and from PEFT's, as pure functions.

A kohya file holds, per adapted module, ``<name>.lora_down.weight`` (PEFT's ``lora_A``: ``r × in``, or
``r × in × kh × kw`` for a conv), ``<name>.lora_up.weight`` (``lora_B``: ``out × r``, or ``out × r × 1 × 1``) and
usually ``<name>.alpha`` (a scalar; the update is ``alpha / r · up @ down``; missing or 0 means ``alpha = r``, as
sd-scripts reads it). ``<name>`` is the module's path in the pipeline component with its dots turned into
underscores, after the component's prefix: ``lora_unet_`` (the UNet), ``lora_te_`` (the text encoder; ``lora_te1_``
in SDXL files) and ``lora_te2_`` (SDXL's second text encoder). ``down_blocks_0_attentions_0_proj_in`` could be
several dotted paths; it is resolved against the module names of the model given, so a name is never guessed.
SDXL files name UNet blocks as Stability's code does (``input_blocks_4_1_…``); those are translated to the
diffusers UNet's names (``down_blocks_1_attentions_0_…``) from the model's own block layout.

Per-module ranks and alphas become ``rank_pattern`` / ``alpha_pattern`` (each module's own value, exactly: no
module's alpha is replaced by the most common one). A conv LoRA (LoCon: a ``3×3`` ``lora_down``) becomes a
Conv2d adapter. Keys that fit nothing are named in the error; DoRA (``dora_scale``) and LyCORIS' other
decompositions (LoHa, LoKr, Tucker ``lora_mid``) are refused by name.

Writing (:func:`to_kohya`, :func:`peft_to_kohya`) uses the diffusers module names under the same prefixes (what
sd-scripts writes for SD 1.x/2.x, and what diffusers, A1111 and ComfyUI read for SDXL too), with every module's
``.alpha``; rsLoRA's scale ``alpha / sqrt(r)`` is written as the equivalent ``alpha · sqrt(r)``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from typing import Mapping, NamedTuple, Optional

import torch
from torch import Tensor, nn

from .config import LoraConfig
from .config_fields import rewrites_base
from .keys import PEFT_PREFIX
from .targeting import pattern_value

__all__ = [
    "KOHYA_PREFIXES",
    "KohyaAdapter",
    "is_kohya_state",
    "kohya_name",
    "from_kohya",
    "kohya_for_model",
    "peft_to_kohya",
    "to_kohya",
]

#: the prefix each pipeline component's modules get in a kohya file (``lora_te1`` is read as ``text_encoder`` too)
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
_READ_PREFIXES = (("lora_unet", "unet"), ("lora_te1", "text_encoder"), ("lora_te2", "text_encoder_2"),
                  ("lora_te", "text_encoder"))
_NAME = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_(\w+)$")
_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# recognised, but not LoRA as lorakit implements it: refused by name
_UNSUPPORTED = {
    "dora_scale": "DoRA (dora_scale)",
    "lora_mid.weight": "LyCORIS' Tucker decomposition (lora_mid)",
    "hada_w1_a": "LyCORIS' LoHa", "hada_w1_b": "LyCORIS' LoHa", "hada_w2_a": "LyCORIS' LoHa",
    "hada_w2_b": "LyCORIS' LoHa", "lokr_w1": "LyCORIS' LoKr", "lokr_w2": "LyCORIS' LoKr",
    "lokr_w1_a": "LyCORIS' LoKr", "lokr_w1_b": "LyCORIS' LoKr", "lokr_w2_a": "LyCORIS' LoKr",
    "lokr_w2_b": "LyCORIS' LoKr", "diff": "full weight differences (diff)", "diff_b": "bias differences (diff_b)",
}
_TEXT_MODEL = "text_model_"  # CLIP's text model in sd-scripts' (transformers 4) naming: the layers' parent
_SGM_OUTSIDE_BLOCKS = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
                       "time_embed_2": "time_embedding_linear_2", "label_emb_0_0": "add_embedding_linear_1",
                       "label_emb_0_2": "add_embedding_linear_2"}
_SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
               "skip_connection": "conv_shortcut", "op": "conv"}


class KohyaAdapter(NamedTuple):
    """One pipeline component's part of a kohya file, in PEFT's terms."""

    config: LoraConfig  #: ranks and alphas of the file, per module (``rank_pattern`` / ``alpha_pattern``)
    state_dict: dict[str, Tensor]  #: PEFT's keys (``base_model.model.<module>.lora_A.weight``)


def kohya_name(prefix: str, module_name: str) -> str:
    """kohya's name of a module: ``lora_unet`` + ``down_blocks.0.attentions.0.proj_in`` ->
    ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return f"{prefix}_{module_name.replace('.', '_')}"


def is_kohya_state(state: Mapping[str, Tensor]) -> bool:
    """Whether a dict of tensors is meant in kohya's format: it has a ``lora_unet_…``/``lora_te…_`` key of a LoRA
    part (``lora_down.weight``, or a LyCORIS/DoRA part, refused later by name). Its other keys are then checked
    (and named if they fit nothing) when it is read."""
    return any(_NAME.match(k.split(".", 1)[0]) and (k.endswith(".lora_down.weight") or k.split(".", 1)[-1]
                                                      in _UNSUPPORTED) for k in state)


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------
def _split(state: Mapping[str, Tensor], source: str) -> tuple[dict[str, dict[str, dict[str, Tensor]]], dict[str, str]]:
    """``({component: {name without prefix: {"down"|"up"|"alpha": tensor}}}, {component: prefix as spelled})``;
    every key is accounted for."""
    out: dict[str, dict[str, dict[str, Tensor]]] = {}
    foreign, unsupported, spelled = [], {}, {}
    for key, tensor in state.items():
        name, _, part = key.partition(".")
        match = _NAME.match(name)
        if not match or not part:
            foreign.append(key)
            continue
        if part in _UNSUPPORTED:
            unsupported.setdefault(_UNSUPPORTED[part], []).append(key)
            continue
        if part not in _PARTS:
            foreign.append(key)
            continue
        prefix, rest = match.groups()
        component = dict(_READ_PREFIXES)[prefix]
        spelled.setdefault(component, set()).add(prefix)
        out.setdefault(component, {}).setdefault(rest, {})[_PARTS[part]] = tensor
    if unsupported:
        kind, keys = next(iter(unsupported.items()))
        raise NotImplementedError(f"{source} holds {kind}, which lorakit does not implement: e.g. {keys[:3]}")
    if foreign:
        raise ValueError(f"{source}: {len(foreign)} key(s) are not kohya LoRA tensors (<lora_unet|lora_te|lora_te1|"
                         f"lora_te2>_<module>.lora_down.weight / .lora_up.weight / .alpha), e.g. {foreign[:5]}")
    for component, prefixes in spelled.items():
        if len(prefixes) > 1:
            raise ValueError(f"{source} names the {component} both as {sorted(prefixes)}; expected one prefix")
    prefixes = {component: next(iter(spelling)) for component, spelling in spelled.items()}
    for component, groups in out.items():
        incomplete = [f"{prefixes[component]}_{n}" for n, g in groups.items() if {"down", "up"} - set(g)]
        if incomplete:
            raise ValueError(f"{source}: {incomplete[:5]} lack their lora_down.weight or lora_up.weight")
    return out, prefixes


def _module_table(model: nn.Module) -> tuple[dict[str, str], dict[str, list[str]], dict[str, nn.Module]]:
    """``(kohya name -> module name, ambiguous kohya name -> module names, module name -> base module)`` for every
    module of ``model`` (lorakit's own parts skipped; a wrapped layer stands for its base layer)."""
    by_kohya: dict[str, list[str]] = {}
    modules: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if not name or "base_layer" in parts or any(p.startswith("lora_") or p == "modules_to_save" for p in parts):
            continue
        modules[name] = getattr(module, "base_layer", module)
        by_kohya.setdefault(name.replace(".", "_"), []).append(name)
    unique = {k: v[0] for k, v in by_kohya.items() if len(v) == 1}
    return unique, {k: v for k, v in by_kohya.items() if len(v) > 1}, modules


def _block_layout(modules: dict[str, nn.Module]) -> dict[str, list[int]]:
    """How many SGM blocks each diffusers down/up block spans: one per resnet, and one for a downsampler."""
    layout: dict[str, list[int]] = {"down_blocks": [], "up_blocks": []}
    for name in modules:
        m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets\.\d+|downsamplers\.0)", name)
        if m:
            blocks = layout[m.group(1)]
            b = int(m.group(2))
            blocks.extend([0] * (b + 1 - len(blocks)))
            blocks[b] += 1
    return layout


def _sgm_to_diffusers(name: str, modules: dict[str, nn.Module], layout: dict[str, list[int]]) -> Optional[str]:
    """A name of Stability's UNet (SDXL files: ``input_blocks_4_1_…``, ``middle_block_1_…``,
    ``output_blocks_2_0_…``) as the diffusers UNet's (underscored), read off the model's block layout."""
    for sgm, diffusers in _SGM_OUTSIDE_BLOCKS.items():
        if name == sgm or name.startswith(sgm + "_"):
            return diffusers + name[len(sgm):]
    m = re.match(r"^middle_block_([012])_(.+)$", name)
    if m:
        sub = ("resnets_0", "attentions_0", "resnets_1")[int(m.group(1))]
        return f"mid_block_{sub}_{_SGM_RESNET.get(m.group(2), m.group(2))}"
    m = re.match(r"^(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$", name)
    if not m:
        return None
    kind, block, inner, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    rest = _SGM_RESNET.get(rest, rest)
    side, index = ("down_blocks", block - 1) if kind == "input_blocks" else ("up_blocks", block)
    for b, n in enumerate(layout[side]):
        if index < n:
            if kind == "input_blocks" and f"{side}.{b}.resnets.{index}" not in modules:
                return f"{side}_{b}_downsamplers_0_{rest}"
            kinds = ["resnets", "attentions", "upsamplers"]
            has_attention = f"{side}.{b}.attentions.{index}" in modules
            sub = kinds[inner] if inner == 0 or has_attention else "upsamplers"
            position = 0 if sub == "upsamplers" else index
            return f"{side}_{b}_{sub}_{position}_{rest}"
        index -= n
    return None


def _resolve(names, model: nn.Module, prefix: str, source: str) -> dict[str, str]:
    """kohya names (without prefix) -> module names of ``model``; every name must resolve to exactly one module."""
    unique, ambiguous, modules = _module_table(model)
    resolved, unknown, layout = {}, [], None
    for name in names:
        key = name
        if name not in unique and name not in ambiguous and name.startswith(_TEXT_MODEL):
            key = name[len(_TEXT_MODEL):]  # transformers 5's CLIPTextModel has no text_model level
        elif name not in unique and name not in ambiguous:
            layout = layout or _block_layout(modules)
            key = _sgm_to_diffusers(name, modules, layout)
        if key in ambiguous:
            raise ValueError(f"{source}: {prefix}_{name} could be any of the modules {ambiguous[key]}")
        if key not in unique:
            unknown.append(f"{prefix}_{name}")
            continue
        resolved[name] = unique[key]
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} module name(s) fit no module of the {type(model).__name__} "
                         f"given, e.g. {unknown[:5]} (a file for another model?)")
    return resolved


def _expected_shapes(module: nn.Module, r: int) -> Optional[tuple[tuple[int, ...], tuple[int, ...]]]:
    """PEFT's (and kohya's) ``lora_A`` / ``lora_B`` shapes on ``module``; None for a module kohya cannot adapt."""
    if isinstance(module, nn.Linear):
        return (r, module.in_features), (module.out_features, r)
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return (r, module.in_channels, *module.kernel_size), (module.out_channels, r, 1, 1)
    return None


def _alpha(group: dict[str, Tensor], r: int, key: str) -> float:
    alpha = group.get("alpha")
    if alpha is None:
        return float(r)
    if alpha.numel() != 1 or not alpha.is_floating_point() and alpha.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{key}.alpha is a {alpha.dtype} tensor of shape {tuple(alpha.shape)}; expected a scalar")
    value = float(alpha.reshape(()).item())
    if not math.isfinite(value):
        raise ValueError(f"{key}.alpha is {value}; expected a finite number")
    return value if value != 0 else float(r)  # sd-scripts reads alpha 0 as "no alpha": alpha = r


def _fit(groups: dict[str, dict[str, Tensor]], model: nn.Module, prefix: str, source: str) -> KohyaAdapter:
    """One component's groups onto ``model``: PEFT keys, shapes checked, ranks and alphas as patterns."""
    resolved = _resolve(groups, model, prefix, source)
    modules = dict(model.named_modules())
    state: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, group in groups.items():
        key, module_name = f"{prefix}_{name}", resolved[name]
        down, up = group["down"], group["up"]
        r = down.shape[0] if down.dim() else 0
        module = getattr(modules[module_name], "base_layer", modules[module_name])
        expected = _expected_shapes(module, r)
        if expected is None:
            raise ValueError(f"{source}: {key} names {module_name!r}, a {type(module).__name__}; kohya LoRA adapts "
                             "nn.Linear and nn.Conv2d (groups=1) layers")
        if r == 0 or (tuple(down.shape), tuple(up.shape)) != expected:
            raise ValueError(f"{source}: {key} has lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)}; "
                             f"{module_name!r} ({type(module).__name__}) needs {expected[0]} and {expected[1]}")
        state[f"{PEFT_PREFIX}{module_name}.lora_A.weight"] = down
        state[f"{PEFT_PREFIX}{module_name}.lora_B.weight"] = up
        ranks[module_name], alphas[module_name] = r, _alpha(group, r, key)
    return KohyaAdapter(_config(ranks, alphas), state)


def _config(ranks: dict[str, int], alphas: dict[str, float]) -> LoraConfig:
    """The most common rank and alpha as ``r`` / ``lora_alpha``, every other module's own in the patterns (each
    name escaped, so that it matches only itself)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return LoraConfig(
        r=r, lora_alpha=alpha, target_modules=sorted(ranks),
        rank_pattern={re.escape(n): v for n, v in sorted(ranks.items()) if v != r},
        alpha_pattern={re.escape(n): v for n, v in sorted(alphas.items()) if v != alpha},
    )


def from_kohya(
    state_dict: Mapping[str, Tensor],
    unet: Optional[nn.Module] = None,
    text_encoder: Optional[nn.Module] = None,
    text_encoder_2: Optional[nn.Module] = None,
    source: str = "kohya state dict",
) -> dict[str, KohyaAdapter]:
    """A kohya LoRA state dict -> ``{component: KohyaAdapter(config, state_dict)}`` with PEFT's keys, for the
    components the file adapts (``"unet"``, ``"text_encoder"``, ``"text_encoder_2"``).

    Each component the file names must be given (the diffusers ``UNet2DConditionModel``, transformers'
    ``CLIPTextModel`` / ``CLIPTextModelWithProjection``): its module names resolve kohya's underscored names. The
    parts are what PEFT's files hold: ``peft = get_peft_model(unet, part.config)`` then
    ``set_peft_model_state_dict(peft, part.state_dict)``. ``PeftModel.from_pretrained(model, "file.safetensors")``
    does this for a kohya file on one component.
    """
    given = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    groups, prefixes = _split(state_dict, source)
    if not groups:
        raise ValueError(f"{source} holds no tensors")
    missing = [c for c in groups if given[c] is None]
    if missing:
        raise ValueError(f"{source} adapts the {missing} but no such model was given; pass "
                         + ", ".join(f"{c}=" for c in missing))
    return {c: _fit(g, given[c], prefixes[c], source) for c, g in groups.items()}


def kohya_for_model(state_dict: Mapping[str, Tensor], model: nn.Module, source: str = "kohya file") -> KohyaAdapter:
    """The part of a kohya file that fits ``model`` (one pipeline component). The other components' tensors are
    left out with a warning naming them (load them onto their own models); none or several fitting is an error."""
    groups, prefixes = _split(state_dict, source)
    if not groups:
        raise ValueError(f"{source} holds no tensors")
    fits, errors = {}, {}
    for component, group in groups.items():
        try:
            fits[component] = _fit(group, model, prefixes[component], source)
        except ValueError as e:
            errors[component] = e
    if not fits:
        if len(errors) == 1:
            raise next(iter(errors.values()))
        raise ValueError(f"{source}: no part of the file fits this {type(model).__name__}: "
                         + "; ".join(f"{c}: {e}" for c, e in errors.items()))
    if len(fits) > 1:
        raise ValueError(f"{source}: the parts {sorted(fits)} all fit this {type(model).__name__}; use "
                         "lorakit.convert.from_kohya with the components named")
    (component, adapter), = fits.items()
    if errors:
        left = {c: len(groups[c]) for c in errors}
        warnings.warn(f"{source}: loaded the {component} part onto this {type(model).__name__}; the file's LoRAs of "
                      f"{left} modules are for other models (load the file onto each of them)", stacklevel=3)
    return adapter


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------
def _alpha_tensor(alpha: float, dtype: torch.dtype) -> Tensor:
    """``alpha`` in the weights' dtype (as sd-scripts saves it), or float32 where that dtype cannot hold it."""
    value = torch.tensor(alpha, dtype=dtype if dtype.is_floating_point else torch.float32)
    if float(value) != alpha:
        value = torch.tensor(alpha, dtype=torch.float32)
    return value


def _write(modules: dict[str, tuple[Tensor, Tensor, float]], prefix: str, dtype: Optional[torch.dtype],
           out: dict[str, Tensor]) -> None:
    """``{module: (A, B, alpha)}`` -> kohya keys in ``out``. Text-encoder names get the ``text_model`` level that
    every kohya reader expects (transformers 5's CLIPTextModel lacks it)."""
    for module_name, (A, B, alpha) in modules.items():
        name = kohya_name(prefix, module_name)
        if prefix != KOHYA_PREFIXES["unet"] and not name.startswith(f"{prefix}_{_TEXT_MODEL}"):
            name = f"{prefix}_{_TEXT_MODEL}{name[len(prefix) + 1:]}"
        if f"{name}.lora_down.weight" in out:
            raise ValueError(f"two modules map to the kohya name {name!r}; cannot write this adapter")
        if A.dim() not in (2, 4):
            raise ValueError(f"{module_name}: lora_A has shape {tuple(A.shape)}; kohya's format holds Linear and "
                             "Conv2d LoRAs only")
        A, B = (t.detach().to("cpu", dtype or t.dtype).contiguous() for t in (A, B))
        out[f"{name}.lora_down.weight"] = A
        out[f"{name}.lora_up.weight"] = B
        out[f"{name}.alpha"] = _alpha_tensor(alpha, A.dtype)


def _kohya_alpha(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha * math.sqrt(r) if use_rslora else float(alpha)


def peft_to_kohya(
    peft_state: Mapping[str, Tensor], config: LoraConfig, prefix: str = "lora_unet",
    dtype: Optional[torch.dtype] = None, source: str = "adapter",
) -> dict[str, Tensor]:
    """A PEFT adapter file's tensors and config -> kohya's dict (no model needed: PEFT names modules with dots).

    Refuses what kohya cannot carry (embedding LoRAs, ``modules_to_save``, trained biases, GPT-2 ``Conv1D``
    layers), naming the key or field."""
    _check_config(config, source)
    unprefixed = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in peft_state.items()}
    modules, other = {}, []
    for key, A in unprefixed.items():
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            B = unprefixed.get(f"{name}.lora_B.weight")
            if B is None:
                raise ValueError(f"{source}: {key} has no lora_B.weight beside it")
            r = A.shape[0]
            alpha = pattern_value(name, config.alpha_pattern or {}, config.lora_alpha)
            modules[name] = (A, B, _kohya_alpha(alpha, r, config.use_rslora))
        elif not key.endswith(".lora_B.weight"):
            other.append(key)
    if other:
        raise ValueError(f"{source}: {other[:5]} are not Linear/Conv LoRA factors; kohya's format cannot carry them")
    out: dict[str, Tensor] = {}
    _write(modules, prefix, dtype, out)
    return out


def _check_config(config: LoraConfig, source: str) -> None:
    if config.modules_to_save:
        raise ValueError(f"{source} has modules_to_save {list(config.modules_to_save)}; kohya's format cannot "
                         "carry fully trained modules")
    if config.bias != "none":
        raise ValueError(f"{source} trains biases (bias={config.bias!r}); kohya's format cannot carry them")
    if rewrites_base(config.init_lora_weights):
        raise ValueError(f"{source} has init_lora_weights={config.init_lora_weights!r}: its factors belong to a "
                         "rewritten base weight, which a kohya file cannot carry; save it with save_pretrained(dir, "
                         "path_initial_model_for_weight_conversion=...) (a plain LoRA) and convert that folder")
    if config.fan_in_fan_out:
        raise ValueError(f"{source} has fan_in_fan_out=True (GPT-2 Conv1D layers); kohya's format holds nn.Linear "
                         "and nn.Conv2d LoRAs only")


def _model_modules(model: nn.Module, adapter_name: str) -> dict[str, tuple[Tensor, Tensor, float]]:
    """``{module: (A, B, kohya alpha)}`` of one adapter of a lorakit PeftModel / LoraModel."""
    lora_model = getattr(model, "base_model", model)
    if not callable(getattr(lora_model, "lora_layers", None)) or adapter_name not in getattr(model, "peft_config", {}):
        raise ValueError(f"expected a lorakit PeftModel with an adapter {adapter_name!r}, got a "
                         f"{type(model).__name__}")
    _check_config(model.peft_config[adapter_name], f"adapter {adapter_name!r}")
    modules = {}
    for name, layer in lora_model.lora_layers():
        if adapter_name not in layer.r:
            continue
        base = layer.base_layer
        stock = type(base).forward in (nn.Linear.forward, nn.Conv2d.forward)
        if _expected_shapes(base, 1) is None or not stock or getattr(layer, "transpose_delta", False):
            raise ValueError(f"{name} is a {type(base).__name__}; kohya's format holds LoRAs of nn.Linear and "
                             "nn.Conv2d (groups=1, stock forward) only")
        A, B = layer.factors(adapter_name)
        r = layer.r[adapter_name]
        modules[name] = (A, B, _kohya_alpha(layer.lora_alpha[adapter_name], r, layer.use_rslora[adapter_name]))
    if not modules:
        raise ValueError(f"adapter {adapter_name!r} has no LoRA layers; nothing to write")
    return modules


def to_kohya(
    model: Optional[nn.Module] = None,
    adapter_name: str = "default",
    *,
    unet: Optional[nn.Module] = None,
    text_encoder: Optional[nn.Module] = None,
    text_encoder_2: Optional[nn.Module] = None,
    dtype: Optional[torch.dtype] = None,
) -> dict[str, Tensor]:
    """lorakit PeftModels -> one kohya state dict (``safetensors.torch.save_file`` it for A1111, ComfyUI or
    ``pipeline.load_lora_weights``).

    Name the components (``unet=``, ``text_encoder=``, ``text_encoder_2=``); a lone ``model`` is the text encoder
    if its base model is a CLIP text model, else the UNet. ``dtype`` casts the factors (``.alpha`` follows them,
    as sd-scripts saves it, unless that dtype cannot hold its value exactly)."""
    given = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    if model is not None:
        base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        component = "text_encoder" if type(base).__name__.startswith("CLIPText") else "unet"
        if given[component] is not None:
            raise ValueError(f"model and {component}= both given; pass each component once")
        given[component] = model
    if all(m is None for m in given.values()):
        raise ValueError("to_kohya needs a model (or unet=, text_encoder=, text_encoder_2=)")
    prefixes = dict(KOHYA_PREFIXES)
    if given["text_encoder_2"] is not None:
        prefixes["text_encoder"] = "lora_te1"  # SDXL's naming for its first text encoder
    out: dict[str, Tensor] = {}
    for component, m in given.items():
        if m is not None:
            _write(_model_modules(m, adapter_name), prefixes[component], dtype, out)
    return out
