"""The one plain ChatGLM-6B forward of the tests (spec §2), sequence-first like the official code.

It reads a state dict with the released key names and re-derives everything from the spec: the official
`get_masks` / `get_position_ids` on Python lists (model path, or tokenizer path = computed on the unpadded
row then left-padded), fp16-rounded rotary frequencies with a position table gathered per token, the per-head
interleaved QKV split, q/(sqrt(d)·(i+1)) → masked_fill(-10000) → fp32 ×(i+1) softmax, the alpha residual on
the normalised input (alpha = sqrt(56) at every depth, as in the official code; never read from the model's
config), the explicit tanh-GELU formula, and the head tied to the word embeddings. A P-Tuning v2 prefix
`[L, 2, b, heads, P, d]` (spec §5.2-5.3) is concatenated in front of each layer's keys/values by hand: no
rotary on it, visible to every query, positions unshifted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: The real special-token ids (spec §4).
SOP, EOP, GMASK, MASK, PAD = 130004, 130005, 130001, 130000, 3

#: The official residual scale: `modeling_chatglm.py` declares `GLMBlock(..., num_layers=28)` and
#: `ChatGLMModel.get_layer` never passes the model's depth, so alpha = sqrt(2·28) for a model of any depth.
OFFICIAL_ALPHA = math.sqrt(2 * 28)


def official_mask_and_positions(row: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`get_masks` (True = blocked) and 2-D `get_position_ids` for one unpadded row."""
    length = len(row)
    context_length = row.index(SOP)
    mask_position = row.index(GMASK if GMASK in row else MASK)
    allowed = torch.ones(length, length).tril()
    allowed[:, :context_length] = 1
    blocked = allowed < 0.5
    position = list(range(length))
    for j in range(context_length, length):
        position[j] = mask_position
    block = [0] * context_length + list(range(1, length - context_length + 1))
    return blocked, torch.tensor([position, block])


def batch_mask_and_positions(rows: list[list[int]], pad: int) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """The tokenizer path: left-pad every row to the longest; pads are blocked rows and columns, position 0."""
    width = max(map(len, rows))
    padded, masks, positions = [], [], []
    for row in rows:
        blocked, position = official_mask_and_positions(row)
        extra = width - len(row)
        padded.append([pad] * extra + row)
        masks.append(F.pad(blocked, (extra, 0, extra, 0), value=True))
        positions.append(F.pad(position, (extra, 0), value=0))
    return padded, torch.stack(masks)[:, None], torch.stack(positions)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rotary(x: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x: [s, b, heads, d]; positions: [b, 2, s]. Table built like the official RotaryEmbedding."""
    rotary_dim = x.shape[-1] // 2
    inv_freq = (1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))).half()
    table_dtype = torch.float16 if dtype == torch.float16 else torch.float32
    inv_freq = inv_freq.to(table_dtype)
    t = torch.arange(int(positions.max()) + 1, dtype=table_dtype)
    freqs = torch.einsum("i,j->ij", t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos_table, sin_table = emb.cos().to(dtype), emb.sin().to(dtype)
    halves = []
    for channel, part in enumerate(x.chunk(2, dim=-1)):
        ids = positions[:, channel].transpose(0, 1)  # [s, b]
        cos, sin = cos_table[ids][:, :, None, :], sin_table[ids][:, :, None, :]
        halves.append(part * cos + _rotate_half(part) * sin)
    return torch.cat(halves, dim=-1)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def reference_logits(
    state: dict[str, torch.Tensor],
    num_layers: int,
    num_heads: int,
    input_ids: torch.Tensor,
    blocked: torch.Tensor,
    positions: torch.Tensor,
    prefix: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    eps: float = 1e-5,
    alpha: float = OFFICIAL_ALPHA,
) -> torch.Tensor:
    """Logits `[b, s, V]` for `input_ids` `[b, s]` with the official bool mask `[b, 1, s, s]` and positions.

    `alpha` is there so a test can show that another residual scale (e.g. sqrt(2·depth)) gives other logits.
    """
    w = {k: v.to(dtype) for k, v in state.items()}
    embedding = w["transformer.word_embeddings.weight"]
    hidden_size = embedding.shape[1]
    head_dim = hidden_size // num_heads
    x = embedding[input_ids].transpose(0, 1)  # [s, b, h]
    seq_len, batch = x.shape[:2]
    if prefix is not None:
        blocked = torch.cat([torch.zeros(batch, 1, seq_len, prefix.shape[4], dtype=torch.bool), blocked], dim=-1)

    def linear(t, name):
        return t @ w[name + ".weight"].T + w[name + ".bias"]

    def norm(t, name):
        return F.layer_norm(t, (hidden_size,), w[name + ".weight"], w[name + ".bias"], eps)

    for i in range(num_layers):
        p = f"transformer.layers.{i}."
        u = norm(x, p + "input_layernorm")
        fused = linear(u, p + "attention.query_key_value").view(seq_len, batch, num_heads, 3 * head_dim)
        q, k, v = fused[..., :head_dim], fused[..., head_dim : 2 * head_dim], fused[..., 2 * head_dim :]
        q, k = _rotary(q, positions, dtype), _rotary(k, positions, dtype)
        if prefix is not None:  # [L, 2, b, heads, P, d] -> seq-first [P, b, heads, d], in front
            k = torch.cat([prefix[i, 0].to(dtype).permute(2, 0, 1, 3), k], dim=0)
            v = torch.cat([prefix[i, 1].to(dtype).permute(2, 0, 1, 3), v], dim=0)
        coeff = float(i + 1)
        q = q / (math.sqrt(head_dim) * coeff)
        scores = torch.einsum("sbnd,tbnd->bnst", q, k)
        scores = scores.masked_fill(blocked, -10000.0)
        probs = torch.softmax(scores.float() * coeff, dim=-1).to(dtype)
        context = torch.einsum("bnst,tbnd->sbnd", probs, v).reshape(seq_len, batch, hidden_size)
        a = linear(context, p + "attention.dense")
        y = alpha * u + a
        v_norm = norm(y, p + "post_attention_layernorm")
        m = linear(_gelu(linear(v_norm, p + "mlp.dense_h_to_4h")), p + "mlp.dense_4h_to_h")
        x = alpha * v_norm + m
    x = norm(x, "transformer.final_layernorm")
    return (x @ embedding.T).transpose(0, 1)
