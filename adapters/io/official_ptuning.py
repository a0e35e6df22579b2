"""Official ChatGLM-6B P-Tuning v2 checkpoints in and out (THUDM/ChatGLM-6B ptuning/).

Spec chatglm-6b-ptuning-v2 §5.7: the official trainer saves only the trainable parameters, i.e.
`transformer.prefix_encoder.embedding.weight` [P, L·2·h] (fp32) and, with `--prefix_projection`,
`transformer.prefix_encoder.trans.{0,2}.{weight,bias}`, as a `pytorch_model.bin` next to a
`config.json` carrying `pre_seq_len` and `prefix_projection`. Inference loads the base, sets
`pre_seq_len`, and loads those keys (prefix stripped) strictly into the prefix encoder; P and the
projection flag must equal the trained ones (the size-mismatch errors of official issues #451, #749).
Reading uses `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmadapter.adapters.io.checkpoint import WEIGHTS_FILE, read_adapter_config
from mmadapter.adapters.methods.base import adapter_config_of, attach_adapter
from mmadapter.adapters.methods.ptuning_v2 import ENCODER_NAME, PTuningV2Config, prefix_encoder_of, prefix_geometry
from mmadapter.core.files import atomic_write_bytes, read_json, read_safetensors, read_torch_file

OFFICIAL_PREFIX = f"transformer.{ENCODER_NAME}."
OFFICIAL_WEIGHTS = "pytorch_model.bin"
OFFICIAL_CONFIG = "config.json"


def _weights_path(source: Path) -> Path:
    path = source / OFFICIAL_WEIGHTS if source.is_dir() else source
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no {OFFICIAL_WEIGHTS} (an official P-Tuning v2 checkpoint folder or file)")
    return path


def read_official_ptuning(source: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(prefix-encoder tensors with `transformer.prefix_encoder.` stripped, the folder's config.json or {})."""
    source = Path(source)
    path = _weights_path(source)
    state = read_torch_file(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    tensors = {k.removeprefix(OFFICIAL_PREFIX): v for k, v in state.items() if k.startswith(OFFICIAL_PREFIX)}
    if not tensors:
        raise ValueError(
            f"{path}: no {OFFICIAL_PREFIX}* keys; not a P-Tuning v2 checkpoint (found {sorted(state)[:5]})"
        )
    config_path = path.parent / OFFICIAL_CONFIG
    config = read_json(config_path) if config_path.is_file() else {}
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, found {type(config).__name__}")
    return tensors, config


def config_from_official(
    tensors: dict[str, torch.Tensor],
    official_config: dict[str, Any] | None = None,
    *,
    pre_seq_len: int | None = None,
    prefix_projection: bool | None = None,
    hidden_size: int | None = None,
    source: str = "checkpoint",
) -> PTuningV2Config:
    """The P-Tuning v2 config the tensors were trained with; explicit values must agree with them.

    `hidden_size` (the base's) lets an MLP as wide as the model keep the default prefix_hidden_size=None.
    """
    if "embedding.weight" not in tensors:
        raise ValueError(f"{source}: no {OFFICIAL_PREFIX}embedding.weight")
    found_length = tensors["embedding.weight"].shape[0]
    found_projection = any(k.startswith("trans.") for k in tensors)
    expected = {"pre_seq_len": pre_seq_len, "prefix_projection": prefix_projection}
    for field, found in (("pre_seq_len", found_length), ("prefix_projection", found_projection)):
        for origin, value in (("requested", expected[field]), ("config.json", (official_config or {}).get(field))):
            if value is not None and value != found:
                raise ValueError(
                    f"{source}: {origin} {field}={value} but the checkpoint was trained with {field}={found}; "
                    f"use {field}={found} (it must equal the training value)"
                )
    hidden = tensors["trans.0.weight"].shape[0] if found_projection else None
    if hidden is not None and hidden == hidden_size:
        hidden = None
    return PTuningV2Config(pre_seq_len=found_length, prefix_projection=found_projection, prefix_hidden_size=hidden)


def check_prefix_fits(tensors: dict[str, torch.Tensor], model_config, source: str = "checkpoint") -> None:
    """Refuse a prefix made for another base, naming both widths (layers · 2 · key/value heads · head size)."""
    geometry = prefix_geometry(model_config)
    needed = geometry["num_layers"] * 2 * geometry["num_heads"] * geometry["head_dim"]
    output = tensors["trans.2.weight"] if "trans.2.weight" in tensors else tensors["embedding.weight"]
    width = output.shape[0] if "trans.2.weight" in tensors else output.shape[1]
    if width != needed:
        raise ValueError(
            f"{source}: the prefix is {width} wide, but this base ({model_config.model_type}) needs "
            f"{geometry['num_layers']} layers x 2 x {geometry['num_heads']} heads x {geometry['head_dim']} = {needed}; "
            "it was trained for another base model (for an official checkpoint use --base chatglm-6b)"
        )


def load_official_ptuning(
    model: nn.Module,
    checkpoint: str | Path,
    *,
    pre_seq_len: int | None = None,
    prefix_projection: bool | None = None,
) -> nn.Module:
    """The official inference recipe: attach P-Tuning v2 to a fresh base and load the checkpoint's prefix.

    `pre_seq_len`/`prefix_projection` are optional checks (the official flags); they must match the file.
    """
    tensors, official_config = read_official_ptuning(checkpoint)
    config = config_from_official(
        tensors,
        official_config,
        pre_seq_len=pre_seq_len,
        prefix_projection=prefix_projection,
        hidden_size=model.config.hidden_size,
        source=str(checkpoint),
    )
    check_prefix_fits(tensors, model.config, str(checkpoint))
    attach_adapter(model, config)
    encoder = prefix_encoder_of(model)
    try:
        # assign=True on a meta-device base (conversion without weights) so the tensors become the parameters.
        encoder.load_state_dict(
            {k: v.float() for k, v in tensors.items()}, strict=True, assign=encoder.embedding.weight.is_meta
        )
    except RuntimeError as error:
        raise ValueError(f"{checkpoint}: the prefix does not fit this base model: {error}") from None
    return model


def _write_official(
    tensors: dict[str, torch.Tensor],
    config: PTuningV2Config,
    directory: Path,
    base_config: dict[str, Any] | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({OFFICIAL_PREFIX + k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, buffer)
    atomic_write_bytes(directory / OFFICIAL_WEIGHTS, buffer.getvalue())
    # Like the official trainer's folder: the base model's config with the two P-Tuning v2 fields.
    document = {**(base_config or {}), "pre_seq_len": config.pre_seq_len, "prefix_projection": config.prefix_projection}
    atomic_write_bytes(directory / OFFICIAL_CONFIG, (json.dumps(document, indent=2) + "\n").encode())
    return directory


def export_official_ptuning(model: nn.Module, directory: str | Path) -> Path:
    """Write the attached prefix as an official checkpoint folder: `pytorch_model.bin` + the base's `config.json`."""
    config = adapter_config_of(model)
    if not isinstance(config, PTuningV2Config):
        raise ValueError(f"the attached adapter is {config.method}, not ptuning-v2")
    return _write_official(prefix_encoder_of(model).state_dict(), config, Path(directory), model.config.to_dict())


def export_official_ptuning_folder(adapter_dir: str | Path, directory: str | Path) -> Path:
    """mmadapter P-Tuning v2 folder -> official checkpoint folder, without building the base model.

    Its config.json holds only `pre_seq_len` and `prefix_projection` (the official loader takes the rest from
    the base model's folder).
    """
    adapter_dir = Path(adapter_dir)
    saved = read_adapter_config(adapter_dir)["adapter"]
    if saved.get("method") != PTuningV2Config.method:
        raise ValueError(f"{adapter_dir}: holds a {saved.get('method')!r} adapter, not ptuning-v2")
    config = PTuningV2Config.from_dict(saved)
    marker = f"{ENCODER_NAME}."
    state = read_safetensors(adapter_dir / WEIGHTS_FILE)
    tensors = {k[k.index(marker) + len(marker) :]: v for k, v in state.items()}
    return _write_official(tensors, config, Path(directory))
