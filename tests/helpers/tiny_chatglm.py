"""A tiny random ChatGLM-6B with the real special-token ids, and a tiny sentencepiece model trained here whose
special pieces sit at the real ids (130000-130007)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mmadapter.adapters.backbones.presets import base_config, build_base_model

CORPUS = [
    "你好，世界！今天天气很好。",
    "我们一起学习机器学习和自然语言处理。",
    "晚上睡不着怎么办？介绍下贵州和清华大学。",
    "ChatGLM-6B 是一个开源的、支持中英双语的对话语言模型。",
    "Hello world, this is a small test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    return 42\n",
]
SPECIAL_PIECES = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]


def build_tiny_glm(seed: int = 0, attn: str = "eager", dtype: torch.dtype | None = None):
    """The `tiny-chatglm` preset (3 layers, hidden 64, 4 heads, 130528-row vocab) with every parameter random
    (LayerNorm weights and biases included), in eval mode, frozen; sublayer outputs scaled by `_weigh_sublayers`."""
    torch.manual_seed(seed)
    model = build_base_model(base_config("tiny-chatglm"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.normal_(0, 0.15)
        _weigh_sublayers(model)
    model.set_attn_implementation(attn)
    if dtype is not None:
        model.to(dtype)
    return model.requires_grad_(False).eval()


def _weigh_sublayers(model) -> None:
    """Scale the attention and MLP output projections by sqrt(28 / 3).

    The official residual scale is sqrt(2·28) at every depth; against it, a random 3-layer model's sublayers
    would be too weak to matter and the model would just repeat its last token. Scaled so, each block equals
    a block with residual scale sqrt(2·3) up to one factor that the next LayerNorm removes.
    """
    gain = math.sqrt(model.config.residual_alpha_layers / model.config.num_layers)
    for block in model.transformer.layers:
        for linear in (block.attention.dense, block.mlp.dense_4h_to_h):
            linear.weight.mul_(gain)
            linear.bias.mul_(gain)


def train_glm_vocab(folder: Path) -> Path:
    """`ice_text.model` stand-in: fillers up to id 129999, then the special pieces at their real ids, then
    `<n>`, `<|tab|>`, `<|blank_2..80|>` and ~300 learned pieces (ids below the 130528 embedding rows)."""
    import sentencepiece as spm

    fillers = [f"<|filler_{i}|>" for i in range(4, 130000)]
    layout = ["<n>", "<|tab|>"] + [f"<|blank_{k}|>" for k in range(2, 81)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_prefix=str(folder / "ice_text"),
        vocab_size=130000 + len(SPECIAL_PIECES) + len(layout) + 300,
        hard_vocab_limit=False,
        user_defined_symbols=fillers + SPECIAL_PIECES + layout,
        model_type="unigram",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        pad_piece="<pad>",
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return folder / "ice_text.model"
