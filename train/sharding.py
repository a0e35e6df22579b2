"""Sharded training: FSDP2 through accelerate, and the checks that stop a DeepSpeed launch that cannot run.

FSDP2 (`fsdp_version: 2`) shards the model once per run with accelerate's own `fsdp2_prepare_model`
(wrap policy, mixed-precision policy, rank-0 loading with `fsdp_cpu_ram_efficient_loading`), before the
first stage's optimizer exists; every stage then builds its optimizer over the sharded parameters, so
nothing needs re-mapping and the multi-stage recipes (LLaMA-Adapter V2) shard once.

On CPUs accelerate 1.15 keeps a torchrun/`accelerate launch` with FSDP asked for (ACCELERATE_USE_FSDP or a
plugin) as plain MULTI_CPU and drops the plugin: it only turns FSDP on for GPU-like devices, although
PyTorch's `fully_shard` works over gloo. `enable_fsdp2` then turns the state into FSDP with the plugin
the launch asked for, so the same accelerate code (sharding, `no_sync`, DTensor-aware gradient
clipping) runs on CPUs as on GPUs; that is what the 2-process CPU tests exercise.
"""

from __future__ import annotations

import os
import warnings

from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    fsdp2_prepare_model,
    is_deepspeed_available,
)
from torch import nn

FSDP_VERSION_HINT = "set fsdp_version: 2 in the accelerate config (see assets/accelerate/fsdp2-8gpu-65b.yaml)"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def check_deepspeed_launch(gpu_available: bool) -> None:
    """A DeepSpeed launch where DeepSpeed cannot run says so and what to do, before anything loads.

    Without CUDA, accelerate silently falls back to plain data parallel on CPUs; refuse instead."""
    if not _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return
    if not is_deepspeed_available():
        raise ValueError(
            "this run was launched with a DeepSpeed config (ACCELERATE_USE_DEEPSPEED) but DeepSpeed is not "
            "installed: pip install deepspeed (needs CUDA GPUs), or launch with "
            "assets/accelerate/fsdp2-8gpu-65b.yaml, which shards the same way with PyTorch alone"
        )
    if not gpu_available:
        raise ValueError(
            "this run was launched with a DeepSpeed config (ACCELERATE_USE_DEEPSPEED) but no CUDA GPU is "
            "visible: DeepSpeed ZeRO-3 needs GPUs; on CPUs launch with assets/accelerate/fsdp2-8gpu-65b.yaml"
        )


def set_deepspeed_micro_batch(accelerator: Accelerator, batch_size: int) -> None:
    """accelerate fills DeepSpeed's "auto" micro-batch from a prepared DataLoader; the loop batches itself,
    so the stage's train.batch_size goes in (accelerate's own advice)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            config["train_micro_batch_size_per_gpu"] = batch_size


def enable_fsdp2(accelerator: Accelerator) -> None:
    """Make an FSDP launch FSDP2 on every device (see the module docstring); refuse FSDP1."""
    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU and _env_flag("ACCELERATE_USE_FSDP"):
        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables the launcher set
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does on GPUs
    if state.distributed_type != DistributedType.FSDP:
        return
    if state.fsdp_plugin.fsdp_version != 2:
        raise ValueError(f"FSDP version {state.fsdp_plugin.fsdp_version} is not supported: {FSDP_VERSION_HINT}")


def is_fsdp2(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def shard_loss_module(accelerator: Accelerator, loss_module: nn.Module) -> nn.Module:
    """Shard the loss module (model forward + loss) in place: decoder layers, embeddings and head each their
    own group, the rest (adapter prompts, V2's CLIP and projector) with the root. Once per run.

    The root is the loss module, not the model: V2's visual prompt is computed before the model's forward,
    and FSDP2 gathers a group's parameters only inside its root's forward. Afterwards the parameters are
    DTensors: this process holds 1/N of each, and so of their gradients and AdamW moments."""
    if any(p.__class__.__name__ in ("Params4bit", "Int8Params") for p in loss_module.parameters()):
        raise ValueError(
            "model.quantization: a quantized base is not sharded here; train it with one process per GPU "
            "(DDP: assets/accelerate/ddp-8gpu-7b.yaml), a 4-bit base fits one GPU"
        )
    plugin = accelerator.state.fsdp_plugin
    if plugin.transformer_cls_names_to_wrap is None:  # the backbone's own decoder layer class
        plugin.transformer_cls_names_to_wrap = list(getattr(loss_module.model, "_no_split_modules", None) or [])
    # TokenLoss returns its per-token losses as a view for a model without logits_to_keep; they are only ever
    # summed out of place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPTokenLoss\) returned a view tensor")
    return fsdp2_prepare_model(accelerator, loss_module)
