"""`mmadapter train` and `mmadapter eval` end to end on the built-in tiny recipe, and their errors."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from safetensors.torch import load_file

from mmadapter.adapters.io.checkpoint import read_adapter_config
from mmadapter.cli.main import main
from tests.helpers.train_data import alpaca_rows, write_json


def _interrupted(*args, **kwargs):
    raise KeyboardInterrupt  # Ctrl-C while training


@pytest.mark.slow
def test_train_then_eval_the_builtin_tiny_recipe(tmp_path, tokenizer_dir, capsys, monkeypatch):
    data = write_json(tmp_path / "alpaca.json", alpaca_rows(16))
    run = tmp_path / "run"
    args = [
        "train",
        "tiny-llama-adapter-v1",
        "--set",
        f"model.tokenizer={tokenizer_dir}",
        "--set",
        f"data.train.0.path={data}",
        "--set",
        f"output_dir={run}",
        "--set",
        "train.epochs=1",
        "--set",
        "train.save_every=2",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"adapter: {run / 'adapter'}" in out and "trainable" in out

    adapter = run / "adapter"
    assert set(load_file(adapter / "adapter_model.safetensors")) == {
        f"model.layers.{i}.self_attn.{name}" for i in (2, 3) for name in ("adapter_prompt", "adapter_gate")
    }
    config = read_adapter_config(adapter)
    assert config["prompt_template"] == "chatglm" and config["training"]["name"] == "tiny-llama-adapter-v1"
    summary = json.loads((adapter / "training_summary.json").read_text())
    assert summary["steps"] == 4 and summary["tokens"] > 0 and summary["tokens_per_second"] > 0
    assert summary["wall_time_seconds"] > 0 and summary["parameters"]["trainable_params"] == 2 * (4 * 64 + 4)
    assert {"final_loss", "best_loss", "best_eval_loss", "final_eval_loss", "stages"} <= set(summary)
    assert (adapter / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run / "logs/tiny-llama-adapter-v1").glob("events.out.tfevents.*")), "no TensorBoard events"
    assert yaml.safe_load((run / "recipe.yaml").read_text())["stages"][0]["data"]["train"][0]["path"] == str(data)
    assert (run / "checkpoints/ckpt-0000002/recipe.yaml").is_file()  # the last step saves the adapter instead
    capsys.readouterr()
    with monkeypatch.context() as patched:  # Ctrl-C on a resumed run names the checkpoint it continues from
        patched.setattr("mmadapter.train.loop.train", _interrupted)
        assert main(["train", "--resume", str(run)]) == 130
    assert f"continue with `mmadapter train --resume {run}` (from ckpt-0000002)" in capsys.readouterr().err

    # The eval command on the eight samples the run evaluated on gives the run's own final eval loss.
    assert main(["eval", str(adapter), "--data", str(data), "--limit", "8", "--generate", "--greedy", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    assert result["eval_perplexity"] == pytest.approx(math.exp(result["eval_loss"]), rel=1e-6)
    generation = result["generation"]
    assert generation["generated"] == 8 and {"rouge-1", "rouge-2", "rouge-l", "bleu-4"} <= set(generation)

    # Rows left out (here one without its output) are said in the text report, not only counted in --json.
    rows = json.loads(data.read_text())[:3]
    del rows[1]["output"]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(rows))
    assert main(["eval", str(adapter), "--data", str(partial)]) == 0
    captured = capsys.readouterr()
    assert "of 2 samples" in captured.out and "left out 1 bad sample(s):" in captured.err
    assert "partial.json[1]" in captured.err


def test_ctrl_c_says_whether_and_how_the_run_resumes(tmp_path, capsys, make_recipe, monkeypatch):
    monkeypatch.setattr("mmadapter.train.loop.train", _interrupted)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(parsed=False)))
    assert main(["train", str(recipe), "--set", f"output_dir={tmp_path / 'run'}"]) == 130
    assert "has no checkpoint yet, so this run cannot be resumed; set train.save_every" in capsys.readouterr().err


def test_cli_errors_name_what_is_wrong(tmp_path, capsys, make_recipe):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(train={"lr": "abc"}, parsed=False)))
    assert main(["train", str(recipe)]) == 2
    assert "bad.yaml: train.lr: expected float, got 'abc'" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert main(["train"]) == 2
    assert "give a RECIPE, or --resume DIR" in capsys.readouterr().err
    (tmp_path / "run/checkpoints/ckpt-0000001").mkdir(parents=True)
    recipe.write_text(yaml.safe_dump(make_recipe(parsed=False)))
    assert main(["train", str(recipe)]) == 2
    assert "already has checkpoints: continue with --resume" in capsys.readouterr().err
    assert main(["train", "--list"]) == 0
    assert "llama-adapter-v1-alpaca" in capsys.readouterr().out


def test_tensorboard_is_optional_at_run_time(monkeypatch):
    from mmadapter.train import reporting
    from mmadapter.train.reporting import tracker_for

    assert tracker_for("tensorboard") == ("tensorboard", None)
    assert tracker_for("none") == (None, None)
    monkeypatch.setattr(reporting, "is_tensorboard_available", lambda: False)
    tracker, message = tracker_for("tensorboard")
    assert tracker is None and "pip install tensorboard" in message
