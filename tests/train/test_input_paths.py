"""A recipe whose model, tokenizer or data paths cannot work (a built-in recipe's placeholders, a typo) stops
before anything heavy loads, with one line naming the recipe key and how to set it."""

from __future__ import annotations

import io
import json
import sys

import pytest
import yaml

import mmadapter.train.loop as loop
from mmadapter.adapters.backbones.loading import load_tokenizer
from mmadapter.adapters.backbones.presets import BASE_PRESETS
from mmadapter.cli.main import main
from tests.helpers.train_data import alpaca_rows, write_jsonl

TOKENIZER_HINT = "set it to the tokenizer folder (--set model.tokenizer=PATH)"


@pytest.fixture
def nothing_loads(monkeypatch, tmp_path):
    """Fail if a run gets as far as its accelerator or model; relative paths resolve in an empty folder."""

    def refuse(*args, **kwargs):
        raise AssertionError("the run went on before its paths were checked")

    monkeypatch.setattr(loop, "make_accelerator", refuse)
    monkeypatch.setattr(loop, "build_model", refuse)
    monkeypatch.chdir(tmp_path)


def error_of(args: list[str], capsys) -> str:
    """The `error:` line(s) of `mmadapter train ARGS`, which must exit 2."""
    assert main(["train", *args]) == 2
    return "".join(line + "\n" for line in capsys.readouterr().err.splitlines() if line.startswith("error:"))


@pytest.mark.usefixtures("nothing_loads")
def test_builtin_recipe_placeholders_name_the_key_to_set(capsys, tokenizer_dir):
    assert error_of(["tiny-llama-adapter-v1"], capsys) == (
        f"error: model.tokenizer: path/to/tiny-tokenizer is not a folder; {TOKENIZER_HINT}\n"
    )
    assert error_of(["tiny-llama-adapter-v1", "--set", "model.tokenizer=/nonexistent/tok"], capsys) == (
        f"error: model.tokenizer: /nonexistent/tok is not a folder; {TOKENIZER_HINT}\n"
    )
    assert error_of(["llama-adapter-v1-alpaca"], capsys) == (
        f"error: model.base: path/to/llama-7b is neither a preset ({', '.join(sorted(BASE_PRESETS))}) nor a folder; "
        "set it to the base model folder (--set model.base=PATH)\n"
    )
    tokenizer = f"model.tokenizer={tokenizer_dir}"
    assert error_of(["tiny-llama-adapter-v1", "--set", tokenizer], capsys) == (
        "error: data.train.0.path: data/alpaca.json not found; set it to the data file (--set data.train.0.path=PATH)\n"
    )
    staged = [
        "tiny-llama-adapter-v2-staged",
        "--set",
        tokenizer,
        "--set",
        f"stages.0.data.train.0.path={tokenizer_dir}",
    ]
    assert error_of(staged, capsys) == (
        f"error: stages.0.data.train.0.path: {tokenizer_dir} is a folder, not a data file; "
        "set it to the data file (--set stages.0.data.train.0.path=PATH)\n"
    )


@pytest.mark.usefixtures("nothing_loads")
def test_a_missing_eval_file_and_a_preset_without_tokenizer(capsys, make_recipe, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    document = make_recipe(data_options={"eval": [{"format": "alpaca", "path": "eval.json"}]}, parsed=False)
    recipe.write_text(yaml.safe_dump(document))
    assert "error: data.eval.0.path: eval.json not found; set it to the data file" in error_of([str(recipe)], capsys)
    del document["model"]["tokenizer"]
    recipe.write_text(yaml.safe_dump(document))
    assert error_of([str(recipe)], capsys) == (
        "error: model.tokenizer: base 'tiny-llama' is a preset without a tokenizer; "
        "set a tokenizer folder (--set model.tokenizer=PATH)\n"
    )


def test_a_misspelled_adapter_option_stops_the_run_before_the_base_loads(capsys, make_recipe, tmp_path, monkeypatch):
    import mmadapter.train.setup as setup

    def refuse(*args, **kwargs):
        raise AssertionError("the base loaded before the adapter's options were checked")

    monkeypatch.setattr(setup, "load_base_model", refuse)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(parsed=False)))
    error = error_of([str(recipe), "--set", "adapter.options.prompt_lenght=3"], capsys)
    assert (
        error.startswith("error: adapter: prompt_lenght: unknown llama-adapter-v1 config field") and "known: " in error
    )


def test_load_tokenizer_names_a_missing_folder():
    with pytest.raises(FileNotFoundError, match=r"^/nonexistent/tok: no such tokenizer folder$"):
        load_tokenizer("/nonexistent/tok")


def test_a_run_with_relative_paths_is_evaluated_and_resumed_from_another_folder(
    make_recipe, tiny_tokenizer, tmp_path, monkeypatch, capsys
):
    """What a run saves names its tokenizer and data absolutely: eval and --resume work from any folder."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    tiny_tokenizer.save_pretrained(project / "tok")
    document = make_recipe(train={"max_steps": 4, "save_every": 2}, parsed=False)
    (project / "data.json").write_text((tmp_path / "alpaca.json").read_text())
    document["model"]["tokenizer"] = "tok"
    document["data"]["train"][0]["path"] = "data.json"
    document["output_dir"] = "run"
    (project / "recipe.yaml").write_text(yaml.safe_dump(document))
    monkeypatch.chdir(project)
    assert main(["train", "recipe.yaml"]) == 0
    saved = yaml.safe_load((project / "run/recipe.yaml").read_text())
    assert saved["model"]["tokenizer"] == str(project / "tok")
    assert saved["stages"][0]["data"]["train"][0]["path"] == str(project / "data.json")

    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["eval", str(project / "run/adapter"), "--data", str(project / "data.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 16
    assert main(["train", "--resume", str(project / "run"), "--set", "train.max_steps=6"]) == 0
    assert (project / "run/checkpoints/ckpt-0000004").is_dir()
    # chat without --base: the base (a preset here) and the tokenizer folder the adapter recorded
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    capsys.readouterr()
    assert main(["chat", "--adapter", str(project / "run/adapter"), "--max-new-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert "base: tiny-llama (recorded by the adapter; --base to change)" in err and "assistant> " in out


def test_eval_says_where_a_missing_base_came_from(make_recipe, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(train={"max_steps": 1}, parsed=False)))
    assert main(["train", str(recipe)]) == 0
    config = tmp_path / "run/adapter/mmadapter_config.json"
    document = json.loads(config.read_text())
    document["training"]["model"]["base"] = "models/gone"
    config.write_text(json.dumps(document))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run/adapter"), "--data", str(tmp_path / "alpaca.json")]) == 2
    error = capsys.readouterr().err
    assert "the adapter was trained on models/gone, which is not here" in error and "pass --base PATH" in error


def test_eval_reads_data_in_the_format_the_adapter_trained_on(make_recipe, tmp_path, capsys):
    rows = [
        {"conversations": [{"from": "human", "value": row["instruction"]}, {"from": "gpt", "value": row["output"]}]}
        for row in alpaca_rows(8)
    ]
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    recipe = tmp_path / "recipe.yaml"
    document = make_recipe(data=[{"format": "conversation", "path": str(data)}], train={"max_steps": 1}, parsed=False)
    recipe.write_text(yaml.safe_dump(document))
    assert main(["train", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run/adapter"), "--data", str(data), "--json"]) == 0  # no --format
    assert json.loads(capsys.readouterr().out)["samples"] == 8
    assert main(["eval", str(tmp_path / "run/adapter"), "--data", str(data), "--format", "alpaca"]) == 2
    error = capsys.readouterr().err
    assert "the data was read as --format alpaca; the adapter trained on conversation" in error


def test_a_run_stopped_by_its_data_or_settings_exits_2_with_one_error_line(make_recipe, tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(train={"lr": 1e38}, parsed=False)))
    assert main(["train", str(recipe)]) == 2  # was an internal error: AdamW's step overflowed float32
    assert "error: " in (error := capsys.readouterr().err) and "train.lr: 1e+38 is not a learning rate" in error

    def stops(*args, **kwargs):  # what the loop raises on a non-finite loss (tests/train/test_loop.py)
        raise loop.TrainingStopped("non-finite loss at step 3 (epoch 0); samples: alpaca.json[5]")

    monkeypatch.setattr(loop, "train", stops)
    recipe.write_text(yaml.safe_dump(make_recipe(parsed=False)))
    assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err.endswith("error: non-finite loss at step 3 (epoch 0); samples: alpaca.json[5]\n")
