"""Visual projectors: released V2 layout and counts, and forwards against plainly written computations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmadapter.vision import VisualProjectorV1, VisualProjectorV2


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_v2_defaults_match_the_released_7b_counts_and_key_names():
    with torch.device("meta"):
        projector = VisualProjectorV2(clip_dim=768, lm_dim=4096)
    assert _count(projector.visual_blocks[0]) == 7_087_872 and len(projector.visual_blocks) == 8
    assert _count(projector.clip_proj) == 590_592 and _count(projector.clip_proj_norm) == 1_536
    assert _count(projector.visual_proj) == 3_149_824 and _count(projector.visual_proj_norm) == 8_192
    assert _count(projector.visual_query) == 7_680
    # spec §5.3: pretrain-phase trainable 61,731,584 = projector + adapter_query 1,269,760 + gates 1,024
    assert _count(projector) == 61_731_584 - 1_269_760 - 1_024
    released = {"clip_proj.weight", "clip_proj.bias", "clip_proj_norm.weight", "clip_proj_norm.bias"}
    released |= {"visual_query.weight", "visual_proj.weight", "visual_proj.bias"}
    released |= {"visual_proj_norm.weight", "visual_proj_norm.bias"}
    for i in range(8):
        for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            released |= {f"visual_blocks.{i}.{name}.weight", f"visual_blocks.{i}.{name}.bias"}
    state = projector.state_dict()
    assert set(state) == released
    assert state["visual_blocks.3.attn.qkv.weight"].shape == (2304, 768)
    assert state["visual_blocks.3.mlp.fc1.weight"].shape == (3072, 768)
    assert all(m.eps == 1e-5 for m in projector.modules() if isinstance(m, nn.LayerNorm))
    assert all(m.approximate == "none" for m in projector.modules() if isinstance(m, nn.GELU))


def _plain_block(block: nn.Module, x: torch.Tensor, heads: int) -> torch.Tensor:
    """A pre-norm ViT block written out: x + MHSA(LN(x)), then x + MLP(LN(x)) with exact GELU."""
    batch, length, width = x.shape
    head_dim = width // heads
    h = F.layer_norm(x, (width,), block.norm1.weight, block.norm1.bias, 1e-5)
    qkv = h @ block.attn.qkv.weight.T + block.attn.qkv.bias
    q, k, v = qkv.view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
    attended = (weights @ v).transpose(1, 2).reshape(batch, length, width)
    x = x + attended @ block.attn.proj.weight.T + block.attn.proj.bias
    h = F.layer_norm(x, (width,), block.norm2.weight, block.norm2.bias, 1e-5)
    hidden = h @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    return x + hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias


def test_v2_forward_matches_a_plain_computation():
    torch.manual_seed(0)
    projector = VisualProjectorV2(clip_dim=24, lm_dim=40, width=32, query_len=4, depth=2, num_heads=4).double()
    for module in projector.modules():  # non-trivial norms so that a skipped norm would show
        if isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight, 1.0, 0.2)
            nn.init.normal_(module.bias, 0.0, 0.2)
    tokens = torch.randn(3, 9, 24, dtype=torch.float64)

    x = F.layer_norm(
        tokens @ projector.clip_proj.weight.T + projector.clip_proj.bias,
        (32,),
        projector.clip_proj_norm.weight,
        projector.clip_proj_norm.bias,
        1e-5,
    )
    x = torch.cat([projector.visual_query.weight.unsqueeze(0).repeat(3, 1, 1), x], dim=1)
    for block in projector.visual_blocks:
        x = _plain_block(block, x, heads=4)
    x = x[:, :4] @ projector.visual_proj.weight.T + projector.visual_proj.bias
    expected = F.layer_norm(x, (40,), projector.visual_proj_norm.weight, projector.visual_proj_norm.bias, 1e-5)

    output = projector(tokens)
    assert output.shape == (3, 4, 40)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-10)  # float64: only rounding differs


def test_v2_casts_half_precision_clip_tokens_and_trains_every_parameter():
    torch.manual_seed(0)
    projector = VisualProjectorV2(clip_dim=16, lm_dim=24, width=32, query_len=3, depth=1, num_heads=2)
    tokens = torch.randn(2, 5, 16).half()  # CLIP runs in fp16 on GPUs, as in the official code
    output = projector(tokens)
    assert output.dtype == torch.float32
    torch.testing.assert_close(output, projector(tokens.float()), rtol=0, atol=0)
    output.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())


def test_v1_projects_the_class_token_to_one_prompt_token():
    torch.manual_seed(0)
    linear = VisualProjectorV1(clip_dim=12, lm_dim=20)
    tokens = torch.randn(2, 7, 12)
    expected = (tokens[:, 0] @ linear.proj.weight.T + linear.proj.bias).unsqueeze(1)
    assert linear(tokens).shape == (2, 1, 20)
    torch.testing.assert_close(linear(tokens), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(linear(tokens[:, 0]), expected, rtol=0, atol=0)  # global features given directly

    mlp = VisualProjectorV1(clip_dim=12, lm_dim=20, hidden=16)
    fc1, fc2 = mlp.proj.fc1, mlp.proj.fc2
    hidden = tokens[:, 0] @ fc1.weight.T + fc1.bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    expected = (hidden @ fc2.weight.T + fc2.bias).unsqueeze(1)
    torch.testing.assert_close(mlp(tokens), expected, rtol=0, atol=1e-6)
    assert sum(p.numel() for p in mlp.parameters()) == 12 * 16 + 16 + 16 * 20 + 20
