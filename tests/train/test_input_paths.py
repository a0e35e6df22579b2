"""A recipe whose model, tokenizer or data paths cannot work (a built-in recipe's placeholders, a typo) stops
before anything heavy loads, with one line naming the recipe key and how to set it."""

from __future__ import annotations

import pytest
import yaml

import mmadapter.train.loop as loop
from mmadapter.adapters.backbones.loading import load_tokenizer
from mmadapter.adapters.backbones.presets import BASE_PRESETS
from mmadapter.cli.main import main

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


def test_load_tokenizer_names_a_missing_folder():
    with pytest.raises(FileNotFoundError, match=r"^/nonexistent/tok: no such tokenizer folder$"):
        load_tokenizer("/nonexistent/tok")
