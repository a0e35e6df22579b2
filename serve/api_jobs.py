"""A generation job seen from the event loop: its events awaited one by one, and cancelled when the client leaves.

The worker's `Job.events()` blocks, so each wait runs on a thread of a limiter sized to the connection limit (not
on the default threadpool, which tokenization and image decoding use). A wait that is cancelled (the client
disconnected, the server stops) is abandoned at once; `close()` cancels the job, which makes the abandoned wait end
within one poll and frees the model within a token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import anyio.to_thread
from anyio import CapacityLimiter
from starlette.types import Receive

from mmadapter.serve.worker import Event, Job

#: Seconds between a blocked wait's checks whether its job was cancelled.
POLL_SECONDS = 0.1


class JobEvents:
    """Await the events of `job` in batches: everything the worker has produced so far, `[]` once it has ended.

    One thread hop per batch, not per token: a stream that falls behind the generation thread catches up in one
    write, so its last event (the end, or `shutting_down`) is never stuck behind a backlog of tokens.
    """

    def __init__(self, job: Job, limiter: CapacityLimiter) -> None:
        self.job = job
        self._limiter = limiter
        self._iterator = job.events(POLL_SECONDS, client_alive=lambda: not job.cancelled)

    async def next_batch(self) -> list[Event]:
        return await anyio.to_thread.run_sync(self._take_ready, abandon_on_cancel=True, limiter=self._limiter)

    def _take_ready(self) -> list[Event]:
        """Block for one event, then take the ones already waiting."""
        batch = []
        for event in self._iterator:
            batch.append(event)
            if not self.job.has_waiting_events:
                break
        return batch

    def close(self) -> None:
        self.job.cancel()


@contextlib.asynccontextmanager
async def cancel_on_disconnect(receive: Receive, job: Job) -> AsyncIterator[None]:
    """While inside, a client that disconnects cancels `job` (waiting in the queue or generating)."""

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        job.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
