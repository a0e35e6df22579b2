"""Resumable training checkpoints, written atomically and read back without unpickling objects.

A checkpoint is a folder `checkpoints/ckpt-NNNNNNN/` holding:
- the adapter itself (`adapter_model.safetensors`, `mmadapter_config.json`): usable on its own;
- `optimizer.pt`: optimizer, LR scheduler and fp16 grad-scaler states (tensors and numbers only);
- `rng_state_<process>.pt`: python, numpy and torch (CPU and CUDA) generator states of each process;
- `trainer_state.json`: the position (stage, step, epoch, micro-batch in epoch) and the history;
- `recipe.yaml`: the resolved recipe that produced it.

It is built in a hidden temporary folder and renamed into place when complete, so a run killed
mid-save leaves the previous checkpoint intact; `latest` names the newest. Everything loads with
`torch.load(weights_only=True)`: RNG states are stored as tensors, lists and numbers.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmadapter.adapters.io.checkpoint import load_adapter_weights, save_adapter
from mmadapter.adapters.methods.base import trainable_parameters
from mmadapter.core.files import atomic_write_bytes

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RECIPE_FILE = "recipe.yaml"


def rng_state() -> dict[str, Any]:
    """This process's random generator states in a form `torch.load(weights_only=True)` accepts."""
    version, mt_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_sharded(accelerator) -> bool:
    """FSDP and DeepSpeed keep parameters and optimizer moments as per-process shards."""
    return accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")


def gathered_adapter(accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors, whole and on the CPU. Every process must call this: under FSDP2
    (DTensor parameters) and DeepSpeed ZeRO-3 they are gathered from all shards."""
    params = trainable_parameters(model, None)
    if accelerator.distributed_type.value == "DEEPSPEED":
        import deepspeed  # only installed where DeepSpeed runs

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {name: p.detach().to("cpu", copy=True) for name, p in params.items()}
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().to("cpu", copy=True)
        for name, p in params.items()
    }


def _tensor_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def checkpoint_name(global_step: int) -> str:
    return f"ckpt-{global_step:07d}"


def save_checkpoint(
    accelerator,
    output_dir: Path,
    global_step: int,
    *,
    model: torch.nn.Module,
    adapter: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    recipe_yaml: str,
    training: dict[str, Any],
    prompt_template: str | None,
    keep: int,
) -> Path:
    """Write one checkpoint (every process calls this; each writes its own RNG state).

    `adapter` is `gathered_adapter(accelerator, model)`; `optimizer_state` None leaves the moments out.
    """
    root = output_dir / CHECKPOINTS
    final = root / checkpoint_name(global_step)
    tmp = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    atomic_write_bytes(tmp / f"rng_state_{accelerator.process_index}.pt", _tensor_bytes(rng_state()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_adapter(model, tmp, prompt_template=prompt_template, training=training, state_dict=adapter)
        if optimizer_state is not None:
            atomic_write_bytes(tmp / OPTIMIZER_FILE, _tensor_bytes(optimizer_state))
        (tmp / RECIPE_FILE).write_text(recipe_yaml)
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write_bytes(root / LATEST, f"{final.name}\n".encode())
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def _prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; drop half-written ones left by a killed run."""
    for old in sorted(root.glob("ckpt-*"))[:-keep] + list(root.glob(".ckpt-*.tmp")):
        shutil.rmtree(old, ignore_errors=True)


def is_checkpoint(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the newest complete one under a run's output folder."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    root = path / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file() and is_checkpoint(root / pointer.read_text().strip()):
        return root / pointer.read_text().strip()
    complete = sorted(p for p in root.glob("ckpt-*") if is_checkpoint(p))
    if not complete:
        raise FileNotFoundError(f"{path}: no checkpoint to resume from (expected {CHECKPOINTS}/ckpt-*/{STATE_FILE})")
    return complete[-1]


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())


def load_checkpoint(checkpoint: Path, model: torch.nn.Module, process_index: int) -> tuple[dict | None, dict]:
    """Load adapter weights into `model`; return (optimizer state or None, this process's RNG state)."""
    load_adapter_weights(model, checkpoint)
    optimizer_file = checkpoint / OPTIMIZER_FILE
    optimizer_state = torch.load(optimizer_file, weights_only=True) if optimizer_file.is_file() else None
    rng_file = checkpoint / f"rng_state_{process_index}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{checkpoint}: no {rng_file.name}; resume with as many processes as the run had")
    return optimizer_state, torch.load(rng_file, weights_only=True)
