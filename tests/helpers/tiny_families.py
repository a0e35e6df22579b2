"""Seeded tiny models of each Llama-style family (the `tiny-<family>` presets), with the parts that make a family
differ made to matter: random norm weights (RMSNorm and Qwen3's q/k norms) and biases (Qwen2's q/k/v), which
transformers initialises to exactly one and zero."""

from __future__ import annotations

from pathlib import Path

import torch

from mmadapter.adapters.backbones.presets import base_config, build_base_model

#: Family -> its tiny preset (tests/adapters/test_families.py runs every method on each).
FAMILY_PRESETS = {
    "llama3": "tiny-llama3",
    "mistral": "tiny-mistral",
    "qwen2": "tiny-qwen2",
    "qwen3": "tiny-qwen3",
}
#: Small enough that a tiny model is saved in several safetensors shards, as real checkpoints are.
SHARD_SIZE = "100KB"


def build_tiny_family(family: str, seed: int = 0, attn: str = "sdpa"):
    """The family's tiny preset with seeded random weights (norms around one, biases around zero), frozen."""
    torch.manual_seed(seed)
    model = build_base_model(base_config(FAMILY_PRESETS[family]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.2 * torch.randn_like(param))
    model.set_attn_implementation(attn)
    return model.requires_grad_(False)


def save_sharded(model, folder: Path) -> Path:
    """A local Hugging Face folder: config.json, sharded safetensors and their index."""
    model.save_pretrained(folder, max_shard_size=SHARD_SIZE)
    return folder
