"""One task that cannot proceed is marked ``failed`` with its reason; the others go on:
check-ins, ticks and start-up never fail because of one task. Over real HTTP and SQLite."""

from __future__ import annotations

import errno
import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.admin import ApiCallError
from coordinator.clock import FakeClock
from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.codecs import encode_update
from edge_sdk.protocol import HEADER_IDEMPOTENCY_KEY, HEADER_REPORT, Route
from tests.fixtures.coordinator import DeviceHTTP, HttpConnection

N = 64
PLAN: dict[str, Any] = {
    "rounds": 2, "goal": 1, "over_selection": 1.0, "selection_window_s": 0.0,
    "round_deadline_s": 600.0, "robust": "none",
}  # fmt: skip


def _delta(i: int) -> np.ndarray:
    return np.random.default_rng(i).normal(0, 0.01, N).astype(np.float32)


def _train(device: DeviceHTTP) -> dict[str, Any]:
    answer = device.check_in()
    assert answer["action"] == "train", answer
    return answer["assignment"]  # type: ignore[no-any-return]


def test_a_server_step_that_would_make_the_model_non_finite_fails_only_its_task(
    clocked_coordinator: EmbeddedCoordinator, tiny_bundle: Path
) -> None:
    admin = clocked_coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    # FedAvg with a server learning rate of 1e300: any update overflows float32
    wild = admin.create_task(bundle_id, {**PLAN, "server_optimizer": {"lr": 1e300}}, name="wild")
    sane = admin.create_task(bundle_id, PLAN, name="sane")
    device = DeviceHTTP(clocked_coordinator)
    a = _train(device)
    assert a["task_id"] == wild["task_id"]
    # the update is durable, so it is acknowledged; the commit is what fails
    assert device.upload(a["assignment_id"], _delta(0))[0] == 200
    task = admin.task(wild["task_id"])
    assert (task["state"], task["model_version"]) == ("failed", 0)
    assert "non-finite" in task["failure"]
    assert admin.rounds(wild["task_id"])[0]["metrics"]["reason"] == "task_failed"
    status = {t["task_id"]: t for t in admin.status()["tasks"]}
    assert status[wild["task_id"]]["failure"] == task["failure"]
    # the other task goes on, for the same device
    b = _train(device)
    assert b["task_id"] == sane["task_id"]
    assert device.upload(b["assignment_id"], _delta(1))[0] == 200
    assert admin.task(sane["task_id"])["model_version"] == 1
    # a failed task takes no more reports, and cannot be resumed, nor take an evaluation
    # round it would never open (before: 202 and pending_evaluations counted up for ever)
    with pytest.raises(ApiCallError) as e:
        admin.resume(wild["task_id"])
    assert e.value.status == 409
    with pytest.raises(ApiCallError) as e:
        admin.evaluate(wild["task_id"])
    assert (e.value.status, e.value.code) == (409, "conflict")
    assert admin.task(wild["task_id"])["pending_evaluations"] == 0


def test_a_failed_task_s_abandoned_round_lets_its_payloads_go(
    clocked_coordinator: EmbeddedCoordinator, tiny_bundle: Path
) -> None:
    # Without retain_updates a round's payloads go when it closes, abandoned included: a
    # task's failure abandons its open round like any other close, or they would stay
    # until a restart's sweep (retention leaves payloads to the close).
    admin = clocked_coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    wild = admin.create_task(bundle_id, {**PLAN, "server_optimizer": {"lr": 1e300}})["task_id"]
    device = DeviceHTTP(clocked_coordinator)
    a = _train(device)
    assert device.upload(a["assignment_id"], _delta(0))[0] == 200
    assert admin.task(wild)["state"] == "failed"
    service = clocked_coordinator.service
    update = clocked_coordinator.call(service.store.get_update, a["assignment_id"])
    assert update is not None
    clocked_coordinator.call(service.blobs.wait_unlinked)
    assert not service.blobs.path(update.payload_sha).exists()


def test_a_task_whose_policy_raises_is_failed_and_check_ins_go_on(
    clocked_coordinator: EmbeddedCoordinator, tiny_bundle: Path
) -> None:
    admin = clocked_coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    broken = admin.create_task(bundle_id, PLAN, name="broken")["task_id"]
    fine = admin.create_task(bundle_id, PLAN, name="fine")["task_id"]
    policy = clocked_coordinator.service.policies["sync"]
    real = policy.check_in

    def check_in(task: Any, *args: Any) -> dict[str, Any]:
        if task.task_id == broken:
            raise RuntimeError("a bug in one task's state")
        return real(task, *args)  # type: ignore[no-any-return]

    policy.check_in = check_in
    device = DeviceHTTP(clocked_coordinator)
    a = _train(device)  # the check-in does not fail: it reaches the task that works
    assert a["task_id"] == fine
    assert device.upload(a["assignment_id"], _delta(2))[0] == 200
    task = admin.task(broken)
    assert task["state"] == "failed"
    assert task["failure"] == "RuntimeError: a bug in one task's state"
    assert admin.task(fine)["model_version"] == 1


def test_start_up_survives_a_task_that_cannot_proceed(tmp_path: Path, tiny_bundle: Path) -> None:
    db, clock = tmp_path / "fedge.db", FakeClock()
    with EmbeddedCoordinator(db, clock=clock, admin_token="t") as coord:
        admin = coord.admin()
        bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
        bad = admin.create_task(bundle_id, PLAN, name="bad")["task_id"]
        good = admin.create_task(bundle_id, {**PLAN, "goal": 2}, name="good")["task_id"]
        d = DeviceHTTP(coord)
        assert _train(d)["task_id"] == bad  # each task has an open round now
        assert DeviceHTTP(coord).check_in()["action"] == "wait"  # good: selecting
        enrollment = coord.enrollment_token
    conn = sqlite3.connect(db)  # a stored plan this coordinator no longer accepts
    conn.execute("update tasks set plan = ? where task_id = ?",
                 [json.dumps({"goal": "ten"}), bad])  # fmt: skip
    conn.commit()
    conn.close()
    with EmbeddedCoordinator(db, clock=clock, admin_token="t",
                             enrollment_token=enrollment) as coord:  # fmt: skip
        admin = coord.admin()
        task = admin.task(bad)
        assert task["state"] == "failed" and "stored plan" in task["failure"]
        assert admin.task(good)["state"] == "running"
        d.http = HttpConnection(coord.url)
        status, _, body = d.raw("POST", "/v1/checkin",
                                json.dumps({"runtimes": ["ort-step"]}).encode())  # fmt: skip
        assert status == 200, body


def test_a_full_disk_answers_503_with_retry_after_and_fails_no_task(
    clocked_coordinator: EmbeddedCoordinator, tiny_bundle: Path
) -> None:
    admin = clocked_coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    task_id = admin.create_task(bundle_id, PLAN)["task_id"]
    device = DeviceHTTP(clocked_coordinator)
    a = _train(device)
    blobs = clocked_coordinator.service.blobs
    real_install = blobs.install  # where an upload's payload becomes durable

    def full(staged: Any) -> None:
        blobs.discard(staged)
        raise OSError(errno.ENOSPC, "No space left on device")

    blobs.install = full  # type: ignore[method-assign]
    before = clocked_coordinator.call(clocked_coordinator.service.store.snapshot)
    frame, _ = encode_update(_delta(3), "fp32")
    path = Route.ASSIGNMENT_UPDATE.format(assignment_id=a["assignment_id"])
    report = {HEADER_IDEMPOTENCY_KEY: "k", HEADER_REPORT: json.dumps({"num_examples": 5})}
    status, headers, body = device.raw("POST", path, frame, report)
    assert (status, json.loads(body)["error"]["code"]) == (503, "overloaded")
    assert int(headers["retry-after"]) >= 1
    assert clocked_coordinator.call(clocked_coordinator.service.store.snapshot) == before
    blobs.install = real_install  # type: ignore[method-assign]  # space freed: the same upload, retried, is taken
    assert device.upload(a["assignment_id"], _delta(3), key="k")[0] == 200
    task = admin.task(task_id)
    assert (task["state"], task["model_version"], task["failure"]) == ("running", 1, None)


def test_a_pause_that_finds_the_plan_unreadable_leaves_the_task_failed(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    """Pausing reads the task's plan; one this coordinator no longer accepts fails the
    task. The pause's own transaction must not roll that back with its refusal."""
    db = tmp_path / "fedge.db"
    with EmbeddedCoordinator(db, clock=FakeClock(), admin_token="t") as coord:
        admin = coord.admin()
        bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
        task_id = admin.create_task(bundle_id, PLAN)["task_id"]
        conn = sqlite3.connect(db)
        conn.execute("update tasks set plan = ? where task_id = ?",
                     [json.dumps({"goal": "ten"}), task_id])  # fmt: skip
        conn.commit()
        conn.close()
        with pytest.raises(ApiCallError, match="failed"):
            admin.pause(task_id)
        task = admin.task(task_id)
        assert task["state"] == "failed" and "stored plan" in task["failure"], task
