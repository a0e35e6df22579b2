"""Check an adapter folder completely, without loading a single weight, before it is shared.

A push that uploads a broken adapter wastes the uploader's bandwidth and every downloader's time,
so `inspect_adapter_folder` proves the folder loads first: the config parses, the weights file is
there, and its tensor names and shapes are exactly what the recorded method creates on the
recorded base shape. The base is built on the meta device (no memory) and only the safetensors
header is read, so checking a 65B adapter takes a second.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from transformers import PretrainedConfig

from mmadapter.adapters.backbones.loading import read_base_config
from mmadapter.adapters.backbones.presets import BASE_PRESETS, build_base_model, model_class_for
from mmadapter.adapters.io.checkpoint import CONFIG_FILE, WEIGHTS_FILE, check_base_matches, read_adapter_config
from mmadapter.adapters.methods.base import (
    AdapterConfig,
    attach_adapter,
    config_from_dict,
    get_method,
    trainable_parameters,
)

#: peft's config file, written beside ours by methods that also use peft's layout (LoRA, prefix tuning).
PEFT_CONFIG_FILE = "adapter_config.json"
#: Weight formats that need unpickling; mmadapter never reads them from an adapter folder.
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")
#: Config fields naming external frozen weights (e.g. V2's CLIP); they may point at another machine's
#: files, and the meta-device check needs shapes only, so it builds without them.
EXTERNAL_WEIGHT_FIELDS = ("clip_pretrained",)


@dataclasses.dataclass(frozen=True)
class AdapterFolder:
    """What a checked adapter folder holds."""

    path: Path
    document: dict[str, Any]
    """The parsed mmadapter_config.json."""
    config: AdapterConfig
    tensor_shapes: dict[str, tuple[int, ...]]
    """Saved tensor name -> shape, read from the safetensors header."""
    base_parameters: int
    """Parameters of the base model alone (counted on the meta device)."""

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def base(self) -> dict[str, Any]:
        return self.document.get("base") or {}

    @property
    def adapter_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.tensor_shapes.values())

    @property
    def has_peft_layout(self) -> bool:
        return (self.path / PEFT_CONFIG_FILE).is_file()


def base_config_from_shape(shape: dict[str, Any], source: str) -> PretrainedConfig:
    """A transformers config with the recorded base shape (enough to build the model on meta)."""
    if not shape.get("model_type"):
        raise ValueError(f"{source}: the base shape has no model_type; was the folder written by save_adapter?")
    fields = {key: value for key, value in shape.items() if key != "model_type"}
    probe = PretrainedConfig()
    probe.model_type = shape["model_type"]
    return model_class_for(probe).config_class(**fields)


def _claimed_base_config(base: dict[str, Any]) -> PretrainedConfig | None:
    """The config of the base the folder names, when that name can be read offline (preset or local folder)."""
    name = str(base.get("name_or_path") or "")
    if name in BASE_PRESETS or (name and (Path(name) / "config.json").is_file()):
        return read_base_config(name)
    return None


def read_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header (no tensor data is read)."""
    try:
        with safe_open(path, framework="pt") as file:
            return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error


def _check_weights_match(path: Path, saved: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    problems += [
        f"{key} has shape {list(saved[key])}, expected {list(shape)}"
        for key, shape in expected.items()
        if key in saved and saved[key] != shape
    ][:5]
    if problems:
        raise ValueError(f"{path}: tensors do not match the adapter its config describes: {'; '.join(problems)}")


def inspect_adapter_folder(directory: str | Path) -> AdapterFolder:
    """Validate an adapter folder offline and describe it; raises with the file and field at fault."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such adapter folder")
    if not any(path.iterdir()):
        raise ValueError(f"{path}: the folder is empty; save an adapter into it first (save_pretrained)")
    document = read_adapter_config(path)
    source = str(path / CONFIG_FILE)
    if not isinstance(document.get("adapter"), dict):
        raise ValueError(f"{source}: no 'adapter' section (method and hyperparameters)")
    try:
        config = config_from_dict(document["adapter"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: 'adapter' section: {error}") from error
    base = document.get("base") or {}
    if not isinstance(base.get("shape"), dict):
        raise ValueError(f"{source}: no 'base.shape' (the shape of the base model the adapter fits)")

    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f"; found {', '.join(pickles)}: convert it with `mmadapter convert`" if pickles else ""
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE}{hint}")
    saved = read_tensor_shapes(weights)

    base_config = _claimed_base_config(base) or base_config_from_shape(base["shape"], source)
    model = build_base_model(base_config, device="meta")
    check_base_matches(base, model, f"{source} names base {base.get('name_or_path')!r}, but")
    base_parameters = sum(p.numel() for p in model.parameters())
    shapes_only = {field: None for field in EXTERNAL_WEIGHT_FIELDS if field in document["adapter"]}
    attach_adapter(model, config_from_dict({**document["adapter"], **shapes_only}))
    method = get_method(config.method)
    expected = {
        method.saved_key(name, config): tuple(param.shape) for name, param in trainable_parameters(model).items()
    }
    _check_weights_match(weights, saved, expected)
    return AdapterFolder(
        path=path, document=document, config=config, tensor_shapes=saved, base_parameters=base_parameters
    )
