"""LLaMA-Adapter V1: learnable prompts with zero-init gated attention in the top layers.

Zhang et al., "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init
Attention", arXiv:2303.16199. The math is in `mmadapter.adapters.methods.prompt_attention`; this module
decides where prompts go (the last L of N decoder layers) and what trains (prompts and gates).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from mmadapter.adapters.methods.base import AdapterConfig, AdapterMethod, register_method
from mmadapter.adapters.methods.prompt_attention import add_gated_prompt, check_prompt_support, use_prompt_attention
from mmadapter.core.config import Bool, Int


@dataclasses.dataclass
class LlamaAdapterV1Config(AdapterConfig):
    method = "llama-adapter-v1"

    prompt_length: Int = 10
    """K: prompt vectors per adapted layer (official default 10)."""
    adapted_layers: Int = 30
    """L: how many of the top decoder layers get prompts (official default 30 of 32)."""
    gate_tanh: Bool = True
    """Apply tanh to the gates as the official training code does; False matches its `example.py`."""

    def __post_init__(self) -> None:
        for field in ("prompt_length", "adapted_layers"):
            if getattr(self, field) < 1:
                raise ValueError(f"{self.method}: {field} must be at least 1, got {getattr(self, field)}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a transformers causal LM (or of a model exposing `get_decoder`)."""
    return model.get_decoder().layers


def adapted_layer_indices(num_layers: int, adapted_layers: int) -> range:
    """Top-L layers: for N = 32, L = 30 these are blocks 2 … 31, prompt i going to block N - L + i."""
    if adapted_layers > num_layers:
        raise ValueError(
            f"adapted_layers={adapted_layers} but the base model has only {num_layers} layers; "
            f"set adapted_layers between 1 and {num_layers} (the official recipes adapt the top 30 of LLaMA-7B's 32)"
        )
    return range(num_layers - adapted_layers, num_layers)


@register_method
class LlamaAdapterV1(AdapterMethod):
    name = "llama-adapter-v1"
    config_class = LlamaAdapterV1Config
    presets = {"alpaca": {"prompt_length": 10, "adapted_layers": 30}}

    @classmethod
    def attach(cls, model: nn.Module, config: LlamaAdapterV1Config) -> None:
        check_prompt_support(model, cls.name)
        layers = decoder_layers(model)
        for index in adapted_layer_indices(len(layers), config.adapted_layers):
            add_gated_prompt(layers[index].self_attn, config.prompt_length, gate_tanh=config.gate_tanh)
        use_prompt_attention(model)

    @classmethod
    def is_trainable(cls, name: str, config: LlamaAdapterV1Config, stage: str | None = None) -> bool:
        return name.endswith((".adapter_prompt", ".adapter_gate"))
