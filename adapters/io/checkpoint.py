"""Adapter-only checkpoints: `adapter_model.safetensors` plus `mmadapter_config.json` (DESIGN §4).

The folder holds only what trained, never base weights. The JSON says which method and
hyperparameters made it, which base shape it fits, the prompt template, and the package version;
loading refuses a base of another shape and says which dimension differs.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from mmadapter.adapters.methods.base import (
    adapter_config_of,
    adapter_state_dict,
    attach_adapter,
    config_from_dict,
    get_method,
    trainable_parameters,
)
from mmadapter.core.files import atomic_save_tensors, atomic_write_bytes

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "mmadapter_config.json"
#: Config fields that fix the shape of a base model (the names differ between LLaMA and ChatGLM).
_SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "inner_hidden_size",
    "vocab_size",
)


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The base model's identity (name if known) and shape, as saved beside an adapter."""
    config = model.config
    shape = {f: getattr(config, f) for f in _SHAPE_FIELDS if getattr(config, f, None) is not None}
    return {"name_or_path": getattr(config, "name_or_path", "") or "", "shape": shape}


def check_base_matches(saved: dict[str, Any], model: nn.Module, source: str) -> None:
    """Raise a ValueError naming every shape field where `model` differs from the saved base."""
    current = base_fingerprint(model)["shape"]
    differences = [
        f"{field}: adapter expects {value}, base has {current.get(field)}"
        for field, value in saved.get("shape", {}).items()
        if current.get(field) != value
    ]
    if differences:
        raise ValueError(f"{source}: the adapter does not fit this base model ({'; '.join(differences)})")


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    *,
    prompt_template: str | None = None,
    training: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the adapter of `model` (weights + config) into `directory`; returns the folder.

    `state_dict` (model parameter names) replaces `adapter_state_dict(model)` when the parameters are
    not plain tensors on the model, e.g. gathered from FSDP / DeepSpeed shards by the training loop.
    """
    config = adapter_config_of(model)
    method = get_method(config.method)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_dict = adapter_state_dict(model) if state_dict is None else state_dict
    tensors = {method.saved_key(name, config): t for name, t in state_dict.items()}
    atomic_save_tensors(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    document = {
        "mmadapter_version": version("mmadapter"),
        "adapter": config.to_dict(),
        "base": base_fingerprint(model),
        "prompt_template": prompt_template,
        "training": training,
    }
    atomic_write_bytes(directory / CONFIG_FILE, (json.dumps(document, indent=2) + "\n").encode())
    method.write_extra_files(model, config, directory)
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE}; is this an mmadapter adapter folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from error


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Copy saved adapter tensors into an already attached adapter, requiring an exact key match."""
    config = adapter_config_of(model)
    method = get_method(config.method)
    path = Path(directory) / WEIGHTS_FILE
    load_adapter_tensors(model, {method.model_key(key, config): t for key, t in load_file(path).items()}, str(path))


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Put tensors (by model parameter name) into an attached adapter; keys and shapes must match exactly.

    On a meta-device model they are assigned (no copy), otherwise copied in place.
    """
    expected = trainable_parameters(model, None)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: keys do not match the attached adapter (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for name, param in expected.items():
        if tensors[name].shape != param.shape:
            raise ValueError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(param.shape)}")
    if any(p.is_meta for p in expected.values()):
        model.load_state_dict(tensors, strict=False, assign=True)
        return
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name])


def load_adapter(model: nn.Module, directory: str | Path, **overrides: Any) -> nn.Module:
    """Attach the adapter saved in `directory` to a fresh base `model` and load its weights.

    `overrides` replace saved config fields that depend on the machine, such as a local weights path.
    """
    document = read_adapter_config(directory)
    check_base_matches(document.get("base", {}), model, str(directory))
    attach_adapter(model, config_from_dict({**document["adapter"], **overrides}))
    load_adapter_weights(model, directory)
    return model
