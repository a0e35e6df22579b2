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
from mmadapter.serve.batching import BatchScheduler, GenerationRequest
from mmadapter.serve.generate import TextDelta
from mmadapter.serve.loader import ServedModel, ServedVariant
from mmadapter.serve.prompting import chat_text, encode_chat
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
    adapter: str | None = None
    """The model id asked for (OpenAI `model`): an adapter's name or `base`; None = the default one."""
    adapter_scale: float = 1.0
    """How strongly the adapter acts, 0 (the base model exactly) to 1 (as trained)."""
    system: str = ""
    """A system message (a chat template's system turn; the official templates put it before the question)."""
    prompt_ids: list[int] | None = None
    """The prompt already encoded with `prompt_ids` (off the generation thread); None: encoded when submitted."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.adapter_scale <= 1.0:  # also refuses NaN
            raise ValueError(f"adapter_scale must be between 0 and 1, got {self.adapter_scale!r}")


@dataclasses.dataclass
class TurnStarted:
    """First event of a turn: the prompt is accepted and generation begins."""

    prompt_tokens: int


def visual_prompt_for(variant: ServedVariant, image: Image.Image | None) -> torch.Tensor | None:
    """The image's visual prompt (1, K, D) for this adapter, computed once per picture (None for text models)."""
    if not variant.takes_images:
        if image is not None:
            raise ImageNotSupportedError(
                f"this model ({variant.method or 'no adapter'}) does not take images; send text only"
            )
        return None
    return visual_prompter_of(variant.model).for_image(image)


def visual_inputs(served: ServedModel, image: Image.Image | None) -> dict[str, torch.Tensor]:
    """The forward arguments carrying the image for the default model (empty for text models)."""
    prompt = visual_prompt_for(served.variant(None), image)
    return {} if prompt is None else {VISUAL_PROMPT_KWARG: prompt}


def prompt_text(served: ServedModel, turn: ChatTurn) -> str:
    """The prompt's text as its template renders it, without special tokens (a string operation)."""
    return _with_template(chat_text, served, turn)


def prompt_ids(served: ServedModel, turn: ChatTurn) -> list[int]:
    """The prompt's token ids for the turn's model id (tokenizer work only: safe on any thread)."""
    if turn.prompt_ids is not None:
        return list(turn.prompt_ids)
    return _with_template(encode_chat, served, turn)


def _with_template(encoding, served: ServedModel, turn: ChatTurn):
    """`encoding` (chat_text or encode_chat) of the turn's conversation with the template of its model id."""
    template = served.variant(turn.adapter).template
    model_type = served.model.config.model_type
    image = turn.image is not None
    return encoding(served.tokenizer, model_type, template, turn.message, turn.history, system=turn.system, image=image)


def turn_params(served: ServedModel, turn: ChatTurn) -> SamplingParams:
    """The turn's sampling settings (or its model's defaults) with the template's stop strings and tokens added
    (a Llama 3 chat ends a turn with `<|eot_id|>`, which is not its end-of-sequence token)."""
    template = served.variant(turn.adapter).template
    params = turn.params or served.variant(turn.adapter).defaults
    return params.replace(
        stop=tuple(dict.fromkeys(template.stop + params.stop)),
        stop_token_ids=tuple(dict.fromkeys(tuple(template.stop_token_ids) + params.stop_token_ids)),
    )


def generation_request(served: ServedModel, turn: ChatTurn, ids: list[int]) -> GenerationRequest:
    """What the scheduler needs for the turn; the visual prompt is model work (the generation thread's)."""
    variant = served.variant(turn.adapter)
    problem = variant.scale_problem(turn.adapter_scale)
    if problem is not None:
        raise ValueError(f"adapter_scale: {problem}")
    visual_prompt = visual_prompt_for(variant, turn.image)
    params = turn_params(served, turn)
    return GenerationRequest(ids, params, variant.route, turn.adapter_scale, visual_prompt, variant.engine)


def stream_turn(served: ServedModel, turn: ChatTurn) -> Iterator[TurnStarted | TextDelta]:
    """Yield `TurnStarted`, then the answer's text deltas (one request alone; closing stops generation).

    Raises `PromptTooLongError` / `ImageNotSupportedError` (ValueErrors) before anything is yielded.
    """
    ids = prompt_ids(served, turn)
    served.engine.check_prompt_length(len(ids))
    request = generation_request(served, turn, ids)
    scheduler = BatchScheduler(served.engine, max_batch=1)
    sequence = scheduler.add(request)
    yield TurnStarted(len(ids))
    try:
        while not sequence.finished:
            for _, delta in scheduler.step():
                yield delta
    finally:
        scheduler.close()
