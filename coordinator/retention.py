"""Retention: what the coordinator deletes so that its database and blob directory hold its
recent history, not all of it.

For each task, a pass keeps

* the last ``keep_versions`` model versions, and every version an open round or an
  assignment still in flight trains on (its device may still download it);
* the rounds on kept versions, and every round closed less than ``receipts_s`` ago (a day
  by default), with all their rows (candidates, assignments, updates, evaluation reports): a
  device that resends an upload whose answer it never got (the edge SDK does so on its next
  run, maybe hours later) still gets its stored receipt instead of ``404``, so it keeps the
  error-feedback residual of the upload that was counted; and the operator sees the recent
  rounds' metrics. Also every open round, every round with an assignment in flight, the
  task's newest round (round numbers continue from it) and the round that made the current
  version (the next commit reads its metrics: the robust aggregation's clipping bound);
* the server-optimizer state of the current version only: a commit reads its base
  version's state, which is always the current one, and nothing reads an older one;

and deletes the rest: older closed rounds with every row that hangs off them (finished and
expired assignments, update rows, whose payloads were folded into a committed version or
belong to an abandoned round), older versions with their parameters and optimizer state
(downloading one then answers ``410 version_pruned``), and the blobs only those rows named.

Never deleted: anything an open round needs (its base version, its updates and their
payloads, which a restart folds again), an assignment in flight or its round, the current
version and its optimizer state, bundles.

Devices are not deleted by default: a device row is the device's credential, and deleting
the row of a phone that is merely offline for a while would lock it out (it answers ``401``
and the device has to register again, which may need an enrollment token it no longer has);
and the number of rows is the fleet's size, which history does not grow. With
``device_inactivity_s`` set, devices neither registered nor seen at a check-in for that long
(and holding no assignment in flight) are deleted. Check-ins then record ``last_seen_at``,
coarsely: one write per device per tenth of the bound, so the hot path stays write-free.

Crash safety: a task's rows are deleted in one transaction, the blobs after it. A crash in
between leaves blobs no record names, which the start-up collection removes
(:meth:`coordinator.blobs.BlobStore.collect`); a blob that a remaining record still names
(content addressing shares identical bytes, e.g. version 0 and its bundle's parameters) is
never deleted. A pass deletes at most ``max_rounds`` rounds and ``max_rounds`` versions per
task, so catching up with a long history holds the worker thread in short steps; the next
pass continues. Runs on the service's worker thread (from :meth:`Coordinator.tick`), never
between an operation's blob write and the commit that references it.

::

    retention = Retention(store, blobs, RetentionPolicy(keep_versions=10, interval_s=60))
    retention.maybe_run(now)          # from tick(): a pass at most every interval_s
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from coordinator.blobs import BlobStore, delete_unneeded
from coordinator.store import Store, StoreError, Task

__all__ = ["Pruned", "Retention", "RetentionPolicy"]

log = logging.getLogger("fedge.coordinator.retention")


@dataclass(frozen=True)
class RetentionPolicy:
    keep_versions: int = 10  # per task; 0 keeps everything
    interval_s: float = 60.0  # between passes
    # Rounds (and versions) deleted per task and pass. Catching up with 500,000 stored
    # updates (rounds of 100) took passes of about 1 s on the shared 2-core machine.
    max_rounds: int = 50
    device_inactivity_s: float | None = None  # None: devices are never deleted
    receipts_s: float = 86400.0  # a closed round's rows stay at least this long
    # The service's retain_updates: closed rounds' payloads are kept with their rows (and
    # deleted with them); else they went at the round's close.
    closed_round_payloads: bool = False


@dataclass(frozen=True)
class Pruned:
    """What one pass deleted."""

    rounds: int = 0
    versions: int = 0
    optimizer_states: int = 0
    blobs: int = 0
    bytes: int = 0
    devices: int = 0

    def __add__(self, other: Pruned) -> Pruned:
        pairs = zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)
        return Pruned(*(a + b for a, b in pairs))


def _chunks(ids: Sequence[int], size: int = 500) -> Iterator[Sequence[int]]:
    for i in range(0, len(ids), size):
        yield ids[i : i + size]


class Retention:
    def __init__(self, store: Store, blobs: BlobStore, policy: RetentionPolicy) -> None:
        self.store = store
        self.blobs = blobs
        self.policy = policy
        self._last_run = float("-inf")

    def saw(self, device_id: str, last_seen_at: float, now: float) -> bool:
        """A device checked in (``last_seen_at``: what its row says); recorded only with an
        inactivity bound, and only when the row is a tenth of the bound old. A failed write
        is logged, not raised: it must not cost the device its check-in. False if the row is
        gone: a pass (another replica's) deleted the device since its check-in was
        authenticated, and the check-in must not go on to an assignment. A device not due for
        the write was seen within a tenth of the bound, so no pass can have deleted it."""
        bound = self.policy.device_inactivity_s
        if bound is None or now - last_seen_at < bound / 10:
            return True
        try:
            # A pass deleting it now waits for this write's row lock and then keeps the row.
            self.store.update_device(device_id, last_seen_at=now)
        except StoreError:  # no such row
            return False
        except Exception:
            log.exception("could not record a check-in of %s", device_id)
        return True

    def maybe_run(self, now: float) -> Pruned | None:
        """A pass if one is due (never raises: a failed pass is logged and retried later)."""
        policy = self.policy
        enabled = policy.keep_versions or policy.device_inactivity_s is not None
        if not enabled or now - self._last_run < policy.interval_s:
            return None
        self._last_run = now
        try:
            return self.run(now)
        except Exception:
            log.exception("retention pass failed")
            return None

    def run(self, now: float) -> Pruned:
        """One pass: inactive devices (with a bound), every task's rows (a transaction per
        task), then the blobs only the deleted rows named."""
        total, doomed_blobs = Pruned(), set()
        bound = self.policy.device_inactivity_s
        if bound is not None:
            total += Pruned(devices=self.store.delete_devices(now - bound))
        if not self.policy.keep_versions:
            return total
        # A task whose transaction fails (a lock timeout) is raised after the others and the
        # blobs of those that committed: no later pass would look for them, their rows gone.
        failed: Exception | None = None
        for task in self.store.list_tasks():
            try:
                pruned, shas = self._prune_rows(task, now)
            except Exception as e:
                log.warning("retention: task %s not pruned: %s", task.task_id, e)
                failed = failed or e
                continue
            total += pruned
            doomed_blobs |= shas
        if doomed_blobs:
            keep = self.store.referenced_blobs(
                closed_round_payloads=self.policy.closed_round_payloads
            )
            doomed = doomed_blobs - keep
            had = {sha: self.blobs.size(sha) for sha in doomed if self.blobs.exists(sha)}
            # Re-checked under each blob's lock: an upload of the same bytes may be storing
            # its row now (keep is a snapshot). Against every row that names a blob, as keep
            # was, not only open rounds' updates: among replicas a row stored since may be a
            # version, or an update of a round closed since whose payloads are kept.
            gone = delete_unneeded(self.blobs, self.store, doomed, self.store.blob_referenced)
            counted = [sha for sha in gone if sha in had]
            total += Pruned(blobs=len(counted), bytes=sum(had[sha] for sha in counted))
        if total != Pruned():
            log.info("retention: deleted %s", total)
        if failed is not None:
            raise failed
        return total

    def _prune_rows(self, task: Task, now: float) -> tuple[Pruned, set[str]]:
        """Delete the task's rows past retention; returns the count and the blob hashes the
        deleted rows named (the caller deletes those no remaining row names)."""
        store, cap = self.store, self.policy.max_rounds
        current = task.model_version
        keep_from = current - self.policy.keep_versions + 1
        versions = store.list_versions(task.task_id)
        # The round that made the current version: its metrics hold what the next commit
        # reads (the robust aggregation's clipping bound).
        maker = {v.round_id for v in versions if v.version == current}
        rounds = store.list_rounds(task.task_id)
        # Rounds on versions past the window: a device in flight on one may still download
        # its version (async stragglers), whatever else keeps the round's rows.
        behind = [r for r in rounds if r.base_version < keep_from and not r.is_open]
        busy = self._rounds_in_flight([r.round_id for r in behind])
        needed = {r.base_version for r in rounds if r.is_open or r.round_id in busy}
        closed_before = now - self.policy.receipts_s
        newest = rounds[-1].round_id if rounds else None
        old = [
            r for r in behind
            if r.round_id not in maker and r.round_id != newest
            and r.closed_at is not None and r.closed_at <= closed_before
        ]  # fmt: skip
        doomed_rounds = [r for r in old if r.round_id not in busy][:cap]
        doomed_versions = [
            v for v in versions if v.version < keep_from and v.version not in needed
        ][:cap]
        doomed = {v.version for v in doomed_versions}
        # Older than current, not merely other: among replicas another one may have committed
        # versions since the task was read (the pass's list of tasks), and the newest of them
        # is the one whose state the next commit reads. The next pass cleans what stays.
        stale_state = [
            v for v in versions
            if v.optimizer_sha is not None and v.version < current and v.version not in doomed
        ]  # fmt: skip
        if not (doomed_rounds or doomed_versions or stale_state):
            return Pruned(), set()
        shas: set[str] = set()
        if self.policy.closed_round_payloads:  # else the service deleted them at close
            shas.update(sha for r in doomed_rounds for sha in store.round_payloads(r.round_id))
        for v in doomed_versions:
            shas.add(v.params_sha)
        for v in doomed_versions + stale_state:
            if v.optimizer_sha is not None:
                shas.add(v.optimizer_sha)
        # Counted as the statements deleted, not as decided: another replica's pass over the
        # same task may have deleted some of them since this one read them.
        with store.atomic():
            rounds_gone = store.delete_rounds([r.round_id for r in doomed_rounds])
            versions_gone = store.delete_versions(task.task_id, sorted(doomed))
            states_gone = store.delete_optimizer_states(
                task.task_id, [v.version for v in stale_state]
            )
        return Pruned(rounds_gone, versions_gone, states_gone), shas

    def _rounds_in_flight(self, round_ids: Sequence[int]) -> set[int]:
        """Which of these rounds still have an assignment a device may report on."""
        return {a.round_id for c in _chunks(round_ids) for a in self.store.open_assignments(c)}
