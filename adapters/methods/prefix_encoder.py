"""The P-Tuning v2 prefix encoder: trainable key/value prefixes for every attention layer.

Liu et al., "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across Scales
and Tasks", arXiv:2110.07602, as ChatGLM-6B's official code builds it (spec chatglm-6b-ptuning-v2
§5.1-5.2): one embedding row per prefix position holding all layers' keys and values side by side
(chunk 2l = layer l's key, 2l+1 its value, head-major then dim), optionally produced by a 2-layer
tanh MLP (prefix-tuning's reparametrisation), followed by dropout (0.1) in training. State-dict names
(`embedding.weight`, `trans.0.*`, `trans.2.*`) are the official ones, so official checkpoints load
unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class PrefixEncoder(nn.Module):
    """forward(batch_size) -> (num_layers, 2, batch, num_heads, pre_seq_len, head_dim) keys (0) and values (1)."""

    def __init__(
        self,
        pre_seq_len: int,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        *,
        prefix_projection: bool = False,
        hidden_size: int | None = None,
        prefix_hidden_size: int | None = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.pre_seq_len, self.num_layers, self.num_heads, self.head_dim = pre_seq_len, num_layers, num_heads, head_dim
        width = num_layers * 2 * num_heads * head_dim
        if prefix_projection:
            if hidden_size is None:
                raise ValueError("a prefix projection needs hidden_size (the embedding width)")
            self.embedding = nn.Embedding(pre_seq_len, hidden_size)
            self.trans = nn.Sequential(
                nn.Linear(hidden_size, prefix_hidden_size or hidden_size),
                nn.Tanh(),
                nn.Linear(prefix_hidden_size or hidden_size, width),
            )
        else:
            self.embedding = nn.Embedding(pre_seq_len, width)
            self.trans = None
        self.dropout = nn.Dropout(dropout)

    @property
    def prefix_projection(self) -> bool:
        return self.trans is not None

    def forward(self, batch_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All layers' prefixes for a batch; cast to `dtype` (the activations') before dropout, as official."""
        # Looking up rows 0..P-1 is the whole table: use it directly and run the MLP once, not per sample.
        prefix = self.embedding.weight
        if self.trans is not None:
            prefix = self.trans(prefix)
        if dtype is not None:
            prefix = prefix.to(dtype)
        # Expand before dropout so every sample gets its own dropout mask, like the official per-sample lookup.
        prefix = self.dropout(prefix.unsqueeze(0).expand(batch_size, -1, -1))
        prefix = prefix.view(batch_size, self.pre_seq_len, self.num_layers, 2, self.num_heads, self.head_dim)
        return prefix.permute(2, 3, 0, 4, 1, 5)
