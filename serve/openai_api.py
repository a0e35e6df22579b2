"""The OpenAI chat-completions format: a checked request -> a chat turn, and the response objects (no HTTP here).

Shapes follow specs/ecosystem-notes.md §4.3 (verified with the official `openai` client): a `chat.completion`
object with `usage`, and for `stream: true` `chat.completion.chunk` objects whose first delta carries the role and
whose last has `finish_reason`. Every invalid request becomes an `APIError` with the status and the OpenAI error
body `{"error": {"message", "type", "param", "code"}}`, naming the offending field (e.g.
`messages[1].content[0].image_url`). Types and ranges are checked earlier, by the pydantic models of
`mmadapter.serve.api_models`; what is checked here needs the conversation or the served model.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from mmadapter.serve.api_models import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    TextPart,
    Usage,
)
from mmadapter.serve.chat import ChatTurn
from mmadapter.serve.loader import ServedModel
from mmadapter.serve.sampling import SamplingParams


class APIError(Exception):
    """An HTTP error with an OpenAI-shaped JSON body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


#: Loads an image URL of a content part (`param` names the part for error messages).
ImageLoader = Callable[[str, str], Image.Image]


def sampling_params(request: ChatCompletionRequest, defaults: SamplingParams) -> SamplingParams:
    """Sampling settings from a request; absent fields keep the served model's defaults."""
    values: dict[str, Any] = {
        "max_new_tokens": request.max_completion_tokens or request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "repetition_penalty": request.repetition_penalty,
        "seed": request.seed,
    }
    changes = {name: value for name, value in values.items() if value is not None}
    return defaults.replace(stop=defaults.stop + request.stop_sequences, **changes)


@dataclasses.dataclass
class _Message:
    role: str
    text: str
    images: list[tuple[str, str]]  # (url, param)


def _parse_message(message: ChatMessage, index: int) -> _Message:
    param = f"messages[{index}]"
    if isinstance(message.content, str):
        return _Message("system" if message.role == "developer" else message.role, message.content, [])
    texts, images = [], []
    for part_index, part in enumerate(message.content):
        part_param = f"{param}.content[{part_index}]"
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif message.role == "user":
            images.append((part.image_url.url, f"{part_param}.image_url"))
        else:
            raise invalid(f"content part type {part.type!r} is only supported in user messages", part_param)
    return _Message("system" if message.role == "developer" else message.role, "\n".join(texts), images)


@dataclasses.dataclass
class Conversation:
    """OpenAI messages as a chat turn takes them."""

    message: str
    """The new user message."""
    history: list[tuple[str, str]]
    """The finished (user, assistant) exchanges before it."""
    images: list[tuple[str, str]]
    """Every image as (url, param)."""
    system: str = ""
    """The system and developer messages, joined (the template decides where they go)."""


def conversation(messages: Sequence[ChatMessage]) -> Conversation:
    """OpenAI messages -> the new user message, the exchanges before it, the images and the system text.

    Consecutive messages of one role are joined; the last message must be the user's; a conversation that starts
    with the assistant gets an empty user message before it.
    """
    parsed = [_parse_message(message, index) for index, message in enumerate(messages)]
    system = "\n\n".join(m.text for m in parsed if m.role == "system" and m.text)
    turns: list[_Message] = []
    for message in (m for m in parsed if m.role != "system"):
        if turns and turns[-1].role == message.role:
            turns[-1].text = "\n".join(t for t in (turns[-1].text, message.text) if t)
            turns[-1].images += message.images
        else:
            turns.append(dataclasses.replace(message, images=list(message.images)))
    if not turns or turns[-1].role != "user":
        raise invalid("the last message must come from the user", "messages")
    if turns[0].role == "assistant":
        turns.insert(0, _Message("user", "", []))
    history = [(turns[i].text, turns[i + 1].text) for i in range(0, len(turns) - 1, 2)]
    images = [image for turn in turns for image in turn.images]
    return Conversation(turns[-1].text, history, images, system)


def chat_turn(request: ChatCompletionRequest, served: ServedModel, load_image: ImageLoader) -> ChatTurn:
    """The chat turn a checked request asks for (decodes its image: run it off the event loop)."""
    chat = conversation(request.messages)
    variant = served.variant(request.model)
    if len(chat.images) > 1:
        raise invalid("this model takes one image per conversation", chat.images[1][1])
    if chat.images and not variant.takes_images:
        raise invalid(f"the model {variant.name!r} does not take images", chat.images[0][1], code="image_not_supported")
    if not chat.message and not chat.images:
        raise invalid("the last user message is empty", "messages")
    scale = 1.0 if request.adapter_scale is None else request.adapter_scale
    problem = variant.scale_problem(scale)
    if problem is not None:
        raise invalid(problem, "adapter_scale")
    params = sampling_params(request, variant.defaults)
    image = load_image(*chat.images[0]) if chat.images else None
    return ChatTurn(
        chat.message, chat.history, image, params, adapter=request.model, adapter_scale=scale, system=chat.system
    )


@dataclasses.dataclass
class ResponseIds:
    """What every object of one completion shares."""

    model: str
    id: str = dataclasses.field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def completion(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        choice = Choice(message=AssistantMessage(content=text), finish_reason=finish_reason)
        usage = Usage.of(prompt_tokens, completion_tokens)
        return ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage
        ).model_dump()

    def chunk(self, delta: Delta, finish_reason: str | None = None) -> dict[str, Any]:
        choice = ChunkChoice(delta=delta, finish_reason=finish_reason)
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])
        body = chunk.model_dump(exclude={"usage"})
        body["choices"][0]["delta"] = delta.model_dump(exclude_none=True)
        return body

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The extra last chunk of `stream_options.include_usage`: no choices, only usage."""
        usage = Usage.of(prompt_tokens, completion_tokens)
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        ).model_dump()


def models_list(model_ids: Sequence[str], created: int) -> ModelList:
    return ModelList(data=[ModelCard(id=model_id, created=created) for model_id in model_ids])
