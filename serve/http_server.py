"""The OpenAI-compatible HTTP server: `/v1/chat/completions` (+ streaming), `/v1/models`, `/health`.

Built on the standard library's `ThreadingHTTPServer` rather than fastapi + uvicorn: the API is
four routes and server-sent events are a few lines, while what matters under load is explicit
here: the body is never read past `max_body_bytes`, a request that cannot queue is answered 429
at once, and a client that disconnects is noticed (failed write while streaming, or a closed
socket while waiting) and cancels its generation. It needs no extra dependency, so `mmadapter
serve` works on a bare install; the gradio UI (`--ui`) runs in the same process on its own port
and shares the same generation queue.

Shutdown (Ctrl-C, SIGTERM, `close()`) is graceful and bounded: the listening socket closes,
waiting requests are answered 503, the running generation stops at its next piece of text, and every
handler thread and the generation thread are joined before the interpreter may exit. A daemon
thread left inside torch while Python finalises makes libtorch abort the process (exit code -6).

Security: binds to 127.0.0.1 unless told otherwise; with an API key every route but /health
needs `Authorization: Bearer <key>`, compared in constant time; the access log holds the request
line and status only, never headers, so the key is never logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import logging
import select
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mmadapter.serve.chat import TurnStarted
from mmadapter.serve.generate import PromptTooLongError, TextDelta
from mmadapter.serve.images import ImagePolicy, load_request_image
from mmadapter.serve.loader import ServedModel
from mmadapter.serve.openai_api import APIError, ResponseIds, models_list, parse_chat_request
from mmadapter.serve.worker import Failed, GenerationWorker, QueueFullError, WorkerClosedError
from mmadapter.vision.images import DEFAULT_MAX_PIXELS

logger = logging.getLogger("mmadapter.serve")

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
HEALTH_PATH = "/health"


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = dataclasses.field(default=None, repr=False)
    allow_remote_images: bool = False
    max_queue: int = 16
    """Requests that may wait while one generates; more are answered 429."""
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    socket_timeout: float = 60.0
    """Seconds a client may take to send its request or accept streamed data."""

    @property
    def image_policy(self) -> ImagePolicy:
        return ImagePolicy(self.allow_remote_images, self.max_image_pixels, self.max_body_bytes)


class APIServer(ThreadingHTTPServer):
    """Serves one `ServedModel`; `worker` may be shared with the web UI."""

    daemon_threads = True  # a handler thread never runs torch, so one that outlives close() cannot crash the exit
    block_on_close = False  # close() joins the handler threads itself, with a deadline
    allow_reuse_address = True
    #: Listen backlog. socketserver's default of 5 makes bursts of connections fail before they can be
    #: answered (even with 429); accepted connections are cheap, the queue limit is enforced per request.
    request_queue_size = 128
    #: Seconds `close()` lets handler threads finish their last response before it shuts their sockets.
    close_grace = 1.0

    def __init__(self, served: ServedModel, settings: ServerSettings, worker: GenerationWorker | None = None) -> None:
        self.served = served
        self.settings = settings
        self.worker = worker or GenerationWorker(served, settings.max_queue)
        self.started = int(time.time())
        self._connections: dict[threading.Thread, socket.socket] = {}  # handler thread -> its client socket
        self._connections_lock = threading.Lock()
        super().__init__((settings.host, settings.port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start_background(self) -> threading.Thread:
        """Serve on a daemon thread (tests, `serve --ui`); stop with `close()`."""
        thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="mmadapter-http", daemon=True
        )
        thread.start()
        return thread

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """Handle a connection on its own thread, remembered until it ends so that `close()` can wait for it."""
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), name="mmadapter-request", daemon=True
        )
        with self._connections_lock:
            self._connections[thread] = request
        try:
            thread.start()
        except BaseException:
            with self._connections_lock:
                del self._connections[thread]
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.pop(threading.current_thread(), None)

    @property
    def active_connections(self) -> int:
        """Connections whose handler thread is still running."""
        with self._connections_lock:
            return len(self._connections)

    def close(self, timeout: float = 10.0) -> None:
        """Stop serving and wait, `timeout` seconds at most in all, until no thread of this server runs.

        The listening socket closes first; then the worker fails waiting requests (503) and stops the
        running generation at its next piece of text; handler threads send those last answers, and
        connections still open after `close_grace` seconds (an idle or slow client) are shut down.
        """
        deadline = time.monotonic() + timeout
        self.shutdown()
        self.server_close()
        self.worker.close(max(0.0, deadline - time.monotonic()))
        self._join_handlers(min(deadline, time.monotonic() + self.close_grace))
        with self._connections_lock:
            connections = list(self._connections.values())
        for connection in connections:  # unblocks a handler waiting to read from or write to its client
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if not self._join_handlers(deadline):
            logger.warning("%d connection(s) still open after %s s; exiting anyway", self.active_connections, timeout)

    def _join_handlers(self, deadline: float) -> bool:
        with self._connections_lock:
            threads = list(self._connections)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)


def _error_for(error: BaseException) -> APIError:
    """Map a generation failure to the HTTP error the client sees."""
    if isinstance(error, PromptTooLongError):
        return APIError(400, str(error), param="messages", code="context_length_exceeded")
    if isinstance(error, WorkerClosedError):
        return APIError(503, str(error), type="server_error", code="shutting_down")
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    return APIError(500, "generation failed; see the server log", type="server_error")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mmadapter"
    sys_version = ""
    server: APIServer

    @property
    def timeout(self) -> float:  # read by StreamRequestHandler.setup
        return self.server.settings.socket_timeout

    # --- logging: request line and status only (never headers, so never the API key) ---------------
    def log_message(self, format: str, *args: Any) -> None:
        logger.info("%s %s", self.client_address[0], format % args)

    # --- plumbing ------------------------------------------------------------------------------------
    def _send_json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def _send_error(self, error: APIError) -> None:
        headers = {"Retry-After": "1"} if error.status in (429, 503) else None
        if error.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        self._send_json(error.status, error.body(), headers)

    def _client_alive(self) -> bool:
        """False once the client closed its connection (readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return not readable or self.connection.recv(1, socket.MSG_PEEK) != b""
        except OSError:
            return False

    def _authorize(self) -> None:
        key = self.server.settings.api_key
        if not key:
            return
        header = self.headers.get("Authorization", "")
        scheme, _, provided = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(provided.strip().encode(), key.encode()):
            message = "invalid or missing API key (send 'Authorization: Bearer <key>')"
            raise APIError(401, message, code="invalid_api_key")

    def _read_json(self) -> Any:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise APIError(411, "chunked request bodies are not supported; send Content-Length")
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            raise APIError(411, "a Content-Length header is required")
        try:
            length = int(length_header)
        except ValueError:
            raise APIError(400, "invalid Content-Length header") from None
        limit = self.server.settings.max_body_bytes
        if length < 0 or length > limit:
            raise APIError(413, f"the request body is larger than {limit:,} bytes", code="request_too_large")
        body = self.rfile.read(length)
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise APIError(400, f"the request body is not valid JSON ({error})", code="invalid_json") from error

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            if path == HEALTH_PATH:
                self._require(method, "GET")
                status = {"status": "ok", "model": self.server.served.name, "pending": self.server.worker.pending}
                self._send_json(200, status)
                return
            if path not in (CHAT_PATH, MODELS_PATH) and not path.startswith(MODELS_PATH + "/"):
                raise APIError(404, f"no route {path}", code="not_found")
            self._authorize()
            if path == CHAT_PATH:
                self._require(method, "POST")
                self._chat_completion()
            elif path == MODELS_PATH:
                self._require(method, "GET")
                self._send_json(200, models_list(self.server.served, self.server.started))
            else:
                self._require(method, "GET")
                self._model(path.removeprefix(MODELS_PATH + "/"))
        except APIError as error:
            self._send_error(error)
        except (ConnectionError, TimeoutError):  # the client left or stopped reading; its generation is cancelled
            logger.info("client %s disconnected", self.client_address[0])
        except Exception:  # the server keeps serving whatever one request does
            logger.exception("request failed")
            with contextlib.suppress(OSError):
                self._send_error(APIError(500, "internal server error", type="server_error"))

    def _require(self, method: str, allowed: str) -> None:
        if method != allowed:
            raise APIError(405, f"method {method} is not allowed here; use {allowed}", code="method_not_allowed")

    def do_GET(self) -> None:  # noqa: N802 (BaseHTTPRequestHandler's naming)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    # --- routes --------------------------------------------------------------------------------------
    def _model(self, model_id: str) -> None:
        listing = models_list(self.server.served, self.server.started)["data"]
        for entry in listing:
            if entry["id"] == model_id:
                self._send_json(200, entry)
                return
        raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")

    def _chat_completion(self) -> None:
        server = self.server
        policy = server.settings.image_policy
        request = parse_chat_request(
            self._read_json(), server.served, lambda url, param: load_request_image(url, param, policy)
        )
        try:
            job = server.worker.submit(request.turn)
        except QueueFullError as error:
            raise APIError(429, str(error), type="rate_limit_error", code="queue_full") from error
        except WorkerClosedError as error:
            raise _error_for(error) from error
        ids = ResponseIds(request.model)
        with contextlib.closing(job.events(client_alive=self._client_alive)) as events:
            first = next(events, None)
            if first is None:
                return  # the client left while the request waited
            if isinstance(first, Failed):
                raise _error_for(first.error)
            assert isinstance(first, TurnStarted)
            if request.stream:
                self._stream(events, ids, first.prompt_tokens, request.include_usage)
            else:
                self._complete(events, ids, first.prompt_tokens)

    def _complete(self, events, ids: ResponseIds, prompt_tokens: int) -> None:
        text, finish_reason, generated = [], "stop", 0
        for event in events:
            if isinstance(event, Failed):
                raise _error_for(event.error)
            if isinstance(event, TextDelta):
                text.append(event.text)
                generated = event.completion_tokens
                finish_reason = event.finish_reason or finish_reason
        self._send_json(200, ids.completion("".join(text), finish_reason, prompt_tokens, generated))

    def _stream(self, events, ids: ResponseIds, prompt_tokens: int, include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        self.close_connection = True
        self._event(ids.chunk({"role": "assistant", "content": ""}))
        generated = 0
        for event in events:
            if isinstance(event, Failed):
                self._event(_error_for(event.error).body())
                return
            if isinstance(event, TextDelta):
                generated = event.completion_tokens
                if event.text:
                    self._event(ids.chunk({"content": event.text}))
                if event.finish_reason:
                    self._event(ids.chunk({}, event.finish_reason))
        if include_usage:
            self._event(ids.usage_chunk(prompt_tokens, generated))
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, payload: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _already_stopping(signum: int, frame: Any) -> None:
    logger.info("already stopping; waiting for the running generation to end")


def serve_forever(server: APIServer) -> None:
    """Run until Ctrl-C or SIGTERM (containers, systemd), then stop cleanly (see `APIServer.close`)."""
    logger.info("serving %r on %s (OpenAI API at %s/v1)", server.served.name, server.url, server.url)
    signals = (signal.SIGINT, signal.SIGTERM)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.getsignal(signum) for signum in signals} if in_main_thread else {}
    if in_main_thread:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("stopping: answering the requests in flight, then exiting")
    finally:
        # A second signal must not cut the shutdown short: that would leave the generation thread in torch.
        for signum in previous:
            signal.signal(signum, _already_stopping)
        try:
            server.close()
        finally:
            for signum, handler in previous.items():
                if handler is not None:
                    signal.signal(signum, handler)
