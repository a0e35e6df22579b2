"""Deep prefixes for transformers decoders (LLaMA) through the KV cache, with ChatGLM's semantics.

P-Tuning v2 (arXiv:2110.07602) puts trained keys/values in front of every layer's own. A
transformers decoder already accepts that as a pre-filled `Cache`; this module adds it with a
forward pre-hook on the decoder, so plain forwards, training and `generate()` all get the prefix
without touching transformers' code. What the hook guarantees (spec ecosystem-notes §1.2, spec
chatglm-6b-ptuning-v2 §5.2-5.3):

* the 2-D attention mask covers prefix + tokens (a mask of the tokens only is silently wrong), and
  every query sees every prefix slot;
* token positions are not shifted by the prefix (prefix keys carry no rotary position), as in the
  official ChatGLM P-Tuning v2 — also inside `generate()`, whose position ids come from its own mask;
* an empty cache (the one `generate()` creates per call) is filled with a fresh prefix, so the
  prefix is never decoded twice and a cache mutated by one call never leaks into the next;
* without a cache in training (or with `use_cache=False`) the prefix goes in a read-only cache that
  is never written, so gradient checkpointing can replay a layer and see the same keys.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from mmadapter.adapters.methods.prefix_encoder import PrefixEncoder

#: Attribute set on a Cache whose first entries are the prefix; its value is the prefix length.
PREFIX_MARK = "mmadapter_prefix_length"


class ReadOnlyPrefixLayer(DynamicLayer):
    """A cache layer holding only the prefix: `update` returns prefix + new states and stores nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def read_only_prefix_cache(prefix: torch.Tensor) -> Cache:
    """A cache that adds `prefix` (L, 2, B, H, P, D) in front of each layer's keys/values without growing."""
    return Cache(layers=[ReadOnlyPrefixLayer(layer[0], layer[1]) for layer in prefix])


def fill_prefix(cache: Cache, prefix: torch.Tensor) -> None:
    """Write `prefix` (L, 2, B, H, P, D) into an empty cache as its first entries."""
    for index, layer in enumerate(prefix):
        cache.update(layer[0], layer[1], index)


def _token_positions(token_mask: torch.Tensor | None, seen: int, length: int, device: torch.device) -> torch.Tensor:
    """Positions of the new tokens counted without the prefix (generate()'s rule: cumsum of the mask - 1)."""
    if token_mask is None:
        return torch.arange(seen, seen + length, device=device).unsqueeze(0)
    positions = token_mask.long().cumsum(-1) - 1
    return positions.masked_fill(token_mask == 0, 0)[:, -length:]


def _prefix_pre_hook(decoder: nn.Module, args: tuple, kwargs: dict[str, Any], *, signature: inspect.Signature):
    encoder: PrefixEncoder = decoder.prefix_encoder
    inputs = dict(signature.bind_partial(*args, **kwargs).arguments)
    # Keyword arguments caught by forward's `**kwargs` are bound under its name; lift them to the top level.
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            inputs.update(inputs.pop(parameter.name, {}))
    reference = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")
    batch, length = reference.shape[:2]
    cache = inputs.get("past_key_values")
    if cache is not None and decoder.training and getattr(decoder, "gradient_checkpointing", False):
        raise ValueError(
            "P-Tuning v2: a past_key_values cache cannot be used while training with gradient checkpointing "
            "(the replayed layers would write it twice); train without passing past_key_values"
        )

    if cache is None or (cache.get_seq_length() == 0 and getattr(cache, PREFIX_MARK, None) is None):
        prefix = encoder(batch, dtype=decoder.get_input_embeddings().weight.dtype)
        if cache is None:
            use_cache = inputs.get("use_cache")
            use_cache = decoder.config.use_cache if use_cache is None else use_cache
            if decoder.training or not use_cache:
                cache = read_only_prefix_cache(prefix)
            else:
                cache = DynamicCache(config=decoder.config)
                fill_prefix(cache, prefix)
        else:
            fill_prefix(cache, prefix)
        setattr(cache, PREFIX_MARK, encoder.pre_seq_len)
        inputs["past_key_values"] = cache
    elif getattr(cache, PREFIX_MARK, None) is None:
        return None  # a cache the caller built: the caller manages its contents, mask and positions

    prefix_length = getattr(cache, PREFIX_MARK)
    seen = cache.get_seq_length() - prefix_length
    mask = inputs.get("attention_mask")
    token_mask = None
    if isinstance(mask, torch.Tensor) and mask.ndim == 2:
        if mask.shape[1] == seen + length:
            token_mask = mask
            inputs["attention_mask"] = torch.cat([mask.new_ones(batch, prefix_length), mask], dim=1)
        elif mask.shape[1] == prefix_length + seen + length:
            token_mask = mask[:, prefix_length:]
        else:
            raise ValueError(
                f"P-Tuning v2: attention_mask has {mask.shape[1]} columns; expected the tokens ({seen + length}) "
                f"or prefix + tokens ({prefix_length + seen + length})"
            )
    if inputs.get("position_ids") is None:
        inputs["position_ids"] = _token_positions(token_mask, seen, length, reference.device)
    return (), inputs


def attach_prefix_to_decoder(decoder: nn.Module, encoder: PrefixEncoder) -> None:
    """Host `encoder` on a transformers decoder (`LlamaModel`) and feed its prefix through the cache."""
    decoder.prefix_encoder = encoder
    hook = functools.partial(_prefix_pre_hook, signature=inspect.signature(decoder.forward))
    decoder.register_forward_pre_hook(hook, with_kwargs=True)
    # The layers only read the read-only prefix cache in training, so checkpointing may keep it (see
    # transformers' GradientCheckpointingLayer._can_checkpoint_with_cache); writable caches are refused above.
    for layer in decoder.layers:
        layer._can_checkpoint_with_cache = True
