"""The event loop's view of a job: events arrive in batches, so a stream that fell behind catches up at once."""

import anyio
from anyio import CapacityLimiter

from mmadapter.serve.api_jobs import JobEvents
from mmadapter.serve.chat import ChatTurn, TurnStarted
from mmadapter.serve.generate import TextDelta
from mmadapter.serve.worker import _DONE, Failed, Job, WorkerClosedError


def test_a_backlog_comes_as_one_batch_ending_with_the_failure_and_then_the_end():
    job = Job(ChatTurn("hi"))
    job.put(TurnStarted(3))
    for token in range(200):
        job.put(TextDelta(0, "z", completion_tokens=token + 1))
    job.put(Failed(WorkerClosedError("the server is shutting down")))
    job.put(_DONE)
    events = JobEvents(job, CapacityLimiter(1))

    async def batches() -> list[list]:
        return [await events.next_batch(), await events.next_batch()]

    first, after_the_end = anyio.run(batches)
    assert len(first) == 202 and isinstance(first[0], TurnStarted) and isinstance(first[-1], Failed)
    assert after_the_end == []


def test_a_batch_holds_only_what_has_arrived():
    job = Job(ChatTurn("hi"))
    job.put(TextDelta(0, "a", completion_tokens=1))
    events = JobEvents(job, CapacityLimiter(1))

    async def first_then_more() -> tuple[list, list]:
        first = await events.next_batch()
        job.put(TextDelta(0, "b", completion_tokens=2))
        job.put(_DONE)
        return first, await events.next_batch()

    first, second = anyio.run(first_then_more)
    assert [event.text for event in first] == ["a"] and [event.text for event in second] == ["b"]
