"""The OpenAI chat-completions format: request validation and response shapes (no HTTP here).

Shapes follow specs/ecosystem-notes.md §4.3 (verified with the official `openai` client): a
`chat.completion` object with `usage`, and for `stream: true` `chat.completion.chunk` objects
whose first delta carries the role and whose last has `finish_reason`. Every invalid request
becomes an `APIError` with the status and the OpenAI error body `{"error": {"message", "type",
"param", "code"}}`, naming the offending field (e.g. `messages[1].content[0].image_url`).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import Any

from PIL import Image

from mmadapter.serve.chat import ChatTurn
from mmadapter.serve.loader import ServedModel
from mmadapter.serve.sampling import SamplingParams

#: OpenAI allows at most four stop sequences.
MAX_STOP_SEQUENCES = 4
_ROLES = ("system", "developer", "user", "assistant")


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


@dataclasses.dataclass
class ChatCompletionRequest:
    model: str
    turn: ChatTurn
    stream: bool
    include_usage: bool


#: Loads an image URL of a content part (`param` names the part for error messages).
ImageLoader = Callable[[str, str], Image.Image]


def _number(payload: dict[str, Any], name: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"'{name}' must be a number", name)
    if value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise invalid(f"'{name}' must be in {bound}, got {value}", name)
    return float(value)


def _integer(payload: dict[str, Any], name: str, low: int, high: int = 2**63 - 1) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{name}' must be an integer", name)
    if not low <= value <= high:
        raise invalid(f"'{name}' must be in [{low}, {high}], got {value}", name)
    return value


def _stop_strings(payload: dict[str, Any]) -> tuple[str, ...]:
    stop = payload.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("'stop' must be a non-empty string or a list of non-empty strings", "stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid(f"'stop' accepts at most {MAX_STOP_SEQUENCES} sequences", "stop")
    return tuple(stops)


def _reject_unsupported(payload: dict[str, Any]) -> None:
    if payload.get("n", 1) != 1:
        raise invalid("only n=1 is supported", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        if payload.get(name) not in (None, 0, 0.0):
            raise invalid(f"'{name}' is not supported; use 'repetition_penalty'", name)
    if payload.get("logprobs"):
        raise invalid("'logprobs' is not supported", "logprobs")
    if payload.get("tools") or payload.get("functions"):
        raise invalid("tool and function calling are not supported", "tools")
    response_format = payload.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise invalid("only response_format {'type': 'text'} is supported", "response_format")


def sampling_params(payload: dict[str, Any], defaults: SamplingParams) -> SamplingParams:
    """Sampling settings from a request; absent fields keep the served model's defaults."""
    _reject_unsupported(payload)
    max_tokens = _integer(payload, "max_completion_tokens", 1) or _integer(payload, "max_tokens", 1)
    values: dict[str, Any] = {
        "max_new_tokens": max_tokens,
        "temperature": _number(payload, "temperature", 0.0, 2.0),
        "top_p": _number(payload, "top_p", 0.0, 1.0, low_open=True),
        "top_k": _integer(payload, "top_k", 0),
        "repetition_penalty": _number(payload, "repetition_penalty", 0.0, 10.0, low_open=True),
        "seed": _integer(payload, "seed", -(2**63)),
    }
    stop = _stop_strings(payload)
    return defaults.replace(stop=defaults.stop + stop, **{k: v for k, v in values.items() if v is not None})


def _content_parts(content: Any, param: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise invalid("'content' must be a string or a list of content parts", param)
    for index, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid("each content part must be an object with a 'type'", f"{param}[{index}]")
    return content


def _image_url(part: dict[str, Any], param: str) -> str:
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise invalid("an image_url part needs image_url.url (a data: URL)", f"{param}.image_url")
    return url


@dataclasses.dataclass
class _Message:
    role: str
    text: str
    images: list[tuple[str, str]]  # (url, param)


def _parse_message(message: Any, index: int) -> _Message:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid("each message must be an object with 'role' and 'content'", param)
    role = message.get("role")
    if role not in _ROLES:
        raise invalid(f"unsupported role {role!r}; use one of {', '.join(_ROLES)}", f"{param}.role")
    content = message.get("content")
    if content is None:
        raise invalid("'content' is required", f"{param}.content")
    texts, images = [], []
    for part_index, part in enumerate(_content_parts(content, f"{param}.content")):
        part_param = f"{param}.content[{part_index}]"
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise invalid("a text part needs 'text' (a string)", f"{part_param}.text")
            texts.append(part["text"])
        elif part["type"] == "image_url" and role == "user":
            images.append((_image_url(part, part_param), f"{part_param}.image_url"))
        else:
            raise invalid(f"content part type {part['type']!r} is not supported in a {role} message", part_param)
    return _Message("system" if role == "developer" else role, "\n".join(texts), images)


def conversation(messages: Any) -> tuple[str, list[tuple[str, str]], list[tuple[str, str]]]:
    """OpenAI messages -> (new user message, finished (user, assistant) exchanges, images as (url, param)).

    System messages are put before the first user message (the templates have no system slot);
    consecutive messages of one role are joined; the last message must be the user's.
    """
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list", "messages")
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
    if system:
        turns[0].text = f"{system}\n\n{turns[0].text}" if turns[0].text else system
    history = [(turns[i].text, turns[i + 1].text) for i in range(0, len(turns) - 1, 2)]
    images = [image for turn in turns for image in turn.images]
    return turns[-1].text, history, images


def parse_chat_request(payload: Any, served: ServedModel, load_image: ImageLoader) -> ChatCompletionRequest:
    """Validate a decoded JSON body and turn it into a chat turn for the served model."""
    if not isinstance(payload, dict):
        raise invalid("the request body must be a JSON object")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required", "model")
    if model != served.name:
        message = f"the model {model!r} does not exist; this server serves {served.name!r}"
        raise APIError(404, message, param="model", code="model_not_found")
    message, history, images = conversation(payload.get("messages"))
    if len(images) > 1:
        raise invalid("this model takes one image per conversation", images[1][1])
    if images and not served.takes_images:
        raise invalid(f"the model {served.name!r} does not take images", images[0][1], code="image_not_supported")
    if not message and not images:
        raise invalid("the last user message is empty", "messages")
    params = sampling_params(payload, served.defaults)
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("'stream' must be a boolean", "stream")
    options = payload.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("'stream_options' must be an object", "stream_options")
    image = load_image(*images[0]) if images else None
    turn = ChatTurn(message, history, image, params)
    return ChatCompletionRequest(model, turn, stream, bool(options.get("include_usage")))


@dataclasses.dataclass
class ResponseIds:
    """What every object of one completion shares."""

    model: str
    id: str = dataclasses.field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def _base(self, object_type: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_type, "created": self.created, "model": self.model}

    def completion(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {
            **self._base("chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": usage(prompt_tokens, completion_tokens),
        }

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {**self._base("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The extra last chunk of `stream_options.include_usage`: no choices, only usage."""
        return {**self._base("chat.completion.chunk"), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def models_list(served: ServedModel, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": served.name, "object": "model", "created": created, "owned_by": "mmadapter"}],
    }
