"""Synchronous rounds served by three replicas (thread mode, real HTTP, one PostgreSQL
schema or SQLite file, one blob directory), every device call going to the next replica:
selection once, hierarchical sums that add up to the numpy reference, a version every
replica serves."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.clock import FakeClock
from coordinator.rounds.sync import SyncRounds
from coordinator.store import open_store
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
from tests.fixtures.coordinator import HttpConnection, select_devices

N = 64
WINDOW = 10.0
PLAN = {"rounds": 2, "goal": 6, "over_selection": 1.5, "selection_window_s": WINDOW,
        "round_deadline_s": 600.0, "robust": "none",
        "eligibility": {"require_charging": False}}  # fmt: skip


def _delta(seed: int) -> np.ndarray:
    return np.random.default_rng(1000 + seed).normal(0, 0.01, N).astype(np.float32)


def _raising(error: Exception) -> Any:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise error

    return fail


def _selected(devices: list[Spread], clock: FakeClock) -> list[tuple[Spread, str]]:
    return select_devices(devices, lambda: clock.advance(WINDOW + 0.5))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


def test_three_replicas_commit_the_numpy_reference(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, clock: FakeClock
) -> None:
    """Each replica writes its partial sum every second upload: the commit adds up the rows
    and folds the uploads no row covers yet from their payloads."""
    blobs = tmp_path / "blobs"
    with thread_replicas(3, replica_db, blobs, clock, replica_partial_every=2) as reps:
        admin, task_id, devices = start_task([r.url for r in reps], tiny_bundle, PLAN, 12)
        base = decode_tensor(devices[0].params(task_id, 0))
        versions = [base]
        for r in range(2):
            chosen = _selected(devices, clock)
            # Selection happened once: exactly the target, each device once.
            assert len(chosen) == 9 and len({d.device_id for d, _ in chosen}) == 9
            round_id = _open_round_id(replica_db, task_id)
            sent = []
            for k, (d, assignment_id) in enumerate(chosen[:6]):
                seed = 10 * r + k
                status, body = d.to(k % 3).upload(assignment_id, _delta(seed), 3 + seed)
                assert status == 200 and body["accepted"] is True, body
                sent.append((_delta(seed), 3 + seed))
                if k == 4:  # before the goal: replicas 0 and 1 wrote their two, 2 has one
                    assert sorted(shares(replica_db, round_id).values()) == [1, 2, 2]
                    rows = partial_rows(replica_db, round_id)
                    assert sorted(p.count for p in rows) == [2, 2]
                    total = sum(np.frombuffer(p.total, "<f8") for p in rows)
                    want = sum(w * d.astype(np.float64) for i, (d, w) in enumerate(sent) if i != 2)
                    np.testing.assert_allclose(total, want, rtol=1e-12)
            # Uploads past the goal are refused whichever replica they reach.
            for k, (d, assignment_id) in enumerate(chosen[6:]):
                status, body = d.to(k).upload(assignment_id, _delta(99), 5)
                assert status == 409 and body["error"]["code"] == "round_closed", body
            expected = versions[-1] + fedavg(sent)
            versions.append(expected.astype(np.float32))
            wait_version(admin, task_id, r + 1)
            for i, d in enumerate(devices[:3]):  # every replica serves the new version
                got = decode_tensor(d.to(i).params(task_id, "current"))
                np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
            assert partial_rows(replica_db, round_id) == []  # folded into the version
            # Each replica holds a sum for this round at most (the first round's, which
            # another replica committed, is let go as the second one's uploads come).
            assert all(set(rep.service.ctx.sums._own) <= {round_id} for rep in reps)
            # The round's payloads go, on each replica's deleting thread, not in the answers.
            for rep in reps:
                rep.service.ctx.deletes.wait()
            store = open_store(replica_db)
            shas = store.round_payloads(round_id)
            store.close()
            assert len(shas) == 6 and not any((blobs / s[:2] / s[2:]).exists() for s in shas)
        rounds = admin.rounds(task_id)
        assert [x["state"] for x in rounds] == ["committed", "committed"]
        assert [x["metrics"]["model_version"] for x in rounds] == [1, 2]
        assert admin.task(task_id)["state"] == "completed"
        served = {i for d in devices for i in d.served_by}
        assert served == {0, 1, 2}


def _open_round_id(url: str, task_id: str) -> int:
    store = open_store(url)
    try:
        rnd = store.open_round(task_id)
        assert rnd is not None
        return rnd.round_id
    finally:
        store.close()


def test_a_defended_close_reads_each_payload_once(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A robust aggregator (median) reads the round's updates back from the blobs at the
    close: that is the only time the close reads them. It used to fold them a first time
    into the round's streaming sum too (the partial sums added up and the uncovered
    payloads decoded), which only undefended FedAvg uses, and threw that away."""
    plan = {**PLAN, "rounds": 1, "robust": {"aggregator": "median", "clip": None,
                                            "agreement": None}}  # fmt: skip
    with thread_replicas(2, replica_db, tmp_path / "blobs", clock, tick_interval_s=3600.0,
                         replica_partial_every=1000) as reps:  # fmt: skip
        admin, task_id, devices = start_task([r.url for r in reps], tiny_bundle, plan, 9)
        base = decode_tensor(devices[0].params(task_id, 0)).astype(np.float64)
        chosen = _selected(devices, clock)
        reads: list[str] = []

        def counting(read: Any) -> Any:
            def counted(sha: str) -> bytes:
                reads.append(sha)
                return bytes(read(sha))

            return counted

        for rep in reps:
            blobs = rep.service.ctx.blobs
            monkeypatch.setattr(blobs, "read", counting(blobs.read))
        sent = [_delta(k) for k in range(6)]
        for k, (d, assignment_id) in enumerate(chosen[:6]):
            status, body = d.to(k % 2).upload(assignment_id, sent[k], 3 + k)
            assert status == 200 and body["accepted"] is True, body
        wait_version(admin, task_id, 1)
        # The six payloads and version 0's parameters, each read once.
        assert len(reads) == len(set(reads)) == 7, reads
        got = decode_tensor(devices[0].params(task_id, 1))
        want = base + np.median(np.stack(sent).astype(np.float64), axis=0)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_two_replicas_racing_to_close_a_round_close_it_once(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Both replicas' ticks find the round due at once (its deadline passed); the close is
    made slow so that they overlap. One closes it; the other skips it, also when it asks
    again while the first is still inside."""
    closing: list[str] = []
    inside = threading.Event()
    close_round = SyncRounds._close_round

    def slow(self: SyncRounds, *args: Any) -> None:
        closing.append(threading.current_thread().name)
        inside.set()
        time.sleep(1.0)
        close_round(self, *args)

    monkeypatch.setattr(SyncRounds, "_close_round", slow)
    plan = {**PLAN, "rounds": 1, "round_deadline_s": 30.0}
    with thread_replicas(2, replica_db, tmp_path / "blobs", clock) as reps:
        admin, task_id, devices = start_task([r.url for r in reps], tiny_bundle, plan, 9)
        chosen = _selected(devices, clock)
        sent = []
        for k, (d, assignment_id) in enumerate(chosen[:5]):  # min_reports of 6: 5
            assert d.upload(assignment_id, _delta(k), 7)[0] == 200
            sent.append((_delta(k), 7))
        clock.advance(31.0)  # past the deadline: due on both
        results: list[BaseException | None] = []

        def tick(i: int) -> None:
            try:
                reps[i].call(reps[i].service.tick)
                results.append(None)
            except BaseException as e:
                results.append(e)

        threads = [threading.Thread(target=tick, args=(i,)) for i in (0, 1, 0, 1)]
        for t in threads[:2]:
            t.start()
        assert inside.wait(10)
        for t in threads[2:]:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [None] * 4
        wait_version(admin, task_id, 1)
        assert len(closing) == 1
        rounds = admin.rounds(task_id)
        assert [r["state"] for r in rounds] == ["committed"]
        task = admin.task(task_id)
        assert (task["model_version"], task["rounds_completed"]) == (1, 1)
        base = decode_tensor(devices[0].params(task_id, 0))
        got = decode_tensor(devices[0].params(task_id, 1))
        np.testing.assert_allclose(got, base + fedavg(sent), rtol=1e-6, atol=1e-7)


def test_two_replicas_racing_to_select_assign_the_target_once(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, clock: FakeClock
) -> None:
    """Check-ins on both replicas at once, after the window: the round's assignments are its
    target, whatever the interleaving; later check-ins fill no slot twice."""
    with thread_replicas(2, replica_db, tmp_path / "blobs", clock) as reps:
        plan = {**PLAN, "goal": 8, "over_selection": 1.25}
        _, task_id, devices = start_task([r.url for r in reps], tiny_bundle, plan, 16)
        for d in devices:
            assert d.check_in()["action"] == "wait"
        clock.advance(WINDOW + 0.5)
        answers: list[dict[str, Any]] = []
        lock = threading.Lock()

        def check_in(d: Spread) -> None:
            a = d.check_in()
            with lock:
                answers.append(a)

        threads = [threading.Thread(target=check_in, args=(d,)) for d in devices]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        trained = [a for a in answers if a["action"] == "train"]
        assert len(trained) == 10
        store = open_store(replica_db)
        try:
            rnd = store.open_round(task_id)
            assert rnd is not None and rnd.state == "reporting"
            assert store.count_assignments(rnd.round_id) == 10
            assert len(store.list_rounds(task_id)) == 1
        finally:
            store.close()


def test_a_round_carries_on_from_one_process_to_replicas(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, clock: FakeClock
) -> None:
    """Half a round acknowledged by a process alone (sums in memory, no partial rows), the
    rest by two replicas after a restart with --replica: the commit folds the first half
    again from the payloads and adds the replicas' partial sums."""
    plan = {**PLAN, "rounds": 1}
    with thread_replicas(1, replica_db, tmp_path / "blobs", clock, replica=False) as (alone,):
        _, task_id, devices = start_task([alone.url], tiny_bundle, plan, 9)
        chosen = _selected(devices, clock)
        base = decode_tensor(devices[0].params(task_id, 0))
        sent = []
        for k, (d, aid) in enumerate(chosen[:3]):
            assert d.upload(aid, _delta(k), 2 + k)[0] == 200
            sent.append((_delta(k), 2 + k))
        assert partial_rows(replica_db) == []
    with thread_replicas(2, replica_db, tmp_path / "blobs", clock) as reps:
        for d in devices:
            d.close()
            d.conns = [HttpConnection(r.url) for r in reps]
        for k, (d, aid) in enumerate(chosen[3:6], 3):
            assert d.upload(aid, _delta(k), 2 + k)[0] == 200
            sent.append((_delta(k), 2 + k))
        wait_version(reps[0].admin(), task_id, 1)
        got = decode_tensor(devices[0].params(task_id, 1))
        np.testing.assert_allclose(got, base + fedavg(sent), rtol=1e-6, atol=1e-7)


def _round(
    reps: list[Any], db: str, bundle: Path, clock: FakeClock
) -> tuple[Any, str, np.ndarray, list[tuple[Spread, str]], int]:
    """A task on 9 devices and its first round selected: the admin client, the task's id,
    version 0, the chosen devices with their assignments, and the round's id."""
    admin, task_id, devices = start_task([r.url for r in reps], bundle, PLAN, 9)
    base = decode_tensor(devices[0].params(task_id, 0))
    chosen = _selected(devices, clock)
    return admin, task_id, base, chosen, _open_round_id(db, task_id)


def _failing_upload(
    rep: Any, method: str, d: Spread, to: int, assignment_id: str, k: int
) -> tuple[int, dict[str, Any]]:
    """Upload ``k`` to replica ``to`` while its store's ``method`` raises the backend's
    transient error (a lost connection)."""
    store = rep.service.store
    real = getattr(store, method)
    setattr(store, method, _raising(store.transient_errors[0]("connection lost")))
    try:
        return d.to(to).upload(assignment_id, _delta(k), 3 + k, key=f"k{k}")
    finally:
        setattr(store, method, real)


def test_a_failing_partial_sum_write_refuses_the_batch_and_the_retry_counts_once(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, clock: FakeClock
) -> None:
    """The partial sum is written in the upload's transaction: when that write fails the
    upload is answered 503 and nothing of it is stored (no update row, the replica's partial
    unchanged); the same upload again is acknowledged and counted once in the version."""
    blobs = tmp_path / "blobs"
    with thread_replicas(2, replica_db, blobs, clock, replica_partial_every=1) as reps:
        admin, task_id, base, chosen, round_id = _round(reps, replica_db, tiny_bundle, clock)
        sent = []
        for k, (d, assignment_id) in enumerate(chosen[:6]):
            if k == 3:
                before = partial_rows(replica_db, round_id)
                status, body = _failing_upload(reps[1], "put_partial", d, 1, assignment_id, k)
                assert (status, body["error"]["code"]) == (503, "overloaded"), body
                assert partial_rows(replica_db, round_id) == before
                assert sum(p.count for p in before) == 3
            status, body = d.to(k % 2).upload(assignment_id, _delta(k), 3 + k, key=f"k{k}")
            assert status == 200 and body["accepted"] is True, body
            sent.append((_delta(k), 3 + k))
        wait_version(admin, task_id, 1)
        got = decode_tensor(chosen[0][0].params(task_id, 1))
        np.testing.assert_allclose(got, base + fedavg(sent), rtol=1e-6, atol=1e-7)
        [rnd] = [x for x in admin.rounds(task_id) if x["metrics"].get("model_version") == 1]
        assert rnd["metrics"]["reported"] == 6


def test_a_batch_failing_before_the_partial_sum_is_due_rebuilds_the_share_from_payloads(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, clock: FakeClock
) -> None:
    """Partial sums every third upload: two uploads acknowledged unwritten, the third's batch
    fails (503). The replica's share in memory is dropped and rebuilt from its row (none)
    and its numbered updates' payloads; the retry writes a row that holds exactly the three,
    and the version is the numpy reference."""
    blobs = tmp_path / "blobs"
    with thread_replicas(2, replica_db, blobs, clock, replica_partial_every=3) as reps:
        admin, task_id, base, chosen, round_id = _round(reps, replica_db, tiny_bundle, clock)
        sent = []
        for k, (d, assignment_id) in enumerate(chosen[:6]):
            if k == 2:
                status, body = _failing_upload(reps[0], "add_update", d, 0, assignment_id, k)
                assert (status, body["error"]["code"]) == (503, "overloaded"), body
                assert partial_rows(replica_db, round_id) == []
                assert sorted(shares(replica_db, round_id).values()) == [2]
            status, body = d.to(k // 3).upload(assignment_id, _delta(k), 3 + k, key=f"k{k}")
            assert status == 200 and body["accepted"] is True, body
            sent.append((_delta(k), 3 + k))
            if k == 2:
                [row] = partial_rows(replica_db, round_id)
                assert row.count == 3
                want = sum(w * x.astype(np.float64) for x, w in sent)
                np.testing.assert_allclose(np.frombuffer(row.total, "<f8"), want, rtol=1e-12)
        wait_version(admin, task_id, 1)
        got = decode_tensor(chosen[0][0].params(task_id, 1))
        np.testing.assert_allclose(got, base + fedavg(sent), rtol=1e-6, atol=1e-7)


def test_a_failing_batch_of_one_task_leaves_another_tasks_unwritten_sum(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, clock: FakeClock
) -> None:
    """Partial sums every third upload, two tasks on one replica: two of task B's uploads
    acknowledged unwritten, then a batch of task A's fails (503). Only A's share is dropped:
    B's third upload writes a row that holds exactly B's three, and both versions are the
    numpy reference."""
    blobs = tmp_path / "blobs"
    with thread_replicas(2, replica_db, blobs, clock, replica_partial_every=3) as reps:
        admin, task_a, base_a, chosen_a, round_a = _round(reps, replica_db, tiny_bundle, clock)
        _, task_b, base_b, chosen_b, round_b = _round(reps, replica_db, tiny_bundle, clock)
        sent_a: list[tuple[np.ndarray, float]] = []
        sent_b: list[tuple[np.ndarray, float]] = []
        for k, (d, assignment_id) in enumerate(chosen_b[:2]):
            assert d.to(0).upload(assignment_id, _delta(10 + k), 2 + k, key=f"b{k}")[0] == 200
            sent_b.append((_delta(10 + k), 2 + k))
        d, assignment_id = chosen_a[0]
        status, body = _failing_upload(reps[0], "add_update", d, 0, assignment_id, 0)
        assert (status, body["error"]["code"]) == (503, "overloaded"), body
        assert partial_rows(replica_db, round_b) == []
        assert list(shares(replica_db, round_b).values()) == [2]
        assert shares(replica_db, round_a) == {}
        d, assignment_id = chosen_b[2]
        assert d.to(0).upload(assignment_id, _delta(12), 4, key="b2")[0] == 200
        sent_b.append((_delta(12), 4))
        [row] = partial_rows(replica_db, round_b)
        assert row.count == 3
        want = sum(w * x.astype(np.float64) for x, w in sent_b)
        np.testing.assert_allclose(np.frombuffer(row.total, "<f8"), want, rtol=1e-12)
        for k, (d, assignment_id) in enumerate(chosen_a[:6]):
            status, body = d.to(k % 2).upload(assignment_id, _delta(k), 3 + k, key=f"k{k}")
            assert status == 200 and body["accepted"] is True, body
            sent_a.append((_delta(k), 3 + k))
        for k, (d, assignment_id) in enumerate(chosen_b[3:6], 3):
            assert d.to(k % 2).upload(assignment_id, _delta(10 + k), 2 + k, key=f"b{k}")[0] == 200
            sent_b.append((_delta(10 + k), 2 + k))
        for task_id, base, chosen, sent in ((task_a, base_a, chosen_a, sent_a),
                                            (task_b, base_b, chosen_b, sent_b)):  # fmt: skip
            wait_version(admin, task_id, 1)
            got = decode_tensor(chosen[0][0].params(task_id, 1))
            np.testing.assert_allclose(got, base + fedavg(sent), rtol=1e-6, atol=1e-7)
