"""P-Tuning v2 (deep prefix tuning) for ChatGLM-6B and LLaMA.

Liu et al., "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across Scales
and Tasks", arXiv:2110.07602; ChatGLM-6B's official recipe (spec chatglm-6b-ptuning-v2 §5). Only the
prefix encoder trains. ChatGLM-6B hosts it where the official model does (`transformer.prefix_encoder`,
so parameter names equal the official checkpoint keys) and applies it itself (mask/positions as §5.3);
LLaMA gets it through the transformers cache (`mmadapter.adapters.methods.prefix_cache`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mmadapter.adapters.backbones.presets import MODEL_CLASSES
from mmadapter.adapters.methods.base import AdapterConfig, AdapterMethod, register_method
from mmadapter.adapters.methods.prefix_cache import attach_prefix_to_decoder
from mmadapter.adapters.methods.prefix_encoder import PrefixEncoder
from mmadapter.core.config import Bool, Float, Int

#: Module name of the encoder; every trainable parameter of this method lives under it.
ENCODER_NAME = "prefix_encoder"


@dataclasses.dataclass
class PTuningV2Config(AdapterConfig):
    method = "ptuning-v2"

    pre_seq_len: Int = 128
    """P: prefix key/value slots per layer (128 in the official ADGEN recipe)."""
    prefix_projection: Bool = False
    """Produce the prefix with a 2-layer tanh MLP (prefix tuning); False is P-Tuning v2 proper."""
    prefix_hidden_size: Int | None = None
    """Width of that MLP's hidden layer; None = the model's hidden size, as official."""
    prefix_dropout: Float = 0.1
    """Dropout on the prefix in training (official 0.1)."""

    def __post_init__(self) -> None:
        if self.pre_seq_len < 1:
            raise ValueError(f"ptuning-v2: pre_seq_len must be at least 1, got {self.pre_seq_len}")
        if not 0.0 <= self.prefix_dropout < 1.0:
            raise ValueError(f"ptuning-v2: prefix_dropout must be in [0, 1), got {self.prefix_dropout}")
        if self.prefix_hidden_size is not None and not self.prefix_projection:
            raise ValueError("ptuning-v2: prefix_hidden_size only applies with prefix_projection=True")


def prefix_geometry(config) -> dict[str, int]:
    """Layers, key/value heads, head size and hidden size of a base config (ChatGLM's maps onto LLaMA's names)."""
    heads = config.num_attention_heads
    return {
        "num_layers": config.num_hidden_layers,
        # Grouped-query attention caches only the key/value heads (as peft's prefix tuning does).
        "num_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "hidden_size": config.hidden_size,
    }


def build_prefix_encoder(model_config, config: PTuningV2Config, device: torch.device | str = "cpu") -> PrefixEncoder:
    """A fp32 encoder (official: `prefix_encoder.float()` beside a half-precision base) for this base."""
    geometry = prefix_geometry(model_config)
    with torch.device(device):
        return PrefixEncoder(
            config.pre_seq_len,
            geometry["num_layers"],
            geometry["num_heads"],
            geometry["head_dim"],
            prefix_projection=config.prefix_projection,
            hidden_size=geometry["hidden_size"],
            prefix_hidden_size=config.prefix_hidden_size,
            dropout=config.prefix_dropout,
        ).float()


def check_prefix_support(model: nn.Module) -> None:
    """Refuse, naming what is missing, a model whose decoder cannot take prefixes through the KV cache."""
    if not isinstance(getattr(model.get_decoder(), "layers", None), nn.ModuleList):
        raise ValueError(
            f"model_type {model.config.model_type!r}: ptuning-v2 needs a transformers decoder with its blocks in "
            f"`get_decoder().layers`, reading past_key_values as a Cache; supported: {', '.join(sorted(MODEL_CLASSES))}"
        )


def prefix_encoder_of(model: nn.Module) -> PrefixEncoder:
    """The attached encoder, wherever the architecture hosts it."""
    for name, module in model.named_modules():
        if isinstance(module, PrefixEncoder) and name.rsplit(".", 1)[-1] == ENCODER_NAME:
            return module
    raise ValueError("this model has no P-Tuning v2 prefix encoder attached")


@register_method
class PTuningV2(AdapterMethod):
    name = "ptuning-v2"
    config_class = PTuningV2Config
    presets = {
        # ptuning/train.sh (ADGEN): PRE_SEQ_LEN=128, no projection.
        "adgen": {"pre_seq_len": 128, "prefix_projection": False},
        # The prefix-tuning reparametrisation the official code offers with --prefix_projection.
        "adgen-projection": {"pre_seq_len": 128, "prefix_projection": True},
    }

    @classmethod
    def attach(cls, model: nn.Module, config: PTuningV2Config) -> None:
        chatglm = model.config.model_type == "chatglm"
        if not chatglm:
            check_prefix_support(model)
        device = next(model.parameters()).device
        # Follow the model's mode: a fresh module is in training mode, which would apply dropout in eval.
        encoder = build_prefix_encoder(model.config, config, device).train(model.training)
        if chatglm:
            # The ChatGLM backbone calls `transformer.prefix_encoder(batch)` itself and owns mask/positions.
            model.transformer.prefix_encoder = encoder
        else:
            attach_prefix_to_decoder(model.get_decoder(), encoder)

    @classmethod
    def is_trainable(cls, name: str, config: PTuningV2Config, stage: str | None = None) -> bool:
        return name.startswith(f"{ENCODER_NAME}.") or f".{ENCODER_NAME}." in name
