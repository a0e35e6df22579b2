"""One chat turn, the same for the terminal, the HTTP API and the web demo.

A turn is the new user message, the finished (user, assistant) exchanges before it, and an
optional image. The adapter's prompt template renders them (the official multimodal prompt is
Alpaca without input, with the question as the instruction; the image enters only through the
visual prompt), the image becomes a visual prompt once, and the engine streams the answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch
from PIL import Image

from mmadapter.adapters.methods.llama_adapter_v2 import visual_prompter_of
from mmadapter.adapters.methods.prompt_attention import VISUAL_PROMPT_KWARG
from mmadapter.serve.generate import TextDelta
from mmadapter.serve.loader import ServedModel
from mmadapter.serve.prompting import encode_chat
from mmadapter.serve.sampling import SamplingParams


class ImageNotSupportedError(ValueError):
    """An image was sent to a model whose adapter has no visual input."""


@dataclasses.dataclass
class ChatTurn:
    message: str
    history: Sequence[tuple[str, str]] = ()
    image: Image.Image | None = None
    params: SamplingParams | None = None
    """None: the served model's defaults."""


@dataclasses.dataclass
class TurnStarted:
    """First event of a turn: the prompt is accepted and generation begins."""

    prompt_tokens: int


def visual_inputs(served: ServedModel, image: Image.Image | None) -> dict[str, torch.Tensor]:
    """The forward arguments carrying the image, computed once per picture (empty for text models)."""
    if not served.takes_images:
        if image is not None:
            raise ImageNotSupportedError(
                f"this model ({served.method or 'no adapter'}) does not take images; send text only"
            )
        return {}
    prompt = visual_prompter_of(served.model).for_image(image)
    return {} if prompt is None else {VISUAL_PROMPT_KWARG: prompt}


def stream_turn(served: ServedModel, turn: ChatTurn) -> Iterator[TurnStarted | TextDelta]:
    """Yield `TurnStarted`, then the answer's text deltas; closing the iterator stops generation.

    Raises `PromptTooLongError` / `ImageNotSupportedError` (ValueErrors) before anything is yielded.
    """
    params = turn.params or served.defaults
    params = params.replace(stop=tuple(dict.fromkeys(served.template.stop + params.stop)))
    ids = encode_chat(served.tokenizer, served.model.config.model_type, served.template, turn.message, turn.history)
    served.engine.check_prompt_length(len(ids))
    model_inputs = visual_inputs(served, turn.image)
    yield TurnStarted(len(ids))
    yield from served.engine.stream([ids], params, model_inputs)
