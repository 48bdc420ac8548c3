"""DP-FedAvg rounds served by two replicas (thread mode, real HTTP, one PostgreSQL schema or
SQLite file, one blob directory): each round enters the privacy ledger as the draw that
replica made, whichever replica commits it and whatever the others stored meanwhile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coordinator.clock import FakeClock
from tests.coordinator.replicas.fleet import start_task, thread_replicas
from tests.coordinator.test_privacy_dp import CLIP, Z, _delta, _expected_epsilon

WINDOW = 10.0
GOAL = 4
PLAN = {"rounds": 1, "goal": GOAL, "over_selection": 1.0, "selection_window_s": WINDOW,
        "round_deadline_s": 600.0, "eligibility": {"require_charging": False},
        "dp": {"clip": CLIP, "noise_multiplier": Z}}  # fmt: skip


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


def test_a_candidate_stored_after_another_replica_drew_the_cohort_is_not_in_the_population(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A check-in on replica 0 finds the window still open and stores its device as a
    candidate, but replica 1 drew the cohort in between (the window ended meanwhile, as
    pace steering has candidates come back just after it): that device was never in the
    draw. The round is accounted with the population it was drawn from, 4 of 4; counting
    the late row too would claim amplification by sampling that no draw gave, and spend
    less epsilon than the round did."""
    with thread_replicas(2, replica_db, tmp_path / "blobs", clock) as reps:
        admin, task_id, devices = start_task([r.url for r in reps], tiny_bundle, PLAN, GOAL + 1)
        *drawn, late = devices
        for d in drawn:
            assert d.check_in()["action"] == "wait"
        store = reps[0].service.store
        real = store.add_candidate

        def meanwhile(round_id: int, device_id: str, at: float) -> Any:
            if device_id == late.device_id:
                clock.advance(WINDOW + 0.5)
                assert drawn[0].to(1).check_in()["action"] == "train"
            return real(round_id, device_id, at)

        monkeypatch.setattr(store, "add_candidate", meanwhile)
        assert late.to(0).check_in()["action"] == "wait"
        monkeypatch.undo()
        for i, d in enumerate(drawn):
            answer = d.check_in()
            assert answer["action"] == "train", answer
            assert d.upload(answer["assignment"]["assignment_id"], _delta(i))[0] == 200
        [rnd] = admin.rounds(task_id)
        assert rnd["state"] == "committed", rnd["metrics"]
        rec = rnd["metrics"]["dp"]
        assert (rec["population"], rec["cohort"]) == (GOAL, GOAL)
        assert rnd["metrics"]["candidates"] == GOAL
        assert rec["epsilon"] == pytest.approx(_expected_epsilon([(GOAL, GOAL)]), rel=1e-9)
        assert admin.task(task_id)["epsilon"] == rec["epsilon"]
