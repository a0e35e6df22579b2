"""The one typed config layer (core/config.py) as recipes, adapter configs and `mmadapter train --schema` use it."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from mmadapter.adapters import available_methods, config_from_dict, make_config
from mmadapter.cli.main import main
from mmadapter.core.config import Float, Int
from mmadapter.train.recipe import DataSection, TrainSection, parse_recipe


def recipe(**sections):
    document = {
        "model": {"base": "tiny-llama"},
        "adapter": {"method": "llama-adapter-v1"},
        "train": {"epochs": 1, "lr": 0.01},
        "data": {"train": [{"format": "alpaca", "path": "a.json"}]},
    }
    for key, values in sections.items():
        document[key] = {**document[key], **values}
    return document


def test_train_schema_prints_the_recipe_schema_as_written(capsys):
    assert main(["train", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"model", "adapter", "stages", "train", "data"} <= set(schema["properties"])
    assert schema["required"] == ["model", "adapter"]  # stages default to one, train/data are defaults
    assert schema["properties"]["train"]["$ref"] == "#/$defs/TrainSection"
    base_lr = schema["$defs"]["TrainSection"]["properties"]["base_lr"]
    assert base_lr["description"].startswith("Official rule: lr = base_lr")
    assert schema["$defs"]["TrainSection"]["additionalProperties"] is False


def _numbers(section: type) -> list[tuple[str, str]]:
    """(field, "int" | "float") for every Int or Float field of a recipe section, optional or not."""
    hints = typing.get_type_hints(section, include_extras=True)
    kinds = {Int: "int", Int | None: "int", Float: "float", Float | None: "float"}
    return [
        (field.name, kinds[hints[field.name]]) for field in dataclasses.fields(section) if hints[field.name] in kinds
    ]


NUMBER_FIELDS = [("train", *f) for f in _numbers(TrainSection)] + [("data", *f) for f in _numbers(DataSection)]


@pytest.mark.parametrize(("section", "field", "kind"), NUMBER_FIELDS)
def test_every_number_field_refuses_a_bool_by_its_key(section, field, kind):
    with pytest.raises(ValueError, match=rf"^{section}\.{field}: expected {kind}, got True \(bool\)$"):
        parse_recipe(recipe(**{section: {field: True}}))


@pytest.mark.parametrize(("section", "field"), [(s, f) for s, f, kind in NUMBER_FIELDS if kind == "float"])
def test_every_float_field_reads_a_numeric_string(section, field):
    stage = parse_recipe(recipe(**{section: {field: "5e-1"}})).stages[0]
    assert getattr(getattr(stage, section), field) == 0.5


def test_all_errors_of_a_document_are_reported():
    with pytest.raises(ValueError, match=r"^train\.seed: expected int, got '1'; train\.lr: expected float, got 'x'$"):
        parse_recipe(recipe(train={"seed": "1", "lr": "x"}))


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("lora", {"r": "8"}, r"^r: expected int, got '8'$"),
        ("lora", {"alpha": True}, r"^alpha: expected float, got True \(bool\)$"),
        ("lora", {"rank": 4}, r"^rank: unknown lora config field 'rank' \(known: r, alpha, dropout, target_modules\)$"),
        ("lora", {"target_modules": ["q_proj", 1]}, r"^target_modules\.1: expected a string, got 1 \(int\)$"),
        ("llama-adapter-v1", {"gate_tanh": "yes"}, r"^gate_tanh: expected true or false, got 'yes'$"),
        ("llama-adapter-v2", {"visual_width": 7.5}, r"^visual_width: expected int, got 7\.5 \(float\)$"),
        ("llama-adapter-v2", {"bias_linears": 3}, r"^bias_linears: expected a list, got 3 \(int\)$"),
        ("ptuning-v2", {"prefix_projection": 1}, r"^prefix_projection: expected true or false, got 1 \(int\)$"),
    ],
)
def test_adapter_configs_name_the_wrong_field(method, options, message):
    with pytest.raises(ValueError, match=message):
        make_config(method, **options)


def test_adapter_config_floats_read_numeric_strings():
    assert make_config("lora", alpha="1e1").alpha == 10.0


@pytest.mark.parametrize("method", available_methods())
def test_adapter_configs_round_trip_through_json(method):
    config = make_config(method)
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
