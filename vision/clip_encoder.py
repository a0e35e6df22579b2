"""Frozen image encoder (an open_clip vision tower, CLIP or SigLIP) returning every token, as LLaMA-Adapter V2 uses it.

Spec: `specs/llama-adapter.md` §3.1-3.2. The official multimodal model runs CLIP ViT-L/14's vision
tower by hand (`clip_encode_image`): patchify, prepend the class token, add positions, `ln_pre`, the
transformer, then `ln_post` on ALL tokens and the visual projection on all tokens, giving
(B, 257, 768). open_clip only exposes the pooled feature after `proj`, so `mmadapter.vision.towers`
writes those few lines out, and defines the same sequence for SigLIP's timm towers (pooled image
embedding first, then the patch tokens); tests check position 0 against open_clip's image embedding.
Preprocessing (size, mean/std, resize mode) comes from the tower's own open_clip config.

Only the vision tower is built (the text tower never exists, as in the official code's
`del clip.transformer`). Trap (`specs/ecosystem-notes.md` §6): OpenAI's weights were trained with
QuickGELU, and nothing in a weights file says so; loading them into a GELU tower silently gives
wrong features. `quick_gelu=None` turns QuickGELU on when the architecture config, the open_clip tag,
a transformers `config.json` (`hidden_act`) or the file format (OpenAI's TorchScript release) says
so; pass `quick_gelu=True` for OpenAI weights stored any other way.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any

import open_clip
import timm
import torch
from open_clip.model import _build_vision_tower
from open_clip.timm_model import TimmModel
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
from PIL import Image
from torch import nn

from mmadapter.core.files import atomic_save_tensors, atomic_write_bytes, file_sha256
from mmadapter.core.state_dicts import check_fits
from mmadapter.vision.tiny import TINY_MODELS, TINY_PREPROCESS, register_tiny_configs
from mmadapter.vision.towers import SUPPORTED, tower_tokens, tower_width, unsupported_reason
from mmadapter.vision.transforms import clip_transform
from mmadapter.vision.weights import (
    HF_CLIP_MARKER,
    find_weights_file,
    hf_clip_to_open_clip_visual,
    is_torchscript_archive,
    read_state_dict,
)

logger = logging.getLogger(__name__)

#: Written by `FrozenCLIPEncoder.save`; open_clip's `local-dir:` layout uses the same file names.
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def _architecture_config(model_name: str) -> dict[str, Any]:
    if model_name in TINY_MODELS:
        register_tiny_configs()
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"unknown open_clip architecture {model_name!r}; see open_clip.list_models()")
    return config


def _architecture_preprocess(model_name: str) -> dict[str, Any]:
    """The preprocessing an architecture's weights were trained with, when only its name is known.

    open_clip keeps mean/std/resize mode per pretrained tag, not per architecture; when all of an
    architecture's tags agree (every SigLIP: mean = std = 0.5, squash) that is the architecture's. Loading a
    SigLIP weights file with CLIP's constants would silently shift every feature.
    """
    defaults = asdict(PreprocessCfg())
    if model_name in TINY_PREPROCESS:
        return merge_preprocess_dict(defaults, TINY_PREPROCESS[model_name])
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    candidates = [merge_preprocess_dict(defaults, open_clip.get_pretrained_cfg(model_name, tag)) for tag in tags]
    if candidates and all(candidate == candidates[0] for candidate in candidates):
        return candidates[0]
    if candidates:  # e.g. ViT-L-14: OpenAI's and most tags use CLIP's constants, laion2b_s32b_b82k uses 0.5
        logger.info(
            "%s: its open_clip tags (%s) preprocess differently; using CLIP's mean/std. Point pretrained at a "
            "folder with open_clip_config.json, or give the tag name, to use the weights' own preprocessing",
            model_name,
            ", ".join(tags),
        )
    return defaults


class _Source:
    """Where an encoder's architecture, preprocessing and weights come from, and whether QuickGELU is implied."""

    def __init__(self, model_name: str, pretrained: str | Path | None, cache_dir: str | None, fetch: bool) -> None:
        self.name = model_name
        self.origin = f"open_clip architecture {model_name}"  # where the architecture came from, for errors
        self.preprocess = asdict(PreprocessCfg())
        self.weights: Path | None = None
        self.quick_gelu_hint: str | None = None  # why QuickGELU is needed, if something says so
        path = None if pretrained is None else Path(pretrained).expanduser()
        if path is not None and (path / CONFIG_FILE).is_file():
            self._read_open_clip_folder(path)
        elif path is not None and path.exists():
            self._read_local_weights(path)
        elif pretrained is not None:
            self._read_tag(str(pretrained), cache_dir, fetch)
        else:
            self.config = _architecture_config(model_name)
            self.preprocess = _architecture_preprocess(model_name)
        if self.config.get("quick_gelu"):
            self.quick_gelu_hint = f"architecture config {self.name} sets quick_gelu"
        elif self.weights is not None and not self.quick_gelu_hint and is_torchscript_archive(self.weights):
            self.quick_gelu_hint = f"{self.weights} is a TorchScript archive, the format of OpenAI's CLIP release"

    def _read_open_clip_folder(self, path: Path) -> None:
        """open_clip's `local-dir` layout: a Hugging Face open_clip download (timm/ViT-B-16-SigLIP, laion/...)
        or a folder written by `FrozenCLIPEncoder.save`. Downloads name no architecture; the folder's name
        stands in for it."""
        try:
            document = json.loads((path / CONFIG_FILE).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path / CONFIG_FILE}: not valid JSON ({error})") from error
        self.config = document.get("model_cfg", document) if isinstance(document, dict) else None
        if not isinstance(self.config, dict) or not isinstance(self.config.get("vision_cfg"), dict):
            raise ValueError(f"{path / CONFIG_FILE}: no model_cfg.vision_cfg; is this an open_clip model folder?")
        self.name = document.get("model_name") or path.resolve().name
        self.origin = f"{self.name} ({path / CONFIG_FILE})"
        self.preprocess = merge_preprocess_dict(self.preprocess, document.get("preprocess_cfg", {}))
        self.weights = find_weights_file(path)

    def _read_local_weights(self, path: Path) -> None:
        """A weights file, or a folder with one (e.g. a transformers CLIP folder, whose config names the activation)."""
        self.config = _architecture_config(self.name)
        self.preprocess = _architecture_preprocess(self.name)
        self.weights = find_weights_file(path) if path.is_dir() else path
        if path.is_dir() and (path / "config.json").is_file():
            hf_config = json.loads((path / "config.json").read_text())
            if hf_config.get("vision_config", hf_config).get("hidden_act") == "quick_gelu":
                self.quick_gelu_hint = f"{path / 'config.json'} sets hidden_act quick_gelu"

    def _read_tag(self, tag_name: str, cache_dir: str | None, fetch: bool) -> None:
        self.config = _architecture_config(self.name)
        tag = open_clip.get_pretrained_cfg(self.name, tag_name)
        if not tag:
            tags = open_clip.list_pretrained_tags_by_model(self.name)
            raise FileNotFoundError(
                f"{tag_name}: no such weights file or folder, and not an open_clip pretrained tag "
                f"for {self.name} (tags: {', '.join(tags) or 'none'})"
            )
        if fetch:  # on the meta device a tag only contributes its settings; nothing is downloaded
            self.weights = Path(open_clip.download_pretrained(tag, cache_dir=cache_dir))
        self.preprocess = merge_preprocess_dict(self.preprocess, tag)
        if tag.get("quick_gelu"):
            self.quick_gelu_hint = f"open_clip tag {self.name}/{tag_name} was trained with QuickGELU"


def _visual_state(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The vision tower's tensors of a full CLIP state dict (`visual.` keys), of a transformers CLIP
    checkpoint (converted), or of a tower-only state dict (as is)."""
    if HF_CLIP_MARKER in state:
        return hf_clip_to_open_clip_visual(state, source)
    if any(key.startswith("visual.") for key in state):
        return {key.removeprefix("visual."): t for key, t in state.items() if key.startswith("visual.")}
    return state


def _build_on_meta(source: _Source, build: Callable[[], nn.Module]) -> nn.Module:
    """The tower's shapes, or an error naming the config and what to do when open_clip cannot build it."""
    timm_name = source.config["vision_cfg"].get("timm_model_name")
    if timm_name and timm_name.startswith("mmadapter_"):
        register_tiny_configs()
    if timm_name and not timm.is_model(timm_name):
        raise ValueError(
            f"{source.origin}: its vision tower is the timm model {timm_name!r}, which timm "
            f"{timm.__version__} does not have; upgrade timm and open_clip_torch, or use a tower this version "
            "knows (timm.list_models('*siglip*'))"
        )
    try:
        with torch.device("meta"):
            visual = build()
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as error:
        raise ValueError(
            f"{source.origin}: open_clip {open_clip.__version__} cannot build its vision tower "
            f"({type(error).__name__}: {error}); check vision_cfg against open_clip's model_configs, or upgrade "
            "open_clip_torch and timm"
        ) from error
    reason = unsupported_reason(visual)
    if reason is not None:
        raise ValueError(f"{source.origin}: {reason}; {SUPPORTED}")
    return visual


class FrozenCLIPEncoder(nn.Module):
    """An open_clip vision tower (CLIP or SigLIP ViT), frozen: `forward(pixels (B, 3, H, W)) -> (B, 1 + patches,
    output_dim)`, the pooled image embedding first, then every patch token (`mmadapter.vision.towers`).

    `pretrained`: None (random init from `seed`), a weights file (safetensors, `torch.save` state dict
    of a full open_clip model or of the vision tower alone, OpenAI's TorchScript `.pt`, a transformers
    `CLIPModel`, a timm SigLIP trunk), a folder (with `open_clip_config.json`: an open_clip download such
    as timm/ViT-B-16-SigLIP or laion/CLIP-ViT-B-32-laion2B-s34B-b79K, or a folder written by `save`; or a
    transformers CLIP folder; or any folder with one weights file), or an open_clip pretrained tag (needs
    a reachable hub). `device="meta"` builds the shapes only (for parameter counts) and loads nothing.

    The module stays in eval mode and its parameters never require grad, whatever a parent module
    calls; `forward` runs without autograd, so no gradient can reach CLIP.
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14",
        pretrained: str | Path | None = None,
        *,
        quick_gelu: bool | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        device = torch.device(device)
        source = _Source(model_name, pretrained, cache_dir, fetch=device.type != "meta")
        if quick_gelu is None:
            quick_gelu = source.quick_gelu_hint is not None
            if quick_gelu:
                logger.info("QuickGELU on: %s", source.quick_gelu_hint)
        elif not quick_gelu and source.quick_gelu_hint:
            warnings.warn(
                f"quick_gelu=False but {source.quick_gelu_hint}: CLIP features will be wrong", UserWarning, stacklevel=2
            )
        self.model_name = source.name
        self.pretrained = None if pretrained is None else str(pretrained)
        self.weights_path = source.weights
        self.quick_gelu = quick_gelu
        self.seed = seed
        self.architecture = {**source.config, "quick_gelu": quick_gelu}
        self.visual = self._build(source, quick_gelu, device, dtype)
        self.visual.requires_grad_(False)
        preprocess = merge_preprocess_dict(source.preprocess, {"size": self.visual.image_size})
        #: open_clip preprocessing fields; sequences as tuples, whether they came from code or JSON.
        self.preprocess_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in preprocess.items()}
        super().train(False)

    def _build(self, source: _Source, quick_gelu: bool, device: torch.device, dtype: torch.dtype) -> nn.Module:
        config = source.config
        vision_cfg = {**config["vision_cfg"], "timm_model_pretrained": False}

        def build() -> nn.Module:
            # cast_dtype=None: open_clip's LayerNorm runs in the weights' dtype; its LayerNormFp32 (chosen for
            # bf16/fp16) fails once `.to(dtype)` makes its weights low precision ("mixed dtype").
            return _build_vision_tower(config["embed_dim"], vision_cfg, quick_gelu, None)

        visual = _build_on_meta(source, build)
        probe = tower_tokens(visual, torch.empty(1, 3, *visual.image_size, device="meta"))
        self.num_tokens, self.output_dim = probe.shape[1:]
        if device.type == "meta":
            return visual.to(dtype=dtype)
        if self.weights_path is None:  # built on the CPU generator alone: the same weights on every machine
            with torch.random.fork_rng(devices=[]), torch.device("cpu"):
                torch.default_generator.manual_seed(self.seed)
                return build().to(device=device, dtype=dtype)
        state = _visual_state(read_state_dict(self.weights_path), str(self.weights_path))
        if isinstance(visual, TimmModel) and not any(key.startswith("trunk.") for key in state):
            state = {f"trunk.{key}": tensor for key, tensor in state.items()}  # a timm checkpoint of the trunk alone
        advice = "another tower's weights? name its architecture (the adapter's clip_model option; convert clip-tower --clip-model), or give the folder with its config"
        check_fits(visual, state, f"{self.weights_path}: weights do not fit {self.model_name}", advice)
        visual.load_state_dict(state, strict=True, assign=True)
        return visual.to(device=device, dtype=dtype)

    # --- frozen behaviour -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FrozenCLIPEncoder:
        """Ignores `mode`: a parent's `.train()` must not switch on CLIP's (patch) dropout."""
        return super().train(False)

    def requires_grad_(self, requires_grad: bool = True) -> FrozenCLIPEncoder:
        """Ignores `requires_grad`: CLIP stays frozen (and `forward` runs without autograd anyway)."""
        return super().requires_grad_(False)

    # --- description ------------------------------------------------------------------------------
    num_tokens: int
    """The pooled token plus one token per patch (257 for ViT-L/14 at 224 px, 197 for SigLIP B/16 at 224 px)."""
    output_dim: int
    """Width of every token: CLIP's projection width, SigLIP's tower width; the projector's input width."""

    @property
    def width(self) -> int:
        """The transformer's width (before the projection)."""
        return tower_width(self.visual)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.visual.image_size)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.visual.parameters()).device

    @cached_property
    def identity(self) -> str:
        """Architecture, activation and weights (file sha256, random seed, or the tag of a meta build)."""
        if self.weights_path is None:
            weights = f"random-init:seed={self.seed}" if self.pretrained is None else f"tag:{self.pretrained}"
        else:
            weights = f"sha256:{file_sha256(self.weights_path)}"
        return f"{self.model_name};quick_gelu={int(self.quick_gelu)};{weights}"

    # --- use --------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """The pooled image embedding, then every patch token, each after the tower's final norm and projection:
        (B, num_tokens, output_dim), in `self.dtype`. For CLIP this is the official `clip_encode_image`."""
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, *self.image_size):
            raise ValueError(
                f"expected pixels of shape (B, 3, {self.image_size[0]}, {self.image_size[1]}), "
                f"got {tuple(pixels.shape)}"
            )
        return tower_tokens(self.visual, pixels.to(device=self.device, dtype=self.dtype))

    def zero_image_features(self) -> torch.Tensor:
        """Tokens (1, num_tokens, output_dim) of the all-zero image that text-only samples see in the released
        training. The tower is frozen, so they are computed once per weights, device and dtype, not per batch."""
        weight = next(self.visual.parameters())
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype)
        cached = getattr(self, "_zero_image_cache", None)
        if cached is None or cached[0] != key:
            pixels = torch.zeros(1, 3, *self.image_size, device=self.device, dtype=self.dtype)
            self._zero_image_cache = (key, self(pixels))
        return self._zero_image_cache[1]

    def transform(self, train: bool = False) -> Callable[[Image.Image], torch.Tensor]:
        """This model's preprocessing: eval (resize, center crop) or train (random resized crop)."""
        return clip_transform(self.preprocess_cfg, train=train)

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Token features of RGB PIL images (loaded with `mmadapter.vision.load_image`)."""
        transform = self.transform()
        return self(torch.stack([transform(image) for image in images]))

    def save(self, directory: str | Path) -> Path:
        """Write the vision tower as `open_clip_config.json` + safetensors; load with `pretrained=directory`.

        Converting OpenAI's TorchScript file once gives a smaller, faster-loading, code-free copy.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {f"visual.{key}": tensor for key, tensor in self.visual.state_dict().items()}
        atomic_save_tensors(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})
        document = {
            "model_name": self.model_name,
            "model_cfg": self.architecture,
            "preprocess_cfg": self.preprocess_cfg,
        }
        atomic_write_bytes(directory / CONFIG_FILE, (json.dumps(document, indent=2) + "\n").encode())
        return directory
