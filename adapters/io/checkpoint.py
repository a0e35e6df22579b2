"""Adapter-only checkpoints: `adapter_model.safetensors` plus `mmadapter_config.json` (DESIGN §4).

The folder holds only what trained, never base weights. The JSON says which method and
hyperparameters made it, which base shape it fits, the prompt template, and the package version;
loading refuses a base of another shape and says which dimension differs.

Every reader of a folder goes through `read_adapter_config`, which checks the document's types by key
path, and through `read_saved_shapes` + `check_weights_fit`, which prove from the safetensors header
alone that the config describes the saved tensors: nothing is allocated for a config that lies.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any

import pydantic
import torch
from torch import nn

from mmadapter.adapters.backbones.presets import build_base_model
from mmadapter.adapters.methods.base import (
    adapter_config_of,
    adapter_state_dict,
    attach_adapter,
    config_from_dict,
    get_method,
    trainable_parameters,
)
from mmadapter.core.config import Int, describe, document_type, parse
from mmadapter.core.files import (
    atomic_save_tensors,
    atomic_write_bytes,
    read_json,
    read_safetensors,
    read_safetensors_shapes,
)
from mmadapter.core.templates import TemplateName

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "mmadapter_config.json"
#: Weight formats that need unpickling; mmadapter never reads them from an adapter folder.
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")
#: Config fields naming external frozen weights (e.g. V2's CLIP); they may point at another machine's
#: files, and the meta-device check needs shapes only, so it builds without them.
EXTERNAL_WEIGHT_FIELDS = ("clip_pretrained",)
#: Base shape fields that count layers: checking a folder builds that many layers (on the meta device).
_LAYER_COUNTS = ("num_hidden_layers", "num_layers")
#: Config integers up to this are left to the exact shape check; building that many modules on the meta
#: device takes seconds, and no tensor is allocated before the check.
_UNCHECKED_SIZES = 1024

#: A dimension of a model: a positive int.
_Size = Annotated[Int, pydantic.Field(gt=0)]


@document_type
@dataclasses.dataclass
class BaseShape:
    """The shape of the base model an adapter fits; LLaMA and ChatGLM name some fields differently."""

    model_type: str
    hidden_size: _Size | None = None
    num_hidden_layers: _Size | None = None
    num_layers: _Size | None = None
    num_attention_heads: _Size | None = None
    num_key_value_heads: _Size | None = None
    head_dim: _Size | None = None
    """Qwen3 (and others) set it apart from hidden_size / num_attention_heads."""
    intermediate_size: _Size | None = None
    inner_hidden_size: _Size | None = None
    vocab_size: _Size | None = None


@document_type
@dataclasses.dataclass
class BaseRecord:
    """Which base model the adapter was trained on (`base` in mmadapter_config.json)."""

    shape: BaseShape
    name_or_path: str = ""
    revision: str | None = None


@document_type
@dataclasses.dataclass
class AdapterDocument:
    """mmadapter_config.json; the `adapter` section is checked by its method's config class."""

    adapter: dict[str, Any]
    base: BaseRecord | None = None
    mmadapter_version: str | None = None
    prompt_template: TemplateName | None = None
    """The prompt template trained with (core/templates.py); None: the base family's official one."""
    chat_template: str | None = None
    """With prompt_template `chat`: the Jinja chat template trained with, which serving renders."""
    training: dict[str, Any] | None = None
    license: str | None = None


#: Config fields that fix the shape of a base model (the names differ between LLaMA and ChatGLM).
_SHAPE_FIELDS = tuple(field.name for field in dataclasses.fields(BaseShape))


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The base model's identity (name if known) and shape, as saved beside an adapter."""
    config = model.config
    derived = {f for f in _SHAPE_FIELDS if isinstance(getattr(type(config), f, None), property)}  # ChatGLM's head_dim
    shape = {f: getattr(config, f) for f in _SHAPE_FIELDS if f not in derived and getattr(config, f, None) is not None}
    return {"name_or_path": getattr(config, "name_or_path", "") or "", "shape": shape}


def check_base_matches(saved: dict[str, Any], model: nn.Module, source: str) -> None:
    """Raise a ValueError naming every shape field where `model` differs from the saved base."""
    current = base_fingerprint(model)["shape"]
    differences = [
        f"{field}: adapter expects {value}, base has {current[field] if field in current else 'none set'}"
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
    chat_template: str | None = None,
) -> Path:
    """Write the adapter of `model` (weights + config) into `directory`; returns the folder.

    `chat_template` is the Jinja source of a `chat` prompt template (recorded only when given).

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
        **({"chat_template": chat_template} if chat_template is not None else {}),
        "training": training,
    }
    atomic_write_bytes(directory / CONFIG_FILE, (json.dumps(document, indent=2) + "\n").encode())
    method.write_extra_files(model, config, directory)
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The folder's mmadapter_config.json, its types checked: a wrong value is a ValueError naming the
    file and the key path (`adapter.prompt_length: expected int, got 'ten'`), never a TypeError later."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE}; is this an mmadapter adapter folder?")
    document = read_json(path)
    try:
        parse(AdapterDocument, document)
        _parse_adapter_section(document["adapter"])
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    if document.get("base") is None:  # `null` is as good as absent; readers then get a mapping
        document["base"] = {}
    return document


def recorded_base(directory: str | Path) -> tuple[str | None, str | None]:
    """(base, tokenizer) the adapter was trained with, as its folder records them: the training recipe's model
    section (mmadapter runs record local paths absolutely), else the base model's name; None where unknown."""
    document = read_adapter_config(directory)
    model = (document.get("training") or {}).get("model") or {}
    return model.get("base") or document["base"].get("name_or_path") or None, model.get("tokenizer")


def _parse_adapter_section(values: dict[str, Any]) -> None:
    """The method's own config class checks the section, each problem at its `adapter.` key path."""
    method = values.get("method")
    if not isinstance(method, str):
        problem = "required key is missing" if "method" not in values else f"expected a string, got {describe(method)}"
        raise ValueError(f"adapter.method: {problem}")
    try:
        config_class = get_method(method).config_class
    except ValueError as error:
        raise ValueError(f"adapter.method: {error}") from error
    fields = {key: value for key, value in values.items() if key != "method"}
    parse(config_class, fields, prefix="adapter", key_name=f"{method} config field")


def read_saved_shapes(directory: str | Path, document: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The saved tensors' shapes (from the safetensors header; a truncated file fails here), with the sizes
    in `document` (its read_adapter_config form) checked against them before anything is built."""
    folder = Path(directory)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f"; found {', '.join(pickles)}: convert it with `mmadapter convert`" if pickles else ""
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE}{hint}")
    saved = read_safetensors_shapes(weights)
    _check_sizes(document, saved, folder / CONFIG_FILE, weights)
    return saved


def _check_sizes(document: dict[str, Any], saved: dict[str, tuple[int, ...]], source: Path, weights: Path) -> None:
    """Every integer of an adapter config is a size, a count or a layer index, and so is a base's layer count:
    none is negative, and a used one is no larger than every dimension and the number of the saved tensors.
    Values up to `_UNCHECKED_SIZES` are left to the exact shape check (unused fields keep defaults such as
    V2's visual_width 768 beside a tiny text-only adapter); so `prompt_length: 1e11` is named here, instead
    of allocating terabytes or building layers for minutes."""
    largest = max((size for shape in saved.values() for size in shape), default=0)
    bound = max(largest, len(saved), _UNCHECKED_SIZES)
    shape = document["base"].get("shape") or {}
    fields = {f"adapter.{key}": value for key, value in document["adapter"].items()}
    fields |= {f"base.shape.{key}": shape[key] for key in _LAYER_COUNTS if key in shape}
    for field, value in fields.items():
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= bound:
            raise ValueError(
                f"{source}: {field} is {value}, but the {len(saved)} tensors in {weights.name} have no dimension "
                f"above {largest}: the config does not describe these weights; fix it, or re-save the adapter"
            )


def expected_tensor_shapes(model: nn.Module, values: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Saved key -> shape of the adapter that config `values` attach to `model`, a base on the meta device.

    New modules are created on meta too (peft would make LoRA layers on the CPU), so nothing is allocated;
    external frozen weights (V2's CLIP) are left out, as only shapes matter."""
    config = config_from_dict({**values, **{field: None for field in EXTERNAL_WEIGHT_FIELDS if field in values}})
    with torch.device("meta"):
        attach_adapter(model, config)
    method = get_method(config.method)
    return {method.saved_key(name, config): tuple(p.shape) for name, p in trainable_parameters(model).items()}


def check_weights_fit(
    directory: str | Path, model: nn.Module, values: dict[str, Any], saved: dict[str, tuple[int, ...]]
) -> None:
    """Raise unless the adapter `values` describe on `model` (a meta-device base) is exactly the `saved` one."""
    try:
        expected = expected_tensor_shapes(model, values)
    except ValueError as error:  # the method's own checks against this base, e.g. more layers than it has
        raise ValueError(f"{Path(directory) / CONFIG_FILE}: {error}") from error
    problems = _mismatches(saved, expected)
    if problems:
        raise ValueError(
            f"{Path(directory) / WEIGHTS_FILE}: tensors do not match the adapter its config describes: "
            + "; ".join(problems)
        )


def _mismatches(saved: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> list[str]:
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    wrong = [key for key, shape in expected.items() if key in saved and saved[key] != shape]
    return problems + [f"{key} has shape {list(saved[key])}, expected {list(expected[key])}" for key in wrong[:5]]


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Copy saved adapter tensors into an already attached adapter, requiring an exact key match."""
    config = adapter_config_of(model)
    method = get_method(config.method)
    path = Path(directory) / WEIGHTS_FILE
    tensors = read_safetensors(path)
    load_adapter_tensors(model, {method.model_key(key, config): t for key, t in tensors.items()}, str(path))


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
    The folder is checked first, on a copy of the base on the meta device: a config that does not describe
    the saved tensors fails before the adapter takes any memory.
    """
    document = read_adapter_config(directory)
    check_base_matches(document["base"], model, str(Path(directory) / CONFIG_FILE))
    values = {**document["adapter"], **overrides}
    saved = read_saved_shapes(directory, document)
    check_weights_fit(directory, build_base_model(copy.deepcopy(model.config), device="meta"), values, saved)
    attach_adapter(model, config_from_dict(values))
    load_adapter_weights(model, directory)
    return model
