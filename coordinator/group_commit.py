"""Group commit: concurrent requests made durable together, in pipelined batches.

:class:`GroupCommit` collects the items submitted on the event loop and hands them, in
batches, to two stages: ``prepare`` (for uploads: their payload fsyncs and renames) and then
``commit`` (their rows, in one transaction). The first item after a quiet spell goes alone;
whatever arrives while the stages are busy forms the next batch, up to ``max_batch``. Under
load the batches grow by themselves; an idle service adds no delay.

The stages overlap: while batch *k* commits, batch *k+1* prepares. At most one batch is in
each stage, and a prepared batch waits for the commit stage before the next one prepares, so
nothing queues between the stages. Batches commit in the order they were formed. Each
submitter gets its own item's answer (or error) only after its batch's commit returned: for
uploads, after their payloads and rows are on disk. An error of either stage answers every
item of its batch.

::

    commits = GroupCommit(accept, prepare=install, max_batch=32, max_pending=64,
                          retry_after_s=2.0)
    answer = await commits.submit(staged_upload)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from coordinator.errors import Overloaded

__all__ = ["GroupCommit"]

I = TypeVar("I")  # noqa: E741
R = TypeVar("R")

# The answer to each item of a batch, in order: a result, or the error that refused it.
Commit = Callable[[Sequence[I]], Awaitable[Sequence[R | BaseException]]]
# Readies a whole batch for its commit; raising refuses every item of it.
Prepare = Callable[[Sequence[I]], Awaitable[None]]

_Batch = list[tuple[I, asyncio.Future[R]]]


class GroupCommit(Generic[I, R]):
    """Batches ``submit``\\ ted items through ``prepare`` (optional) and ``commit``, one
    batch in each stage at a time.

    ``max_pending`` bounds the items submitted and not yet answered (each may hold a decoded
    update in memory): past it :meth:`reserve` refuses with ``503 overloaded`` at once.
    """

    def __init__(
        self,
        commit: Commit[I, R],
        *,
        prepare: Prepare[I] | None = None,
        max_batch: int,
        max_pending: int,
        retry_after_s: float,
    ) -> None:
        if max_batch < 1 or max_pending < max_batch:
            raise ValueError("need 1 <= max_batch <= max_pending")
        self._commit = commit
        self._prepare = prepare
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.retry_after_s = retry_after_s
        self._queue: _Batch[I, R] = []
        # The batch in each stage (its task), and one prepared batch waiting for the commit
        # stage. Invariant after each _pump: items queued or a batch waiting imply a stage
        # running, so close() only has to wait for the stages.
        self._preparing: asyncio.Task[None] | None = None
        self._prepared: _Batch[I, R] | None = None
        self._committing: asyncio.Task[None] | None = None
        self.reserved = 0  # slots taken by reserve() and not yet released by an answer

    def reserve(self) -> None:
        """Take a slot for an item to come (before the work of preparing it)."""
        if self.reserved >= self.max_pending:
            raise Overloaded(
                f"{self.reserved} uploads are being made durable; retry after the time in "
                "Retry-After",
                self.retry_after_s,
            )
        self.reserved += 1

    def release(self) -> None:
        """Give a slot back (the item was answered, or never submitted)."""
        self.reserved -= 1

    async def submit(self, item: I) -> R:
        """``item``'s answer once its batch committed (a slot reserved for it beforehand)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._pump()
        return await future

    def _pump(self) -> None:
        """Move batches on: the prepared one into a free commit stage, then the next one
        (what queued meanwhile) into a free prepare stage."""
        if self._prepared is not None and self._committing is None:
            batch, self._prepared = self._prepared, None
            self._committing = asyncio.create_task(self._run_commit(batch))
        if self._queue and self._preparing is None and self._prepared is None:
            batch = self._queue[: self.max_batch]
            del self._queue[: self.max_batch]
            if self._prepare is None:
                self._prepared = batch
                self._pump()
            else:
                self._preparing = asyncio.create_task(self._run_prepare(batch))

    async def _run_prepare(self, batch: _Batch[I, R]) -> None:
        assert self._prepare is not None
        try:
            await self._prepare([i for i, _ in batch])
        except BaseException as e:  # every submitter must hear of it
            self._settle(batch, [e] * len(batch))
            if isinstance(e, asyncio.CancelledError):
                raise
        else:
            self._prepared = batch
        finally:
            self._preparing = None
            self._pump()

    async def _run_commit(self, batch: _Batch[I, R]) -> None:
        answers: Sequence[R | BaseException] = []
        try:
            answers = await self._commit([i for i, _ in batch])
            if len(answers) != len(batch):
                raise RuntimeError(f"{len(answers)} answers for {len(batch)} items")
        except BaseException as e:  # every submitter must hear of it
            answers = [e] * len(batch)
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            # Answered before the next batch's commit starts: answers go out in order.
            self._settle(batch, answers)
            self._committing = None
            self._pump()

    @staticmethod
    def _settle(batch: _Batch[I, R], answers: Sequence[R | BaseException]) -> None:
        for (_, future), answer in zip(batch, answers, strict=True):
            if future.done():
                continue
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)

    async def close(self) -> None:
        """Wait until every batch submitted is answered, both stages idle (at shutdown,
        before the store closes)."""
        while True:
            stages = [t for t in (self._preparing, self._committing) if t is not None]
            if not stages:
                return
            await asyncio.wait(stages)
