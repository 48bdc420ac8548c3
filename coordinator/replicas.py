"""Replicas: several coordinator processes on one database and one blob directory.

A coordinator started with ``replica = true`` (``fedge serve --replica``) shares every task
with the other replicas on its database; devices may reach any of them for any call. The
database is PostgreSQL (replicas on several machines behind a load balancer), or a SQLite
file that the processes of one machine share (``fedge serve --processes K``,
:mod:`fedge.supervisor`). What a single process holds in memory is either read from the
database on every use or made durable per replica:

* **Turns.** Whatever must happen once per round happens in a transaction holding the
  round's row lock (``select ... for update``), in which the round is read again: selection,
  filling free slots, the close and commit, an async buffer's commit
  (:meth:`~coordinator.rounds.base.PolicyContext.turn`), and each batch of uploads, for the
  rounds it stores updates into (their goal, or K, bounds them). A close asks with
  ``skip locked``: while another replica holds the round (closing it, or storing an upload
  into it) this one leaves it, and the next tick tries again. A sync round's close, which
  may compute for seconds, first claims the round
  (:meth:`~coordinator.store.Store.claim_round`): batches of uploads look for the claim
  before asking for the row, and refuse the round's uploads at once instead of waiting out
  the close on their one worker thread. A replica that dies holding a lock loses its
  connection, the server rolls its transaction back and releases the lock:
  the others take the round over at their next tick. Opening a task's round takes the
  task's row lock instead (one open round per task). On SQLite every transaction takes the
  file's one write lock as it begins (:class:`~coordinator.store.SQLiteStore`): stronger
  than any row lock, the lock methods take nothing more, and a close that would skip a
  held round waits for the holder's commit, then finds the round closed or still due.
* **Hierarchical aggregation.** Each replica folds the updates it accepts into its own
  :class:`~coordinator.store.PartialSum` row per round, and numbers the updates it stores
  in each round (``Update.replica_id``, ``replica_seq``: a row of ``count`` covers those
  numbered up to it). The row is written in a batch's transaction once ``write_every``
  updates of the round were stored since its last write (:meth:`Replica.flush`), not with
  every batch: a model's float64 sum weighs what several uploads do. Acknowledged means
  stored and numbered; what no row covers yet is folded from its payload by whoever needs
  it. A commit, under the round's lock, adds up the round's rows (:func:`combine`) and folds
  the updates none covers (:meth:`Replica.covered`: at most ``write_every - 1`` per replica,
  and any stored by a coordinator that was not a replica); a replica that lost its sum in
  memory (a failed batch) rebuilds it from its row and its own uncovered updates
  (:meth:`Replica.own`). Should the count still differ from the round's stored updates,
  the sum is rebuilt from every payload, as a single process does after a restart. Robust
  aggregators read the updates back from the blob store as always.
* **Shared payloads.** Blobs are content-addressed: a payload is deleted only under an
  exclusive advisory lock on its hash (:func:`~coordinator.blobs.delete_unneeded`), which an
  upload's transaction, and a version's commit for its blobs, hold shared from their
  existence check to their commit.
* **Stalls.** The store's sessions carry ``lock_timeout`` and
  ``idle_in_transaction_session_timeout`` (:class:`~coordinator.store.postgres.PostgresStore`):
  a replica paused inside a transaction loses its session and its locks.
* **Identity.** A replica draws a new random id at every start (after its process id, for
  the operator), so that two live processes can never write the same row; the rows of a
  replica that died stay and are counted.

Not shared, per replica: pace steering's estimates (each sees its share of check-ins, and
scales what it sees by ``pacing.replicas``: :mod:`coordinator.pacing`) and the bytes-served
metric of a round.

::

    replica = Replica(store)                      # inside Coordinator, when config.replica
    sums = PartialSums(store, blobs, replica)      # the sync mode's sums
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from coordinator.aggregation import RunningSum
from coordinator.blobs import BlobStore
from coordinator.store import PartialSum, Store, Update
from coordinator.versions import RoundSums, StagedFold

__all__ = ["PartialSums", "Replica", "combine", "partial_record"]


def partial_record(
    round_id: int, replica_id: str, state: Mapping[str, Any], at: float
) -> PartialSum:
    """A store row from an :meth:`~coordinator.async_buffer.AsyncBuffer.state`-shaped dict
    (``count``, ``weight``, ``examples``, ``staleness_sum``, ``staleness_max``, ``sum``)."""
    return PartialSum(
        round_id=round_id,
        replica_id=replica_id,
        count=int(state["count"]),
        weight=float(state["weight"]),
        examples=int(state["examples"]),
        staleness_sum=int(state["staleness_sum"]),
        staleness_max=int(state["staleness_max"]),
        total=np.asarray(state["sum"], dtype="<f8").tobytes(),
        updated_at=at,
    )


def combine(partials: Sequence[PartialSum], num_parameters: int) -> dict[str, Any]:
    """The round's aggregate from every replica's row, in the same dict shape."""
    total = np.zeros(num_parameters, dtype=np.float64)
    for p in partials:
        total += np.frombuffer(p.total, dtype="<f8")
    return {
        "count": sum(p.count for p in partials),
        "weight": sum(p.weight for p in partials),
        "examples": sum(p.examples for p in partials),
        "staleness_sum": sum(p.staleness_sum for p in partials),
        "staleness_max": max((p.staleness_max for p in partials), default=0),
        "sum": total,
    }


class Replica:
    """This process among the replicas: its id, the updates it stores numbered per round, and
    its partial sums, each written once ``write_every`` uploads folded into it are due rather
    than with every batch."""

    def __init__(
        self, store: Store, replica_id: str | None = None, *, write_every: int = 1
    ) -> None:
        self.store = store
        self.replica_id = replica_id or f"r-{os.getpid()}-{secrets.token_hex(6)}"
        self.write_every = write_every
        self._unwritten: dict[int, Callable[[], PartialSum]] = {}  # round_id -> its row
        self._due: dict[int, int] = {}  # round_id -> its updates stored since its row
        self._batch: set[int] = set()  # rounds folded into in this batch (their locks held)
        # Rounds' stored updates as counted in this batch's transaction (see stored()).
        self._stored: dict[int, int] = {}

    def stored(self, round_id: int) -> int:
        """How many updates of a round are stored, every replica's: counted once per batch
        of uploads, then moved by the batch's own (:meth:`added`). The batch holds the
        round's lock, so no other replica stores into it before the batch commits; counted
        per upload, a round of thousands cost a scan of its index each."""
        n = self._stored.get(round_id)
        if n is None:
            n = self._stored[round_id] = self.store.count_updates(round_id)
        return n

    def added(self, round_id: int) -> None:
        """One more update of the batch stored into ``round_id``."""
        if round_id in self._stored:
            self._stored[round_id] += 1

    def recount(self, round_id: int) -> None:
        """The count of ``round_id`` is no longer known: the next :meth:`stored` counts."""
        self._stored.pop(round_id, None)

    def tagged(self, update: Update, folded: int) -> Update:
        """``update`` as this replica stores it, its sum of the round holding ``folded``
        updates before it: numbered next (what its partial sum's count covers)."""
        return dataclasses.replace(update, replica_id=self.replica_id, replica_seq=folded + 1)

    def own(self, round_id: int) -> tuple[PartialSum | None, list[Update]]:
        """What this replica's share of a round is rebuilt from (its sum in memory lost): its
        partial sum as written, and its updates stored past it, to fold from their payloads.
        A sum not written yet is dropped: it is rebuilt from those."""
        self.forget(round_id)
        row = self.store.get_partial(round_id, self.replica_id)
        tail = self.store.uncovered_updates(round_id, self.replica_id)
        self._due[round_id] = len(tail)
        return row, tail

    def fold(self, round_id: int, state: Callable[[], Mapping[str, Any]]) -> None:
        """Record that this replica's sum of a round moved by one update stored in this
        batch: a write writes what ``state`` then gives (the sum as of the last update
        folded: one copy per write, not per update)."""
        at = time.time()
        self._unwritten[round_id] = lambda: partial_record(round_id, self.replica_id, state(), at)
        self._due[round_id] = self._due.get(round_id, 0) + 1
        self._batch.add(round_id)

    def flush(self) -> None:
        """At the end of a batch's transaction, before it commits: write the partial sums of
        the batch's rounds that ``write_every`` uploads have moved since their last write.
        Each write of a model's float64 sum costs the transaction what several uploads do
        (800 KB for 100k parameters, and its share of the log's checkpoints); a sum not
        written is no less durable: its updates are, numbered, and a commit folds those past
        a partial sum from their payloads (:meth:`covered`). Only rounds the batch holds the
        locks of: a round another replica committed meanwhile gets no row again."""
        self._stored.clear()  # the batch ends: other replicas' updates count again
        batch, self._batch = self._batch, set()
        for round_id in sorted(batch):
            if round_id in self._unwritten and self._due[round_id] >= self.write_every:
                self._write(round_id)

    def _write(self, round_id: int) -> None:
        self.store.put_partial(self._unwritten.pop(round_id)())
        self._due.pop(round_id, None)

    def forget(self, round_id: int) -> None:
        """This replica's sum of a round was dropped from memory: nothing of it to write."""
        self._unwritten.pop(round_id, None)
        self._due.pop(round_id, None)

    def discard(self) -> None:
        """The batch's transaction rolled back: forget the sums it moved (their owners drop
        them too, and rebuild them from the store); those of other rounds stand."""
        for round_id in self._batch:
            self.forget(round_id)
        self._batch.clear()
        self._stored.clear()

    def covered(self, round_id: int) -> tuple[list[PartialSum], list[Update]]:
        """A round's aggregate, read: every replica's partial sum and the updates none of
        them covers (this one's unwritten among them, from their payloads like the others':
        nothing is written here, where the round's lock may not be held and another replica
        may have committed the round already)."""
        return self.store.round_partials(round_id), self.store.uncovered_updates(round_id)


def _state_of(s: RunningSum) -> dict[str, Any]:
    # Synchronous rounds weigh by examples and know no staleness.
    return {"count": s.count, "weight": s.weight, "examples": round(s.weight),
            "staleness_sum": 0, "staleness_max": 0, "sum": s.total}  # fmt: skip


def _sum_of(state: Mapping[str, Any]) -> RunningSum:
    out = RunningSum(0)
    out.total = np.array(state["sum"], dtype=np.float64)
    out.weight = float(state["weight"])
    out.count = int(state["count"])
    return out


class PartialSums(RoundSums):
    """The synchronous mode's running sums among replicas: :meth:`stage` and :meth:`put` move
    this replica's partial sum (:meth:`tag` numbers the update), :meth:`get` adds up every
    replica's and the updates none covers, for the commit."""

    def __init__(self, store: Store, blobs: BlobStore, replica: Replica) -> None:
        super().__init__(store, blobs)
        self.replica = replica
        self._own: dict[int, RunningSum] = {}

    def _folding(self, task_id: str, round_id: int, num_parameters: int) -> RunningSum:
        s = self._own.get(round_id)
        if s is None:
            # A task has one round open at a time: a sum held for another of its rounds is
            # of one that another replica closed (a replica drops those it closes itself).
            for done in [r for r, t in self._task_of.items() if t == task_id and r != round_id]:
                self.drop(done)
            row, tail = self.replica.own(round_id)
            s = _sum_of(combine([] if row is None else [row], num_parameters))
            self.fold_stored(s, tail, num_parameters)
            self._own[round_id] = s
            self._task_of[round_id] = task_id
        return s

    def get(self, task_id: str, round_id: int, num_parameters: int) -> RunningSum:
        """Every replica's partial sum added up, and the updates they do not cover folded
        from their payloads (call it under the round's lock, for the commit)."""
        partials, tail = self.replica.covered(round_id)
        combined = _sum_of(combine(partials, num_parameters))
        self.fold_stored(combined, tail, num_parameters)
        if combined.count == self.store.count_updates(round_id):
            return combined
        rebuilt = super().get(task_id, round_id, num_parameters)  # from every payload
        self._sums.pop(round_id, None)  # the partial rows stay what later folds build on
        return rebuilt

    def tag(self, update: Update, staged: StagedFold) -> Update:
        return self.replica.tagged(update, staged.count)

    def stored(self, task_id: str, round_id: int, num_parameters: int) -> int:
        # Every replica's updates count; this one's sum holds only its own.
        return self.replica.stored(round_id)

    def _held(self, round_id: int) -> RunningSum | None:
        return self._own.get(round_id)

    def _moved(self, round_id: int, held: RunningSum) -> None:
        self.replica.fold(round_id, lambda: _state_of(held))
        self.replica.added(round_id)

    def drop(self, round_id: int) -> None:
        super().drop(round_id)
        self._own.pop(round_id, None)
        self.replica.forget(round_id)
        self.replica.recount(round_id)
