"""FSDP2 through accelerate on two CPU processes (gloo): the same adapter as one process, and a run killed
with SIGKILL resumes from its sharded checkpoint to the adapter of an uninterrupted run.

Every method trains in one launch (start-up dominates: ~30 s a launch on a shared CPU). The launch sets the
variables `accelerate launch` derives from assets/accelerate/fsdp2-8gpu-65b.yaml (test_accelerate_configs
checks that they agree): FSDP2, decoder layers wrapped, resharded after forward, rank 0 loading the weights.
accelerate keeps FSDP for GPUs, and mmadapter.train.sharding turns it on for CPUs (its docstring says why).

Tolerance as tests/train/test_distributed.py (rtol 1e-4, atol 5e-5, Adam eps 1e-6 where a near-zero
gradient's rounding would otherwise show): FSDP2's reduce-scatter sums gradients in another order than
one process does, so they agree to float32 rounding. The losses logged at every step agree to 1e-5.
"""

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
from mmadapter.train.loop import train
from mmadapter.train.recipe import parse_recipe
from tests.helpers.train_data import COLOURS, alpaca_rows, write_image, write_json, write_jsonl
from tests.train.test_distributed import adapters_close

REPO = Path(__file__).resolve().parents[2]
#: What `accelerate launch --config_file assets/accelerate/fsdp2-8gpu-65b.yaml` puts in the environment.
FSDP2_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
    "FSDP_OFFLOAD_PARAMS": "false",
    "FSDP_ACTIVATION_CHECKPOINTING": "false",
}


def launch_fsdp2(*commands: list[str], extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`mmadapter` command lines, one after another, in one 2-process FSDP2 launch (torchrun, gloo)."""
    args = [arg for command in commands for arg in [*command, "--"]][:-1]
    env = {**os.environ, **FSDP2_ENV, **(extra_env or {}), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    driver = str(REPO / "tests/train/fsdp_driver.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", driver, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def caption_source(tmp_path: Path) -> dict:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    captions = []
    for i, colour in enumerate(list(COLOURS) * 2):
        write_image(images / f"{i}.png", colour)
        captions.append({"image": f"{i}.png", "caption": f"a {colour} square"})
    path = write_jsonl(tmp_path / "c.jsonl", captions)
    return {"format": "caption-jsonl", "path": str(path), "images": str(images), "trains": "caption"}


def method_recipes(make_recipe, tmp_path: Path) -> dict[str, dict]:
    """One recipe per method: V1, V2 staged (caption stage, then instruction stage), V2 with both kinds in
    every step, LoRA, P-Tuning v2; global batch 8."""
    captions = caption_source(tmp_path)
    alpaca = {"format": "alpaca", "path": str(write_json(tmp_path / "a.json", alpaca_rows(8))), "trains": "instruction"}
    v2_train = {"max_steps": 4, "batch_size": 8, "eps": 1e-6}
    staged = make_recipe(method="llama-adapter-v2", train=v2_train, parsed=False)
    del staged["data"]["train"]
    staged["stages"] = [
        {"name": "caption", "trains": "caption", "data": {"train": [captions]}},
        {"name": "instruction", "trains": "instruction", "data": {"train": [alpaca]}},
    ]
    return {
        "v1": make_recipe(train={"lr": 0.3, "max_steps": 6, "batch_size": 8}, parsed=False),
        "v2-staged": staged,
        "v2-mixed": make_recipe(data=[captions, alpaca], method="llama-adapter-v2", train=v2_train, parsed=False),
        "lora": make_recipe(method="lora", train={"lr": 0.05, "max_steps": 4, "batch_size": 8}, parsed=False),
        "ptuning": make_recipe(method="ptuning-v2", train={"lr": 0.05, "max_steps": 4, "batch_size": 8}, parsed=False),
    }


def history(run: Path) -> list[float]:
    summary = json.loads((run / "adapter/training_summary.json").read_text())
    return [h["loss"] for stage in summary["stages"] for h in stage["history"]]


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process(make_recipe, tmp_path):
    documents = method_recipes(make_recipe, tmp_path)
    commands = []
    for name, document in documents.items():
        train(parse_recipe(dict(document, output_dir=str(tmp_path / f"{name}-one"))))
        halved = dict(document, output_dir=str(tmp_path / f"{name}-two"), train={**document["train"], "batch_size": 4})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(halved))
        commands.append(["train", str(path)])

    done = launch_fsdp2(*commands)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("FSDP2: the model is sharded over 2 processes") == len(documents)  # once per run
    for name in documents:
        one, two = tmp_path / f"{name}-one", tmp_path / f"{name}-two"
        adapters_close(one / "adapter", two / "adapter")
        assert history(one) == pytest.approx(history(two), abs=1e-5), name
    for stage in ("caption", "instruction"):  # the staged run's stage adapters too
        adapters_close(tmp_path / f"v2-staged-one/stages/{stage}", tmp_path / f"v2-staged-two/stages/{stage}")


@pytest.mark.slow
def test_fsdp2_resume_after_sigkill_matches_an_uninterrupted_run(make_recipe, tmp_path, capsys):
    # LoRA with dropout and weight decay: the sharded AdamW moments, the schedule and every process's RNG
    # must all come back for the resumed run to end bit for bit where the uninterrupted one ends.
    document = make_recipe(
        method="lora",
        adapter={"options": {"r": 4, "alpha": 8, "dropout": 0.1}},
        train={"max_steps": 8, "save_every": 2, "keep_checkpoints": 2, "weight_decay": 0.01, "warmup_steps": 2},
        parsed=False,
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(document))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    checkpoints = killed / "checkpoints"
    done = launch_fsdp2(
        ["train", str(recipe), "--set", f"output_dir={straight}"],
        ["train", str(recipe), "--set", f"output_dir={killed}"],
        extra_env={"MMADAPTER_TEST_KILL_AT": str(checkpoints / ".ckpt-0000006.tmp")},
    )
    assert done.returncode != 0 and (straight / "adapter").is_dir(), done.stderr[-3000:]
    assert -signal.SIGKILL in (done.returncode, -done.returncode) or "Signal 9" in done.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        ".ckpt-0000006.tmp",
        "ckpt-0000002",
        "ckpt-0000004",
        "latest",
    ]
    shards = sorted(p.name for p in (checkpoints / "ckpt-0000004/optimizer_shards").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each process wrote its own shard
    manifest = json.loads((checkpoints / "ckpt-0000004/manifest.json").read_text())["files"]
    assert {"optimizer_shards/__0_0.distcp", "optimizer_shards/__1_0.distcp", "optimizer.pt"} <= set(manifest)

    done = launch_fsdp2(["train", "--resume", str(killed)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming from" in done.stdout and "ckpt-0000004" in done.stdout
    expected = load_file(straight / "adapter/adapter_model.safetensors")
    resumed = load_file(killed / "adapter/adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    assert history(straight) == history(killed)

    # Sharded optimizer state resumes only under the same kind of launch: one plain process says so.
    capsys.readouterr()
    assert main(["train", "--resume", str(checkpoints / "ckpt-0000004")]) == 2
    assert "written with FSDP2" in capsys.readouterr().err
