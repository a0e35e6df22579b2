"""Trainable projectors from CLIP tokens to visual prompt tokens in the language model's width.

`VisualProjectorV2` is the released LLaMA-Adapter V2 multimodal projector (`specs/llama-adapter.md`
§3.1-3.2, counts §5.3) with the official submodule names, so a released checkpoint's `clip_proj.*`,
`visual_query.*`, `visual_blocks.*`, `visual_proj.*` tensors copy in without renaming.
`VisualProjectorV1` is the V1 multimodal projection (§2): one global CLIP feature through a small
MLP to one token that the adapter adds to every adapted layer's prompt.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn

#: The official blocks are pre-norm ViT blocks with torch's LayerNorm (eps 1e-5); timm's default is 1e-6.
_LAYER_NORM = partial(nn.LayerNorm, eps=1e-5)


class VisualProjectorV2(nn.Module):
    """CLIP tokens (B, N, clip_dim) -> visual prompt (B, query_len, lm_dim).

    clip_proj + norm, then learned query tokens attend jointly with the CLIP tokens through `depth`
    ViT blocks; the query positions are projected to the LM width and normalised. Defaults are the
    released 7B model's (width 768, 10 queries, 8 blocks of 16 heads, MLP ratio 4).
    """

    def __init__(
        self,
        clip_dim: int,
        lm_dim: int,
        width: int = 768,
        query_len: int = 10,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.query_len = query_len
        self.clip_proj = nn.Linear(clip_dim, width)
        self.clip_proj_norm = nn.LayerNorm(width, eps=1e-5)
        self.visual_query = nn.Embedding(query_len, width)  # N(0, 1) init, as nn.Embedding does
        self.visual_blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, qkv_bias=True, norm_layer=_LAYER_NORM) for _ in range(depth)
        )
        self.visual_proj = nn.Linear(width, lm_dim)
        self.visual_proj_norm = nn.LayerNorm(lm_dim, eps=1e-5)

    def forward(self, clip_tokens: torch.Tensor) -> torch.Tensor:
        x = clip_tokens.to(self.clip_proj.weight.dtype)  # the official code casts CLIP's fp16 output to fp32
        x = self.clip_proj_norm(self.clip_proj(x))
        queries = self.visual_query.weight.unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([queries, x], dim=1)
        for block in self.visual_blocks:
            x = block(x)
        return self.visual_proj_norm(self.visual_proj(x[:, : self.query_len]))


class VisualProjectorV1(nn.Module):
    """Global CLIP feature -> one visual token (B, 1, lm_dim), added to every adapted layer's prompt.

    Input: CLIP tokens (B, N, clip_dim), of which the class token is used, or global features
    (B, clip_dim) (e.g. several scales concatenated, clip_dim being their total width). `hidden=None`
    is a single linear map; otherwise Linear -> GELU -> Linear.
    """

    def __init__(self, clip_dim: int, lm_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        if hidden is None:
            self.proj = nn.Linear(clip_dim, lm_dim)
        else:
            self.proj = Mlp(clip_dim, hidden_features=hidden, out_features=lm_dim)

    def forward(self, clip_features: torch.Tensor) -> torch.Tensor:
        global_feature = clip_features[:, 0] if clip_features.ndim == 3 else clip_features
        weight = next(self.parameters())
        return self.proj(global_feature.to(weight.dtype)).unsqueeze(1)
