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

from transformers import PretrainedConfig

from mmadapter.adapters.backbones.loading import read_base_config
from mmadapter.adapters.backbones.presets import build_base_model, is_preset, model_class_for
from mmadapter.adapters.io.checkpoint import (
    CONFIG_FILE,
    check_base_matches,
    check_weights_fit,
    read_adapter_config,
    read_saved_shapes,
)
from mmadapter.adapters.methods.base import AdapterConfig, config_from_dict

#: peft's config file, written beside ours by methods that also use peft's layout (LoRA, prefix tuning).
PEFT_CONFIG_FILE = "adapter_config.json"


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
    def prompt_template(self) -> str | None:
        """The template trained with; None: the base family's official one (folders from before the record)."""
        return self.document.get("prompt_template")

    @property
    def chat_template(self) -> str | None:
        """With prompt_template `chat`: the Jinja chat template trained with."""
        return self.document.get("chat_template")

    @property
    def adapter_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.tensor_shapes.values())

    @property
    def has_peft_layout(self) -> bool:
        return (self.path / PEFT_CONFIG_FILE).is_file()


def base_config_from_shape(shape: dict[str, Any], source: str) -> PretrainedConfig:
    """A transformers config with the recorded base shape (enough to build the model on meta)."""
    fields = {key: value for key, value in shape.items() if key != "model_type"}
    probe = PretrainedConfig()
    probe.model_type = shape["model_type"]
    try:
        return model_class_for(probe).config_class(**fields)
    except ValueError as error:  # an unknown model_type, or sizes transformers refuses
        raise ValueError(f"{source}: base.shape: {error}") from error


def _claimed_base_config(base: dict[str, Any]) -> PretrainedConfig | None:
    """The config of the base the folder names, when that name can be read offline (preset or local folder)."""
    name = str(base.get("name_or_path") or "")
    if is_preset(name) or (name and (Path(name) / "config.json").is_file()):
        return read_base_config(name)
    return None


def inspect_adapter_folder(directory: str | Path) -> AdapterFolder:
    """Validate an adapter folder offline and describe it; raises with the file and field at fault."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such adapter folder")
    if not any(path.iterdir()):
        raise ValueError(f"{path}: the folder is empty; save an adapter into it first (save_pretrained)")
    document = read_adapter_config(path)
    source = str(path / CONFIG_FILE)
    base = document["base"]
    if "shape" not in base:
        raise ValueError(f"{source}: no 'base.shape' (the shape of the base model the adapter fits)")
    saved = read_saved_shapes(path, document)
    model = build_base_model(_claimed_base_config(base) or base_config_from_shape(base["shape"], source), device="meta")
    check_base_matches(base, model, f"{source} names base {base.get('name_or_path')!r}, but")
    base_parameters = sum(p.numel() for p in model.parameters())
    check_weights_fit(path, model, document["adapter"], saved)
    return AdapterFolder(
        path=path,
        document=document,
        config=config_from_dict(document["adapter"]),
        tensor_shapes=saved,
        base_parameters=base_parameters,
    )
