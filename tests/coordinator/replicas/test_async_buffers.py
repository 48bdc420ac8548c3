"""Asynchronous (FedBuff) buffers served by three replicas: each replica folds what it
accepts into its own durable partial buffer, the K-th update from any replica makes the
commit due, one replica commits it; the versions match numpy (staleness weights
1/sqrt(1+s)), also when uploads race across the K boundary."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.clock import FakeClock
from coordinator.config import PacingConfig
from coordinator.errors import Conflict
from coordinator.rounds.buffered import BufferedAsync
from coordinator.store import is_database_url, open_store
from edge_sdk.frame import decode_tensor
from tests.coordinator.replicas.fleet import (
    Spread,
    fedavg,
    partial_rows,
    shares,
    start_task,
    thread_replicas,
    wait_version,
)

N = 64
PLAN: dict[str, Any] = {"rounds": 100, "buffer_k": 4, "max_concurrency": 8,
                        "round_deadline_s": 600.0, "robust": "none",
                        "eligibility": {"require_charging": False}}  # fmt: skip


def _delta(seed: int) -> np.ndarray:
    return np.random.default_rng(2000 + seed).normal(0, 0.01, N).astype(np.float32)


def _assign(d: Spread) -> str:
    answer = d.check_in()
    assert answer["action"] == "train", answer
    return str(answer["assignment"]["assignment_id"])


def test_buffers_across_replicas_match_numpy(
    replica_db: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """Partial buffers written every second upload: the commit adds up what rows there are
    and folds the uploads none covers from their payloads."""
    blobs = tmp_path / "blobs"
    with thread_replicas(3, replica_db, blobs, FakeClock(), replica_partial_every=2) as reps:
        admin, task_id, devices = start_task([r.url for r in reps], tiny_bundle, PLAN, 12, "async")
        v0 = decode_tensor(devices[0].params(task_id, 0))
        on_v0 = [(d, _assign(d)) for d in devices[:8]]
        # max_concurrency holds across replicas
        assert devices[8].check_in()["reason"] == "window_full"
        sent = []
        for k, (d, aid) in enumerate(on_v0[:4]):
            assert d.to(k).upload(aid, _delta(k), 5 + k)[0] == 200
            sent.append((_delta(k), 5 + k))
            if k == 2:  # one upload each: no partial buffer written yet
                assert sorted(shares(replica_db).values()) == [1, 1, 1]
                assert partial_rows(replica_db) == []
        v1 = v0 + fedavg(sent)
        wait_version(admin, task_id, 1)
        for i in range(3):
            got = decode_tensor(devices[i].to(i).params(task_id, "current"))
            np.testing.assert_allclose(got, v1, rtol=1e-6, atol=1e-7)
        # Version 2: two fresh updates (on version 1) and two one version stale.
        fresh = [(d, _assign(d)) for d in devices[8:10]]
        w1 = 1 / math.sqrt(2)
        buffer2 = []
        for k, (d, aid) in enumerate(fresh + on_v0[4:6]):
            n = 4 + k
            assert d.to(k + 1).upload(aid, _delta(10 + k), n)[0] == 200
            buffer2.append((_delta(10 + k), n * (1.0 if k < 2 else w1)))
        v2 = v1.astype(np.float32) + fedavg(buffer2)
        wait_version(admin, task_id, 2)
        np.testing.assert_allclose(
            decode_tensor(devices[0].params(task_id, 2)), v2, rtol=1e-6, atol=1e-7
        )
        rounds = admin.rounds(task_id)
        assert [r["metrics"].get("model_version") for r in rounds[:2]] == [1, 2]
        assert rounds[1]["metrics"]["mean_staleness"] == 0.5
        # No replica holds an unwritten partial buffer of version 1's round, which another
        # replica committed: let go when it folded into version 2's.
        store = open_store(replica_db)
        [first] = [r.round_id for r in store.list_rounds(task_id) if r.base_version == 0]
        store.close()
        assert all(first not in rep.service.ctx.replica._unwritten for rep in reps)


def test_a_full_buffer_is_folded_once_under_its_round_s_lock(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The K-th upload makes the commit due and its replica commits it, folding the payloads
    no partial buffer covers once, under the round's lock. Before, it folded them a first
    time outside the lock too: the commit's work twice, and a commit by another replica
    meanwhile deleted the payloads under it (a 503)."""
    with thread_replicas(2, replica_db, tmp_path / "blobs", FakeClock(), tick_interval_s=3600.0,
                         replica_partial_every=1000) as reps:  # fmt: skip
        admin, task_id, devices = start_task([r.url for r in reps], tiny_bundle, PLAN, 4, "async")
        v0 = decode_tensor(devices[0].params(task_id, 0))
        aids = [_assign(d) for d in devices]
        blobs = reps[0].service.ctx.blobs
        read, reads = blobs.read, []

        def counted(sha: str) -> bytes:
            reads.append(sha)
            return read(sha)

        monkeypatch.setattr(blobs, "read", counted)
        for k, (d, aid) in enumerate(zip(devices, aids, strict=True)):
            assert d.to((k + 1) % 2).upload(aid, _delta(k), 5 + k)[0] == 200
        assert admin.task(task_id)["model_version"] == 1  # by replica 0, which took the 4th
        # No partial rows: the four payloads (and version 0's parameters), each read once.
        assert len(reads) == len(set(reads)) == 5, reads
        sent = [(_delta(k), 5 + k) for k in range(4)]
        np.testing.assert_allclose(decode_tensor(devices[0].params(task_id, 1)),
                                   v0 + fedavg(sent), rtol=1e-6, atol=1e-7)  # fmt: skip


def test_uploads_racing_across_the_k_boundary(
    replica_db: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """Eight concurrent uploads over three replicas into buffers of four: two versions, each
    exactly four acknowledged updates, each the weighted mean of the four it records."""
    with thread_replicas(3, replica_db, tmp_path / "blobs", FakeClock()) as reps:
        plan = {**PLAN, "max_staleness": 4}
        admin, task_id, devices = start_task([r.url for r in reps], tiny_bundle, plan, 8, "async")
        v0 = decode_tensor(devices[0].params(task_id, 0))
        work = [(d, _assign(d), k) for k, d in enumerate(devices)]
        answers: dict[int, tuple[int, dict[str, Any]]] = {}

        def upload(d: Spread, aid: str, k: int) -> None:
            for _ in range(20):  # a 503 (buffer being committed) is retried, as the SDK does
                status, body = d.upload(aid, _delta(k), 3 + k, key=f"key-{k}")
                if status != 503:
                    break
            answers[k] = (status, body)

        threads = [threading.Thread(target=upload, args=w) for w in work]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(s == 200 for s, _ in answers.values()), answers
        wait_version(admin, task_id, 2)
        store = open_store(replica_db)
        try:
            buffers = [r for r in store.list_rounds(task_id) if r.state == "committed"]
            by_device = {d.device_id: k for d, _, k in work}
            version = v0.astype(np.float32)
            for r in buffers:
                updates = list(store.round_updates(r.round_id))
                assert len(updates) == 4
                terms = [(_delta(by_device[u.device_id]),
                          (3 + by_device[u.device_id]) / math.sqrt(1 + u.report["staleness"]))
                         for u in updates]  # fmt: skip
                version = (version + fedavg(terms)).astype(np.float32)
                got = decode_tensor(devices[0].params(task_id, r.metrics["model_version"]))
                np.testing.assert_allclose(got, version, rtol=1e-6, atol=1e-7)
            assert sorted(u.device_id for r in buffers for u in store.round_updates(r.round_id)) \
                == sorted(by_device)  # fmt: skip
        finally:
            store.close()


def test_replicas_racing_to_commit_a_full_buffer_commit_it_once(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The K-th upload's replica commits (made slow); the other replicas' ticks, run while it
    is inside, leave the buffer alone."""
    committing: list[int] = []
    inside = threading.Event()
    commit_buffer = BufferedAsync._commit_buffer

    def slow(self: BufferedAsync, *args: Any) -> None:
        committing.append(args[2].round_id)
        inside.set()
        time.sleep(1.0)
        commit_buffer(self, *args)

    monkeypatch.setattr(BufferedAsync, "_commit_buffer", slow)
    with thread_replicas(3, replica_db, tmp_path / "blobs", FakeClock()) as reps:
        admin, task_id, devices = start_task([r.url for r in reps], tiny_bundle, PLAN, 4, "async")
        work = [(d, _assign(d)) for d in devices]
        for k, (d, aid) in enumerate(work[:3]):
            assert d.to(k).upload(aid, _delta(k), 2)[0] == 200
        last = threading.Thread(target=lambda: work[3][0].to(0).upload(work[3][1], _delta(3), 2))
        last.start()
        assert inside.wait(10)
        ticks = [threading.Thread(target=r.call, args=(r.service.tick,)) for r in reps[1:] * 2]
        for t in ticks:
            t.start()
        for t in [*ticks, last]:
            t.join(30)
        wait_version(admin, task_id, 1)
        assert len(committing) == 1


def test_concurrent_check_ins_respect_max_concurrency(
    replica_db: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """Sixteen devices check in at once over three replicas; eight may train."""
    with thread_replicas(3, replica_db, tmp_path / "blobs", FakeClock()) as reps:
        _, _, devices = start_task([r.url for r in reps], tiny_bundle, PLAN, 16, "async")
        actions: list[str] = []
        threads = [
            threading.Thread(target=lambda d=d: actions.append(d.check_in()["action"]))
            for d in devices
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(actions) == ["train"] * 8 + ["wait"] * 8


def _upload_racing(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, meanwhile: str, after_write: bool
) -> tuple[int, dict[str, Any], Any, Any, Any]:
    """Replica 0 accepts an upload while replica 1 writes the expiry its tick found due (the
    deadline passing meanwhile) or the abort the device sent, started once replica 0's batch
    has checked the assignment: before it stores the update (``after_write`` False) or
    after. The upload's status and body, replica 1's answer (or its refusal), and the
    assignment and update as stored at the end."""
    clock = FakeClock()
    with thread_replicas(2, replica_db, tmp_path / "blobs", clock) as reps:
        _, _, devices = start_task([r.url for r in reps], tiny_bundle, PLAN, 1, "async")
        d = devices[0]
        aid = _assign(d.to(0))
        first, other = reps[0], reps[1]
        real_add = first.service.store.add_update
        outcome: list[Any] = []

        def act() -> None:
            try:
                if meanwhile == "expiry":
                    outcome.append(other.call(other.service.tick))
                else:
                    who = other.call(other.service.authenticate, d.auth["Authorization"])
                    outcome.append(other.call(other.service.abort, who, aid, b"{}"))
            except Exception as e:  # the refused abort
                outcome.append(e)

        acting = threading.Thread(target=act)

        def add_update(update: Any) -> bool:  # inside replica 0's batch transaction
            if meanwhile == "expiry":
                clock.advance(PLAN["round_deadline_s"] + 1.0)  # the deadline passes meanwhile
            if not after_write:
                acting.start()
                # Replica 1 writes and commits (PostgreSQL), or waits for this batch's
                # write lock (a SQLite file).
                acting.join(1.0)
            stored = real_add(update)
            if after_write:
                acting.start()
                time.sleep(1.0)  # replica 1 reads "delivered", then waits to write
            return stored

        first.service.store.add_update = add_update  # type: ignore[method-assign]
        status, body = d.to(0).upload(aid, _delta(0), 5, key="k0")
        first.service.store.add_update = real_add  # type: ignore[method-assign]
        acting.join(60)
        store = open_store(replica_db)
        try:
            return status, body, outcome[0], store.get_assignment(aid), store.get_update(aid)
        finally:
            store.close()


@pytest.mark.parametrize("meanwhile", ["expiry", "abort"])
def test_a_report_stored_meanwhile_stays_reported(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, meanwhile: str
) -> None:
    """Replica 1 reads an assignment in flight while replica 0's batch, which has stored its
    update, commits; then replica 1 writes the expiry its tick found due, or the abort its
    device sent. The acknowledged report's assignment stays "reported", the abort is refused
    (before: both overwrote it, an update counted under an assignment marked expired or
    aborted)."""
    status, body, outcome, a, u = _upload_racing(
        replica_db, tmp_path, tiny_bundle, meanwhile, after_write=True
    )
    assert status == 200 and body["accepted"], body
    if meanwhile == "abort":
        assert isinstance(outcome, Conflict), outcome
        assert "reported" in str(outcome)
    assert u is not None and a is not None
    assert a.state == "reported", a


@pytest.mark.parametrize("meanwhile", ["expiry", "abort"])
def test_an_assignment_closed_meanwhile_takes_no_report(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, meanwhile: str
) -> None:
    """Replica 0's batch checked the assignment in flight; replica 1 then expires or aborts
    it, before the batch stores the update. On PostgreSQL replica 1 commits first: the
    upload is refused ``409 round_closed`` and nothing of it is stored. On a SQLite file
    replica 1 waits for the batch: the report is stored and the abort refused. Before, on
    PostgreSQL, the batch overwrote the expiry or abort with "reported": an update counted
    for an assignment its device had been told was aborted."""
    status, body, outcome, a, u = _upload_racing(
        replica_db, tmp_path, tiny_bundle, meanwhile, after_write=False
    )
    assert a is not None
    if is_database_url(replica_db):
        assert status == 409 and body["error"]["code"] == "round_closed", body
        assert u is None and a.state == ("expired" if meanwhile == "expiry" else "aborted"), a
        if meanwhile == "abort":
            assert outcome["aborted"] is True, outcome
    else:
        assert status == 200 and body["accepted"], body
        assert u is not None and a.state == "reported", a
        if meanwhile == "abort":
            assert isinstance(outcome, Conflict), outcome


def test_pace_steering_learns_the_job_time_on_a_replica(
    replica_db: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """Among replicas too, check-ins are paced by the time devices take to report, as each
    replica measures it on the reports it accepts, not by the first guess (a quarter of
    round_deadline_s) for ever."""
    clock = FakeClock()
    pacing = PacingConfig(jitter=0.0, min_retry_s=0.001)
    with thread_replicas(2, replica_db, tmp_path / "blobs", clock, pacing=pacing) as reps:
        _, task_id, devices = start_task([r.url for r in reps], tiny_bundle, PLAN, 1, "async")
        aid = _assign(devices[0].to(0))
        clock.advance(10.0)  # the device trains for 10 s
        assert devices[0].to(0).upload(aid, _delta(0), 5)[0] == 200
        service = reps[0].service

        def steer() -> tuple[float, float]:
            task = service.store.get_task(task_id)
            assert task is not None
            plan, now = service._plan(task), clock.now()
            slots = plan.buffer.max_concurrency
            return service.policies["async"].steer(task, plan, now), service.pacing.interval(
                now, slots, 10.0
            )

        got, want = reps[0].call(steer)
        assert got == pytest.approx(want)
