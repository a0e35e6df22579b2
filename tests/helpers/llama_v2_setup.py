"""Tiny LLaMA-Adapter V2 configurations and images shared by the V2 test files."""

from __future__ import annotations

import torch

from mmadapter.adapters import make_config

ALL_LINEARS = ["q", "k", "v", "o", "gate", "up", "down"]
#: Short linear name -> the reference's Meta-style name.
META_NAMES = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w1", "up": "w3", "down": "w2"}
#: A 2-block projector of width 32 over the tiny CLIP (32 px, 17 tokens of width 32), K = 3.
TINY_VISION = {
    "clip_model": "mmadapter-tiny-vit",
    "visual_width": 32,
    "visual_depth": 2,
    "visual_heads": 4,
    "prompt_length": 3,
}
#: Every V2 feature at once: prompts + visual prompt, bias and scale on all linears, LoRA.
EVERYTHING = {
    "bias_linears": ALL_LINEARS,
    "scale_linears": ALL_LINEARS,
    "lora_rank": 4,
    "instruction_trains": ["bias", "scale", "norms", "lora"],
}


def tiny_v2_config(preset: str | None = None, **overrides):
    return make_config("llama-adapter-v2", preset, **{**TINY_VISION, **overrides})


def pixels(batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
