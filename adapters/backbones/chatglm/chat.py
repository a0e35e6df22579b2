"""ChatGLM-6B's `chat()` / `stream_chat()`: the official round prompt, sampling defaults and reply clean-up.

Spec §2.8: the prompt is the raw query without history, else `[Round i]\\n问：q\\n答：r\\n` turns (i from 0)
then `[Round n]\\n问：{query}\\n答：` (the "chatglm" template of `mmadapter.core.templates`); sampling
with top_p 0.7, temperature 0.95, max_length 2048 (prompt included), stopping at `<eop>`; a NaN/Inf guard
that replaces broken scores by a forced "▁" (`InvalidScoreLogitsProcessor`); and `process_response`, which
strips the text, fills the `[[训练时间]]` placeholder and turns ASCII punctuation next to CJK characters
full-width (the tokenizer normalises full-width punctuation away, so the model emits ASCII).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from mmadapter.core.templates import get_template

Turn = tuple[str, str]

#: Official sampling defaults of `chat()` and `stream_chat()`.
CHAT_DEFAULTS: dict[str, Any] = {
    "max_length": 2048,
    "num_beams": 1,
    "do_sample": True,
    "top_p": 0.7,
    "temperature": 0.95,
}

_FULL_WIDTH = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}
_CJK = "\u4e00-\u9fff"


def process_response(text: str) -> str:
    """The official reply clean-up (`ChatGLMForConditionalGeneration.process_response`)."""
    text = text.strip().replace("[[训练时间]]", "2023年")
    for ascii_mark, full_width in _FULL_WIDTH.items():
        mark = re.escape(ascii_mark)
        text = re.sub(rf"([{_CJK}]){mark}", rf"\1{full_width}", text)
        text = re.sub(rf"{mark}([{_CJK}])", rf"{full_width}\1", text)
    return text


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """If any score is NaN/Inf (fp16 overflow), zero them all and force `fallback_token_id` (official: id 5, "▁")."""

    def __init__(self, fallback_token_id: int = 5):
        self.fallback_token_id = fallback_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not torch.isfinite(scores).all():
            scores = torch.zeros_like(scores)
            scores[..., self.fallback_token_id] = 5e4
        return scores


def chat_prompt(query: str, history: Sequence[Turn] = ()) -> str:
    return get_template("chatglm").render(query, history=tuple(history))


def decode_reply(tokenizer, generated: Sequence[int]) -> str:
    """Generated ids -> cleaned reply: cut at the first `<eop>`, drop special/pad ids, decode, post-process."""
    ids = list(generated)
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return process_response(tokenizer.decode(ids, skip_special_tokens=True))


def _generation_kwargs(tokenizer, overrides: dict[str, Any]) -> dict[str, Any]:
    kwargs = {**CHAT_DEFAULTS, **overrides}
    if "max_new_tokens" in overrides and "max_length" not in overrides:
        kwargs.pop("max_length")
    processors = LogitsProcessorList([InvalidScoreLogitsProcessor(tokenizer.convert_tokens_to_ids("▁"))])
    processors.extend(kwargs.pop("logits_processor", None) or [])
    kwargs["logits_processor"] = processors
    if not kwargs["do_sample"]:
        kwargs.pop("top_p"), kwargs.pop("temperature")
    return kwargs


def _encode(model, tokenizer, query: str, history: Sequence[Turn]) -> dict[str, torch.Tensor]:
    inputs = tokenizer([chat_prompt(query, history)], return_tensors="pt")
    return {name: tensor.to(model.device) for name, tensor in inputs.items()}


def chat(model, tokenizer, query: str, history: Sequence[Turn] | None = None, **generate_kwargs: Any):
    """One turn: returns `(response, history + [(query, response)])`; keyword arguments go to `generate()`."""
    history = list(history or [])
    inputs = _encode(model, tokenizer, query, history)
    output = model.generate(**inputs, **_generation_kwargs(tokenizer, generate_kwargs))
    response = decode_reply(tokenizer, output[0, inputs["input_ids"].shape[1] :].tolist())
    return response, history + [(query, response)]


def stream_chat(
    model, tokenizer, query: str, history: Sequence[Turn] | None = None, **generate_kwargs: Any
) -> Iterator[tuple[str, list[Turn]]]:
    """Yield `(response_so_far, history + [(query, response_so_far)])` after every generated token.

    A plain generator, no streamer thread: `generate()` runs one token at a time on a KV cache that
    carries over, so sampling draws the same random numbers as one `chat()` call, and a consumer that
    stops iterating stops generation at once.
    """
    history = list(history or [])
    inputs = _encode(model, tokenizer, query, history)
    kwargs = _generation_kwargs(tokenizer, generate_kwargs)
    prompt_length = inputs["input_ids"].shape[1]
    budget = kwargs.pop("max_new_tokens", None) or kwargs.pop("max_length") - prompt_length
    kwargs.pop("max_length", None)
    ids, mask, cache = inputs["input_ids"], inputs["attention_mask"], None
    for _ in range(budget):
        output = model.generate(
            input_ids=ids,
            attention_mask=mask,
            past_key_values=cache,
            max_new_tokens=1,
            return_dict_in_generate=True,
            **kwargs,
        )
        ids, cache = output.sequences, output.past_key_values
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        response = decode_reply(tokenizer, ids[0, prompt_length:].tolist())
        yield response, history + [(query, response)]
        if ids[0, -1].item() == tokenizer.eos_token_id:
            return
