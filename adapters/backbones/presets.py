"""Named base-model shapes: the released LLaMA 1/2/3, Mistral, Qwen2.5, Qwen3 and ChatGLM-6B sizes, and
tiny configs for tests.

A preset is only a transformers config (no weights); `build_base_model` turns one into a model,
on the meta device when only parameter counts are wanted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def llama_ffn_size(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's rule for the SwiGLU hidden size (11008 for 7B, 22016 for 65B)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def decoder_config(
    config_class: type[PretrainedConfig],
    dim: int,
    layers: int,
    heads: int,
    kv_heads: int,
    ffn: int,
    *,
    vocab: int,
    context: int,
    eps: float,
    rope_theta: float,
    rope_scaling: dict | None = None,
    **extra,
) -> PretrainedConfig:
    """A config of a Llama-style decoder family (Llama, Mistral, Qwen2, Qwen3 share these field names)."""
    return config_class(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        rms_norm_eps=eps,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, **(rope_scaling or {})},
        **extra,
    )


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
    rope_scaling: dict | None = None,
    **extra,
) -> LlamaConfig:
    """A LLaMA-architecture config by its shape (FFN size by Meta's rule unless given); used by presets and benchmarks.

    `extra` overrides other config fields (Llama 3's special ids); LLaMA 1/2's ids are the default."""
    return decoder_config(
        LlamaConfig,
        dim,
        layers,
        heads,
        kv_heads or heads,
        ffn or llama_ffn_size(dim),
        vocab=vocab,
        context=context,
        eps=eps,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        **{"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False, **extra},
    )


#: Llama 3.1's RoPE frequency scaling (`rope_scaling` of meta-llama/Llama-3.1-8B and -70B config.json).
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
#: The same rule for the tiny test model, with a 64-position original context so that its 8 frequency pairs
#: fall in all three bands (kept, smoothed, divided by the factor) at head size 16 and theta 500000.
TINY_LLAMA3_ROPE = {**LLAMA31_ROPE, "original_max_position_embeddings": 64}
#: Ids of the tiny test tokenizer (tests/helpers/tiny_tokenizer.py), for the tiny presets of every family.
_TINY_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def _tiny(config_class: type[PretrainedConfig], rope_theta: float, **extra) -> PretrainedConfig:
    """A 3-layer, 64-wide family config with grouped KV heads (4 query heads, 2 KV heads) for tests."""
    return decoder_config(
        config_class, 64, 3, 4, 2, 128, vocab=256, context=256, eps=1e-6, rope_theta=rope_theta, **_TINY_IDS, **extra
    )


def _chatglm(**overrides) -> PretrainedConfig:
    """ChatGLM-6B v1 (defaults = the released config.json), through the Auto class it registers on import."""
    return AutoConfig.for_model("chatglm", **overrides)


def _llama3(dim: int, layers: int, heads: int, ffn: int) -> LlamaConfig:
    """A Llama 3.1 size: 8 KV heads, the 128256-token vocabulary, RoPE theta 500000 with llama3 scaling."""
    return llama_config(
        dim,
        layers,
        heads,
        kv_heads=8,
        ffn=ffn,
        vocab=128256,
        eps=1e-5,
        context=131072,
        rope_theta=500000.0,
        rope_scaling=LLAMA31_ROPE,
        bos_token_id=128000,
        eos_token_id=128001,
        pad_token_id=None,
    )


BASE_PRESETS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama-7b": lambda: llama_config(4096, 32, 32),
    "llama-13b": lambda: llama_config(5120, 40, 40),
    "llama-33b": lambda: llama_config(6656, 60, 52),
    "llama-65b": lambda: llama_config(8192, 80, 64),
    "llama2-7b": lambda: llama_config(4096, 32, 32, eps=1e-5, context=4096),
    "llama2-13b": lambda: llama_config(5120, 40, 40, eps=1e-5, context=4096),
    "llama2-70b": lambda: llama_config(8192, 80, 64, kv_heads=8, ffn=28672, eps=1e-5, context=4096),
    # Llama 3.1 (meta-llama/Llama-3.1-8B, -70B config.json): vocab 128256, rope_theta 500000, rms_norm_eps 1e-5,
    # 131072 positions, LLAMA31_ROPE, bos 128000, eos 128001, untied. 8B: hidden 4096, 32 layers, 32 heads,
    # 8 KV heads, FFN 14336 (8,030,261,248 parameters); 70B: 8192, 80, 64, 8, 28672 (70,553,706,496).
    # Llama 3.0 has the same shapes with 8192 positions and no rope_scaling.
    "llama3-8b": lambda: _llama3(4096, 32, 32, 14336),
    "llama3-70b": lambda: _llama3(8192, 80, 64, 28672),
    # Mistral 7B v0.3 (mistralai/Mistral-7B-v0.3 config.json): hidden 4096, 32 layers, 32 heads, 8 KV heads,
    # FFN 14336, vocab 32768, rope_theta 1e6, rms_norm_eps 1e-5, 32768 positions, sliding_window null, untied
    # (7,248,023,552 parameters). v0.1 differs: vocab 32000, rope_theta 1e4, a 4096-token sliding window.
    "mistral-7b": lambda: decoder_config(
        MistralConfig,
        4096,
        32,
        32,
        8,
        14336,
        vocab=32768,
        context=32768,
        eps=1e-5,
        rope_theta=1e6,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    ),
    # Qwen2.5-7B (Qwen/Qwen2.5-7B config.json): hidden 3584, 28 layers, 28 heads, 4 KV heads, FFN 18944,
    # vocab 152064, rope_theta 1e6, rms_norm_eps 1e-6, 131072 positions, no sliding window, untied (the 0.5B-3B
    # sizes tie), q/k/v biases (7,615,616,512 parameters).
    "qwen2.5-7b": lambda: decoder_config(
        Qwen2Config,
        3584,
        28,
        28,
        4,
        18944,
        vocab=152064,
        context=131072,
        eps=1e-6,
        rope_theta=1e6,
        use_sliding_window=False,
        bos_token_id=151643,
        eos_token_id=151643,
        tie_word_embeddings=False,
    ),
    # Qwen3-8B (Qwen/Qwen3-8B config.json): hidden 4096, 36 layers, 32 heads, 8 KV heads, head_dim 128, FFN 12288,
    # vocab 151936, rope_theta 1e6, rms_norm_eps 1e-6, 40960 positions, untied (0.6B-4B tie), per-head q/k norms
    # (8,190,735,360 parameters).
    "qwen3-8b": lambda: decoder_config(
        Qwen3Config,
        4096,
        36,
        32,
        8,
        12288,
        vocab=151936,
        context=40960,
        eps=1e-6,
        rope_theta=1e6,
        head_dim=128,
        use_sliding_window=False,
        bos_token_id=151643,
        eos_token_id=151645,
        tie_word_embeddings=False,
    ),
    # Tiny shapes for tests and examples (seconds on a CPU).
    "tiny-llama": lambda: llama_config(64, 4, 4, ffn=128, vocab=256, context=256),
    "tiny-llama-gqa": lambda: llama_config(64, 4, 4, kv_heads=2, ffn=128, vocab=256, context=256),
    # One per family, each with what sets the family apart: Llama 3.1's RoPE scaling; Mistral's sliding window
    # (6, shorter than the test sequences, so it acts); Qwen2's q/k/v biases and tied embeddings (as the small
    # Qwen2.5 sizes); Qwen3's per-head q/k norms, tied embeddings and a head size that is not hidden / heads.
    "tiny-llama3": lambda: _tiny(LlamaConfig, 500000.0, rope_scaling=TINY_LLAMA3_ROPE, tie_word_embeddings=False),
    "tiny-mistral": lambda: _tiny(MistralConfig, 1e6, sliding_window=6, tie_word_embeddings=False),
    "tiny-qwen2": lambda: _tiny(Qwen2Config, 1e6, use_sliding_window=False, tie_word_embeddings=True),
    "tiny-qwen3": lambda: _tiny(Qwen3Config, 1e6, head_dim=32, use_sliding_window=False, tie_word_embeddings=True),
    "chatglm-6b": _chatglm,
    # The real 130528-row vocabulary, so the special ids ([gMASK] 130001, <sop> 130004, <eop> 130005) are real.
    "tiny-chatglm": lambda: _chatglm(hidden_size=64, num_layers=3, num_attention_heads=4, inner_hidden_size=256),
}

#: model_type -> causal-LM class of the tested backbones; other backbones (ChatGLM-6B) add themselves on import.
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
}


def is_preset(base: str | Path | None) -> bool:
    """Whether `base` names a preset. A folder of that name wins, as a local folder wins over a hub id in
    transformers: `./llama-7b` holding downloaded weights must not become the preset's random ones."""
    return base is not None and str(base) in BASE_PRESETS and not Path(base).is_dir()


def base_config(name: str) -> PretrainedConfig:
    if name not in BASE_PRESETS:
        raise ValueError(f"unknown base preset {name!r}; available: {', '.join(sorted(BASE_PRESETS))}")
    config = BASE_PRESETS[name]()
    config.name_or_path = name  # what an adapter attached to it records as its base (as a folder's path is)
    return config


def model_class_for(config: PretrainedConfig) -> type[PreTrainedModel]:
    """A tested backbone's class, else transformers' own causal LM for the model_type (never remote code), so
    other families load and each adapter method says what it would need from them."""
    if config.model_type in MODEL_CLASSES:
        return MODEL_CLASSES[config.model_type]
    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if class_name is None:
        raise ValueError(
            f"unsupported model_type {config.model_type!r}: not a transformers causal LM; "
            f"supported: {', '.join(sorted(MODEL_CLASSES))}"
        )
    return getattr(transformers, class_name)


def build_base_model(
    config: PretrainedConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """A randomly initialised base model; with device="meta" it allocates nothing."""
    with torch.device(device):
        model = model_class_for(config)(config)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
