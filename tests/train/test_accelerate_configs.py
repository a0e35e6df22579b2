"""The documented accelerate configs load with accelerate's own parser, say what the README says, and launch
what the tests run; a DeepSpeed launch where DeepSpeed cannot run stops with a message, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import ClusterConfig

from mmadapter.cli.main import main
from tests.train.test_fsdp import FSDP2_ENV

CONFIGS = Path(__file__).resolve().parents[2] / "assets" / "accelerate"


def load(name: str) -> ClusterConfig:
    return ClusterConfig.from_yaml_file(str(CONFIGS / name))


def test_ddp_fsdp2_and_zero3_configs():
    ddp = load("ddp-8gpu-7b.yaml")
    assert (ddp.distributed_type.value, ddp.num_processes, ddp.mixed_precision) == ("MULTI_GPU", 8, "bf16")
    fsdp = load("fsdp2-8gpu-65b.yaml")
    assert fsdp.distributed_type.value == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    zero3 = load("deepspeed-zero3-8gpu-65b.yaml")
    assert zero3.distributed_type.value == "DEEPSPEED" and zero3.deepspeed_config["zero_stage"] == 3
    assert zero3.deepspeed_config["gradient_accumulation_steps"] == 1  # the loop refuses its own accumulation


def test_fsdp2_tests_run_the_shipped_fsdp2_settings():
    """accelerate launch turns each fsdp_<key> into FSDP_<KEY>; the 2-process CPU tests set exactly those."""
    shipped = {
        f"FSDP_{key[len('fsdp_') :].upper()}": str(value).lower()
        for key, value in load("fsdp2-8gpu-65b.yaml").fsdp_config.items()
    }
    tested = {key: value.lower() for key, value in FSDP2_ENV.items() if key.startswith("FSDP_")}
    assert shipped == tested


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where DeepSpeed cannot run")
def test_zero3_launch_without_deepspeed_or_cuda_says_what_to_do(make_recipe, tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(parsed=False)))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate launch sets for the ZeRO-3 config
    assert main(["train", str(recipe)]) == 2
    error = capsys.readouterr().err
    assert "DeepSpeed" in error and "fsdp2-8gpu-65b.yaml" in error and "Traceback" not in error
    assert not (tmp_path / "run").exists()  # stopped before anything loaded or was written


@pytest.mark.gpu
@pytest.mark.slow
def test_zero3_config_trains_where_deepspeed_runs(make_recipe, tmp_path):
    """The shipped ZeRO-3 config, on the GPUs here (at most 2), trains a LoRA adapter to the end."""
    pytest.importorskip("deepspeed")
    config = yaml.safe_load((CONFIGS / "deepspeed-zero3-8gpu-65b.yaml").read_text())
    config["num_processes"] = min(2, torch.cuda.device_count())
    (tmp_path / "zero3.yaml").write_text(yaml.safe_dump(config))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(method="lora", train={"max_steps": 4, "save_every": 2}, parsed=False)))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "zero3.yaml")]
    command += ["-m", "mmadapter.cli.main", "train", str(recipe)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "run/adapter/adapter_model.safetensors").is_file()
    assert (tmp_path / "run/checkpoints/ckpt-0000002").is_dir()
