"""The official P-Tuning v2 prefix table read by hand, so the references need not trust the prefix encoder."""

from __future__ import annotations

import torch


def prefix_key_values(table: torch.Tensor, num_layers: int, num_heads: int, batch: int) -> torch.Tensor:
    """`(P, layers·2·heads·d)` -> `[layers, 2, batch, heads, P, d]`: in row p, chunk 2l is layer l's key and
    chunk 2l+1 its value, each head-major (heads, d)."""
    pre_seq_len = table.shape[0]
    per_layer = table.reshape(pre_seq_len, num_layers, 2, num_heads, -1)
    return per_layer.permute(1, 2, 3, 0, 4)[:, :, None].expand(-1, -1, batch, -1, -1, -1)
