"""Reading CLIP weight files without unpickling code: safetensors, `torch.save` files, TorchScript.

OpenAI's own CLIP release (`ViT-L-14.pt`, the file the official LLaMA-Adapter V2 code loads with
`clip.load`) is a TorchScript archive. `torch.load(weights_only=True)` refuses those, and
`torch.jit.load` would run the archive's TorchScript code. A TorchScript archive is a zip whose
`data.pkl` pickles the module tree as plain attribute dicts plus tensor storages in `data/N`, so
`read_torchscript_tensors` reads it with an unpickler that knows only tensors, storages and an inert
stand-in for module objects: nothing from the file is ever executed.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from mmadapter.core.files import RefusedPickleError, read_safetensors, read_torch_file, torch_file_errors

#: Weight files looked for inside a folder, in order of preference (open_clip's and HF's names).
PREFERRED_WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "model.safetensors",
    "open_clip_pytorch_model.bin",
    "pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.pth",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def is_torchscript_archive(path: str | Path) -> bool:
    """TorchScript zips carry `constants.pkl` (and `code/`); plain `torch.save` zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


class _ScriptObject:
    """Inert stand-in for every TorchScript module or class instance: it only keeps its attribute dict."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _passthrough(values: Any, *_type_info: Any) -> Any:
    return values


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript `data.pkl`, allowing tensors and inert objects only."""

    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }

    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, source: str) -> None:
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._root = root
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return _ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch.jit._pickle" and (name.startswith("build_") or name == "restore_type_tag"):
            return _passthrough  # typed containers: build_intlist(list), restore_type_tag(value, type)
        raise RefusedPickleError(self._source, f"refusing to load {module}.{name} (only tensors are read)")

    def persistent_load(self, pid: Any) -> Any:
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"{self._source}: unexpected persistent id {pid!r}")
        data = self._archive.read(f"{self._root}/data/{key}")
        untyped = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=storage_type.dtype, _internal=True)


def _collect_tensors(node: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(node, torch.Tensor):
        out[prefix.rstrip(".")] = node
    elif isinstance(node, _ScriptObject) and isinstance(node.state, dict):
        for name, value in node.state.items():
            _collect_tensors(value, f"{prefix}{name}.", out)


def read_torchscript_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript module archive, named like `state_dict()` keys."""
    with torch_file_errors(path), zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.count("/") == 1 and name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: not a TorchScript module archive (no single */data.pkl)")
        root = pickles[0].split("/", 1)[0]
        top = _TensorsOnlyUnpickler(archive.read(pickles[0]), archive, root, str(path)).load()
    tensors: dict[str, torch.Tensor] = {}
    _collect_tensors(top, "", tensors)
    if not tensors:
        raise ValueError(f"{path}: the TorchScript archive holds no tensors")
    return tensors


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, a `torch.save` state dict (optionally under
    `state_dict`, keys optionally prefixed `module.`), or a TorchScript archive (OpenAI's release)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        state = read_safetensors(path)
    elif is_torchscript_archive(path):
        state = read_torchscript_tensors(path)
    else:
        state = read_torch_file(path)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    if all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def find_weights_file(folder: str | Path) -> Path:
    """The weights file of a model folder: a preferred name, else the only weights file there."""
    folder = Path(folder)
    for name in PREFERRED_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise FileNotFoundError(f"{folder}: expected one weights file ({'/'.join(WEIGHT_SUFFIXES)}), found {found}")
    return candidates[0]


_HF_LAYER_RENAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_TOP_RENAMES = {
    "vision_model.embeddings.class_embedding": "class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "positional_embedding",
    "vision_model.pre_layrnorm.weight": "ln_pre.weight",  # sic: transformers' spelling
    "vision_model.pre_layrnorm.bias": "ln_pre.bias",
    "vision_model.post_layernorm.weight": "ln_post.weight",
    "vision_model.post_layernorm.bias": "ln_post.bias",
}
HF_CLIP_MARKER = "vision_model.embeddings.patch_embedding.weight"


def hf_clip_to_open_clip_visual(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A transformers `CLIPModel` / `CLIPVisionModelWithProjection` state dict -> open_clip vision tower keys.

    transformers keeps q/k/v as three linears (open_clip: one `in_proj`) and stores the projection
    as a Linear weight (open_clip: its transpose); everything else is a rename.
    """
    if "vision_model.head.probe" in state:
        raise ValueError(
            f"{source}: a transformers SigLIP checkpoint; mmadapter reads SigLIP in open_clip's layout: download "
            "the open_clip release (e.g. timm/ViT-B-16-SigLIP: open_clip_config.json + open_clip_model.safetensors) "
            "and point at that folder"
        )
    if "visual_projection.weight" not in state:
        raise ValueError(f"{source}: no visual_projection.weight (a CLIPVisionModel without projection?)")
    tower = {new: state[old] for old, new in _HF_TOP_RENAMES.items()}
    tower["proj"] = state["visual_projection.weight"].T.contiguous()
    prefix = "vision_model.encoder.layers."
    layers = sorted({int(key[len(prefix) :].split(".")[0]) for key in state if key.startswith(prefix)})
    for i in layers:
        hf, oc = f"{prefix}{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            tower[f"{oc}attn.in_proj_{kind}"] = torch.cat([state[f"{hf}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for old, new in _HF_LAYER_RENAMES.items():
                tower[f"{oc}{new}.{kind}"] = state[f"{hf}{old}.{kind}"]
    return tower
