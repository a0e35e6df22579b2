"""The serving KV cache holds what transformers' DynamicLayer holds, without a new buffer per token."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from mmadapter.adapters.backbones.presets import base_config
from mmadapter.serve.kv_cache import ROOM_BLOCK, GrowingLayer, new_kv_cache


def states(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 2, length, 4, generator=generator) for _ in range(2))


def assert_same(layer: GrowingLayer, reference: DynamicLayer) -> None:
    assert torch.equal(layer.keys, reference.keys)
    assert torch.equal(layer.values, reference.values)
    assert layer.get_seq_length() == reference.get_seq_length()


def test_updates_return_and_hold_what_a_dynamic_layer_does():
    layer, reference = GrowingLayer(), DynamicLayer()
    for step, length in enumerate([5, 1, 1, 7, 1]):
        keys, values = states(3, length, step)
        assert all(
            torch.equal(a, b) for a, b in zip(layer.update(keys, values), reference.update(keys, values), strict=True)
        )
        assert_same(layer, reference)


def test_decoding_writes_into_the_same_buffer_until_it_is_full():
    layer = GrowingLayer()
    layer.update(*states(2, 3, 0))
    first = layer.keys.data_ptr()
    for step in range(ROOM_BLOCK - 3):
        layer.update(*states(2, 1, step + 1))
        assert layer.keys.data_ptr() == first, f"moved at position {layer.get_seq_length()}"
    layer.update(*states(2, 1, 99))  # position ROOM_BLOCK + 1: one move to a bigger buffer
    assert layer.keys.data_ptr() != first
    assert layer.get_seq_length() == ROOM_BLOCK + 1


def test_keys_assigned_from_outside_are_kept_and_extended():
    """What the batch scheduler does: stack new rows, drop finished ones, cut leading padding columns."""
    layer, reference = GrowingLayer(), DynamicLayer()
    for cache in (layer, reference):
        cache.update(*states(2, 6, 0))
    joined = states(1, 6, 1)
    for cache in (layer, reference):
        cache.keys = torch.cat([cache.keys, joined[0]])
        cache.values = torch.cat([cache.values, joined[1]])
        cache.update(*states(3, 1, 2))
    assert_same(layer, reference)
    for cache in (layer, reference):
        cache.batch_select_indices(torch.tensor([0, 2]))
        cache.update(*states(2, 1, 3))
    assert_same(layer, reference)
    for cache in (layer, reference):
        cache.keys, cache.values = cache.keys[:, :, 2:], cache.values[:, :, 2:]
        cache.update(*states(2, 1, 4))
    assert_same(layer, reference)
    old = layer.keys.clone()
    layer.crop(-3)  # a cropped view is still the buffer's: the next token overwrites the dropped positions
    layer.update(*states(2, 1, 5))
    assert torch.equal(layer.keys[:, :, :-1], old[:, :, :-3])


@pytest.mark.parametrize(
    ("preset", "kind"),
    [("tiny-llama3", GrowingLayer), ("tiny-qwen3", GrowingLayer), ("tiny-mistral", DynamicSlidingWindowLayer)],
)
def test_full_attention_layers_grow_in_place_and_sliding_window_layers_stay_transformers(preset, kind):
    config = base_config(preset)
    assert [type(layer) for layer in new_kv_cache(config).layers] == [kind] * config.num_hidden_layers
