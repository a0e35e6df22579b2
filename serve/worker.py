"""One model, many clients: a bounded queue in front of a single generation thread.

The model generates one chat turn at a time (a CPU or one GPU gains little from interleaving,
and serialising keeps the KV cache memory bounded). Requests beyond `max_queue` waiting ones are
refused at once with `QueueFullError` (HTTP 429) instead of piling up. A client that goes away
cancels its job: a waiting job is skipped, a running one stops before its next token.

`close()` must run before the interpreter exits: it fails the waiting jobs, stops the running
one at its next piece of text and waits for the thread. A daemon thread still inside torch when
Python finalises is killed mid-call, and libtorch aborts the process ("terminate called without
an active exception", exit code -6).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

from mmadapter.serve.chat import ChatTurn, TurnStarted, stream_turn
from mmadapter.serve.generate import TextDelta
from mmadapter.serve.loader import ServedModel

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """More requests are waiting than the server accepts."""


class WorkerClosedError(RuntimeError):
    """The server is shutting down."""


class Failed:
    """Last event of a job that raised; `error` is the exception."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()
Event = TurnStarted | TextDelta | Failed
SHUTTING_DOWN = "the server is shutting down"


class Job:
    """A submitted chat turn; iterate `events()` to receive what the worker produces."""

    def __init__(self, turn: ChatTurn) -> None:
        self.turn = turn
        self._events: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def put(self, event: object) -> None:
        self._events.put(event)

    def events(self, poll_seconds: float = 0.25, client_alive: Callable[[], bool] | None = None) -> Iterator[Event]:
        """Events until the job ends. Every `poll_seconds` (whether or not tokens arrive) `client_alive()`
        is asked; when it says False the job is cancelled and iteration stops. Leaving early cancels too."""
        next_check = time.monotonic() + poll_seconds
        try:
            while True:
                try:
                    event = self._events.get(timeout=max(0.0, next_check - time.monotonic()))
                except queue.Empty:
                    event = None
                if time.monotonic() >= next_check:
                    if client_alive is not None and not client_alive():
                        return
                    next_check = time.monotonic() + poll_seconds
                if event is _DONE:
                    return
                if event is not None:
                    yield event
        finally:
            self.cancel()  # no effect on a finished job; frees the model if the consumer stopped early


class GenerationWorker:
    """Runs chat turns for one `ServedModel` on a background thread, one at a time."""

    def __init__(self, served: ServedModel, max_queue: int = 16) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.served = served
        self.max_queue = max_queue
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0  # waiting + running
        self._closed = False
        # Daemon, so a worker nobody closes cannot hang the interpreter's exit; `close()` is what makes exit safe.
        self._thread = threading.Thread(target=self._loop, name="mmadapter-generation", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Jobs waiting or running."""
        return self._pending

    @property
    def alive(self) -> bool:
        """Whether the generation thread is alive (False once `close()` has stopped it)."""
        return self._thread.is_alive()

    def submit(self, turn: ChatTurn) -> Job:
        with self._lock:
            if self._closed:
                raise WorkerClosedError(SHUTTING_DOWN)
            if self._pending > self.max_queue:  # one running + max_queue waiting
                raise QueueFullError(
                    f"the server is busy ({self._pending} requests in progress or waiting); retry shortly"
                )
            self._pending += 1
            job = Job(turn)
            self._jobs.put(job)  # under the lock: every accepted job is queued before close()'s sentinel
        return job

    def close(self, timeout: float | None = 10.0) -> bool:
        """Stop accepting jobs, fail the waiting ones, stop the running one at its next piece of text (a few
        tokens at most), and wait up to `timeout` seconds for the thread to end. Returns whether it ended.
        Safe to call twice."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._jobs.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("the generation thread did not stop within %s s", timeout)
            return False
        return True

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self._closed:  # queued before close(): the client is told why, not served
                    job.put(Failed(WorkerClosedError(SHUTTING_DOWN)))
                elif not job.cancelled:
                    self._run(job)
            finally:
                with self._lock:
                    self._pending -= 1
                job.put(_DONE)  # after the count: a client that got its answer sees the slot free

    def _run(self, job: Job) -> None:
        stream = stream_turn(self.served, job.turn)
        try:
            for event in stream:
                if job.cancelled:
                    logger.info("generation cancelled: the client went away")
                    return
                if self._closed:
                    logger.info("generation stopped: the server is shutting down")
                    job.put(Failed(WorkerClosedError(SHUTTING_DOWN)))
                    return
                job.put(event)
        except Exception as error:  # reported to the client; the worker keeps serving
            if not isinstance(error, ValueError):
                logger.exception("generation failed")
            job.put(Failed(error))
        finally:
            stream.close()
