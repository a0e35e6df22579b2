"""What differs between backbones when generating: model inputs, guard processors, reply clean-up.

LLaMA (any transformers decoder) takes 1-D positions counted over real tokens. ChatGLM-6B takes
2-D GLM positions that depend on where `[gMASK]` and `<sop>` sit in the whole sequence (spec
chatglm-6b-ptuning-v2 §2.7-2.8), guards against NaN/Inf scores as its `chat()` does, and cleans
its replies with the official `process_response`. Both get a fresh KV cache per request, which is
also where P-Tuning v2 prefixes enter (once per request, never per token).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from transformers import LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase

from mmadapter.adapters.backbones.chatglm.chat import InvalidScoreLogitsProcessor, process_response
from mmadapter.adapters.backbones.chatglm.masks import glm_position_ids
from mmadapter.adapters.backbones.chatglm.modeling import special_ids
from mmadapter.serve.kv_cache import new_kv_cache


class CausalLMInputs:
    """Inputs of a transformers decoder (LLaMA): left padding, positions counted over real tokens.

    Positions count real tokens only (as `generate()` does), so a padded row gets the same
    positions, and therefore the same tokens, as the row alone.
    """

    def __init__(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.model = model
        self.attention_mask = attention_mask
        self.padded = not bool(attention_mask.all())
        self.position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.input_ids = input_ids
        self.cache = new_kv_cache(model.config)

    def _forward(self, extra: dict[str, Any]) -> torch.Tensor:
        output = self.model(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask if self.padded else None,
            position_ids=self.position_ids,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        return output.logits[:, -1]

    def prefill(self, extra: dict[str, Any]) -> torch.Tensor:
        return self._forward(extra)

    def step(self, next_tokens: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        self.input_ids = next_tokens[:, None]
        self.position_ids = self.position_ids[:, -1:] + 1
        if self.padded:
            ones = self.attention_mask.new_ones(self.attention_mask.shape[0], 1)
            self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        return self._forward(extra)


class GLMInputs:
    """Inputs of ChatGLM-6B: the 2-D padding mask over cached + new tokens, and GLM positions of the new ones."""

    def __init__(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.model = model
        self.input_ids = input_ids
        self.sequence = input_ids
        self.attention_mask = attention_mask
        self.cache = new_kv_cache(model.config)
        self._special = special_ids(model.config)
        self._positions = glm_position_ids

    def _forward(self, new_ids: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        positions = self._positions(self.sequence, self.attention_mask, **self._special)[..., -new_ids.shape[1] :]
        output = self.model(
            input_ids=new_ids,
            position_ids=positions.contiguous(),
            attention_mask=self.attention_mask,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        return output.logits[:, -1]

    def prefill(self, extra: dict[str, Any]) -> torch.Tensor:
        return self._forward(self.sequence, extra)

    def step(self, next_tokens: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        self.sequence = torch.cat([self.sequence, next_tokens[:, None]], dim=1)
        ones = self.attention_mask.new_ones(self.attention_mask.shape[0], 1)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        return self._forward(next_tokens[:, None], extra)


def _glm_processors(tokenizer: PreTrainedTokenizerBase) -> list[LogitsProcessor]:
    return [InvalidScoreLogitsProcessor(tokenizer.convert_tokens_to_ids("▁"))]


def _glm_process_response(text: str) -> str:
    return process_response(text)


_GLM_PLACEHOLDER = "[[训练时间]]"
_GLM_PUNCTUATION = ",!:;?"


def _glm_unstable_tail(text: str) -> int:
    """Characters at the end of a cleaned ChatGLM reply that more text could still change: an ASCII
    mark (made full-width when a CJK character follows) or the start of the `[[训练时间]]` placeholder."""
    tail = 0
    for size in range(min(len(_GLM_PLACEHOLDER) - 1, len(text)), 0, -1):
        if text.endswith(_GLM_PLACEHOLDER[:size]):
            tail = size
            break
    return max(tail, 1 if text[-1:] and text[-1] in _GLM_PUNCTUATION else 0)


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    inputs: type = CausalLMInputs
    """Builds and advances the forward arguments: `inputs(model, input_ids, attention_mask)`."""
    logits_processors: Callable[[PreTrainedTokenizerBase], list[LogitsProcessor]] = lambda tokenizer: []
    """Processors applied before sampling on every step (guards, not sampling settings)."""
    postprocess: Callable[[str], str] | None = None
    """Clean-up of the whole reply text, applied while streaming (see `StablePostprocessor`)."""
    unstable_tail: Callable[[str], int] = lambda text: 0
    """How many final characters of a cleaned prefix may still change as more text arrives."""


FAMILIES: dict[str, ModelFamily] = {
    "chatglm": ModelFamily(GLMInputs, _glm_processors, _glm_process_response, _glm_unstable_tail),
}


def family_of(model: PreTrainedModel) -> ModelFamily:
    return FAMILIES.get(model.config.model_type, ModelFamily())
