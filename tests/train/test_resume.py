"""A run killed with SIGKILL (here: in the middle of writing a checkpoint) resumes with `mmadapter train
--resume` and ends with exactly the adapter of an uninterrupted run (bit for bit: same batches, same
RNG states, same optimizer and schedule state, same float operations in the same order)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmadapter.cli.main import main
from tests.helpers.threads import single_thread  # noqa: F401 (autouse fixture)

REPO = Path(__file__).resolve().parents[2]
#: Runs the CLI, but the process kills itself with SIGKILL while checkpoint 6 is half written.
DIES_WHILE_SAVING = """
import os, signal, sys
import mmadapter.train.checkpointing as checkpointing
from mmadapter.cli.main import main

original = checkpointing.save_adapter

def save_adapter(model, directory, **kwargs):
    if directory.name == ".ckpt-0000006.tmp":
        os.kill(os.getpid(), signal.SIGKILL)
    return original(model, directory, **kwargs)

checkpointing.save_adapter = save_adapter
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(make_recipe, tmp_path):
    # LoRA with dropout: resuming must also restore the RNG that draws the dropout masks.
    document = make_recipe(
        method="lora",
        adapter={"options": {"r": 4, "alpha": 8, "dropout": 0.1}},
        train={"max_steps": 8, "save_every": 2, "keep_checkpoints": 2, "weight_decay": 0.01, "warmup_steps": 2},
        data_options={"eval_from_train": 4},
        parsed=False,
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(document))
    assert main(["train", str(recipe), "--set", f"output_dir={tmp_path / 'straight'}"]) == 0

    killed = tmp_path / "killed"
    command = [sys.executable, "-c", DIES_WHILE_SAVING, "train", str(recipe), "--set", f"output_dir={killed}"]
    # One thread here and there: bit-for-bit equality needs the same kernels' reduction order in both processes.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    checkpoints = killed / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        ".ckpt-0000006.tmp",
        "ckpt-0000002",
        "ckpt-0000004",
        "latest",
    ]
    assert not (killed / "adapter").exists()

    assert main(["train", "--resume", str(killed)]) == 0  # the saved recipe, continued from ckpt-0000004
    straight = load_file(tmp_path / "straight/adapter/adapter_model.safetensors")
    resumed = load_file(killed / "adapter/adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    summaries = [json.loads((p / "adapter/training_summary.json").read_text()) for p in (tmp_path / "straight", killed)]
    assert [h["loss"] for h in summaries[0]["stages"][0]["history"]] == [
        h["loss"] for h in summaries[1]["stages"][0]["history"]
    ]
    assert summaries[0]["tokens"] == summaries[1]["tokens"]
    state = json.loads((checkpoints / "ckpt-0000004/trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["micro_batch"]) == (4, 0, 4)
    assert (checkpoints / "ckpt-0000004/recipe.yaml").is_file() and (
        checkpoints / "ckpt-0000004/optimizer.pt"
    ).is_file()


def test_a_resume_trains_with_the_recipes_learning_rate(make_recipe, tmp_path, capsys):
    """`--resume RUN --set train.lr=…` continues the schedule at the checkpoint's step with the new peak: the
    schedule is linear in its peak (min_lr 0), so each resumed step's lr is the first run's lr at that step × 3."""
    document = make_recipe(
        method="llama-adapter-v1",
        train={"max_steps": 6, "save_every": 2, "log_every": 1, "lr": 0.01, "warmup_steps": 2, "min_lr": 0.0},
        parsed=False,
    )
    recipe, run = tmp_path / "recipe.yaml", tmp_path / "run"
    recipe.write_text(yaml.safe_dump(document))
    assert main(["train", str(recipe), "--set", f"output_dir={run}"]) == 0
    first = json.loads((run / "adapter/training_summary.json").read_text())["stages"][0]["history"]
    capsys.readouterr()

    assert main(["train", "--resume", str(run), "--set", "train.lr=0.03"]) == 0  # from ckpt-0000004
    assert "note: peak lr 0.03 (recipe) instead of the checkpoint's 0.01" in capsys.readouterr().out
    resumed = json.loads((run / "adapter/training_summary.json").read_text())["stages"][0]["history"]
    lrs = {h["step"]: h["lr"] for h in first}
    assert [h["step"] for h in resumed][-2:] == [5, 6]
    for record in resumed[-2:]:
        assert record["lr"] == pytest.approx(3 * lrs[record["step"]], rel=1e-12), record


def test_a_checkpoint_of_another_adapter_is_refused_with_what_differs(make_recipe, tmp_path, capsys):
    v1 = make_recipe(method="llama-adapter-v1", train={"max_steps": 4, "save_every": 2}, parsed=False)
    run = tmp_path / "run"
    (tmp_path / "v1.yaml").write_text(yaml.safe_dump(v1))
    assert main(["train", str(tmp_path / "v1.yaml"), "--set", f"output_dir={run}"]) == 0
    lora = make_recipe(method="lora", adapter={"options": {"r": 4}}, parsed=False)
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(lora))
    capsys.readouterr()

    assert main(["train", str(tmp_path / "lora.yaml"), "--resume", str(run)]) == 2
    error = capsys.readouterr().err
    assert "ckpt-0000002: the run trained adapter.method = 'llama-adapter-v1', the recipe sets 'lora'" in error


def test_train_json_prints_only_json_on_stdout(make_recipe, tmp_path, capsys):
    document = make_recipe(method="llama-adapter-v1", train={"max_steps": 2, "save_every": 1}, parsed=False)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(document))
    assert main(["train", str(tmp_path / "recipe.yaml"), "--set", f"output_dir={tmp_path / 'run'}", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["steps"] == 2  # the whole of stdout is one JSON document
    assert "checkpoint:" in err and "schedule:" in err  # the log went to stderr
