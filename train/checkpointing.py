"""Resumable training checkpoints, written atomically and read back without unpickling objects.

A checkpoint is a folder `checkpoints/ckpt-NNNNNNN/` holding:
- the adapter itself (`adapter_model.safetensors`, `mmadapter_config.json`): usable on its own;
- `optimizer.pt`: optimizer, LR scheduler and fp16 grad-scaler states (tensors and numbers only);
- `rng_state_<process>.pt`: python, numpy and torch (CPU and CUDA) generator states of each process;
- `trainer_state.json`: the position (stage, step, epoch, micro-batch in epoch) and the history;
- `recipe.yaml`: the resolved recipe that produced it;
- `manifest.json`, written last: every other file's name, size and sha256.

It is built in a hidden temporary folder and renamed into place when complete, so a run killed
mid-save leaves the previous checkpoint intact, and a failed save (a full disk) removes its temporary
folder; `latest` names the newest. A resume verifies checkpoints against their manifests, newest
first, and skips damaged ones (a truncated copy, a file changed since). Everything loads with
`torch.load(weights_only=True)`: RNG states are stored as tensors, lists and numbers.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mmadapter.adapters.io.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_adapter_weights, save_adapter
from mmadapter.adapters.methods.base import trainable_parameters
from mmadapter.core.files import atomic_write_bytes, file_sha256

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
#: FSDP2: every process's shard of the AdamW moments, as torch.distributed.checkpoint writes them.
OPTIMIZER_SHARDS = "optimizer_shards"
RECIPE_FILE = "recipe.yaml"
MANIFEST_FILE = "manifest.json"
#: What reading a damaged file raises (truncated zip, safetensors header, JSON; a missing file).
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, EOFError, SafetensorError, pickle.UnpicklingError)


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


def save_sharded_optimizer(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shard of the optimizer state (a collective: all processes call it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=folder)


def load_sharded_optimizer(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process reads its shard of the optimizer state back into `optimizer` (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the layout to read into
    dcp.load(state, checkpoint_id=folder)
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


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
    optimizer_shards: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None,
    trainer_state: dict[str, Any],
    recipe_yaml: str,
    training: dict[str, Any],
    prompt_template: str | None,
    keep: int,
    chat_template: str | None = None,
) -> Path:
    """Write one checkpoint (every process calls this; each writes its own RNG state).

    `adapter` is `gathered_adapter(accelerator, model)` (gathered once; the main process writes it);
    `optimizer_state` (None: none) goes to optimizer.pt, and `optimizer_shards` (FSDP2's sharded model and
    its optimizer) to optimizer_shards/, each process its own shard.
    """
    root = output_dir / CHECKPOINTS
    final = root / checkpoint_name(global_step)
    tmp = root / f".{final.name}.tmp"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        atomic_write_bytes(tmp / f"rng_state_{accelerator.process_index}.pt", _tensor_bytes(rng_state()))
        if optimizer_shards is not None:
            save_sharded_optimizer(tmp / OPTIMIZER_SHARDS, *optimizer_shards)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_adapter(
                model,
                tmp,
                prompt_template=prompt_template,
                chat_template=chat_template,
                training=training,
                state_dict=adapter,
            )
            if optimizer_state is not None:
                atomic_write_bytes(tmp / OPTIMIZER_FILE, _tensor_bytes(optimizer_state))
            (tmp / RECIPE_FILE).write_text(recipe_yaml)
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")
            write_manifest(tmp)
            _publish(tmp, final, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays; the previous checkpoint is the newest
        raise
    accelerator.wait_for_everyone()
    return final


def _publish(tmp: Path, final: Path, keep: int) -> None:
    """Rename a complete checkpoint into place, point `latest` at it, drop the oldest."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write_bytes(final.parent / LATEST, f"{final.name}\n".encode())
    _prune(final.parent, keep)


def write_manifest(folder: Path) -> None:
    """Name, size and sha256 of every file of a checkpoint, written last: a resume can then tell a
    complete checkpoint from one truncated or changed afterwards (a copy cut short, a file edited)."""
    files = {
        path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }
    atomic_write_bytes(folder / MANIFEST_FILE, (json.dumps({"files": files}, indent=2) + "\n").encode())


def _prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; drop half-written ones left by a killed run."""
    for old in sorted(root.glob("ckpt-*"))[:-keep] + partial_checkpoints(root):
        shutil.rmtree(old, ignore_errors=True)


def partial_checkpoints(root: Path) -> list[Path]:
    """Temporary folders of checkpoints whose writing never finished (a killed run)."""
    return sorted(root.glob(".ckpt-*.tmp"))


def is_checkpoint(path: Path) -> bool:
    return (path / STATE_FILE).is_file() or (path / MANIFEST_FILE).is_file()


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run resumes from, and the newer ones passed over because they are damaged."""

    checkpoint: Path
    skipped: tuple[str, ...] = ()
    """`ckpt-NNNNNNN: why` for each, newest first."""


def find_checkpoint(path: str | Path) -> ResumePoint:
    """A checkpoint folder (which must be intact), or the newest intact one under a run's output folder."""
    path = Path(path)
    if is_checkpoint(path):
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ValueError(
                f"{path}: damaged checkpoint: {problem}; resume from the run folder instead "
                "to continue from its newest intact checkpoint"
            )
        return ResumePoint(path)
    candidates = sorted((p for p in (path / CHECKPOINTS).glob("ckpt-*") if p.is_dir()), reverse=True)
    if not candidates:
        raise FileNotFoundError(f"{path}: no checkpoint to resume from (expected {CHECKPOINTS}/ckpt-*/{STATE_FILE})")
    skipped = []
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            return ResumePoint(candidate, tuple(skipped))
        skipped.append(f"{candidate.name}: {problem}")
    raise ValueError(
        f"{path}: no intact checkpoint to resume from ({'; '.join(skipped)}); start again with another output_dir"
    )


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a file missing, truncated or changed), or None.

    Checkpoints of versions before manifests are accepted if every file loads."""
    manifest = checkpoint / MANIFEST_FILE
    if not manifest.is_file():
        return _load_problem(checkpoint)
    try:
        files = {name: (e["size"], e["sha256"]) for name, e in json.loads(manifest.read_text())["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return f"{MANIFEST_FILE} is unreadable ({_first_line(error)})"
    for name, (size, sha256) in files.items():
        problem = _file_problem(checkpoint / name, size, sha256)
        if problem is not None:
            return problem
    return None


def _file_problem(path: Path, size: int, sha256: str) -> str | None:
    """How a file differs from its manifest entry (sizes first: hashing is the slow part), or None."""
    if not path.is_file():
        return f"{path.name} is missing"
    actual = path.stat().st_size
    if actual != size:
        return f"{path.name} is {actual:,} bytes, the manifest says {size:,}"
    if file_sha256(path) != sha256:
        return f"{path.name} differs from the manifest (sha256)"
    return None


def _load_problem(checkpoint: Path) -> str | None:
    """The first file of a checkpoint without manifest that does not load, and why; None if all load."""
    readers: list[tuple[str, Callable[[Path], Any]]] = [
        (STATE_FILE, _read_json),
        (CONFIG_FILE, _read_json),
        (WEIGHTS_FILE, load_file),
    ]
    optimizer = [checkpoint / OPTIMIZER_FILE] if (checkpoint / OPTIMIZER_FILE).is_file() else []
    readers += [(path.name, _read_tensors) for path in optimizer + sorted(checkpoint.glob("rng_state_*.pt"))]
    for name, read in readers:
        try:
            read(checkpoint / name)
        except _LOAD_ERRORS as error:
            return f"{name} does not load ({_first_line(error)})"
    return None


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _read_tensors(path: Path) -> Any:
    return torch.load(path, weights_only=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())


def load_checkpoint(checkpoint: Path, model: torch.nn.Module, process_index: int) -> tuple[dict | None, dict]:
    """Load adapter weights into `model`; return (optimizer state or None, this process's RNG state).

    The optimizer state's "optimizer_shards" names the folder of FSDP2's shards, read once the sharded
    optimizer exists (`load_sharded_optimizer`)."""
    load_adapter_weights(model, checkpoint)
    optimizer_file = checkpoint / OPTIMIZER_FILE
    optimizer_state = torch.load(optimizer_file, weights_only=True) if optimizer_file.is_file() else None
    if optimizer_state is not None and (checkpoint / OPTIMIZER_SHARDS).is_dir():
        optimizer_state["optimizer_shards"] = str(checkpoint / OPTIMIZER_SHARDS)
    rng_file = checkpoint / f"rng_state_{process_index}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{checkpoint}: no {rng_file.name}; resume with as many processes as the run had")
    return optimizer_state, torch.load(rng_file, weights_only=True)
