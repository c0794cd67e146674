"""LoraConfig: PEFT's fields and defaults, validated at construction with errors that name the field."""

import dataclasses

import peft
import pytest

from lorakit import LoraConfig, TaskType


def test_every_peft_default_we_share_is_the_same():
    ours = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for f in dataclasses.fields(LoraConfig)}
    theirs = peft.LoraConfig()
    for name, value in ours.items():
        if name in ("peft_type", "task_type", "target_modules", "peft_version"):  # PEFT fills in its version
            continue
        theirs_value = getattr(theirs, name)
        if dataclasses.is_dataclass(theirs_value):  # PEFT's sub-config objects: lorakit keeps their JSON dicts
            theirs_value = dataclasses.asdict(theirs_value)
        assert theirs_value == value, name
    assert set(ours) == set(vars(theirs)) - {"_custom_modules"}  # every PEFT field, nothing more
    assert str(theirs.peft_type.value) == ours["peft_type"]


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(r=0), ValueError, ["r=0", "positive int"]),
        (dict(r=-2), ValueError, ["r=-2"]),
        (dict(r=2.5), TypeError, ["r=2.5", "positive int"]),
        (dict(r=True), TypeError, ["r=True"]),
        (dict(lora_alpha="16"), TypeError, ["lora_alpha", "number"]),
        (dict(lora_dropout=1.0), ValueError, ["lora_dropout=1.0", "[0, 1)"]),
        (dict(lora_dropout=-0.1), ValueError, ["lora_dropout"]),
        (dict(bias="some"), ValueError, ["bias='some'", "lora_only"]),
        (dict(init_lora_weights="pisa"), ValueError, ["init_lora_weights", "gaussian"]),
        (dict(init_lora_weights="loftq"), NotImplementedError, ["init_lora_weights='loftq'"]),
        (dict(init_lora_weights=1), ValueError, ["init_lora_weights"]),
        (dict(target_modules=["q", 3]), TypeError, ["target_modules"]),
        (dict(target_modules=5), TypeError, ["target_modules"]),
        (dict(layers_pattern="layers"), ValueError, ["layers_pattern", "layers_to_transform"]),
        (dict(target_modules="q.*", layers_to_transform=[0]), ValueError, ["layers_to_transform", "list"]),
        (dict(target_modules=["q"], layers_to_transform=[-1]), ValueError, ["layers_to_transform"]),
        (dict(target_modules=["q"], layers_to_transform="0"), TypeError, ["layers_to_transform"]),
        (dict(rank_pattern={"q": 0}), ValueError, ["rank_pattern['q']", "positive int"]),
        (dict(alpha_pattern={"q": "x"}), TypeError, ["alpha_pattern['q']"]),
        (dict(rank_pattern=[("q", 2)]), TypeError, ["rank_pattern"]),
        (dict(task_type="TRANSLATE"), ValueError, ["task_type", "CAUSAL_LM"]),
        (dict(use_rslora="yes"), TypeError, ["use_rslora"]),
        (dict(modules_to_save="classifier"), TypeError, ["modules_to_save"]),
    ],
)
def test_bad_values_name_field_value_and_what_is_allowed(kwargs, error, words):
    with pytest.raises(error) as info:
        LoraConfig(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_good_values_are_kept_and_normalised():
    c = LoraConfig(r=4, lora_alpha=8.5, target_modules={"v", "q"}, layers_to_transform=(0, 2),
                   layers_pattern="layers", task_type=TaskType.CAUSAL_LM, init_lora_weights="gaussian")
    assert c.target_modules == ["q", "v"]
    assert c.layers_to_transform == [0, 2]
    assert c.task_type == "CAUSAL_LM"
    assert LoraConfig(task_type=peft.TaskType.SEQ_CLS).task_type == "SEQ_CLS"


def test_dict_round_trip_and_unknown_fields_refused_unless_empty():
    c = LoraConfig(r=4, target_modules=["q"], rank_pattern={"q": 2})
    assert LoraConfig.from_dict(c.to_dict()) == c
    data = c.to_dict() | {"use_dora": False, "some_future_field": None, "peft_version": "0.99"}
    assert LoraConfig.from_dict(data).r == 4
    with pytest.raises(ValueError, match="some_future_field=3"):
        LoraConfig.from_dict(data | {"some_future_field": 3})


def test_json_shape_is_peft_s():
    """to_dict has PEFT's keys (runtime_config is left out of the file by both) and PEFT reads it back."""
    ours = LoraConfig(target_modules=["q"], r=4).to_dict()
    assert set(ours) == set(peft.LoraConfig(target_modules=["q"]).to_dict())
    theirs = peft.LoraConfig(**{k: v for k, v in ours.items() if k != "peft_type"})
    assert theirs.r == 4 and theirs.target_modules == {"q"}
