"""The serving KV cache: transformers' `DynamicCache`, with full-attention layers that grow in place.

transformers' `DynamicLayer` concatenates on every update, so each decoded token copies every cached
key and value of every layer into a fresh buffer: work that grows with the batch and the context (8 rows
of 512-token prompts on an 8 × 768 LLaMA, one CPU thread: 125 ms a decoding step, 88 ms with this cache;
bench/bench_kv_cache.py).
`GrowingLayer` writes new tokens into spare room and hands out views, moving to a larger buffer only
every `ROOM_BLOCK` tokens. Sliding-window layers (Mistral) keep transformers' own class.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

ROOM_BLOCK = 128
"""Buffers hold a multiple of this many positions: at most this many unused per row, a move every this many."""


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose `keys`/`values` are leading views of larger buffers.

    Callers may still assign `keys`/`values` (the batch scheduler stacks, selects and trims rows); the next
    update sees that they no longer view the buffers and moves them into new ones.
    """

    def __init__(self) -> None:
        super().__init__()
        self._key_room: torch.Tensor | None = None
        self._value_room: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if not (
            _has_room(self._key_room, self.keys, key_states, end)
            and _has_room(self._value_room, self.values, value_states, end)
        ):
            self._key_room = _move_to_room(self.keys, start, key_states, end)
            self._value_room = _move_to_room(self.values, start, value_states, end)
        self._key_room[:, :, start:end] = key_states
        self._value_room[:, :, start:end] = value_states
        self.keys, self.values = self._key_room[:, :, :end], self._value_room[:, :, :end]
        return self.keys, self.values

    def reset(self) -> None:
        self._key_room = self._value_room = None
        super().reset()


def _has_room(room: torch.Tensor | None, cached: torch.Tensor, new: torch.Tensor, end: int) -> bool:
    """Whether `cached` is still the leading view of `room` and `room` takes `end` positions of `new`'s rows."""
    if room is None or room.shape[-2] < end or room.dtype != new.dtype:
        return False
    if room.shape[:2] != new.shape[:2] or room.shape[-1] != new.shape[-1]:
        return False
    return cached.numel() == 0 or (cached.data_ptr() == room.data_ptr() and cached.stride() == room.stride())


def _move_to_room(cached: torch.Tensor, start: int, new: torch.Tensor, end: int) -> torch.Tensor:
    capacity = -(-end // ROOM_BLOCK) * ROOM_BLOCK
    room = new.new_empty((*new.shape[:2], capacity, new.shape[-1]))
    if start:
        room[:, :, :start] = cached
    return room


def new_kv_cache(config: PretrainedConfig) -> DynamicCache:
    """An empty cache for a model with `config`: transformers' layer types, full-attention ones growing in place."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
