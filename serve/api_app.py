"""The FastAPI application: `/v1/chat/completions` (JSON or server-sent events), `/v1/models`, `/health`, `/metrics`.

A chat request goes: pydantic checks the body (types, ranges, NaN, lone surrogates: 400 naming the field) -> the
model id -> the image is decoded and the prompt tokenized and length-checked on the threadpool, before the request
may queue -> the worker takes it or answers 429 (`--max-queue`) -> the answer is awaited (or streamed) while a
client that disconnects cancels it. Every error is OpenAI-shaped (`{"error": {"message", "type", "param",
"code"}}`); nothing a client sends can produce a 5xx but a failure inside generation, which is logged.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from anyio import CapacityLimiter
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware import Middleware
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from mmadapter.serve.api_guards import AccessLog, BearerAuth, BodyLimits, RejectedBody, error_response
from mmadapter.serve.api_jobs import JobEvents, cancel_on_disconnect
from mmadapter.serve.api_metrics import APIMetrics
from mmadapter.serve.api_models import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Delta,
    ErrorBody,
    Health,
    ModelCard,
    ModelList,
)
from mmadapter.serve.api_prompts import count_prompt_tokens
from mmadapter.serve.api_settings import ServerSettings
from mmadapter.serve.chat import TurnStarted
from mmadapter.serve.generate import PromptTooLongError, TextDelta
from mmadapter.serve.images import load_request_image
from mmadapter.serve.loader import ServedModel, UnknownModelError
from mmadapter.serve.openai_api import APIError, ResponseIds, chat_turn, invalid, models_list
from mmadapter.serve.worker import Event, Failed, GenerationWorker, QueueFullError, WorkerClosedError

logger = logging.getLogger("mmadapter.serve")
#: The route whose requests `mmadapter_requests_total` counts, by status.
CHAT_COMPLETIONS = "/v1/chat/completions"

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 404, 408, 413, 429, 503)
}


@dataclasses.dataclass
class APIState:
    """What the routes share: the model, its worker, the settings and the metrics."""

    served: ServedModel
    worker: GenerationWorker
    settings: ServerSettings
    started: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        worker = self.worker
        self.metrics = APIMetrics(waiting=lambda: worker.waiting, running=lambda: worker.running)
        # Threads that wait for job events: one per open connection at most (see api_jobs).
        self.event_threads = CapacityLimiter(self.settings.max_connections + 1)

    @property
    def model_ids(self) -> Sequence[str]:
        return self.served.model_ids()


def generation_error(error: BaseException) -> APIError:
    """The HTTP error a client sees for a failure reported by the worker."""
    if isinstance(error, PromptTooLongError):
        return APIError(400, str(error), param="messages", code="context_length_exceeded")
    if isinstance(error, WorkerClosedError):
        return APIError(503, str(error), type="server_error", code="shutting_down")
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    return APIError(500, "generation failed; see the server log", type="server_error")


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _param(loc: Sequence[str | int]) -> str:
    """`('messages', 0, 'content', 'list[ContentPart]', 1)` -> `messages[0].content[1]` (union member tags dropped)."""
    param = ""
    for segment in loc:
        if isinstance(segment, int):
            param += f"[{segment}]"
        elif segment.isidentifier() and segment not in _TYPE_TAGS and not segment[0].isupper():
            param += f".{segment}" if param else segment
    return param


def validation_error(error: RequestValidationError) -> APIError:
    """The first problem of a body pydantic refused, as a 400 naming the field.

    A union (`content`: a string or a list of parts) reports a type mismatch for every member; a problem found
    inside a member (a lone surrogate in `content[0].text`) is the one that tells the client what to fix.
    """
    problems = list(error.errors())
    if problems[0]["type"] == "json_invalid":
        reason = problems[0].get("ctx", {}).get("error", "JSON decode error")
        return APIError(400, f"the request body is not valid JSON ({reason})", code="invalid_json")
    # Without a problem inside a member, the deepest type mismatch is the one that names what to fix
    # (`content[0].image_url` must be an object), not the union member it did not match (`content` as a string).
    problems = [p for p in problems if not p["type"].endswith("_type")] or sorted(
        problems, key=lambda p: -len(p["loc"])
    )
    param = _param(problems[0]["loc"][1:])
    if not param:
        return invalid("the request body must be a JSON object sent with 'Content-Type: application/json'")
    same = [p for p in problems if _param(p["loc"][1:]) == param]
    if same[0]["type"] == "missing":
        return invalid(f"'{param}' is required", param)
    reasons = "; ".join(dict.fromkeys(p["msg"].removeprefix("Value error, ") for p in same))
    return invalid(f"'{param}': {reasons}", param)


def _http_error(error: HTTPException) -> APIError:
    if isinstance(error, RejectedBody):
        return error.error
    if error.status_code == 404:
        return APIError(404, "no such route", code="not_found")
    if error.status_code == 405:
        return APIError(405, "this method is not allowed here", code="method_not_allowed")
    if error.status_code == 400:  # FastAPI could not read the body as JSON (e.g. not UTF-8)
        return APIError(400, f"the request body could not be read as JSON ({error.detail})", code="invalid_json")
    return APIError(error.status_code, str(error.detail))


def _install_error_handlers(app: FastAPI, metrics: APIMetrics) -> None:
    def refused(request: Request, error: APIError, headers: dict[str, str] | None = None) -> Response:
        """A chat completion refused before its route ran (unreadable or invalid body, body limits) is counted
        here; the route counts every request it answers."""
        if request.url.path == CHAT_COMPLETIONS:
            metrics.requests.labels(str(error.status)).inc()
        return error_response(error, headers)

    async def api_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, APIError)
        return error_response(error)

    async def invalid_body(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        return refused(request, validation_error(error))

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        return refused(request, _http_error(error), dict(error.headers or {}))

    async def unexpected(request: Request, error: Exception) -> Response:
        logger.error("request failed", exc_info=error)
        return error_response(APIError(500, "internal server error", type="server_error"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _sse(payload: dict[str, Any] | str) -> bytes:
    return b"data: " + (payload if isinstance(payload, str) else json.dumps(payload)).encode() + b"\n\n"


class _Answer:
    """One chat completion being answered: turns job events into the response and counts them in the metrics.

    Events come in batches (`JobEvents.next_batch`); a batch's text goes out as one chunk.
    """

    def __init__(self, state: APIState, events: JobEvents, model: str, arrived: float, prompt_tokens: int) -> None:
        self.metrics = state.metrics
        self.events = events
        self.ids = ResponseIds(model)
        self.arrived = arrived
        self.prompt_tokens = prompt_tokens
        self.generated = 0
        self._unread: list[Event] = []

    async def first_event(self) -> Event | None:
        """The job's first event (`TurnStarted` or `Failed`); `None` if it ended without one."""
        batch = await self.events.next_batch()
        self._unread = batch[1:]
        return batch[0] if batch else None

    async def _batches(self) -> AsyncIterator[list[Event]]:
        if self._unread:
            yield self._unread
        while batch := await self.events.next_batch():
            yield batch

    def _text_of(self, batch: list[Event]) -> tuple[str, str | None]:
        """The batch's text and finish reason, counted in the metrics."""
        deltas = [event for event in batch if isinstance(event, TextDelta)]
        if deltas:
            self._count(deltas[-1])
        return "".join(delta.text for delta in deltas), next((d.finish_reason for d in deltas if d.finish_reason), None)

    def _count(self, delta: TextDelta) -> None:
        if self.generated == 0 and delta.completion_tokens > 0:
            self.metrics.time_to_first_token.observe(time.perf_counter() - self.arrived)
        self.metrics.generated_tokens.inc(delta.completion_tokens - self.generated)
        self.generated = delta.completion_tokens

    async def whole(self) -> dict[str, Any]:
        text, finish_reason = [], "stop"
        async for batch in self._batches():
            piece, finish = self._text_of(batch)
            if failed := _failure(batch):
                raise generation_error(failed.error)
            text.append(piece)
            finish_reason = finish or finish_reason
        return self.ids.completion("".join(text), finish_reason, self.prompt_tokens, self.generated)

    async def stream(self, include_usage: bool) -> AsyncIterator[bytes]:
        try:
            yield _sse(self.ids.chunk(Delta(role="assistant", content="")))
            async for batch in self._batches():
                piece, finish = self._text_of(batch)
                if piece:
                    yield _sse(self.ids.chunk(Delta(content=piece)))
                if failed := _failure(batch):
                    yield _sse(generation_error(failed.error).body())
                    return
                if finish:
                    yield _sse(self.ids.chunk(Delta(), finish))
            if include_usage:
                yield _sse(self.ids.usage_chunk(self.prompt_tokens, self.generated))
            yield _sse("[DONE]")
        finally:
            self.events.close()


def _failure(batch: list[Event]) -> Failed | None:
    return next((event for event in batch if isinstance(event, Failed)), None)


def _routes(app: FastAPI, state: APIState) -> None:
    served, worker, settings, metrics = state.served, state.worker, state.settings, state.metrics

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> JSONResponse:
        """Liveness for load balancers (no API key needed): 503 once the generation thread has stopped."""
        alive = worker.alive
        status = "ok" if alive else "unavailable"
        body = Health(status=status, model=served.name, models=list(state.model_ids), pending=worker.pending)
        return JSONResponse(body.model_dump(), status_code=200 if alive else 503)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics() -> Response:
        """Prometheus text format: queue depth, running requests, tokens, time to first token, answers by status."""
        return Response(metrics.exposition(), media_type=metrics.content_type)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def list_models() -> ModelList:
        return models_list(state.model_ids, state.started)

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
    async def get_model(model_id: str) -> ModelCard:
        for card in models_list(state.model_ids, state.started).data:
            if card.id == model_id:
                return card
        raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")

    stream_schema = {"text/event-stream": {"schema": ChatCompletionChunk.model_json_schema()}}

    @app.post(
        CHAT_COMPLETIONS,
        response_model=ChatCompletion,
        responses={**_ERRORS, 200: {"content": stream_schema}},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """OpenAI chat completions; `stream: true` answers with server-sent events ending in `data: [DONE]`."""
        arrived = time.perf_counter()
        status = 500
        try:
            response = await _complete(body, request, arrived)
            status = response.status_code
            return response
        except APIError as error:
            status = error.status
            raise
        finally:
            metrics.requests.labels(str(status)).inc()

    async def _complete(body: ChatCompletionRequest, request: Request, arrived: float) -> Response:
        try:
            served.variant(body.model)
        except UnknownModelError as error:
            raise APIError(404, str(error), param="model", code="model_not_found") from error
        policy = settings.image_policy
        turn = await run_in_threadpool(
            chat_turn, body, served, lambda url, param: load_request_image(url, param, policy)
        )
        try:
            prompt = await run_in_threadpool(count_prompt_tokens, served, turn, settings.max_prompt_tokens)
        except PromptTooLongError as error:
            raise generation_error(error) from error
        turn = dataclasses.replace(turn, prompt_ids=prompt)  # the worker need not tokenize again
        try:
            job = await run_in_threadpool(worker.submit, turn)
        except QueueFullError as error:
            raise APIError(429, str(error), type="rate_limit_error", code="queue_full") from error
        except WorkerClosedError as error:
            raise generation_error(error) from error
        metrics.prompt_tokens.inc(len(prompt))
        events = JobEvents(job, state.event_threads)
        answer = _Answer(state, events, body.model, arrived, len(prompt))
        try:
            async with cancel_on_disconnect(request.receive, job):
                first = await answer.first_event()
                if isinstance(first, Failed):
                    raise generation_error(first.error)
                if not isinstance(first, TurnStarted):  # the client left while its request waited
                    return Response(status_code=499)
                answer.prompt_tokens = first.prompt_tokens
                if not body.stream:
                    return JSONResponse(await answer.whole())
        except BaseException:
            events.close()
            raise
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(answer.stream(include_usage), media_type="text/event-stream", headers=headers)


def create_app(state: APIState) -> FastAPI:
    """The API of one served model; `state.worker` may be shared with the web UI."""
    settings = state.settings
    middleware = [  # outermost first: every request is logged, then authorised, then its body bounded
        Middleware(AccessLog),
        Middleware(BearerAuth, api_key=settings.api_key),
        Middleware(BodyLimits, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout),
    ]
    app = FastAPI(
        title="mmadapter",
        summary="OpenAI-compatible chat completions for a model with a parameter-efficient adapter",
        docs_url=None,  # the interactive pages load scripts from a CDN; /openapi.json is what tools need
        redoc_url=None,
        middleware=middleware,
    )
    _install_error_handlers(app, state.metrics)
    _routes(app, state)
    app.openapi = functools.partial(_openapi_without_422, app)
    return app


def _openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema without the 422 responses it adds to every route with a body: this API answers a body
    it cannot accept with an OpenAI-shaped 400 (`validation_error`)."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
    return app.openapi_schema
