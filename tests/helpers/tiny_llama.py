"""A seeded tiny LLaMA built in-process (no downloads) and the token batch the adapter tests feed it."""

from __future__ import annotations

import torch

from mmadapter.adapters.backbones.presets import base_config, build_base_model

IDS = torch.tensor([[5, 17, 42, 9, 100, 3, 77, 12], [8, 8, 61, 200, 4, 33, 19, 250]])


def build_tiny_llama(gqa: bool = False, attn: str = "sdpa", dtype: torch.dtype | None = None, seed: int = 0):
    """The `tiny-llama` (or `tiny-llama-gqa`) preset with seeded random weights, frozen."""
    torch.manual_seed(seed)
    model = build_base_model(base_config("tiny-llama-gqa" if gqa else "tiny-llama"), dtype=dtype)
    model.set_attn_implementation(attn)
    return model.requires_grad_(False)


def left_padded(ids: torch.Tensor = IDS, pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0 keeps all tokens; row 1 is left-padded by `pad` positions."""
    ids = ids.clone()
    mask = torch.ones_like(ids)
    ids[1, :pad] = 0
    mask[1, :pad] = 0
    return ids, mask
