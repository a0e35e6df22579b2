"""The documented accelerate configs load with accelerate's own parser and say what the README says."""

from __future__ import annotations

from pathlib import Path

from accelerate.commands.config.config_args import ClusterConfig

CONFIGS = Path(__file__).resolve().parents[2] / "assets" / "accelerate"


def load(name: str) -> ClusterConfig:
    return ClusterConfig.from_yaml_file(str(CONFIGS / name))


def test_ddp_fsdp2_and_zero3_configs():
    ddp = load("ddp-8gpu-7b.yaml")
    assert (ddp.distributed_type.value, ddp.num_processes, ddp.mixed_precision) == ("MULTI_GPU", 8, "bf16")
    fsdp = load("fsdp2-8gpu-65b.yaml")
    assert fsdp.distributed_type.value == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    zero3 = load("deepspeed-zero3-8gpu-65b.yaml")
    assert zero3.distributed_type.value == "DEEPSPEED" and zero3.deepspeed_config["zero_stage"] == 3
    assert zero3.deepspeed_config["gradient_accumulation_steps"] == 1  # the loop refuses its own accumulation
