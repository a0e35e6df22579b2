"""Recipes: typed parsing, errors that name the key, stage inheritance, overrides, built-in recipes."""

from __future__ import annotations

import typing

import pytest
import yaml

from mmadapter.train.readers import READERS
from mmadapter.train.recipe import (
    DataSource,
    builtin_recipes,
    dump_recipe,
    find_recipe,
    load_recipe,
    parse_recipe,
)


def minimal(**changes):
    document = {
        "model": {"base": "tiny-llama"},
        "adapter": {"method": "llama-adapter-v1"},
        "train": {"epochs": 1, "lr": 0.01},
        "data": {"train": [{"format": "alpaca", "path": "a.json"}]},
    }
    document.update(changes)
    return document


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train": {"epochs": 1, "lr": "abc"}}, "^train.lr: expected float, got 'abc'"),
        ({"train": {"epochs": 1, "lr": 1e38}}, r"train.lr: 1e\+38 is not a learning rate (at most 10)"),
        (
            {"data": {"train": [{"format": "alpaca", "path": "a.json"}], "num_workers": -1}},
            "data.num_workers: must be 0",
        ),
        (
            {"model": {"base": "tiny-llama", "quantization": {"bits": 8, "quant_type": "fp4"}}},
            "model.quantization.quant_type applies to bits: 4 only",
        ),
        ({"train": {"epochs": 1, "lr": 0.1, "batch_size": 2.5}}, "train.batch_size: expected int, got 2.5"),
        ({"train": {"epochs": 1, "lr": 0.1, "bogus": 1}}, "train.bogus: unknown key"),
        ({"model": {"tokenizer": "t"}}, "model.base: required key is missing"),
        ({"train": {"epochs": 1, "lr": 0.1, "mixed_precision": "fp8"}}, "train.mixed_precision: expected one of"),
        ({"train": {"epochs": 1, "lr": 0.1, "betas": [0.9]}}, "train.betas: expected a list of 2 values"),
        ({"train": {"epochs": 1, "lr": 0.1, "grad_clip": True}}, "train.grad_clip: expected float, got True"),
        ({"data": {"train": [{"format": "csv", "path": "x"}]}}, "data.train.0.format: expected one of"),
        ({"train": {"lr": 0.1}}, "^train: set epochs or max_steps"),
        ({"train": {"epochs": 1}}, "^train: set lr (absolute) or base_lr"),
        ({"train": {"epochs": 1, "lr": -1.0}}, "^train.lr: must be positive"),
        ({"data": {"train": []}}, "^data.train: no training data"),
        ({"stages": [{"name": "a", "train": {"max_steps": 0}}]}, "^stages.0.train.max_steps: must be at least 1"),
        ({"stages": [{"name": "a"}, {"name": "a"}]}, "stage names must be unique"),
        ({"stages": [{"name": "a", "train": {"lr": "x"}}]}, "stages.0.train.lr: expected float, got 'x'"),
        (
            {"stages": [{"name": "a"}, {"name": "b", "train": {"mixed_precision": "bf16"}}]},
            "train.mixed_precision: must be the same in every stage",
        ),
        ({"extra": 1}, "extra: unknown key"),
    ],
)
def test_errors_name_the_key(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_recipe(minimal(**change))


def test_stages_inherit_defaults_and_override_only_what_they_name():
    recipe = parse_recipe(
        minimal(
            train={"epochs": 2, "lr": 0.01, "weight_decay": 0.02},
            stages=[
                {"name": "caption", "trains": "caption", "train": {"lr": 0.001}},
                {"name": "instruction", "trains": "instruction", "data": {"max_length": 96}},
            ],
        )
    )
    caption, instruction = recipe.stages
    assert (caption.train.lr, caption.train.weight_decay, caption.train.epochs) == (0.001, 0.02, 2)
    assert (instruction.train.lr, instruction.data.max_length, caption.data.max_length) == (0.01, 96, 512)
    assert caption.data.train[0] == DataSource(format="alpaca", path="a.json")


def test_the_old_stage_key_still_reads_as_trains_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match=r"stages\.0\.stage is deprecated: call it `trains`"):
        recipe = parse_recipe(minimal(stages=[{"name": "caption", "stage": "caption"}]))
    assert recipe.stages[0].trains == "caption"
    with pytest.raises(ValueError, match=r"stages\.0: give `trains` only"):
        parse_recipe(minimal(stages=[{"name": "caption", "stage": "caption", "trains": "caption"}]))


def test_overrides_set_nested_keys_list_items_and_numeric_strings():
    recipe = parse_recipe(
        minimal(), {"train.lr": "2e-2", "data.train.0.path": "b.json", "train.betas": [0.9, 0.95], "name": "x"}
    )
    assert recipe.stages[0].train.lr == 0.02  # PyYAML reads 2e-2 as a string; floats accept it
    assert recipe.stages[0].data.train[0].path == "b.json"
    assert recipe.stages[0].train.betas == (0.9, 0.95)
    assert recipe.name == "x"
    with pytest.raises(ValueError, match="data.train.3: no list item 3"):
        parse_recipe(minimal(), {"data.train.3.path": "x"})


def test_overrides_of_train_and_data_reach_every_stage_of_a_resolved_recipe():
    resolved = yaml.safe_load(dump_recipe(parse_recipe(minimal(stages=[{"name": "a"}, {"name": "b"}]))))
    recipe = parse_recipe(resolved, {"train.lr": 0.5, "data.train.0.path": "new.json", "stages.1.train.seed": 7})
    assert [s.train.lr for s in recipe.stages] == [0.5, 0.5]
    assert [s.data.train[0].path for s in recipe.stages] == ["new.json", "new.json"]
    assert [s.train.seed for s in recipe.stages] == [0, 7]


def test_resolved_recipe_round_trips_through_yaml():
    recipe = parse_recipe(minimal(stages=[{"name": "a"}, {"name": "b", "train": {"lr": 0.5}}]))
    again = parse_recipe(yaml.safe_load(dump_recipe(recipe)))
    assert again == recipe


def test_data_formats_match_the_readers():
    assert set(typing.get_args(typing.get_type_hints(DataSource)["format"])) == set(READERS)


def test_builtin_recipes_parse_and_carry_the_official_hyperparameters():
    names = builtin_recipes()
    assert {"llama-adapter-v1-alpaca", "llama-adapter-v2-multimodal", "chatglm-ptuning-v2-adgen"} <= set(names)
    recipes = {name: load_recipe(name) for name in names}
    v1 = recipes["llama-adapter-v1-alpaca"].stages[0].train
    # alpaca_finetuning_v1: blr 9e-3, effective batch 32, 5 epochs, 2 warmup epochs, wd 0.02, betas (0.9, 0.95)
    assert (v1.base_lr, v1.batch_size * v1.grad_accum, v1.epochs, v1.warmup_epochs) == (9e-3, 32, 5, 2)
    assert (v1.weight_decay, v1.betas, v1.min_lr) == (0.02, (0.9, 0.95), 0.0)
    caption, instruction = recipes["llama-adapter-v2-multimodal"].stages
    assert (caption.trains, caption.train.base_lr, caption.train.weight_decay, caption.data.max_length) == (
        "caption",
        1e-4,
        0.05,
        96,
    )
    assert (instruction.trains, instruction.train.base_lr, instruction.train.epochs) == ("instruction", 1e-3, 4)
    ptuning = recipes["chatglm-ptuning-v2-adgen"]
    assert ptuning.adapter.options["pre_seq_len"] == 128
    stage = ptuning.stages[0]
    assert (stage.train.lr, stage.train.max_steps, stage.train.batch_size * stage.train.grad_accum) == (2e-2, 3000, 16)
    assert (stage.data.max_source_length, stage.data.max_target_length, stage.train.grad_clip) == (64, 64, 1.0)


def test_find_recipe_by_name_or_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    assert find_recipe(path) == path
    assert find_recipe("llama-adapter-v1-alpaca").name == "llama-adapter-v1-alpaca.yaml"
    with pytest.raises(FileNotFoundError, match="built-in recipes: .*llama-adapter-v1-alpaca"):
        find_recipe(tmp_path / "missing.yaml")
    path.write_text("model:\n  base: x\ntrain: [unclosed\n")
    with pytest.raises(ValueError, match=r"mine.yaml: invalid YAML \(line 4, column 1: expected ',' or ']'") as error:
        load_recipe(path)
    assert "<unicode string>" not in str(error.value)
