"""ChatGLM-6B (first generation) configuration, read from the official `config.json` without remote code.

Field names and defaults are those of the released `THUDM/chatglm-6b` config.json (spec §1), not the
class defaults of the 2023 `configuration_chatglm.py` (which still carry the pre-"slim" 150528 vocab).
ChatGLM2/ChatGLM3 also say `model_type: "chatglm"` but are a different architecture (spec §7.2);
loading one of their folders fails here, naming the fields that give it away.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from transformers import PretrainedConfig

#: config.json fields that only ChatGLM2/ChatGLM3 (and GLM-4) configs have -> what they mean.
NEWER_GENERATION_FIELDS: dict[str, str] = {
    "multi_query_attention": "multi-query/grouped KV heads (v1 uses full multi-head attention)",
    "multi_query_group_num": "number of KV groups (v1 has none)",
    "padded_vocab_size": "padded 65024-row vocabulary (v1: vocab_size 130528)",
    "ffn_hidden_size": "SwiGLU MLP width (v1: inner_hidden_size, GELU MLP)",
    "kv_channels": "separate KV head width (v1: hidden_size / num_attention_heads)",
    "rmsnorm": "RMSNorm (v1: LayerNorm with bias)",
    "seq_length": "context length field of v2/v3 (v1: max_sequence_length)",
    "rope_ratio": "scaled RoPE base (v1: fixed 2-D RoPE, base 10000)",
    "add_qkv_bias": "bias only on QKV (v1: bias on every linear)",
    "apply_residual_connection_post_layernorm": "standard pre-LN residual switch (v1: alpha-scaled DeepNorm residual)",
    "post_layer_norm": "final RMSNorm switch of v2/v3",
    "original_rope": "1-D interleaved RoPE switch of v2/v3 (v1: 2-D rotate-half RoPE)",
}


class ChatGLMConfig(PretrainedConfig):
    """Shape and special-token ids of ChatGLM-6B v1; unknown keys of config.json are kept as attributes."""

    model_type: ClassVar[str] = "chatglm"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]
    attribute_map: ClassVar[dict[str, str]] = {
        "num_hidden_layers": "num_layers",
        "intermediate_size": "inner_hidden_size",
        "max_position_embeddings": "max_sequence_length",
        "layer_norm_eps": "layernorm_epsilon",
    }

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    bos_token_id: int | None = 130004
    eos_token_id: int | list[int] | None = 130005
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    pad_token_id: int | None = 3
    use_cache: bool = True
    # The released config leaves this unset, which meant True under transformers 4.x: the head is tied.
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    # The official quirk: `modeling_chatglm.py` builds `GLMBlock(..., num_layers=28)` by default and
    # `ChatGLMModel.get_layer` never passes the model's depth, so the residual scale is sqrt(2·28) = sqrt(56)
    # at every depth. Equal to `num_layers` for the released model; kept separate so other depths match too.
    residual_alpha_layers: int = 28
    # P-Tuning v2 (spec §5): read here so an official P-tuning checkpoint's config.json loads; the prefix
    # encoder itself is attached by the ptuning-v2 adapter method (`model.transformer.prefix_encoder`).
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    quantization_bit: int = 0

    def __post_init__(self, **kwargs: Any) -> None:
        # The official config maps AutoModel to remote code; mmadapter never runs it, and must not save it back.
        kwargs.pop("auto_map", None)
        super().__post_init__(**kwargs)
        check_v1_config(vars(self), type(self).__name__)

    @property
    def head_dim(self) -> int:
        """Width of one attention head (128 for ChatGLM-6B); half of it is rotated by each position channel."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def get_config_dict(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Read config.json and refuse ChatGLM2/3 (and quantized v1) folders before any weight is touched."""
        config_dict, unused = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        check_v1_config(config_dict, os.path.join(str(pretrained_model_name_or_path), "config.json"))
        return config_dict, unused


def check_v1_config(values: dict[str, Any], source: str) -> None:
    """Raise a ValueError naming what makes `values` something other than ChatGLM-6B v1."""
    newer = sorted(key for key in NEWER_GENERATION_FIELDS if key in values)
    if newer:
        details = "; ".join(f"{key}={values[key]!r}: {NEWER_GENERATION_FIELDS[key]}" for key in newer)
        raise ValueError(
            f"{source} is a ChatGLM2/ChatGLM3-style config, not ChatGLM-6B (v1): {details}. mmadapter implements "
            "only the first-generation ChatGLM-6B; see the README section 'ChatGLM-6B' for what v2/v3 would need."
        )
    if values.get("position_encoding_2d", True) is not True:
        raise ValueError(
            f"{source}: position_encoding_2d={values['position_encoding_2d']!r}; only the released 2-D rotary "
            "position encoding of ChatGLM-6B is implemented"
        )
    if values.get("quantization_bit", 0):
        raise ValueError(
            f"{source}: quantization_bit={values['quantization_bit']!r} (an int4/int8 ChatGLM-6B folder); load the "
            "fp16 release (THUDM/chatglm-6b) instead — its quantized weight layout is not supported"
        )
    hidden, heads = values.get("hidden_size", 4096), values.get("num_attention_heads", 32)
    if hidden % heads or (hidden // heads) % 4:
        raise ValueError(
            f"{source}: hidden_size={hidden} with num_attention_heads={heads} gives a head width that cannot be "
            "split into the two rotary halves of 2-D RoPE (it must be a multiple of 4)"
        )
