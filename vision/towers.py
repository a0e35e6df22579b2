"""What LLaMA-Adapter V2 reads from an open_clip vision tower: the pooled image embedding, then the patch tokens.

The official V2 (`specs/llama-adapter.md` §3.2) feeds its projector all 257 tokens of CLIP ViT-L/14: the
class token and the 256 patch tokens, each after `ln_post` and the visual projection. CLIP's class token
after ln_post and proj *is* its image embedding (what `encode_image` returns), so one rule covers every
tower, CLIP or SigLIP:

    tokens = [pooled image embedding ; patch tokens], every token through the tower's final norm and projection

- open_clip's own `VisionTransformer` (OpenAI CLIP, LAION, DataComp, MetaCLIP, ...): `pool_type="tok"` gives
  the official layout bit for bit; `"avg"` puts the mean of the normalised patches first (the class token,
  which that tower never pools, is left out); `final_ln_after_pool` normalises the pooled feature after
  pooling, as open_clip does, and each patch token on its own; `no_ln_pre` needs nothing (ln_pre is then
  the identity).
- a timm ViT inside open_clip's `TimmModel` (every SigLIP and SigLIP2 tower of open_clip 3.x): there is no
  class token; position 0 is the attention-pool head's output (`attn_pool`, "map"), which is the SigLIP
  image embedding, and the patch tokens are the trunk's output after its final norm. Register tokens are
  left out: they are scratch space with no place in the image. A `timm_proj` head (linear or MLP) is applied
  to every token, as CLIP's proj is.

Why the pooled feature first: it is the tower's one trained summary of the picture, position 0 is what the
V1 projector reads, and for CLIP it keeps the released V2 checkpoints' input exactly. Either way the
sequence holds 1 + patches tokens of one width, which the projector's input width follows.
"""

from __future__ import annotations

import torch
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

#: Said with every unsupported tower: what works instead.
SUPPORTED = (
    "mmadapter reads tokens from ViT towers: open_clip's own VisionTransformer (CLIP) or a timm ViT in "
    "open_clip's TimmModel (SigLIP, SigLIP2); pick such an architecture (open_clip.list_models())"
)


def unsupported_reason(visual: nn.Module) -> str | None:
    """Why this open_clip vision tower gives no [pooled ; patch tokens] sequence, or None when it does."""
    if isinstance(visual, VisionTransformer):
        if visual.attn_pool is not None:
            return "its attentional pooler (CoCa-style attentional_pool) outputs query tokens, not patch tokens"
        if visual.pool_type not in ("tok", "avg"):
            return f"pool_type {visual.pool_type!r} gives no pooled image feature"
        return None
    if isinstance(visual, TimmModel):
        trunk = visual.trunk
        if not isinstance(trunk, TimmViT):
            return f"its timm trunk is a {type(trunk).__name__}, not a timm VisionTransformer"
        if "pool" in visual.head:
            return "its timm_pool (abs_attn/rot_attn) pools a feature map, not ViT tokens"
        if not trunk.global_pool:
            return "its timm trunk has no pooling (timm_pool is empty), so there is no image embedding"
        if tuple(trunk.patch_embed.img_size) != tuple(visual.image_size) and not trunk.dynamic_img_size:
            return (
                f"vision_cfg.image_size is {tuple(visual.image_size)} but the timm model is built for "
                f"{tuple(trunk.patch_embed.img_size)}; set image_size to match"
            )
        return None
    return f"token features need a ViT tower, not {type(visual).__name__}"


def tower_width(visual: nn.Module) -> int:
    """The transformer's width (before any projection)."""
    return visual.trunk.embed_dim if isinstance(visual, TimmModel) else visual.conv1.out_channels


def tower_tokens(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1 + patches, D): the pooled image embedding, then every patch token (module doc)."""
    if isinstance(visual, TimmModel):
        return _timm_tokens(visual, pixels)
    return _open_clip_tokens(visual, pixels)


def _open_clip_tokens(visual: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    # open_clip's VisionTransformer.forward returns patch tokens before the projection; V2 needs them after.
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)  # (B, patches, width)
    class_token = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([class_token, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.transformer(visual.ln_pre(x))  # patch dropout is the identity in eval mode
    if not visual.final_ln_after_pool:
        x = visual.ln_post(x)
    pooled = x[:, :1] if visual.pool_type == "tok" else x[:, 1:].mean(dim=1, keepdim=True)
    tokens = torch.cat([pooled, x[:, 1:]], dim=1)
    if visual.final_ln_after_pool:
        tokens = visual.ln_post(tokens)
    return tokens if visual.proj is None else tokens @ visual.proj


def _timm_tokens(visual: TimmModel, pixels: torch.Tensor) -> torch.Tensor:
    trunk = visual.trunk
    x = trunk.forward_features(pixels)  # every token after the final norm (unless the pool has its own fc_norm)
    pooled = trunk.forward_head(x)  # attn_pool ("map") / class token / average, fc_norm, the trunk's head
    patches = trunk.head(trunk.fc_norm(x[:, trunk.num_prefix_tokens :]))
    return visual.head(torch.cat([pooled.unsqueeze(1), patches], dim=1))
