"""The worker thread's queue (coordinator.app.WorkQueue): operations run one at a time in
submission order, whatever queued while the worker was busy runs as one batch, each caller
gets its own answer or error, and an answer is not held back behind slow internal work."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from coordinator.app import WorkQueue
from coordinator.errors import Overloaded


def _run(coro_fn):  # type: ignore[no-untyped-def]
    return asyncio.run(coro_fn())


def test_a_batch_runs_in_order_on_one_thread_with_each_callers_answer() -> None:
    queue = WorkQueue(bound=100, retry_after_s=1.0)
    gate = threading.Event()
    ran: list[int] = []
    threads: set[int] = set()
    jobs: list[object] = []  # executor jobs submitted: the batch rides in the blocker's
    submit = queue.executor.submit
    queue.executor.submit = lambda *a, **k: jobs.append(a) or submit(*a, **k)  # type: ignore[method-assign]

    def op(i: int) -> int:
        threads.add(threading.get_ident())
        ran.append(i)
        if i == 3:
            raise ValueError("three")
        return i * 10

    async def main() -> list[object]:
        blocker = asyncio.ensure_future(queue.run(gate.wait, 5.0))
        await asyncio.sleep(0.05)  # the worker is busy: what follows queues as one batch
        calls = [asyncio.ensure_future(queue.run(op, i)) for i in range(6)]
        await asyncio.sleep(0.05)
        assert not ran and queue.pending == 7
        gate.set()
        await blocker
        return list(await asyncio.gather(*calls, return_exceptions=True))

    answers = _run(main)
    assert ran == [0, 1, 2, 3, 4, 5] and len(threads) == 1 and len(jobs) == 1
    assert answers[:3] == [0, 10, 20] and answers[4:] == [40, 50]
    assert isinstance(answers[3], ValueError) and str(answers[3]) == "three"
    assert queue.pending == 0
    queue.executor.shutdown()


def test_an_operation_cancelled_before_it_ran_is_skipped_and_uncounted() -> None:
    queue = WorkQueue(bound=100, retry_after_s=1.0)
    gate = threading.Event()
    ran: list[str] = []

    async def main() -> None:
        blocker = asyncio.ensure_future(queue.run(gate.wait, 5.0))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(queue.run(ran.append, "gone"))
        kept = asyncio.ensure_future(queue.run(ran.append, "kept"))
        await asyncio.sleep(0.01)
        gone.cancel()  # its client left while it waited
        gate.set()
        await blocker
        await kept

    _run(main)
    assert ran == ["kept"] and queue.pending == 0
    queue.executor.shutdown()


def test_the_bound_refuses_requests_but_not_internal_work() -> None:
    queue = WorkQueue(bound=2, retry_after_s=3.0)
    gate = threading.Event()

    async def main() -> None:
        first = asyncio.ensure_future(queue.run(gate.wait, 5.0))
        second = asyncio.ensure_future(queue.run(lambda: 2))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            await queue.run(lambda: 3)
        internal = asyncio.ensure_future(queue.run(lambda: 4, internal=True))
        gate.set()
        assert [await first, await second, await internal] == [True, 2, 4]

    _run(main)
    assert queue.refused == 1 and queue.pending == 0
    queue.executor.shutdown()


def test_an_answer_does_not_wait_for_internal_work_queued_behind_it() -> None:
    queue = WorkQueue(bound=100, retry_after_s=1.0)
    gate = threading.Event()

    def slow_commit() -> float:
        time.sleep(0.5)  # an fsync on a busy disk
        return time.monotonic()

    async def main() -> tuple[float, float]:
        blocker = asyncio.ensure_future(queue.run(gate.wait, 5.0))
        await asyncio.sleep(0.05)
        quick = asyncio.ensure_future(queue.run(lambda: None))
        commit = asyncio.ensure_future(queue.run(slow_commit, internal=True))
        await asyncio.sleep(0.01)
        gate.set()
        await blocker
        await quick
        answered = time.monotonic()
        return answered, await commit

    answered, committed = _run(main)
    assert answered < committed - 0.3  # answered while the commit still ran
    queue.executor.shutdown()


def test_an_answer_does_not_wait_for_a_slow_request_queued_behind_it() -> None:
    """A request can take long too (a check-in that runs a due tick, an abort's fsync, an
    operator's bundle upload): the answers before it go out as soon as they are ready. The
    slow request waits until the test has seen the quick answer, so holding that answer back
    would stall for its 5 s timeout."""
    queue = WorkQueue(bound=100, retry_after_s=1.0)
    gate, seen_quick = threading.Event(), threading.Event()

    async def main() -> bool:
        blocker = asyncio.ensure_future(queue.run(gate.wait, 5.0))
        await asyncio.sleep(0.05)
        quick = asyncio.ensure_future(queue.run(lambda: "quick"))
        slow = asyncio.ensure_future(queue.run(seen_quick.wait, 5.0))
        await asyncio.sleep(0.01)
        gate.set()
        await blocker
        assert await asyncio.wait_for(quick, 2.0) == "quick"
        seen_quick.set()
        return await slow

    try:
        assert _run(main) is True  # the slow request saw the quick answer delivered first
    finally:
        seen_quick.set()
        queue.executor.shutdown()
