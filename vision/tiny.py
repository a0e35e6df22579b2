"""Tiny vision towers for tests and the embedded demo, registered with open_clip (and timm) on request.

Two kinds, as real downloads come: open_clip's own ViT (`mmadapter-tiny-vit`, `mmadapter-tiny-vit-64`, CLIP
layout with a class token) and a SigLIP-style tower (`mmadapter-tiny-siglip`): open_clip builds every SigLIP
vision tower in its registry from a timm ViT named in the config (`timm_model_name`, no class token,
attention-pool head `attn_pool`), and a timm name fixes the width, so the tiny SigLIP needs a tiny timm
architecture of its own, `mmadapter_tiny_vit_siglip_32`, registered here under a prefix no timm model uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip
import timm
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

__all__ = [
    "TINY_CONFIG_DIR",
    "TINY_MODELS",
    "TINY_PREPROCESS",
    "TINY_TIMM_SIGLIP",
    "mmadapter_tiny_vit_siglip_32",
    "register_tiny_configs",
]

TINY_CONFIG_DIR = Path(__file__).parent / "model_configs"
#: Tiny open_clip architectures (2 layers, width 64, patch 8): CLIP at 32 and 64 px, SigLIP at 32 px.
TINY_MODELS = ("mmadapter-tiny-vit", "mmadapter-tiny-vit-64", "mmadapter-tiny-siglip")
#: The tiny timm trunk of `mmadapter-tiny-siglip`: SigLIP's layout (no class token, "map" pooling) at width 64.
TINY_TIMM_SIGLIP = "mmadapter_tiny_vit_siglip_32"
#: Preprocessing the tiny architectures were "trained" with: open_clip keeps it with a pretrained tag, which a
#: tiny architecture has none of, so SigLIP's normalisation (mean = std = 0.5, squash resize) is stated here.
TINY_PREPROCESS: dict[str, dict[str, Any]] = {
    "mmadapter-tiny-siglip": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "resize_mode": "squash"},
}


def mmadapter_tiny_vit_siglip_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The timm entry point of the tiny SigLIP trunk: `timm.create_model` passes its pretrained-config arguments, which a random tower ignores."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    if pretrained:
        raise ValueError(f"{TINY_TIMM_SIGLIP} is a test architecture; it has no pretrained weights")
    shape = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0}
    return VisionTransformer(**{**shape, "class_token": False, "global_pool": "map", **kwargs})


def register_tiny_configs() -> tuple[str, ...]:
    """Make the tiny architectures known to open_clip and timm (idempotent), e.g. for `open_clip.create_model`."""
    if not timm.is_model(TINY_TIMM_SIGLIP):
        register_model(mmadapter_tiny_vit_siglip_32)  # registered under its function name
    if not set(TINY_MODELS) <= set(open_clip.list_models()):
        open_clip.add_model_config(TINY_CONFIG_DIR)
    return TINY_MODELS
