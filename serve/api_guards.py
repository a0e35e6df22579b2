"""ASGI middleware between uvicorn and the API routes: the access log, the API key, and the request-body limits.

They run before FastAPI reads a body, so a client without the key, or with a body over `max_body_bytes`
(announced in Content-Length or counted as it arrives), or one that sends its body slower than `body_timeout`
seconds allow, is answered without the server reading or holding more than the limit. The access log holds the
method, the path, the query's parameter names (values redacted: clients put keys in `?api_key=`), the status and
the time taken; never headers, so the key is never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import urllib.parse
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mmadapter.serve.openai_api import APIError

logger = logging.getLogger("mmadapter.serve")

#: Routes open without the API key (load balancers and orchestrators probe it).
OPEN_PATHS = frozenset({"/health"})


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The OpenAI-shaped JSON answer of `error`, with the headers its status calls for."""
    extra = dict(headers or {})
    if error.status in (429, 503):
        extra.setdefault("Retry-After", "1")
    if error.status == 401:
        extra["WWW-Authenticate"] = "Bearer"
    if error.status in (408, 413):  # the rest of the body is not read: the connection cannot be reused
        extra["Connection"] = "close"
    return JSONResponse(error.body(), status_code=error.status, headers=extra)


class RejectedBody(HTTPException):
    """Raised from `receive` when the body is too large or too slow; FastAPI passes HTTPExceptions through."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.status, error.message)
        self.error = error


def redacted_target(scope: Scope) -> str:
    """The request path with every query value replaced, e.g. `/v1/models?api_key=[redacted]`."""
    query = scope.get("query_string", b"").decode("latin-1")
    if not query:
        return scope["path"]
    names = [name for name, _ in urllib.parse.parse_qsl(query, keep_blank_values=True)] or ["[unparsed]"]
    return scope["path"] + "?" + "&".join(f"{urllib.parse.quote(name)}=[redacted]" for name in names)


class AccessLog:
    """One log line per request: client, method, redacted target, status, milliseconds."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: list[int] = []

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            client = (scope.get("client") or ("-",))[0]
            milliseconds = (time.perf_counter() - started) * 1000
            code: Any = status[0] if status else "-"
            logger.info('%s "%s %s" %s %.0f ms', client, scope["method"], redacted_target(scope), code, milliseconds)


class BearerAuth:
    """Every route but `OPEN_PATHS` needs `Authorization: Bearer <key>` (compared in constant time)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self._key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._key and scope["path"].rstrip("/") not in OPEN_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, provided = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(provided.strip(), self._key):
                message = "invalid or missing API key (send 'Authorization: Bearer <key>')"
                await error_response(APIError(401, message, code="invalid_api_key"))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit:,} bytes", code="request_too_large")


class BodyLimits:
    """Refuse bodies over `max_bytes` (before reading, when Content-Length says so) or slower than `timeout` s."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            error = _too_large(self.max_bytes) if length.isdigit() else APIError(400, "invalid Content-Length header")
            await error_response(error)(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout
        received = 0
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # afterwards only disconnects arrive; waiting for one has no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                message = f"the request body did not arrive within {self.timeout:g} s"
                raise RejectedBody(APIError(408, message, code="request_timeout")) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RejectedBody(_too_large(self.max_bytes))
                body_done = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)
