"""Which of PEFT's ``LoraConfig`` fields lorakit honours, and the refusal of the rest: "never loaded wrong".

``LoraConfig`` carries every field of PEFT 0.21.2 with PEFT's name and default, so any ``adapter_config.json``
PEFT writes can be read. A field lorakit does not implement is accepted only at a value that changes nothing (its
"off" values below); any other value is refused when the config is built (and so when a file is read), with an
error naming the field, its value and why, never later and never as a warning. Fields that only describe the file
(versions, ``auto_mapping``) or the run (``runtime_config``) stay quiet whatever their value.

A field from a PEFT newer than 0.21.2 is unknown here: it is dropped quietly if it holds an "empty" value (``None``,
``False``, ``{}``, ``[]``: how PEFT writes a new feature that is off) and refused by name otherwise.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "UnsupportedFieldError",
    "INIT_CHOICES",
    "BASE_REWRITING_INITS",
    "METADATA_FIELDS",
    "UNSUPPORTED_FIELDS",
    "check_init_lora_weights",
    "check_unsupported_fields",
    "check_unknown_fields",
    "check_file_fields",
    "rewrites_base",
]


class UnsupportedFieldError(NotImplementedError, ValueError):
    """A config field set to a value lorakit cannot honour (catchable as ``ValueError`` or ``NotImplementedError``)."""


#: the ``init_lora_weights`` values lorakit implements (besides ``"pissa_niter_<k>"``)
INIT_CHOICES = (True, False, "gaussian", "orthogonal", "pissa", "olora")
#: values PEFT knows that lorakit refuses, and why
_REFUSED_INITS = {
    "eva": "EVA needs activations from a data pass at init",
    "corda": "CorDA needs covariance statistics from a data pass at init",
    "loftq": "LoftQ re-quantizes the base weights",
    "lora_ga": "LoRA-GA needs gradients from a data pass at init",
    "mica": "MiCA freezes lora_B during training, a LoRA variant lorakit lacks",
}
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
#: inits that move part of the base weight into the adapter (the base weight is rewritten)
BASE_REWRITING_INITS = ("pissa", "olora")

#: describe the file or the run, never the adapter's maths: quiet whatever their value
METADATA_FIELDS = ("peft_version", "lorakit_version", "auto_mapping", "runtime_config")

# PEFT fields lorakit stores but does not implement: the values at which they change nothing, and why any other is
# refused. ``None``/``False``/``{}``/``[]`` in a tuple are compared by equality.
UNSUPPORTED_FIELDS: dict[str, tuple[tuple, str]] = {
    "use_dora": ((False, None), "DoRA (weight-decomposed LoRA) is not implemented yet"),
    "alora_invocation_tokens": ((None,), "Activated LoRA changes which tokens the adapter acts on"),
    "layer_replication": ((None, []), "layer replication changes the base model's layer stack"),
    "megatron_config": ((None,), "Megatron parallel linear layers are not supported"),
    "use_qalora": ((False, None), "QA-LoRA (GPTQ input pooling) is not supported"),
    "velora_config": ((None,), "VeLoRA's compressed backward is not supported"),
    "monteclora_config": ((None,), "MonteCLoRA's sampled weights are not supported"),
    "use_bdlora": ((None, False), "block-diagonal LoRA (BD-LoRA) is not supported"),
    "arrow_config": ((None,), "Arrow routing between adapters is not supported"),
    "kasa_config": ((None,), "KaSA truncates the base weight and adds a singular-value diagonal"),
    "ensure_weight_tying": ((False, None), "tying adapters of tied embeddings/heads is not supported"),
}

# Fields PEFT reads only together with another setting and ignores otherwise, as lorakit does: megatron_core
# (with megatron_config), qalora_group_size (use_qalora), loftq_config / eva_config / corda_config / lora_ga_config
# (init_lora_weights="loftq"/"eva"/"corda"/"lora_ga"). Those settings are refused, so any value of these is harmless.


def _is_off(value: Any, off: tuple) -> bool:
    return any(value is o or (type(value) is type(o) and value == o) for o in off)


def check_init_lora_weights(value: Any) -> None:
    """Raise naming ``init_lora_weights`` unless lorakit implements ``value``."""
    if isinstance(value, bool) or value in INIT_CHOICES[2:] or (isinstance(value, str) and _PISSA_NITER.fullmatch(value)):
        return
    if isinstance(value, str) and value in _REFUSED_INITS:
        raise UnsupportedFieldError(
            f"LoraConfig.init_lora_weights={value!r} is not supported by lorakit: {_REFUSED_INITS[value]}; "
            f"supported: {list(INIT_CHOICES)} and 'pissa_niter_<k>'"
        )
    raise ValueError(
        f"LoraConfig.init_lora_weights={value!r} is invalid: expected one of {list(INIT_CHOICES)} or "
        "'pissa_niter_<k>' (k a number of subspace iterations)"
    )


def rewrites_base(init_lora_weights: Any) -> bool:
    """Whether this init moves part of the base weight into the adapter (PiSSA, OLoRA)."""
    return isinstance(init_lora_weights, str) and (
        init_lora_weights in BASE_REWRITING_INITS or init_lora_weights.startswith("pissa_niter_")
    )


def check_unsupported_fields(values: dict[str, Any]) -> None:
    """Raise :class:`UnsupportedFieldError` naming every PEFT field set to something lorakit cannot honour."""
    refused = [
        f"{name}={values[name]!r} ({why})"
        for name, (off, why) in UNSUPPORTED_FIELDS.items()
        if name in values and not _is_off(values[name], off)
    ]
    if refused:
        raise UnsupportedFieldError(
            "LoraConfig fields lorakit cannot honour: " + "; ".join(refused)
            + ". Loading would give outputs that differ from PEFT's, so the config is refused"
        )


def _is_empty(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, tuple, str)) and len(value) == 0)


def check_unknown_fields(unknown: dict[str, Any]) -> None:
    """Fields lorakit (and PEFT 0.21.2) does not know: quiet when empty (a newer feature left off), else refused."""
    meaningful = {k: v for k, v in unknown.items() if k not in METADATA_FIELDS and not _is_empty(v)}
    if meaningful:
        raise UnsupportedFieldError(
            "adapter config fields unknown to lorakit (written by a newer PEFT?) are set: "
            + ", ".join(f"{k}={v!r}" for k, v in sorted(meaningful.items()))
            + "; they may change the adapter's outputs, so the config is refused"
        )


def check_file_fields(data: dict[str, Any], written_by_lorakit: bool = False) -> None:
    """What only a file can tell: an adapter trained with ``init_lora_weights="pissa_niter_<k>"`` by PEFT (no
    ``lorakit_version`` in its weights' metadata) trained on a residual drawn from PEFT's unseeded global RNG, which no load can rebuild (PEFT
    itself loads it on another residual); it is refused. lorakit's own draws are seeded, so its files load exactly."""
    init = data.get("init_lora_weights")
    if isinstance(init, str) and _PISSA_NITER.fullmatch(init) and not written_by_lorakit:
        raise UnsupportedFieldError(
            f"init_lora_weights={init!r} in a file not written by lorakit: PEFT drew that randomized SVD from its "
            "unseeded global RNG, so the residual base weights the adapter was trained on cannot be rebuilt (PEFT's "
            "own reload differs too). Convert it in PEFT to a plain LoRA (save_pretrained with "
            "path_initial_model_for_weight_conversion) and load that"
        )
