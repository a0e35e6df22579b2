"""Named base-model shapes: the released LLaMA sizes, ChatGLM-6B, and tiny configs for tests.

A preset is only a transformers config (no weights); `build_base_model` turns one into a model,
on the meta device when only parameter counts are wanted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel


def llama_ffn_size(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's rule for the SwiGLU hidden size (11008 for 7B, 22016 for 65B)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def llama_config(
    dim: int,
    layers: int,
    heads: int,
    *,
    kv_heads: int | None = None,
    ffn: int | None = None,
    vocab: int = 32000,
    eps: float = 1e-6,
    context: int = 2048,
    rope_theta: float = 10000.0,
) -> LlamaConfig:
    """A LLaMA-architecture config by its shape (FFN size by Meta's rule unless given); used by presets and benchmarks."""
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=ffn or llama_ffn_size(dim),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=context,
        rms_norm_eps=eps,
        rope_theta=rope_theta,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def _chatglm(**overrides) -> PretrainedConfig:
    """ChatGLM-6B v1 (defaults = the released config.json), through the Auto class it registers on import."""
    return AutoConfig.for_model("chatglm", **overrides)


BASE_PRESETS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama-7b": lambda: llama_config(4096, 32, 32),
    "llama-13b": lambda: llama_config(5120, 40, 40),
    "llama-33b": lambda: llama_config(6656, 60, 52),
    "llama-65b": lambda: llama_config(8192, 80, 64),
    "llama2-7b": lambda: llama_config(4096, 32, 32, eps=1e-5, context=4096),
    "llama2-13b": lambda: llama_config(5120, 40, 40, eps=1e-5, context=4096),
    "llama2-70b": lambda: llama_config(8192, 80, 64, kv_heads=8, ffn=28672, eps=1e-5, context=4096),
    # Tiny shapes for tests and examples (seconds on a CPU).
    "tiny-llama": lambda: llama_config(64, 4, 4, ffn=128, vocab=256, context=256),
    "tiny-llama-gqa": lambda: llama_config(64, 4, 4, kv_heads=2, ffn=128, vocab=256, context=256),
    "chatglm-6b": _chatglm,
    # The real 130528-row vocabulary, so the special ids ([gMASK] 130001, <sop> 130004, <eop> 130005) are real.
    "tiny-chatglm": lambda: _chatglm(hidden_size=64, num_layers=3, num_attention_heads=4, inner_hidden_size=256),
}

#: model_type -> causal-LM class; other backbones (ChatGLM-6B) add themselves on import.
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {"llama": LlamaForCausalLM}


def base_config(name: str) -> PretrainedConfig:
    if name not in BASE_PRESETS:
        raise ValueError(f"unknown base preset {name!r}; available: {', '.join(sorted(BASE_PRESETS))}")
    return BASE_PRESETS[name]()


def model_class_for(config: PretrainedConfig) -> type[PreTrainedModel]:
    if config.model_type not in MODEL_CLASSES:
        raise ValueError(f"unsupported model_type {config.model_type!r}; supported: {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[config.model_type]


def build_base_model(
    config: PretrainedConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """A randomly initialised base model; with device="meta" it allocates nothing."""
    with torch.device(device):
        model = model_class_for(config)(config)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
