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
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
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
