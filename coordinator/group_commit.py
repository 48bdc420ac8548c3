"""Group commit: concurrent requests made durable together, one batch at a time.

:class:`GroupCommit` collects the items submitted on the event loop and hands them to its
``commit`` coroutine in batches: the first item after a quiet spell goes alone, and whatever
arrives while a batch is being committed (its fsyncs, its transaction) forms the next one, up
to ``max_batch``. Under load the batches grow by themselves; an idle service adds no delay.
Each submitter gets its own item's answer (or error) only after its batch's commit returned:
for uploads, after their payloads and rows are on disk.

::

    commits = GroupCommit(commit_uploads, max_batch=32, max_pending=64, retry_after_s=2.0)
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


class GroupCommit(Generic[I, R]):
    """Batches ``submit``\\ ted items into calls of ``commit`` (one at a time).

    ``max_pending`` bounds the items submitted and not yet answered (each may hold a decoded
    update in memory): past it :meth:`reserve` refuses with ``503 overloaded`` at once.
    """

    def __init__(
        self, commit: Commit[I, R], *, max_batch: int, max_pending: int, retry_after_s: float
    ) -> None:
        if max_batch < 1 or max_pending < max_batch:
            raise ValueError("need 1 <= max_batch <= max_pending")
        self._commit = commit
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.retry_after_s = retry_after_s
        self._queue: list[tuple[I, asyncio.Future[R]]] = []
        self._runner: asyncio.Task[None] | None = None
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
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            batch = self._queue[: self.max_batch]
            del self._queue[: self.max_batch]
            try:
                answers: Sequence[R | BaseException] = await self._commit([i for i, _ in batch])
                if len(answers) != len(batch):
                    raise RuntimeError(f"{len(answers)} answers for {len(batch)} items")
            except BaseException as e:  # every submitter must hear of it
                answers = [e] * len(batch)
                if isinstance(e, asyncio.CancelledError):
                    self._settle(batch, answers)
                    raise
            self._settle(batch, answers)

    @staticmethod
    def _settle(
        batch: list[tuple[I, asyncio.Future[R]]], answers: Sequence[R | BaseException]
    ) -> None:
        for (_, future), answer in zip(batch, answers, strict=True):
            if future.done():
                continue
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)

    async def close(self) -> None:
        """Wait for the batches under way (at shutdown, before the store closes)."""
        runner = self._runner
        if runner is not None and not runner.done():
            await asyncio.shield(runner)
