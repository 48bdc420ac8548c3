"""Two replicas' steps interleaved on one database (PostgreSQL, or a SQLite file), at the
policies' level:

* content-addressed payloads: one replica deleting the payload of a closed round while
  another stores an update with the same bytes (two zero updates) into an open round; the
  update, once committed, must find its payload;
* an evaluation round's goal: a report reaching a replica after another stored the last
  one the goal allows, before any tick closed the round; and a report retried on another
  replica while the first try was being stored."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

from coordinator.blobs import BlobStore, delete_unneeded
from coordinator.config import PacingConfig
from coordinator.errors import Conflict, ErrorCode
from coordinator.pacing import PaceSteering
from coordinator.plan import TaskPlan
from coordinator.rounds import PolicyContext
from coordinator.rounds.sync import SyncRounds
from coordinator.store import (
    Assignment,
    EvalReport,
    Round,
    Store,
    Task,
    Update,
    open_store,
)
from coordinator.versions import ModelVersions, RoundSums

HOLD_S = 0.6


def _update(assignment_id: str, round_id: int, sha: str) -> Update:
    return Update(assignment_id, round_id, "t-1", "d-" + assignment_id, "k-" + assignment_id,
                  sha, 3, 5, None, {"num_examples": 5}, 1.0, {"accepted": True})  # fmt: skip


def _context(store: Store, blobs: BlobStore) -> PolicyContext:
    rng = random.Random(0)
    return PolicyContext(
        store=store,
        blobs=blobs,
        pacing=PaceSteering(PacingConfig(), rng),
        rng=rng,
        versions=ModelVersions(store, blobs),
        sums=RoundSums(store, blobs),
    )


def test_a_payload_stored_by_one_replica_survives_another_deleting_the_same_bytes(
    replica_db: str, tmp_path: Path
) -> None:
    uploader, closer = open_store(replica_db), open_store(replica_db)
    blobs = BlobStore(tmp_path / "blobs")
    try:
        uploader.add_bundle("b-1", {"num_parameters": 8, "files": {}}, 0.0)
        uploader.add_task(Task("t-1", "x", "b-1", "sync", "default", {}, "running", 0, 0, 0, 1.0))
        done = uploader.add_round(Round(0, "t-1", 1, "train", "committed", 0, 3, 4, 3, 1.0, 2.0))
        live = uploader.add_round(Round(0, "t-1", 2, "train", "reporting", 1, 3, 4, 3, 3.0, 9.0))
        sha = blobs.put(b"\x00\x00\x00")  # the zero update both rounds received
        uploader.add_assignments([
            Assignment("a-1", done.round_id, "t-1", "d-a-1", "train", "delivered", 1.0),
            Assignment("a-2", live.round_id, "t-1", "d-a-2", "train", "delivered", 3.0),
        ])  # fmt: skip
        uploader.add_update(_update("a-1", done.round_id, sha))
        stored = threading.Event()
        committing_at: list[float] = []

        def upload() -> None:
            # What Coordinator._accept_staged does on a replica: the round's lock, the
            # payload held shared, its file checked, the row stored; the commit comes later
            # (the rest of the batch).
            with uploader.atomic():
                uploader.lock_round(live.round_id)
                uploader.lock_blob(sha, shared=True)
                assert blobs.exists(sha)
                uploader.add_update(_update("a-2", live.round_id, sha))
                stored.set()
                time.sleep(HOLD_S)
                committing_at.append(time.monotonic())

        thread = threading.Thread(target=upload)
        thread.start()
        assert stored.wait(10)
        # The other replica closed the first round and now drops its payloads.
        _context(closer, blobs)._delete_payloads(done.round_id)
        deleted_at = time.monotonic()
        thread.join()
        # It waited for the upload's commit (on PostgreSQL after trying the blob's lock and
        # finding it held), then saw the open round still needs the bytes.
        assert committing_at and committing_at[0] <= deleted_at
        assert blobs.exists(sha)
        assert [u.payload_sha for u in closer.round_updates(live.round_id)] == [sha]
        # Once no open round names them, the bytes go.
        closer.update_round(live.round_id, state="committed")
        _context(closer, blobs)._delete_payloads(live.round_id)
        assert not blobs.exists(sha)
    finally:
        uploader.close()
        closer.close()


def test_a_payload_whose_lock_was_held_is_decided_again_once_it_is_free(
    replica_db: str, tmp_path: Path
) -> None:
    """Another transaction holds the bytes' lock (a replica deciding them for a round that
    still needed them, say) when this one's chunk comes to them: they are decided again,
    alone, once the lock is free, not left for ever."""
    holder, deleter = open_store(replica_db), open_store(replica_db)
    blobs = BlobStore(tmp_path / "blobs")
    try:
        sha = blobs.put(b"\x00\x00\x00")
        others = [blobs.put(bytes([i])) for i in range(1, 4)]
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with holder.atomic():
                holder.lock_blob(sha)
                held.set()
                release.wait(10)

        thread = threading.Thread(target=hold)
        thread.start()
        assert held.wait(10)
        threading.Timer(HOLD_S, release.set).start()
        gone = delete_unneeded(blobs, deleter, [*others, sha], lambda _: False)
        thread.join()
        assert release.is_set()  # it waited for the holder (on SQLite: the file's writer)
        assert gone == [*others, sha] and not any(blobs.exists(s) for s in [*others, sha])
    finally:
        holder.close()
        deleter.close()


def _open_round(store: Store, kind: str) -> tuple[Task, Round]:
    """A sync task "t-1" (goal 2) and its first round of ``kind``, reporting."""
    store.add_bundle("b-1", {"num_parameters": 8, "files": {}}, 0.0)
    task = Task("t-1", "x", "b-1", "sync", "default", {}, "running", 0, 0, 0, 1.0)
    store.add_task(task)
    return task, store.add_round(Round(0, "t-1", 1, kind, "reporting", 0, 2, 3, 2, 1.0, 9.0))


def test_eval_reports_stop_at_the_goal_whichever_replica_stores_them(
    replica_db: str, tmp_path: Path
) -> None:
    first, second = open_store(replica_db), open_store(replica_db)
    blobs = BlobStore(tmp_path / "blobs")
    try:
        task, rnd = _open_round(first, "evaluate")
        ids = [f"e-{i}" for i in range(3)]
        first.add_assignments(
            [Assignment(a, rnd.round_id, "t-1", "d-" + a, "evaluate", "delivered", 1.0)
             for a in ids]
        )  # fmt: skip

        def report(store: Store, assignment_id: str) -> None:
            device = "d-" + assignment_id
            sent = EvalReport(assignment_id, rnd.round_id, "t-1", device, 10, 0.5, 0.9, 2.0, {})
            SyncRounds(_context(store, blobs)).accept_eval(task, TaskPlan.from_json({}), sent, 2.0)

        report(first, ids[0])
        report(second, ids[1])  # the goal (2), across replicas; no tick closed the round yet
        try:
            report(first, ids[2])
        except Conflict as e:
            assert e.code == ErrorCode.ROUND_CLOSED
        else:
            raise AssertionError("a report past the goal was stored")
        assert [r.assignment_id for r in second.round_eval_reports(rnd.round_id)] == ids[:2]
    finally:
        first.close()
        second.close()


def test_an_eval_report_retried_on_another_replica_is_the_same_report(
    replica_db: str, tmp_path: Path
) -> None:
    """A device's report reached replica 2 while replica 1 was storing its first try (the
    service's check for a stored report found none): the same values are that report, stored
    once and answered as accepted, even when it was the one that reached the goal; other
    values are ``409 duplicate_upload``. Before, the retry was refused, ``duplicate_upload``
    or, at the goal, ``round_closed``: the device was told its counted report was not."""
    first, second = open_store(replica_db), open_store(replica_db)
    blobs = BlobStore(tmp_path / "blobs")
    try:
        task, rnd = _open_round(first, "evaluate")
        first.add_assignments(
            [Assignment(a, rnd.round_id, "t-1", "d-" + a, "evaluate", "delivered", 1.0)
             for a in ("e-0", "e-1")]
        )  # fmt: skip

        def report(store: Store, assignment_id: str, loss: float = 0.5) -> None:
            sent = EvalReport(assignment_id, rnd.round_id, "t-1", "d-" + assignment_id, 10,
                              loss, 0.9, 2.0, {})  # fmt: skip
            SyncRounds(_context(store, blobs)).accept_eval(task, TaskPlan.from_json({}), sent, 2.0)

        report(first, "e-0")
        report(second, "e-0")
        report(second, "e-1")  # the goal (2)
        report(first, "e-1")
        for assignment_id in ("e-0", "e-1"):
            try:
                report(first, assignment_id, loss=0.7)
            except Conflict as e:
                assert e.code == ErrorCode.DUPLICATE_UPLOAD
            else:
                raise AssertionError("a different report was taken for a reported assignment")
        stored = second.round_eval_reports(rnd.round_id)
        assert [(r.assignment_id, r.loss) for r in stored] == [("e-0", 0.5), ("e-1", 0.5)]
    finally:
        first.close()
        second.close()


def test_a_delivery_read_before_another_replica_closed_the_round_revives_nothing(
    replica_db: str, tmp_path: Path
) -> None:
    """A check-in on one replica read its assignment "selected"; another replica then closed
    the round, expiring it. The delivery written after that leaves it expired (before, it
    set it "delivered" again: in flight in a closed round)."""
    checking_in, closer = open_store(replica_db), open_store(replica_db)
    blobs = BlobStore(tmp_path / "blobs")
    try:
        task, rnd = _open_round(checking_in, "train")
        checking_in.add_assignments(
            [Assignment("a-1", rnd.round_id, "t-1", "d-1", "train", "selected", 1.0)]
        )
        read = checking_in.get_assignment("a-1")
        assert read is not None and read.state == "selected"
        closer.update_round(rnd.round_id, state="committed")
        assert closer.expire_assignments(rnd.round_id, 5.0) == 1
        SyncRounds(_context(checking_in, blobs))._deliver(
            read, rnd, task, TaskPlan.from_json({}), 6.0
        )
        after = closer.get_assignment("a-1")
        assert after is not None and (after.state, after.delivered_at) == ("expired", None)
    finally:
        checking_in.close()
        closer.close()
