"""The async (FedBuff) task mode over real HTTP and SQLite: concurrency, commits every K
updates with staleness weights checked against numpy, the staleness bound, expiry, crashes.
"""

from __future__ import annotations

import errno
import json
import math
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.admin import AdminClient, ApiCallError
from coordinator.clock import FakeClock
from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.frame import decode_tensor
from tests.fixtures.coordinator import DeviceHTTP, HttpConnection, without_wait

N = 64
PLAN: dict[str, Any] = {
    "rounds": 100, "buffer_k": 3, "max_concurrency": 6, "round_deadline_s": 60.0,
    "robust": "none",  # these tests check plain FedBuff; robust aggregation: test_robust*
}  # fmt: skip


def _delta(i: int) -> np.ndarray:
    return np.random.default_rng(1000 + i).normal(0, 0.01, N).astype(np.float32)


class AsyncTask:
    def __init__(self, coord: EmbeddedCoordinator, tiny_bundle: Path, devices: int,
                 **plan: Any) -> None:  # fmt: skip
        self.coord = coord
        self.admin: AdminClient = coord.admin()
        bundle_id = self.admin.upload_bundle(tiny_bundle)["bundle_id"]
        self.task_id = self.admin.create_task(bundle_id, {**PLAN, **plan}, mode="async")["task_id"]
        self.devices = [DeviceHTTP(coord) for _ in range(devices)]

    def assign(self, d: DeviceHTTP) -> dict[str, Any]:
        answer = d.check_in()
        assert answer["action"] == "train", answer
        return answer["assignment"]

    def params(self, version: int | str) -> np.ndarray:
        return decode_tensor(self.devices[0].params(self.task_id, version))

    def task(self) -> dict[str, Any]:
        return self.admin.task(self.task_id)

    def snapshot(self) -> Any:
        return self.coord.call(self.coord.service.store.snapshot)


@pytest.fixture
def async_task(clocked_coordinator, tiny_bundle):
    return lambda devices, **plan: AsyncTask(clocked_coordinator, tiny_bundle, devices, **plan)


def _code(answer: tuple[int, dict[str, Any]]) -> tuple[int, str]:
    return answer[0], answer[1]["error"]["code"]


def test_concurrency_limit_holds_and_slots_free_up(async_task, fake_clock) -> None:
    t = async_task(9, max_concurrency=4)
    answers = [d.check_in() for d in t.devices[:6]]
    assert [a["action"] for a in answers] == ["train"] * 4 + ["wait"] * 2
    assert {a["reason"] for a in answers[4:]} == {"window_full"}
    assert {a["assignment"]["model_version"] for a in answers[:4]} == {0}
    assert answers[0]["assignment"]["deadline_in_s"] == pytest.approx(60.0)
    # asking again while training returns the same assignment, not a second slot
    first = answers[0]["assignment"]
    assert t.assign(t.devices[0])["assignment_id"] == first["assignment_id"]
    assert t.devices[4].check_in()["action"] == "wait"
    # a report frees a slot; the reporter cannot take a second one on the same version
    assert t.devices[0].upload(first["assignment_id"], _delta(0))[0] == 200
    assert t.devices[0].check_in()["action"] == "wait"
    fifth = t.assign(t.devices[4])
    assert t.devices[5].check_in()["reason"] == "window_full"
    # an abort frees a slot too
    assert t.devices[1].abort(answers[1]["assignment"]["assignment_id"])[0] == 200
    t.assign(t.devices[5])
    assert t.devices[6].check_in()["reason"] == "window_full"
    # past the deadline the silent ones expire and free their slots; their uploads are late
    fake_clock.advance(60.5)
    for d in t.devices[6:9]:
        t.assign(d)
    status, code = _code(t.devices[2].upload(answers[2]["assignment"]["assignment_id"], _delta(2)))
    assert (status, code) == (409, "round_closed")
    status, code = _code(t.devices[4].upload(fifth["assignment_id"], _delta(4)))
    assert (status, code) == (409, "round_closed")
    assert t.task()["model_version"] == 0  # 1 of buffer_k=3 updates so far


def test_commits_every_k_updates_with_staleness_weights_like_numpy(async_task) -> None:
    t = async_task(7)
    p0 = t.params(0)
    old = [t.assign(d) for d in t.devices[:5]]  # five devices train on version 0
    n = [40, 25, 60, 33, 47, 51]
    for i in range(3):
        status, body = t.devices[i].upload(old[i]["assignment_id"], _delta(i), num_examples=n[i])
        assert status == 200 and body.pop("retry_after_s") > 0
        assert body == {"accepted": True, "round": 1, "model_version": 0}
    assert t.task()["model_version"] == 1  # the 3rd update committed version 1
    fresh = t.assign(t.devices[5])
    assert fresh["model_version"] == 1 and fresh["round"] == 2
    # two stale updates (trained on 0, now at 1) and one fresh one make version 2
    assert t.devices[3].upload(old[3]["assignment_id"], _delta(3), num_examples=n[3])[0] == 200
    assert t.devices[5].upload(fresh["assignment_id"], _delta(5), num_examples=n[5])[0] == 200
    assert t.task()["model_version"] == 1
    assert t.devices[4].upload(old[4]["assignment_id"], _delta(4), num_examples=n[4])[0] == 200
    assert t.task()["model_version"] == 2

    # numpy reference: w_i = n_i / sqrt(1 + s_i), delta = sum w_i d_i / sum w_i, FedAvg (lr 1)
    def step(ids: list[int], staleness: list[int]) -> np.ndarray:
        d = np.stack([_delta(i).astype(np.float64) for i in ids])
        w = np.array([n[i] for i in ids], float) / np.sqrt(1.0 + np.array(staleness, float))
        return (w[:, None] * d).sum(0) / w.sum()

    p1 = (p0.astype(np.float64) + step([0, 1, 2], [0, 0, 0])).astype(np.float32)
    np.testing.assert_allclose(t.params(1), p1, rtol=1e-6, atol=1e-7)
    p2 = (p1.astype(np.float64) + step([3, 5, 4], [1, 0, 1])).astype(np.float32)
    np.testing.assert_allclose(t.params(2), p2, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(t.params("current"), t.params(2))
    rounds = t.admin.rounds(t.task_id)
    assert [r["state"] for r in rounds] == ["committed", "committed"]
    assert [r["metrics"]["reported"] for r in rounds] == [3, 3]
    assert rounds[1]["metrics"]["mean_staleness"] == pytest.approx(2 / 3)
    assert rounds[1]["metrics"]["num_examples"] == n[3] + n[4] + n[5]
    assert t.admin.status()["updates_accepted"] == 6


def test_over_stale_update_refused_and_changes_nothing(async_task) -> None:
    t = async_task(4, buffer_k=1, max_staleness=1)
    a0, a3 = t.assign(t.devices[0]), t.assign(t.devices[3])
    a1 = t.assign(t.devices[1])
    assert t.devices[1].upload(a1["assignment_id"], _delta(1))[0] == 200  # version 1
    # staleness 1, at the bound: accepted, makes version 2
    status, body = t.devices[3].upload(a3["assignment_id"], _delta(3))
    assert (status, body["model_version"]) == (200, 0)
    assert t.task()["model_version"] == 2
    before = t.snapshot()
    blobs = sorted(p.name for p in t.coord.config.blob_dir.rglob("*"))
    status, code = _code(t.devices[0].upload(a0["assignment_id"], _delta(0)))
    assert (status, code) == (409, "too_stale")
    assert t.snapshot() == before
    assert sorted(p.name for p in t.coord.config.blob_dir.rglob("*")) == blobs
    assert t.task()["model_version"] == 2 and t.admin.status()["updates_accepted"] == 2


def test_assignments_past_the_bound_release_their_slots(async_task) -> None:
    t = async_task(5, buffer_k=1, max_staleness=1, max_concurrency=2)
    stuck = t.assign(t.devices[0])  # never reports
    for i in (1, 2):  # each commits a version; the second leaves `stuck` 2 behind
        a = t.assign(t.devices[i])
        assert t.devices[i].upload(a["assignment_id"], _delta(i))[0] == 200
    assert t.task()["model_version"] == 2
    # two free slots again: the stale assignment no longer counts
    assert [t.assign(d)["model_version"] for d in t.devices[3:5]] == [2, 2]
    assert _code(t.devices[0].upload(stuck["assignment_id"], _delta(0)))[1] == "too_stale"


def test_task_completes_after_its_versions(async_task) -> None:
    t = async_task(4, rounds=2, buffer_k=1)
    held = t.assign(t.devices[3])
    for i in (0, 1):
        a = t.assign(t.devices[i])
        assert t.devices[i].upload(a["assignment_id"], _delta(i))[0] == 200
    task = t.task()
    assert (task["state"], task["model_version"], task["rounds_completed"]) == ("completed", 2, 2)
    assert task["current_round"] is None
    assert t.devices[2].check_in()["action"] == "wait"
    assert _code(t.devices[3].upload(held["assignment_id"], _delta(3)))[1] == "round_closed"


def test_replayed_upload_is_counted_once(async_task) -> None:
    t = async_task(2, buffer_k=2)
    a = t.assign(t.devices[0])
    first = without_wait(t.devices[0].upload(a["assignment_id"], _delta(0), key="k"))
    assert without_wait(t.devices[0].upload(a["assignment_id"], _delta(0), key="k")) == first
    assert _code(t.devices[0].upload(a["assignment_id"], _delta(9), key="other")) == (
        409, "duplicate_upload",
    )  # fmt: skip
    assert t.admin.status()["updates_accepted"] == 1 and t.task()["model_version"] == 0


@pytest.mark.parametrize(
    "plan",
    [
        {"buffer_k": 0},
        {"buffer_k": 5, "max_concurrency": 4},
        {"max_concurrency": "many"},
        {"staleness": "exponential"},
        {"staleness": {"name": "polynomial", "a": -1}},
        {"max_staleness": -1},
        {"max_staleness": "3"},
    ],
)
def test_bad_async_plans_are_refused(clocked_coordinator, tiny_bundle, plan) -> None:
    admin = clocked_coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    with pytest.raises(ApiCallError) as e:
        admin.create_task(bundle_id, plan, mode="async")
    assert (e.value.status, e.value.code) == (400, "invalid_request")
    assert admin.tasks() == []


def _rebind(devices: list[DeviceHTTP], url: str) -> None:
    """The same devices (credentials) talking to a restarted coordinator on a new port."""
    for d in devices:
        d.http.close()
        d.http = HttpConnection(url)


def test_acknowledged_updates_survive_sigkill(tmp_path, tiny_bundle) -> None:
    db = tmp_path / "fedge.db"
    token = "crash-test-token"
    n = [30, 41, 52, 23, 34, 45, 56, 27]
    with EmbeddedCoordinator(db, subprocess=True, admin_token=token) as coord:
        admin = coord.admin()
        bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
        plan = {**PLAN, "buffer_k": 4, "max_concurrency": 8}
        task_id = admin.create_task(bundle_id, plan, mode="async")["task_id"]
        devices = [DeviceHTTP(coord) for _ in range(8)]
        p0 = decode_tensor(devices[0].params(task_id, 0))
        work = [d.check_in()["assignment"] for d in devices[:6]]
        for i in range(5):  # 4 commit version 1, the 5th waits in version 1's buffer
            status, _ = devices[i].upload(work[i]["assignment_id"], _delta(i), num_examples=n[i])
            assert status == 200
        coord.kill()
    with EmbeddedCoordinator(db, subprocess=True, admin_token=token) as coord:
        admin = coord.admin()
        _rebind(devices, coord.url)
        info = admin.status()
        assert (info["updates_accepted"], info["model_version"]) == (5, 1)
        # the 6th device still trains on version 0; two newcomers train on version 1
        assert devices[5].upload(work[5]["assignment_id"], _delta(5), num_examples=n[5])[0] == 200
        for i in (6, 7):
            a = devices[i].check_in()["assignment"]
            assert a["model_version"] == 1
            assert devices[i].upload(a["assignment_id"], _delta(i), num_examples=n[i])[0] == 200
        assert admin.task(task_id)["model_version"] == 2
        p2 = decode_tensor(devices[0].params(task_id, 2))
        coord.stop()

    def step(ids: list[int], s: list[int]) -> np.ndarray:
        w = np.array([n[i] / math.sqrt(1 + si) for i, si in zip(ids, s, strict=True)])
        d = np.stack([_delta(i).astype(np.float64) for i in ids])
        return (w[:, None] * d).sum(0) / w.sum()

    p1 = (p0.astype(np.float64) + step([0, 1, 2, 3], [0, 0, 0, 0])).astype(np.float32)
    # the update acknowledged before the kill (device 4, trained on version 0) is in version 2
    ref = (p1.astype(np.float64) + step([4, 5, 6, 7], [1, 1, 0, 0])).astype(np.float32)
    np.testing.assert_allclose(p2, ref, rtol=1e-6, atol=1e-7)


def test_commit_interrupted_after_the_kth_update_is_finished_on_restart(tmp_path, tiny_bundle):
    db = tmp_path / "fedge.db"
    clock = FakeClock()
    with EmbeddedCoordinator(db, clock=clock, admin_token="t") as coord:
        t = AsyncTask(coord, tiny_bundle, 2, buffer_k=2)
        p0 = t.params(0)
        work = [t.assign(d) for d in t.devices]
        assert t.devices[0].upload(work[0]["assignment_id"], _delta(0), num_examples=7)[0] == 200

        def disk_full(*args: Any, **kwargs: Any) -> int:
            raise OSError(errno.ENOSPC, "no space left for the version")

        coord.service.ctx.versions.commit_next = disk_full
        status, _ = t.devices[1].upload(
            work[1]["assignment_id"], _delta(1), num_examples=9, key="k-1"
        )
        # stored before the commit began, so acknowledged; the version is not there yet
        assert status == 200 and t.task()["model_version"] == 0
        assert t.task()["state"] == "running"  # a full disk does not fail the task
    with EmbeddedCoordinator(db, clock=clock, admin_token="t") as coord:
        _rebind(t.devices, coord.url)
        admin = coord.admin()
        clock.advance(1.0)
        assert admin.task(t.task_id)["model_version"] == 1  # finished by the first tick
        assert admin.status()["updates_accepted"] == 2
        ref = p0.astype(np.float64) + (7 * _delta(0) + 9 * _delta(1)).astype(np.float64) / 16
        p1 = decode_tensor(t.devices[0].params(t.task_id, 1))
        np.testing.assert_allclose(p1, ref.astype(np.float32), rtol=1e-6, atol=1e-7)
        # the client's retry is answered as stored (idempotent), not folded twice
        retry = t.devices[1].upload(work[1]["assignment_id"], _delta(1), num_examples=9, key="k-1")
        assert retry[0] == 200 and retry[1].pop("retry_after_s") > 0
        assert retry[1] == {"accepted": True, "round": 1, "model_version": 0}
        assert admin.status()["updates_accepted"] == 2
        rounds = admin.rounds(t.task_id)
        assert [r["metrics"].get("reported") for r in rounds if r["state"] == "committed"] == [2]


def test_evaluation_rounds_are_refused_for_async_tasks(async_task) -> None:
    t = async_task(1)
    with pytest.raises(ApiCallError) as e:
        t.admin.evaluate(t.task_id)
    assert (e.value.status, e.value.code) == (409, "conflict")
    assert t.task()["pending_evaluations"] == 0


def test_paused_task_assigns_nothing_but_takes_reports(async_task) -> None:
    t = async_task(3, buffer_k=2)
    a = t.assign(t.devices[0])
    t.admin.pause(t.task_id)
    answer = t.devices[1].check_in()
    assert (answer["action"], answer["reason"]) == ("wait", "paused")
    assert t.devices[0].upload(a["assignment_id"], _delta(0))[0] == 200
    t.admin.resume(t.task_id)
    assert t.assign(t.devices[1])["model_version"] == 0


def test_sigkill_with_uploads_in_flight_loses_nothing_acknowledged(tmp_path, tiny_bundle):
    db = tmp_path / "fedge.db"
    token = "crash-test-token"
    k, senders = 7, 24
    coord = EmbeddedCoordinator(db, subprocess=True, admin_token=token).start()
    try:
        admin = coord.admin()
        bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
        plan = {**PLAN, "buffer_k": k, "max_concurrency": 30}
        task_id = admin.create_task(bundle_id, plan, mode="async")["task_id"]
        devices = [DeviceHTTP(coord) for _ in range(senders)]
        work = [d.check_in()["assignment"]["assignment_id"] for d in devices]
        acked: set[str] = set()
        lock = threading.Lock()
        enough = threading.Event()

        def report(i: int) -> None:
            try:
                status, _ = devices[i].upload(work[i], _delta(i), key=f"key-{i}")
            except OSError:
                return  # cut off by the kill: not acknowledged
            if status == 200:
                with lock:
                    acked.add(work[i])
                    if len(acked) >= 10:
                        enough.set()

        threads = [threading.Thread(target=report, args=(i,)) for i in range(senders)]
        for t in threads:
            t.start()
        assert enough.wait(60)
        coord.kill()  # SIGKILL while other uploads are in flight, around a commit at 7 or 14
        for t in threads:
            t.join(30)
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        stored = {row[0] for row in conn.execute("select assignment_id from updates")}
        conn.close()
        print(f"acknowledged {len(acked)}, stored {len(stored)} of {senders} sent")
        assert acked <= stored, "an acknowledged upload was lost"

        coord = EmbeddedCoordinator(db, subprocess=True, admin_token=token).start()
        admin = coord.admin()
        _rebind(devices, coord.url)
        status = admin.status()
        # every full buffer is committed after the restart, a half-done commit included
        assert status["updates_accepted"] == len(stored)
        assert status["model_version"] == len(stored) // k
        for i in range(senders):  # clients retry with their keys; counted ones count once
            assert devices[i].upload(work[i], _delta(i), key=f"key-{i}")[0] == 200
        status = admin.status()
        assert status["updates_accepted"] == senders
        assert status["model_version"] == senders // k
        rounds = [r for r in admin.rounds(task_id) if r["state"] == "committed"]
        assert [r["metrics"]["reported"] for r in rounds] == [k] * (senders // k)
    finally:
        coord.stop()


def test_a_device_contributes_at_most_once_to_a_version(async_task) -> None:
    t = async_task(4, buffer_k=2)
    a0, a1, a2 = (t.assign(d) for d in t.devices[:3])
    for i, a in ((1, a1), (2, a2)):
        assert t.devices[i].upload(a["assignment_id"], _delta(i))[0] == 200
    assert t.task()["model_version"] == 1
    # device 0's update, trained on version 0, lands in version 2's buffer ...
    assert t.devices[0].upload(a0["assignment_id"], _delta(0))[0] == 200
    # ... so it gets no assignment on version 1: a second update would count twice in 2
    answer = t.devices[0].check_in()
    assert (answer["action"], answer["reason"]) == ("wait", "window_full")
    a3 = t.assign(t.devices[3])
    assert a3["model_version"] == 1
    assert t.devices[3].upload(a3["assignment_id"], _delta(3))[0] == 200
    assert t.task()["model_version"] == 2
    rounds = [r for r in t.admin.rounds(t.task_id) if r["state"] == "committed"]
    assert [r["metrics"]["reported"] for r in rounds] == [2, 2]
    assert t.assign(t.devices[0])["model_version"] == 2  # a new version: welcome again


def test_a_task_paused_during_its_last_version_completes(async_task) -> None:
    t = async_task(3, rounds=1, buffer_k=2)
    a0, a1 = t.assign(t.devices[0]), t.assign(t.devices[1])
    t.admin.pause(t.task_id)
    for i, a in ((0, a0), (1, a1)):
        assert t.devices[i].upload(a["assignment_id"], _delta(i))[0] == 200
    task = t.task()
    assert (task["state"], task["model_version"], task["rounds_completed"]) == ("completed", 1, 1)
    assert t.devices[2].check_in()["action"] == "wait"


def test_a_staleness_weight_that_underflows_within_the_bound_is_refused(
    clocked_coordinator, tiny_bundle
) -> None:
    admin = clocked_coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    steep = {"staleness": {"name": "polynomial", "a": 400}, "max_staleness": 20}
    with pytest.raises(ApiCallError) as e:
        admin.create_task(bundle_id, {**PLAN, **steep}, mode="async")
    assert (e.value.status, e.value.code) == (400, "invalid_request")
    assert "underflows" in e.value.message
    assert admin.tasks() == []


def test_restart_with_an_overfull_buffer_commits_all_of_it(tmp_path, tiny_bundle) -> None:
    """A database an older coordinator left with more than buffer_k updates in an open
    buffer (it kept folding after a failed commit) starts, and every acknowledged update of
    that buffer goes into the version."""
    db, clock = tmp_path / "fedge.db", FakeClock()
    with EmbeddedCoordinator(db, clock=clock, admin_token="t") as coord:
        t = AsyncTask(coord, tiny_bundle, 3, buffer_k=3)
        p0 = t.params(0)
        work = [t.assign(d) for d in t.devices]
        for i in (0, 1):
            status, _ = t.devices[i].upload(work[i]["assignment_id"], _delta(i), num_examples=5 + i)
            assert status == 200
        token, enrollment = coord.admin_token, coord.enrollment_token
    # lower buffer_k to 1 in the stored plan: version 0's open buffer now holds 2 > k updates,
    # as if the commit after the first had failed and the buffer had been folded into since
    conn = sqlite3.connect(db)
    plan = json.loads(conn.execute("select plan from tasks").fetchone()[0])
    conn.execute("update tasks set plan = ?", [json.dumps({**plan, "buffer_k": 1})])
    conn.commit()
    conn.close()
    with EmbeddedCoordinator(db, clock=clock, admin_token=token,
                             enrollment_token=enrollment) as coord:  # fmt: skip
        _rebind(t.devices, coord.url)
        clock.advance(1.0)
        task = coord.admin().task(t.task_id)
        assert task["state"] == "running" and task["model_version"] == 1
        ref = p0.astype(np.float64) + (5 * _delta(0) + 6 * _delta(1)).astype(np.float64) / 11
        np.testing.assert_allclose(t.params(1), ref.astype(np.float32), rtol=1e-6, atol=1e-7)


def test_assignments_from_before_a_restart_expire_at_their_deadline(tmp_path, tiny_bundle):
    """The expiry scan is skipped until the earliest known deadline; a restarted process
    knows none until its first scan, so a check-in before it must not hide the deadlines
    of the assignments it finds in the store."""
    db, clock = tmp_path / "fedge.db", FakeClock()
    with EmbeddedCoordinator(db, clock=clock, admin_token="t") as coord:
        t = AsyncTask(coord, tiny_bundle, 4, buffer_k=1, max_concurrency=2)
        silent = t.assign(t.devices[0])  # never reports: its slot frees at 60 s
        a1 = t.assign(t.devices[1])
        assert t.devices[1].upload(a1["assignment_id"], _delta(1))[0] == 200
        assert t.task()["model_version"] == 1  # committed; version 1's buffer not open yet
        token, enrollment = coord.admin_token, coord.enrollment_token
    clock.advance(30.0)
    with EmbeddedCoordinator(db, clock=clock, admin_token=token,
                             enrollment_token=enrollment) as coord:  # fmt: skip
        _rebind(t.devices, coord.url)
        assert t.assign(t.devices[2])["model_version"] == 1  # the second slot; due at 90 s
        clock.advance(31.0)  # 61 s: the silent assignment expired, its slot is free
        answer = t.devices[3].check_in()
        assert answer["action"] == "train", answer
        status, code = _code(t.devices[0].upload(silent["assignment_id"], _delta(0)))
        assert (status, code) == (409, "round_closed")


def test_devices_that_all_missed_a_deadline_can_still_fill_the_buffer(
    async_task, fake_clock
) -> None:
    """One assignment per device and buffer round: a fleet whose devices all let their
    assignments on a version expire (or aborted them) was told ``window_full`` for ever and
    the version never came. Such a device gets its assignment back with a new deadline;
    one that reported does not."""
    t = async_task(3, buffer_k=2, max_concurrency=3)
    first = [t.assign(d) for d in t.devices]
    assert t.devices[2].abort(first[2]["assignment_id"])[0] == 200
    fake_clock.advance(61.0)  # every other assignment expired
    again = [t.assign(d) for d in t.devices]
    assert [a["assignment_id"] for a in again] == [a["assignment_id"] for a in first]
    assert {(a["model_version"], a["deadline_in_s"]) for a in again} == {(0, 60.0)}
    assert t.devices[0].upload(again[0]["assignment_id"], _delta(0))[0] == 200
    assert t.devices[0].check_in()["reason"] == "window_full"  # it reported on version 0
    assert t.devices[1].upload(again[1]["assignment_id"], _delta(1))[0] == 200
    assert t.task()["model_version"] == 1
    p0 = t.params(0).astype(np.float64)
    ref = p0 + (_delta(0).astype(np.float64) + _delta(1).astype(np.float64)) / 2
    np.testing.assert_allclose(t.params(1), ref.astype(np.float32), rtol=1e-6, atol=1e-7)


def test_a_failed_task_releases_its_stragglers_on_older_versions(async_task) -> None:
    """A task that fails leaves no assignment in flight, like one that completes: also none
    on the versions before its open buffer's (which would hold those versions and rounds
    from retention, and count as training in the dashboard, for ever)."""
    t = async_task(3, buffer_k=1)
    straggler = t.assign(t.devices[0])  # on version 0, still training
    a1 = t.assign(t.devices[1])
    assert t.devices[1].upload(a1["assignment_id"], _delta(1))[0] == 200  # version 1

    def broken(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("the server optimizer broke")

    t.coord.service.ctx.versions.commit_next = broken
    a2 = t.assign(t.devices[2])
    assert t.devices[2].upload(a2["assignment_id"], _delta(2))[0] == 200  # stored, then fails
    assert t.task()["state"] == "failed"
    store = t.coord.service.store
    left = t.coord.call(store.get_assignment, straggler["assignment_id"])
    assert left.state == "expired"
    assert _code(t.devices[0].abort(straggler["assignment_id"])) == (409, "round_closed")


def test_an_assignment_past_its_deadline_is_not_handed_out_again(async_task, fake_clock) -> None:
    """Between a commit and the next buffer's opening no round of the task is open, and the
    service's tick passes it by: a check-in must still see the deadlines that passed
    meanwhile, not hand the device its dead assignment again (deadline 0, its upload
    refused) nor count it against max_concurrency."""
    t = async_task(3, buffer_k=1, max_concurrency=2)
    late = t.assign(t.devices[0])
    a1 = t.assign(t.devices[1])
    assert t.devices[1].upload(a1["assignment_id"], _delta(1))[0] == 200  # version 1
    fake_clock.advance(61.0)  # the first assignment's deadline passed
    again = t.assign(t.devices[0])
    assert again["assignment_id"] != late["assignment_id"]
    assert (again["model_version"], again["deadline_in_s"]) == (1, pytest.approx(60.0))
    assert t.assign(t.devices[2])["model_version"] == 1  # the other slot
    assert _code(t.devices[0].upload(late["assignment_id"], _delta(0))) == (409, "round_closed")
