"""The OpenAI-compatible HTTP server: the FastAPI app of `api_app` on uvicorn, in a thread of its own.

uvicorn runs the app on an asyncio loop in the thread `mmadapter-http`; generation runs on the worker's thread;
blocking work of a request (image decoding, tokenization, waiting for job events) runs on threadpools, so the loop
only moves bytes. The operator's limits (`ServerSettings`) map onto the stack: connections and header deadline ->
`api_protocol.GuardedH11Protocol`; idle keep-alive -> uvicorn's `timeout_keep_alive`; key, body size and body
deadline -> `api_guards`; prompt tokens -> `api_prompts`; queue length -> the worker (429 with Retry-After).

Shutdown (Ctrl-C, SIGTERM, `close()`) is graceful and bounded: the listening socket closes, idle connections close,
waiting requests are answered 503, the running generation stops at its next piece of text, and the generation
thread and the server thread are joined before the interpreter may exit. A daemon thread left inside torch while
Python finalises makes libtorch abort the process (exit code -6).

Security: binds to 127.0.0.1 unless told otherwise; with an API key every route but /health needs
`Authorization: Bearer <key>`, compared in constant time; the access log holds no headers and no query values.
"""

from __future__ import annotations

import functools
import logging
import signal
import socket
import threading
import time
from typing import Any

import uvicorn

from mmadapter.serve.api_app import APIState, create_app
from mmadapter.serve.api_protocol import GuardedH11Protocol
from mmadapter.serve.api_settings import ServerSettings
from mmadapter.serve.loader import ServedModel
from mmadapter.serve.worker import GenerationWorker

logger = logging.getLogger("mmadapter.serve")

#: Listen backlog: bursts of connections are accepted and answered (429, 503) rather than refused by the kernel.
BACKLOG = 1024


class APIServer:
    """Serves one `ServedModel`; `worker` may be shared with the web UI (it is closed with the server)."""

    #: Seconds `close()` lets requests in flight finish their last response before their tasks are cancelled.
    close_grace = 2.0

    def __init__(self, served: ServedModel, settings: ServerSettings, worker: GenerationWorker | None = None) -> None:
        self.served = served
        self.settings = settings
        self.worker = worker or GenerationWorker(served, settings.max_queue, max_batch=settings.max_batch)
        self.app = create_app(APIState(served, self.worker, settings))
        protocol = functools.partial(
            GuardedH11Protocol, header_timeout=settings.header_timeout, max_connections=settings.max_connections
        )
        config = uvicorn.Config(
            self.app,
            http=protocol,  # type: ignore[arg-type]  # a protocol factory, as uvicorn calls it
            lifespan="off",
            ws="none",  # the API has no websocket routes; an upgrade request is plain HTTP to it
            log_config=None,  # the application's logging setup stays as it is
            access_log=False,  # api_guards.AccessLog logs requests, with query values redacted
            server_header=False,
            limit_concurrency=settings.max_connections + 1,  # GuardedH11Protocol refuses the connection beyond
            timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]  # seconds, a float works
            timeout_graceful_shutdown=int(max(1, self.close_grace)),
            backlog=BACKLOG,
        )
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        self._socket = socket.create_server((settings.host, settings.port), family=family, backlog=BACKLOG)
        self._uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._finished = threading.Event()

    @property
    def server_address(self) -> tuple[str, int]:
        host, port = self._socket.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def active_connections(self) -> int:
        """Open client connections."""
        return len(self._uvicorn.server_state.connections)

    def start_background(self, timeout: float = 30.0) -> threading.Thread:
        """Serve on the thread `mmadapter-http` and return once it accepts connections; stop with `close()`."""
        if self._thread is not None:
            return self._thread
        thread = threading.Thread(target=self._run, name="mmadapter-http", daemon=True)
        thread.start()
        self._thread = thread
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._uvicorn.started:
            raise RuntimeError("the HTTP server did not start; see the log above")
        return thread

    def _run(self) -> None:
        try:
            self._uvicorn.run(sockets=[self._socket])
        finally:
            self._finished.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the server thread has ended, after waiting up to `timeout` seconds.

        Use this, not `Thread.join`, where a signal may interrupt the wait: on Python 3.11 and 3.12 an exception
        raised by a signal handler inside `join` can mark the still running thread as ended (the bpo-45274
        handler in `Thread._wait_for_tstate_lock`), and every later `join` then returns at once.
        """
        return self._finished.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop serving and wait, `timeout` seconds at most in all, until no thread of this server runs.

        uvicorn stops listening and closes idle connections; the worker fails waiting requests (503) and stops the
        running generation at its next piece of text; requests still running after `close_grace` seconds (a
        client that does not read) are cancelled.
        """
        deadline = time.monotonic() + timeout
        # The worker first: its last event (503 / shutting_down) reaches every open stream before uvicorn starts
        # closing connections; the other order could cut a stream before that event was written.
        self.worker.close(max(0.0, deadline - time.monotonic()))
        self._uvicorn.should_exit = True
        if self._thread is not None:
            if not self.wait(max(0.0, deadline - time.monotonic())):
                self._uvicorn.force_exit = True
                self.wait(1.0)
                logger.warning(
                    "%d connection(s) still open after %s s; exiting anyway", self.active_connections, timeout
                )
        self._socket.close()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _already_stopping(signum: int, frame: Any) -> None:
    logger.info("already stopping; waiting for the running generation to end")


def serve_forever(server: APIServer) -> None:
    """Serve until Ctrl-C or SIGTERM (containers, systemd), then stop cleanly (see `APIServer.close`)."""
    names = ", ".join(repr(name) for name in server.served.model_ids())
    logger.info("serving %s on %s (OpenAI API at %s/v1)", names, server.url, server.url)
    signals = (signal.SIGINT, signal.SIGTERM)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.getsignal(signum) for signum in signals} if in_main_thread else {}
    if in_main_thread:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.start_background()
        while not server.wait(0.5):
            pass
    except KeyboardInterrupt:
        logger.info("stopping: requests in flight end with 503 shutting_down, then the server exits")
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
