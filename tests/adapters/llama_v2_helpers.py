"""Tiny LLaMA-Adapter V2 setups shared by the V2 test files."""

from __future__ import annotations

import torch

from mmadapter.adapters import make_config, trainable_parameters

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
IDS = torch.tensor([[5, 17, 42, 9, 100, 3, 77, 12], [8, 8, 61, 200, 4, 33, 19, 250]])


def tiny_v2_config(preset: str | None = None, **overrides):
    return make_config("llama-adapter-v2", preset, **{**TINY_VISION, **overrides})


def left_padded(ids: torch.Tensor = IDS, pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0 keeps all tokens; row 1 is left-padded by `pad` positions."""
    ids = ids.clone()
    mask = torch.ones_like(ids)
    ids[1, :pad] = 0
    mask[1, :pad] = 0
    return ids, mask


def pixels(batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def randomize_adapter(model, seed: int = 1) -> None:
    """Move every adapter term away from its identity init, as training would."""
    generator = torch.Generator().manual_seed(seed)

    def noise(param, scale):
        return scale * torch.randn(param.shape, generator=generator)

    with torch.no_grad():
        for name, param in trainable_parameters(model).items():
            if name.endswith("adapter_gate"):
                param.copy_(noise(param, 0.8))
            elif name.endswith(("adapter_bias", "lora_B.default.weight")):
                param.copy_(noise(param, 0.1))
            elif name.endswith(("adapter_scale", "layernorm.weight", "model.norm.weight")):
                param.copy_(1 + noise(param, 0.2))
