"""Meta's original LLaMA layout (`consolidated.NN.pth` shards + `params.json`) to the HF layout.

The official LLaMA-Adapter code reads this layout. Three things differ from Hugging Face's:
key names; model-parallel shards (column-parallel weights split on dim 0, row-parallel ones and
the embedding on dim 1); and the rotary layout of q/k rows (Meta interleaves each head's rotary
pairs, HF splits them into halves), fixed by `permute_rotary_rows`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import LlamaConfig

from mmadapter.adapters.backbones.presets import llama_ffn_size
from mmadapter.core.files import read_torch_file

#: Meta per-layer key suffix -> (HF suffix, dim along which model-parallel shards are split or None).
_LAYER_KEYS = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_TOP_KEYS = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}
_LAYER_PATTERN = re.compile(r"layers\.(\d+)\.(.+)")


def permute_rotary_rows(rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Meta -> HF order of q/k output rows: within a head, index 2i+r moves to r*(d/2)+i.

    Works on weights (out, in) and on output-side vectors such as a q bias (out,).
    """
    out = rows.shape[0]
    head_dim = out // num_heads
    rest = rows.shape[1:]
    # (H, d/2, 2, ...) -> (H, 2, d/2, ...): the pair index becomes the outer half index.
    return rows.reshape(num_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(out, *rest)


def meta_key_to_hf(key: str) -> tuple[str, int | None]:
    """HF name and shard dimension of a Meta key; raises on keys LLaMA does not have."""
    if key in _TOP_KEYS:
        return _TOP_KEYS[key]
    match = _LAYER_PATTERN.fullmatch(key)
    if match and match.group(2) in _LAYER_KEYS:
        suffix, dim = _LAYER_KEYS[match.group(2)]
        return f"model.layers.{match.group(1)}.{suffix}", dim
    raise KeyError(f"unexpected key {key!r} in a Meta-layout LLaMA checkpoint")


def is_meta_checkpoint(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "params.json").is_file() and any(folder.glob("consolidated.*.pth"))


def config_from_params(params: dict, vocab_size: int) -> LlamaConfig:
    """A LlamaConfig from Meta's params.json (vocab_size there is -1 in LLaMA-1, so it is passed in)."""
    dim = params["dim"]
    heads = params["n_heads"]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=llama_ffn_size(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
        num_hidden_layers=params["n_layers"],
        num_attention_heads=heads,
        num_key_value_heads=params.get("n_kv_heads") or heads,
        rms_norm_eps=params.get("norm_eps", 1e-6),
        rope_theta=params.get("rope_theta", 10000.0),
        max_position_embeddings=params.get("max_seq_len", 2048),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def _merge_shards(shards: list[dict[str, torch.Tensor]], key: str, dim: int | None) -> torch.Tensor:
    if dim is None or len(shards) == 1:
        return shards[0][key]
    return torch.cat([shard[key] for shard in shards], dim=dim)


def load_meta_checkpoint(folder: str | Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Read a Meta-layout folder into (HF config, HF-layout state dict), merging shards."""
    folder = Path(folder)
    params = json.loads((folder / "params.json").read_text())
    paths = sorted(folder.glob("consolidated.*.pth"))
    if not paths:
        raise FileNotFoundError(f"{folder}: no consolidated.*.pth shards next to params.json")
    shards = [read_torch_file(p) for p in paths]
    vocab_size = shards[0]["tok_embeddings.weight"].shape[0]
    config = config_from_params(params, vocab_size)
    state = {}
    for key in shards[0]:
        if key.endswith("rope.freqs"):  # precomputed rotary table some dumps carry; HF recomputes it
            continue
        hf_key, dim = meta_key_to_hf(key)
        state[hf_key] = _merge_shards(shards, key, dim)
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}.self_attn."
        state[prefix + "q_proj.weight"] = permute_rotary_rows(
            state[prefix + "q_proj.weight"], config.num_attention_heads
        )
        state[prefix + "k_proj.weight"] = permute_rotary_rows(
            state[prefix + "k_proj.weight"], config.num_key_value_heads
        )
    return config, state
