"""The synchronous straggler policy ``wait_for_all``: no over-selection, the round waits for
every selected device (or its abort), up to the deadline. Real HTTP, SQLite, a fake clock."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from coordinator.admin import ApiCallError
from tests.fixtures.coordinator import DeviceHTTP

N = 64
PLAN = {"rounds": 5, "goal": 5, "selection_window_s": 10.0, "round_deadline_s": 60.0,
        "wait_for_all": True, "robust": "none"}  # fmt: skip


def _delta(i: int) -> np.ndarray:
    return np.random.default_rng(i).normal(0, 0.01, N).astype(np.float32)


@pytest.fixture
def selected(clocked_coordinator, fake_clock, tiny_bundle):
    admin = clocked_coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    task_id = admin.create_task(bundle_id, PLAN)["task_id"]
    devices = [DeviceHTTP(clocked_coordinator) for _ in range(8)]
    for d in devices:
        assert d.check_in()["reason"] == "selecting"
    fake_clock.advance(PLAN["selection_window_s"] + 0.5)
    chosen: list[tuple[DeviceHTTP, dict[str, Any]]] = []
    for d in devices:
        answer = d.check_in()
        if answer["action"] == "train":
            chosen.append((d, answer["assignment"]))
    return admin, task_id, chosen


def test_selects_exactly_goal_and_plan_says_so(selected) -> None:
    admin, task_id, chosen = selected
    assert len(chosen) == 5  # 8 candidates, goal 5, no over-selection
    plan = admin.task(task_id)["plan"]
    assert plan["wait_for_all"] is True and plan["over_selection"] == 1.0


def test_waits_for_the_last_straggler_then_commits(selected, fake_clock) -> None:
    admin, task_id, chosen = selected
    for i, (d, a) in enumerate(chosen[:4]):
        assert d.upload(a["assignment_id"], _delta(i))[0] == 200
    fake_clock.advance(50.0)  # 4 >= min_reports, but one device is still training
    assert admin.task(task_id)["current_round"]["state"] == "reporting"
    d, a = chosen[4]
    assert d.upload(a["assignment_id"], _delta(4))[0] == 200
    r = admin.rounds(task_id)[0]
    assert r["state"] == "committed" and r["metrics"]["reported"] == 5


def test_an_abort_ends_the_wait(selected, fake_clock) -> None:
    admin, task_id, chosen = selected
    for i, (d, a) in enumerate(chosen[:4]):
        assert d.upload(a["assignment_id"], _delta(i))[0] == 200
    d, a = chosen[4]
    assert d.abort(a["assignment_id"])[0] == 200
    fake_clock.advance(1.0)  # the next tick sees nobody left training
    r = admin.rounds(task_id)[0]
    assert r["state"] == "committed" and r["metrics"]["reported"] == 4
    assert r["metrics"]["aborted"] == 1 and r["metrics"]["duration_s"] < 20.0


def test_a_silent_dropout_costs_the_deadline(selected, fake_clock) -> None:
    admin, task_id, chosen = selected
    for i, (d, a) in enumerate(chosen[:4]):
        assert d.upload(a["assignment_id"], _delta(i))[0] == 200
    fake_clock.advance(59.0)
    assert admin.task(task_id)["current_round"]["state"] == "reporting"
    fake_clock.advance(1.5)
    r = admin.rounds(task_id)[0]
    assert r["state"] == "committed" and r["metrics"]["dropouts"] == 1


def test_over_selection_contradicts_wait_for_all(clocked_coordinator, tiny_bundle) -> None:
    admin = clocked_coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    with pytest.raises(ApiCallError) as e:
        admin.create_task(bundle_id, {**PLAN, "over_selection": 1.3})
    assert (e.value.status, e.value.code) == (400, "invalid_request")
    with pytest.raises(ApiCallError):
        admin.create_task(bundle_id, {**PLAN, "wait_for_all": "yes"})
    assert admin.tasks() == []
