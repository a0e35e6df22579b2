"""The OpenAI chat-completions bodies as pydantic models: what `/openapi.json` documents and requests are checked against.

Field names and shapes follow specs/ecosystem-notes.md §4.3 (verified with the official `openai` client). Checks are
strict, as OpenAI's are: `"0.5"` is not a number, `true` is not an integer, JSON's `NaN`/`Infinity` are refused
(`allow_inf_nan=False`), and every string is checked for lone surrogates (`"\\ud800"` decodes in Python's JSON but
cannot be encoded or tokenized). Unknown fields are ignored, as clients send many (`user`, `metadata`, …); fields the
server cannot honour (n > 1, penalties, tools, logprobs) are refused naming the field. `adapter_scale` is this
server's extension: how strongly the adapter acts, 0 (the base model) to 1 (as trained).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, field_validator

#: OpenAI allows at most four stop sequences.
MAX_STOP_SEQUENCES = 4


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the string holds a lone surrogate (e.g. \\ud800); send valid UTF-8 / UTF-16 pairs") from None
    return text


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2**63 else value


def _bounded(low: int, high: int) -> Any:
    """An integer from `low` to `high` (a float with an integral value, `5.0` as some JSON encoders write integers,
    counts as one), bounds set on the integer before the validator wraps it, so /openapi.json
    states them as JSON Schema's minimum/maximum (bounds on the field itself come out as `ge`/`le`, which clients
    ignore)."""
    return Annotated[int, Field(ge=low, le=high), BeforeValidator(_integral)]


TokenCount = _bounded(1, 2**31 - 1)
TopK = _bounded(0, 2**31 - 1)
Seed = _bounded(-(2**63), 2**63 - 1)
OnlyOne = _bounded(1, 1)
#: A string that can be encoded (no lone surrogates).
Text = Annotated[str, AfterValidator(_encodable)]
StopText = Annotated[Text, Field(min_length=1)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class ImageURL(_Body):
    url: Text = Field(description="a base64 data URL (data:image/png;base64,…); http(s) only if the server allows")
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


def _part_kind(part: Any) -> str | None:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return {"text": "TextPart", "image_url": "ImagePart"}.get(kind) if isinstance(kind, str) else None


#: A content part, told apart by `type` (the tags are class names, so error locations name only fields).
ContentPart = Annotated[
    Annotated[TextPart, Tag("TextPart")] | Annotated[ImagePart, Tag("ImagePart")],
    Discriminator(
        _part_kind,
        custom_error_type="content_part_kind",
        custom_error_message="a content part needs 'type': 'text' or 'image_url'",
    ),
]


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart]
    name: Text | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: Literal["text"] = Field(description="only plain text answers are supported")


def _unsupported(value: Any, message: str) -> Any:
    """`value` if it asks for nothing (absent, zero, false, empty, "none", text only), else a refusal."""
    if value not in (None, 0, False, [], {}, "none", ["text"]):
        raise ValueError(message)
    return value


class ChatCompletionRequest(_Body):
    """POST /v1/chat/completions. Absent sampling fields take the served model's defaults."""

    model: Text = Field(min_length=1, description="a model id from GET /v1/models")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = Field(None, description="takes precedence over max_tokens")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: TopK | None = Field(None, description="extension: sample from the k most likely (0 = off)")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="extension: 1 = off")
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: Seed | None = None
    n: OnlyOne | None = Field(None, description="only 1 is supported")
    adapter_scale: float | None = Field(
        None, ge=0.0, le=1.0, description="extension: adapter strength, 0 = the base model, 1 = as trained (default)"
    )
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="only 0 is supported")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="only 0 is supported")
    logprobs: bool | None = Field(None, description="not supported")
    tools: list[dict[str, Any]] | None = Field(None, description="not supported")
    functions: list[dict[str, Any]] | None = Field(None, description="not supported")
    function_call: Any = Field(None, description="not supported")
    tool_choice: Any = Field(None, description="not supported (only 'none')")
    logit_bias: dict[str, Any] | None = Field(None, description="not supported")
    top_logprobs: Any = Field(None, description="not supported")
    modalities: list[Any] | None = Field(None, description="only ['text']")
    audio: Any = Field(None, description="not supported")
    prediction: Any = Field(None, description="not supported")
    response_format: ResponseFormat | None = None
    user: Text | None = None

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        return _unsupported(value, "is not supported; use 'repetition_penalty'")

    @field_validator(
        "logprobs", "tools", "functions", "function_call", "tool_choice", "logit_bias", "top_logprobs", "modalities",
        "audio", "prediction",
    )  # fmt: skip
    @classmethod
    def _no_extras(cls, value: Any) -> Any:
        return _unsupported(value, "is not supported by this server")

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


# --- responses (documented in /openapi.json; the server builds them with these models) ----------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class _CompletionObject(BaseModel):
    """What every object of one completion shares."""

    id: str
    created: int
    model: str


class ChatCompletion(_CompletionObject):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(_CompletionObject):
    """One `data:` event of a streamed answer (`stream: true`); the stream ends with `data: [DONE]`."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mmadapter"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    model: str = Field(description="the default model id")
    models: list[str] = Field(description="every model id served (GET /v1/models)")
    pending: int = Field(description="requests generating or waiting")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail
