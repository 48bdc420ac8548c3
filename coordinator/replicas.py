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
  into it) this one leaves it, and the next tick tries again. A replica that dies holding a
  lock loses its connection, the server rolls its transaction back and releases the lock:
  the others take the round over at their next tick. Opening a task's round takes the
  task's row lock instead (one open round per task). On SQLite every transaction takes the
  file's one write lock as it begins (:class:`~coordinator.store.SQLiteStore`): stronger
  than any row lock, the lock methods take nothing more, and a close that would skip a
  held round waits for the holder's commit, then finds the round closed or still due.
* **Hierarchical aggregation.** Each replica folds the updates it accepts into its own
  :class:`~coordinator.store.PartialSum` row per round, written in the transaction that
  stores those updates (:meth:`Replica.flush`, once per batch of uploads): acknowledged
  means folded and durable. A commit, under the round's lock, adds up the round's rows
  (:func:`combine`); their count must equal the round's stored updates, else (updates
  stored by a coordinator that was not a replica) the sum is rebuilt from the payloads, as
  a single process does after a restart. Robust aggregators read the updates back from the
  blob store as always.
* **Shared payloads.** Blobs are content-addressed: a payload is deleted only under an
  exclusive advisory lock on its hash (:func:`~coordinator.blobs.delete_unneeded`), which an
  upload's transaction holds shared from its existence check to its commit.
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

import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from coordinator.aggregation import RunningSum
from coordinator.blobs import BlobStore
from coordinator.store import PartialSum, Store
from coordinator.versions import RoundSums

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
    """This process among the replicas: its id and its partial sums not yet written."""

    def __init__(self, store: Store, replica_id: str | None = None) -> None:
        self.store = store
        self.replica_id = replica_id or f"r-{os.getpid()}-{secrets.token_hex(6)}"
        self._unwritten: dict[int, Callable[[], PartialSum]] = {}
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

    def own(self, round_id: int) -> PartialSum | None:
        """This replica's partial sum of a round (as folded, written or not)."""
        held = self._unwritten.get(round_id)
        return held() if held is not None else self.store.get_partial(round_id, self.replica_id)

    def fold(self, round_id: int, state: Callable[[], Mapping[str, Any]]) -> None:
        """Record that this replica's partial sum of a round moved: :meth:`flush` writes
        what ``state`` then gives (the sum as of the batch's last update: one copy of it per
        batch, not per update)."""
        at = time.time()
        self._unwritten[round_id] = lambda: partial_record(round_id, self.replica_id, state(), at)

    def flush(self) -> None:
        """Write the partial sums folded since the last flush: inside the transaction that
        stores their updates, before it commits."""
        self._stored.clear()  # the batch ends: other replicas' updates count again
        while self._unwritten:
            _, partial = self._unwritten.popitem()
            self.store.put_partial(partial())

    def discard(self) -> None:
        """Forget unwritten sums (their transaction rolled back; the store has the truth)."""
        self._unwritten.clear()
        self._stored.clear()

    def partials(self, round_id: int) -> list[PartialSum]:
        """Every replica's partial sum of a round, this one's flushed first."""
        self.flush()
        return self.store.round_partials(round_id)


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
    this replica's partial sum (written with the batch's updates), :meth:`get` adds up every
    replica's for the commit."""

    def __init__(self, store: Store, blobs: BlobStore, replica: Replica) -> None:
        super().__init__(store, blobs)
        self.replica = replica
        self._own: dict[int, RunningSum] = {}

    def _folding(self, task_id: str, round_id: int, num_parameters: int) -> RunningSum:
        s = self._own.get(round_id)
        if s is None:
            row = self.replica.own(round_id)
            s = (
                RunningSum(num_parameters)
                if row is None
                else _sum_of(combine([row], num_parameters))
            )
            self._own[round_id] = s
            self._task_of[round_id] = task_id
        return s

    def get(self, task_id: str, round_id: int, num_parameters: int) -> RunningSum:
        """Every replica's partial sums added up (call it under the round's lock)."""
        combined = _sum_of(combine(self.replica.partials(round_id), num_parameters))
        if combined.count == self.store.count_updates(round_id):
            return combined
        rebuilt = super().get(task_id, round_id, num_parameters)  # from the payloads
        self._sums.pop(round_id, None)  # the partial rows stay what later folds build on
        return rebuilt

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
        self.replica.recount(round_id)
