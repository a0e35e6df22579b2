"""One model, many clients: a bounded queue in front of a single generation thread.

Turns share decoding steps (`serve.batching`: a turn joins the running batch after its prefill and
leaves when it ends); decoding is memory-bound, so a batch of 8 costs little more than one turn.
At most `max_batch` turns run and `max_queue` more wait; beyond that a request is refused at once
with `QueueFullError` (HTTP 429) instead of piling up, which also bounds the KV cache memory. A
client that goes away cancels its job: a waiting job is skipped, a running one leaves the batch at
the next step.

`close()` must run before the interpreter exits: it fails the waiting jobs, stops the running
ones at their next step and waits for the thread. A daemon thread still inside torch when
Python finalises is killed mid-call, and libtorch aborts the process ("terminate called without
an active exception", exit code -6).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

from mmadapter.serve.batching import BatchScheduler, Sequence
from mmadapter.serve.chat import ChatTurn, TurnStarted, generation_request, prompt_ids
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
        self.prompt_ids: list[int] = []
        self._events: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def put(self, event: object) -> None:
        self._events.put(event)

    @property
    def has_waiting_events(self) -> bool:
        """Whether `events()` would yield (or end) without blocking."""
        return not self._events.empty()

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
    """Runs chat turns for one `ServedModel` on a background thread, batched continuously.

    Up to `max_batch` turns decode together (`serve.batching`); up to `max_queue` more wait. Prompts are
    tokenized and checked in `submit` (the caller's thread), visual prompts and the model on the generation
    thread. `max_batch=1` answers one turn at a time.
    """

    def __init__(
        self, served: ServedModel, max_queue: int = 16, max_batch: int = 16, prefill_tokens: int = 512
    ) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.served = served
        self.max_queue = max_queue
        self.scheduler = BatchScheduler(served.engine, max_batch, prefill_tokens)
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0  # waiting + running
        self._running = 0
        self._generated = 0
        self._closed = False
        self._active: dict[Sequence, Job] = {}
        # Daemon, so a worker nobody closes cannot hang the interpreter's exit; `close()` is what makes exit safe.
        self._thread = threading.Thread(target=self._loop, name="mmadapter-generation", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Jobs waiting or running."""
        return self._pending

    @property
    def running(self) -> int:
        """Turns in the running batch (being prefilled or decoded)."""
        return self._running

    @property
    def waiting(self) -> int:
        """Accepted turns not yet in the batch."""
        return max(0, self._pending - self._running)

    @property
    def generated_tokens(self) -> int:
        """Tokens generated since the worker started (for a tokens/s rate)."""
        return self._generated

    @property
    def alive(self) -> bool:
        """Whether the generation thread is alive (False once `close()` has stopped it)."""
        return self._thread.is_alive()

    def submit(self, turn: ChatTurn) -> Job:
        """Queue a turn. A bad prompt (unknown model, too long) comes back as the job's `Failed` event."""
        with self._lock:
            if self._closed:
                raise WorkerClosedError(SHUTTING_DOWN)
            if self._pending >= self.scheduler.max_batch + self.max_queue:  # a full batch + max_queue waiting
                raise QueueFullError(
                    f"the server is busy ({self._pending} requests in progress or waiting); retry shortly"
                )
            self._pending += 1
        job = Job(turn)
        try:
            ids = prompt_ids(self.served, turn)  # tokenizer work here, not on the generation thread
            self.served.engine.check_prompt_length(len(ids))
            job.prompt_ids = ids
        except ValueError as error:
            self._finish(job, Failed(error))
            return job
        with self._lock:
            if self._closed:
                self._pending -= 1
                raise WorkerClosedError(SHUTTING_DOWN)
            self._jobs.put(job)  # under the lock: every accepted job is queued before close()'s sentinel
        return job

    def close(self, timeout: float | None = 10.0) -> bool:
        """Stop accepting jobs, fail the waiting ones, stop the running ones at their next step, and wait up to
        `timeout` seconds for the thread to end. Returns whether it ended. Safe to call twice."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._jobs.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("the generation thread did not stop within %s s", timeout)
            return False
        return True

    def _finish(self, job: Job, last: Failed | None = None) -> None:
        if last is not None:
            job.put(last)
        with self._lock:
            self._pending -= 1
        job.put(_DONE)  # after the count: a client that got its answer sees the slot free

    def _loop(self) -> None:
        try:
            while self._admit(block=self.scheduler.idle):
                self._cancel_gone()
                try:
                    events = self.scheduler.step()
                except Exception as error:  # reported to every client in the batch; the worker keeps serving
                    logger.exception("generation failed")
                    self._fail_all(error)
                    continue
                self._deliver(events)
        finally:
            self._fail_all(WorkerClosedError(SHUTTING_DOWN))
            while (job := self._jobs.get_nowait() if not self._jobs.empty() else None) is not None:
                self._finish(job, Failed(WorkerClosedError(SHUTTING_DOWN)))

    def _admit(self, block: bool) -> bool:
        """Move submitted jobs into the scheduler; False once the worker is closed."""
        while True:
            try:
                job = self._jobs.get(block=block)
            except queue.Empty:
                return not self._closed
            block = False
            if job is None or self._closed:
                if job is not None:
                    self._finish(job, Failed(WorkerClosedError(SHUTTING_DOWN)))
                return False
            if job.cancelled:
                self._finish(job)
                continue
            try:
                request = generation_request(self.served, job.turn, job.prompt_ids)
                sequence = self.scheduler.add(request)
            except ValueError as error:
                self._finish(job, Failed(error))
                continue
            except Exception as error:  # e.g. the vision tower failed on this picture
                logger.exception("preparing the request failed")
                self._finish(job, Failed(error))
                continue
            self._active[sequence] = job
            job.put(TurnStarted(len(job.prompt_ids)))

    def _cancel_gone(self) -> None:
        for sequence, job in list(self._active.items()):
            if job.cancelled and not sequence.cancelled:
                logger.info("generation cancelled: the client went away")
                self.scheduler.cancel(sequence)

    def _deliver(self, events: list) -> None:
        for sequence, delta in events:
            self._active[sequence].put(delta)
            self._generated += len(delta.token_ids)
        for sequence, job in list(self._active.items()):
            if sequence.finished:
                del self._active[sequence]
                self._finish(job)
        self._running = self.scheduler.active

    def _fail_all(self, error: BaseException) -> None:
        for sequence, job in list(self._active.items()):
            self.scheduler.cancel(sequence)
            self._finish(job, Failed(error))
        self._active.clear()
        self.scheduler.close()
        self._running = 0
