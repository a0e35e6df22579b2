"""ChatGLM-6B's prefix-LM attention mask and 2-D position ids (spec §2.7, §2.8, §5.3).

Layout of a row: `[prompt …, [gMASK], <sop>, answer …, <eop>]`. The context (everything before the first
`<sop>`) attends bidirectionally within itself; from `<sop>` on attention is causal. Position channel 0
counts the context and then stays at the `[gMASK]` index; channel 1 ("block position") is 0 over the
context and counts 1, 2, … from `<sop>`.

The official tokenizer returns these as a `[b, 1, s, s]` bool mask and `[b, 2, s]` positions when it pads.
mmadapter's tokenizer returns the usual 2-D padding mask instead (so `generate()` can grow it), and the
model builds the official mask and positions from it here: left pads are masked as keys and as query rows,
and positions restart at 0 on the first real token, exactly as the official tokenizer's `_pad` produces.
Without a padding mask the model behaves like the official model-built path (nothing is masked as padding,
positions count from index 0).

Rows without `<sop>` are treated as all context (bidirectional), where the official code raises
"130004 is not in list"; rows without `[gMASK]`/`[MASK]` take the last context token as the mask position.
"""

from __future__ import annotations

import torch


def first_index(input_ids: torch.Tensor, token_id: int, default: torch.Tensor | int) -> torch.Tensor:
    """Per row, the index of the first `token_id`, or `default` where the row has none."""
    hits = input_ids == token_id
    index = hits.int().argmax(dim=-1)
    default = torch.as_tensor(default, device=input_ids.device).expand_as(index)
    return torch.where(hits.any(dim=-1), index, default)


def context_lengths(input_ids: torch.Tensor, bos_token_id: int) -> torch.Tensor:
    """Index of the first `<sop>` per row (the official `context_length`), or the row length if none."""
    return first_index(input_ids, bos_token_id, input_ids.shape[-1])


def glm_position_ids(
    input_ids: torch.Tensor,
    padding_mask: torch.Tensor | None = None,
    *,
    bos_token_id: int,
    gmask_token_id: int,
    mask_token_id: int,
) -> torch.Tensor:
    """2-D positions `[b, 2, s]` for complete rows (no cache), as the official model/tokenizer build them.

    `padding_mask` (`[b, s]`, 1 = real token) is optional; pads get position 0 on both channels.
    """
    seq_len = input_ids.shape[-1]
    arange = torch.arange(seq_len, device=input_ids.device)
    context = context_lengths(input_ids, bos_token_id)
    last_context = (context - 1).clamp(min=0)
    mask_position = first_index(input_ids, gmask_token_id, first_index(input_ids, mask_token_id, last_context))
    if padding_mask is None:
        real_index = arange.expand_as(input_ids)
    else:
        real_index = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)
    in_context = arange[None, :] < context[:, None]
    mask_real_index = real_index.gather(1, mask_position[:, None])
    position = torch.where(in_context, real_index, mask_real_index)
    block_position = torch.where(in_context, torch.zeros_like(arange), arange[None, :] - context[:, None] + 1)
    positions = torch.stack([position, block_position], dim=1)
    if padding_mask is not None:
        positions = positions.masked_fill(~padding_mask.bool()[:, None, :], 0)
    return positions


def glm_blocked_mask(
    input_ids: torch.Tensor,
    padding_mask: torch.Tensor | None = None,
    *,
    bos_token_id: int,
    past_length: int = 0,
    prefix_length: int = 0,
) -> torch.Tensor:
    """Bool mask `[b, 1, s, prefix_length + past_length + s]`, True = may NOT attend (official convention).

    `input_ids` are the `s` new tokens; `padding_mask` (`[b, past_length + s]`, 1 = real) covers the
    tokens in the cache and the new ones (not the prefix). With a cache, new tokens are the answer part
    (after `<sop>`): they see every earlier token, causally among themselves. Prefix columns (P-Tuning v2)
    are visible to every query, pads included (spec §5.3).
    """
    batch, seq_len = input_ids.shape
    device = input_ids.device
    total = past_length + seq_len
    query = torch.arange(past_length, total, device=device)
    key = torch.arange(total, device=device)
    if past_length == 0:
        context = context_lengths(input_ids, bos_token_id)
    else:
        sop_in_chunk = first_index(input_ids, bos_token_id, -past_length)
        context = sop_in_chunk + past_length
    visible = (key[None, None, :] <= query[None, :, None]) | (key[None, None, :] < context[:, None, None])
    if padding_mask is not None:
        if padding_mask.shape != (batch, total):
            raise ValueError(
                f"attention_mask has shape {tuple(padding_mask.shape)}; expected ({batch}, {total}) = "
                f"(batch, cached tokens {past_length} + new tokens {seq_len})"
            )
        real = padding_mask.bool()
        visible = visible & real[:, None, :] & real[:, past_length:, None]
    blocked = ~visible[:, None]
    if prefix_length:
        blocked = torch.cat([blocked.new_zeros(batch, 1, seq_len, prefix_length), blocked], dim=-1)
    return blocked
