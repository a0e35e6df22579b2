"""Tiny LLaMA-Adapter V2 configurations and images shared by the V2 test files."""

from __future__ import annotations

import torch

from mmadapter.adapters import make_config
from mmadapter.adapters.methods.bias_scale import LINEAR_PATHS
from tests.helpers.llama_reference import Terms

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


def reference_terms(model, scale_side: str = "input") -> Terms:
    """The bias/scale/LoRA tensors of an adapter with all of them on every linear (EVERYTHING), under the
    reference's (layer, Meta name) keys."""
    terms = Terms(scale_side=scale_side)
    for n, layer in enumerate(model.get_decoder().layers):
        for short, meta in META_NAMES.items():
            module = layer.get_submodule(LINEAR_PATHS[short])
            linear = module.base_layer
            terms.bias[(n, meta)] = linear.adapter_bias.detach().double()
            terms.scale[(n, meta)] = linear.adapter_scale.detach().double()
            terms.lora[(n, meta)] = (module.lora_A.default.weight.double(), module.lora_B.default.weight.double())
    return terms
