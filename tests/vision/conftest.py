"""Fixtures for the vision tests: tiny CLIP towers and reference open_clip models (no downloads)."""

from __future__ import annotations

import open_clip
import pytest
import torch

from mmadapter.vision import FrozenCLIPEncoder, register_tiny_configs


@pytest.fixture
def tiny_clip():
    """Factory: a seeded random tiny frozen encoder (`mmadapter-tiny-vit`: 32 px, patch 8, 17 tokens x 32)."""

    def build(seed: int = 0, model_name: str = "mmadapter-tiny-vit", **kwargs) -> FrozenCLIPEncoder:
        return FrozenCLIPEncoder(model_name, seed=seed, **kwargs)

    return build


@pytest.fixture
def reference_clip():
    """Factory: a full open_clip CLIP model of a tiny architecture, random weights from `seed`, in eval mode."""

    def build(seed: int = 1, model_name: str = "mmadapter-tiny-vit", quick_gelu: bool = False):
        register_tiny_configs()
        torch.manual_seed(seed)
        return open_clip.create_model(model_name, force_quick_gelu=quick_gelu).eval()

    return build
