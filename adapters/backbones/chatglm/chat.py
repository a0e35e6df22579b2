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
import threading
from collections.abc import Iterator, Sequence
from queue import Queue
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

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


class _TokenQueue(BaseStreamer):
    """Receives generate()'s tokens (the prompt first, then one step at a time) for a consumer thread."""

    def __init__(self) -> None:
        self.queue: Queue[list[int] | None] = Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


class _StopWhenSet(StoppingCriteria):
    """Stops generate() at the next step once the consumer has gone away."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_chat(
    model, tokenizer, query: str, history: Sequence[Turn] | None = None, **generate_kwargs: Any
) -> Iterator[tuple[str, list[Turn]]]:
    """Yield `(response_so_far, history + [(query, response_so_far)])` after every generated token."""
    history = list(history or [])
    inputs = _encode(model, tokenizer, query, history)
    kwargs = _generation_kwargs(tokenizer, generate_kwargs)
    streamer, stop, failure = _TokenQueue(), threading.Event(), []
    criteria = StoppingCriteriaList([_StopWhenSet(stop), *(kwargs.pop("stopping_criteria", None) or [])])

    def run() -> None:
        try:
            model.generate(**inputs, **kwargs, streamer=streamer, stopping_criteria=criteria)
        except Exception as error:  # re-raised in the consumer
            failure.append(error)
        finally:
            streamer.end()

    worker = threading.Thread(target=run, name="chatglm-stream-chat", daemon=True)
    worker.start()
    generated: list[int] = []
    try:
        while (tokens := streamer.queue.get()) is not None:
            generated.extend(tokens)
            response = decode_reply(tokenizer, generated)
            yield response, history + [(query, response)]
    finally:
        stop.set()
        worker.join()
    if failure:
        raise failure[0]
