"""DP-FedAvg end to end: the plan's ``dp`` object, the noised commit, the ledger recorded with
every version, the budget that stops a task; over real HTTP and SQLite with a fake clock.

Epsilon is checked against dp-accounting driven here from first principles: a round samples
``cohort`` of ``population`` devices without replacement; under the replace-one relation one
device moves the clipped sum by up to ``2 C``, and the noise has std ``z C``, so the Gaussian
mechanism's noise relative to its sensitivity is ``z / 2``.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant
from scipy import stats

from coordinator.admin import ApiCallError
from coordinator.errors import InvalidRequest
from coordinator.plan import TaskPlan
from coordinator.privacy import NOISE_GRID, DpSpec, gaussian_noise, noised_mean
from edge_sdk.dp import clip_to_norm, plan_clip
from edge_sdk.protocol import Route
from tests.coordinator.rounds.test_sync import PLAN, Fleet, N

DELTA = 1e-5
CLIP = 0.05
Z = 1.0


def _expected_epsilon(rounds: list[tuple[int, int]], z: float = Z) -> float:
    acc = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    # RDP composition commutes: each distinct round once, times its count (cheaper).
    for (population, cohort), times in Counter(rounds).items():
        acc.compose(
            dp_event.SampledWithoutReplacementDpEvent(
                population, cohort, dp_event.GaussianDpEvent(z / 2)
            ),
            times,
        )
    return float(acc.get_epsilon(DELTA))


def _delta(i: int) -> np.ndarray:
    # Norms around 0.08: most are clipped to CLIP.
    return np.random.default_rng(i).normal(0, 0.01, N).astype(np.float32)


@pytest.fixture
def dp_fleet(clocked_coordinator, fake_clock, tiny_bundle):
    def make(devices: int, **dp: Any) -> Fleet:
        return Fleet(
            clocked_coordinator,
            fake_clock,
            tiny_bundle,
            devices,
            dp={"clip": CLIP, "noise_multiplier": Z, **dp},
        )

    return make


def _commit_round(f: Fleet, offset: int = 0, devices: int | None = None) -> list[np.ndarray]:
    """Select among the first ``devices`` devices; the first ``goal`` chosen report."""
    everyone = f.devices
    f.devices = everyone[: devices or len(everyone)]
    try:
        chosen = f.select()
    finally:
        f.devices = everyone
    sent = []
    for i, (d, a) in enumerate(chosen[: PLAN["goal"]]):
        assert a["plan"]["dp"] == {"clip": CLIP}
        status, _ = d.upload(a["assignment_id"], _delta(offset + i))
        assert status == 200
        sent.append(_delta(offset + i))
    return sent


def test_a_dp_round_commits_the_clipped_sum_over_goal_plus_gaussian_noise(dp_fleet) -> None:
    f = dp_fleet(15)
    base = f.params(0)
    sent = _commit_round(f)
    r = f.rounds()[0]
    assert r["state"] == "committed"
    dp = r["metrics"]["dp"]
    assert (dp["population"], dp["cohort"], dp["noise_multiplier"]) == (15, 13, Z)
    assert dp["reports"] == 10 and dp["clipped"] == sum(np.linalg.norm(d) > CLIP for d in sent)
    clipped = [d * min(1.0, CLIP / float(np.linalg.norm(d.astype(np.float64)))) for d in sent]
    plain = np.sum(clipped, axis=0) / PLAN["goal"]  # fixed denominator: the goal
    noise = (f.params(1).astype(np.float64) - base - plain) * PLAN["goal"] / (Z * CLIP)
    # 64 standard normal draws: mean and spread within a few standard errors.
    assert abs(noise.mean()) < 4 / math.sqrt(N)
    assert 0.6 < noise.std() < 1.4
    assert stats.kstest(noise, "norm").pvalue > 1e-4


def test_epsilon_per_version_matches_dp_accounting(dp_fleet) -> None:
    f = dp_fleet(15)
    _commit_round(f)
    _commit_round(f, offset=20, devices=12)  # a smaller window: 12 candidates, all chosen
    rounds = [r for r in f.rounds() if r["state"] == "committed"]
    assert [(r["metrics"]["dp"]["population"], r["metrics"]["dp"]["cohort"]) for r in rounds] == [
        (15, 13),
        (12, 12),
    ]
    eps1, eps2 = (r["metrics"]["dp"]["epsilon"] for r in rounds)
    assert eps1 == pytest.approx(_expected_epsilon([(15, 13)]), rel=1e-9)
    assert eps2 == pytest.approx(_expected_epsilon([(15, 13), (12, 12)]), rel=1e-9)
    task = f.admin.task(f.task_id)
    assert task["epsilon"] == eps2 and task["privacy"]["delta"] == DELTA
    listed = {t["task_id"]: t for t in f.admin.status()["tasks"]}[f.task_id]
    assert listed["epsilon"] == eps2 and listed["privacy"]["completed_reason"] is None


def test_budget_stops_the_task_when_the_next_round_would_exceed_it(dp_fleet) -> None:
    two, three = _expected_epsilon([(15, 13)] * 2), _expected_epsilon([(15, 13)] * 3)
    f = dp_fleet(15, budget=(two + three) / 2)
    _commit_round(f)
    assert f.admin.task(f.task_id)["state"] == "running"
    _commit_round(f, offset=20)
    task = f.admin.task(f.task_id)
    assert task["state"] == "completed" and task["rounds_completed"] == 2  # of 3
    assert task["privacy"]["completed_reason"] == "privacy_budget"
    assert (
        task["epsilon"] == pytest.approx(two, rel=1e-9)
        and task["epsilon"] <= task["privacy"]["budget"]
    )
    listed = f.admin.status()["tasks"][0]
    assert listed["state"] == "completed"
    assert listed["privacy"]["completed_reason"] == "privacy_budget"


def test_a_smaller_window_than_the_budget_allows_completes_the_task_unselected(
    dp_fleet,
) -> None:
    # Round 2 fits with 40 candidates (cohort 13 of 40) but not with 11 (all 11 chosen).
    fits = _expected_epsilon([(40, 13)] * 2)
    too_much = _expected_epsilon([(40, 13), (11, 11)])
    assert fits < too_much
    f = dp_fleet(40, budget=(fits + too_much) / 2)
    _commit_round(f)
    first = [d.check_in() for d in f.devices[:11]]
    assert {a["reason"] for a in first} == {"selecting"}
    f.clock.advance(301)  # past the selection timeout: start with the 11 candidates, or not
    answer = f.devices[0].check_in()
    assert answer["action"] == "wait" and answer["reason"] == "no_task"
    rounds = f.rounds()
    assert rounds[-1]["state"] == "abandoned"
    assert rounds[-1]["metrics"]["reason"] == "privacy_budget"
    task = f.admin.task(f.task_id)
    assert task["state"] == "completed" and task["model_version"] == 1
    assert task["privacy"]["completed_reason"] == "privacy_budget"
    assert all(not a.get("assignment") for a in (d.check_in() for d in f.devices))


def test_no_late_assignments_under_dp(dp_fleet) -> None:
    """The cohort is drawn from the window's candidates only: a late check-in is not taken in
    to fill the slots over-selection left (the accountant would not describe it)."""
    f = dp_fleet(15)
    f.devices, late = f.devices[:11], f.devices[11:]
    chosen = f.select()
    assert len(chosen) == 11  # all 11 candidates, target 13
    answer = late[0].check_in()
    assert answer["action"] == "wait"


@pytest.mark.parametrize(
    ("dp", "mode", "message"),
    [
        ({"noise_multiplier": 1.0}, "sync", "plan.dp.clip is required"),
        ({"clip": 1.0}, "sync", "exactly one of noise_multiplier and epsilon"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "epsilon": 2.0}, "sync", "exactly one"),
        ({"clip": 1.0, "epsilon": 2.0}, "sync", "needs population"),
        ({"clip": 1.0, "epsilon": 2.0, "population": 5}, "sync", "at least the round's target"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "population": 500}, "sync", "epsilon only"),
        # goal 10: target 13, a window admits ceil(13 x 4) = 52 candidates, never 53
        ({"clip": 1.0, "epsilon": 2.0, "population": 53}, "sync", "window admits"),
        ({"clip": -1.0, "noise_multiplier": 1.0}, "sync", "plan.dp.clip must be"),
        ({"clip": 1.0, "noise_multiplier": 0}, "sync", "plan.dp.noise_multiplier must be"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "delta": 0.5}, "sync", "plan.dp.delta must"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "nois": 1}, "sync", "unknown fields in plan.dp"),
        ({"clip": 1.0, "noise_multiplier": 1.0}, "async", "not available in async mode"),
    ],
)
def test_bad_dp_plans_are_refused_and_create_nothing(
    clocked_coordinator, tiny_bundle, dp: dict[str, Any], mode: str, message: str
) -> None:
    admin = clocked_coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    with pytest.raises(ApiCallError) as e:
        admin.create_task(bundle_id, {"goal": 10, "dp": dp}, mode=mode)
    assert (e.value.status, e.value.code) == (400, "invalid_request")
    assert message in str(e.value)
    assert admin.tasks() == []


def test_dp_with_secure_aggregation_is_distributed_dp_not_central() -> None:
    # the server never sees the sum in the clear: devices noise it (tests/coordinator/secagg/
    # test_dp.py), so no central DpSpec is made
    plan = TaskPlan.from_json({"dp": {"clip": 1.0, "noise_multiplier": 1.0}, "secagg": {}})
    assert plan.dp is None and plan.secagg is not None and plan.secagg.dp is not None
    assert "dp" not in plan.client_json() and "dp" in plan.client_json()["secagg"]


def test_dp_plans_refuse_robust_aggregation_and_round_trip() -> None:
    with pytest.raises(InvalidRequest, match=r"plan\.robust cannot be combined with plan\.dp"):
        TaskPlan.from_json({"dp": {"clip": 1.0, "noise_multiplier": 1.0}, "robust": {}})
    plan = TaskPlan.from_json({"dp": {"clip": 2.0, "noise_multiplier": 1.5, "budget": 3.0}})
    assert plan.robust.undefended and plan.dp == DpSpec(2.0, 1.5, 1e-5, 3.0)
    assert TaskPlan.from_json(plan.to_json()) == plan
    assert TaskPlan.from_json({**plan.to_json(), "robust": "none"}) == plan


def test_a_target_epsilon_is_calibrated_to_a_noise_multiplier() -> None:
    dp = {"clip": 1.0, "epsilon": 4.0, "population": 1000}
    plan = TaskPlan.from_json({"rounds": 50, "goal": 20, "max_candidates_factor": 40.0, "dp": dp})
    assert plan.robust.undefended and plan.dp is not None
    assert plan.dp.budget == 4.0
    # the calibrated noise keeps 50 rounds of 26 out of 1000 within the budget
    assert _expected_epsilon([(1000, 26)] * 50, plan.dp.noise_multiplier) <= 4.0
    assert TaskPlan.from_json(plan.to_json()) == plan
    assert plan.client_json()["dp"] == {"clip": 1.0}


def test_gaussian_noise_is_standard_normal_and_fresh_per_seed() -> None:
    a = gaussian_noise(200_001, 2.5, bytes(32))
    assert a.shape == (200_001,)
    assert stats.kstest(a / 2.5, "norm").pvalue > 1e-3
    assert np.array_equal(a, gaussian_noise(200_001, 2.5, bytes(32)))  # a function of the seed
    b = gaussian_noise(200_001, 2.5, bytes(31) + b"\x01")
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.01


def test_noised_mean_is_numpys_mean_of_clipped_updates_plus_noise_of_the_right_scale() -> None:
    rng = np.random.default_rng(7)
    n, goal, spec = 50_000, 20, DpSpec(clip=1.0, noise_multiplier=0.7)
    deltas = [rng.normal(0, 0.01 * (i + 1), n) for i in range(15)]  # some clipped, some not
    norms = [float(np.linalg.norm(d)) for d in deltas]
    expected = np.sum([d * min(1.0, 1.0 / s) for d, s in zip(deltas, norms, strict=True)], 0)
    out = noised_mean(iter(deltas), n, spec, goal)
    assert out.reports == 15 and out.clipped == sum(s > 1.0 for s in norms)
    residual = (out.mean * goal - expected) / (spec.noise_multiplier * spec.clip)
    assert stats.kstest(residual, "norm").pvalue > 1e-3
    again = noised_mean(iter(deltas), n, spec, goal)
    assert not np.array_equal(again.mean, out.mean)  # fresh noise at every commit


def test_device_side_clipping() -> None:
    x = np.array([3.0, 4.0], dtype=np.float32)
    assert np.allclose(clip_to_norm(x, 1.0), [0.6, 0.8])
    assert clip_to_norm(x, 5.0) is x
    assert plan_clip({"dp": {"clip": 2}}) == 2.0 and plan_clip({"lr": 0.1}) is None
    for bad in (0, -1, float("nan"), True, "1"):
        with pytest.raises(ValueError):
            plan_clip({"dp": {"clip": bad}})


def test_the_ledger_survives_retention_and_a_lost_ledger_fails_the_task(dp_fleet) -> None:
    f = dp_fleet(15)
    _commit_round(f)
    _commit_round(f, offset=20)
    store = f.coord.service.store
    rounds = store.list_rounds(f.task_id)
    store.delete_rounds([rounds[0].round_id])  # what retention does to old rounds
    _commit_round(f, offset=40)
    task = f.admin.task(f.task_id)
    assert task["epsilon"] == pytest.approx(_expected_epsilon([(15, 13)] * 3), rel=1e-9)
    # Without the round that made the current version, the spent budget is unknown: the task
    # fails rather than start again from zero.
    f2 = dp_fleet(15, budget=100.0)  # a budget: selection reads the ledger
    _commit_round(f2)
    store.delete_rounds([r.round_id for r in store.list_rounds(f2.task_id)])
    for d in f2.devices:
        d.check_in()
    f2.clock.advance(PLAN["selection_window_s"] + 0.5)
    f2.devices[0].check_in()
    task = f2.admin.task(f2.task_id)
    assert task["state"] == "failed" and "privacy ledger" in task["failure"]


def test_a_create_with_an_epsilon_target_stores_the_calibrated_noise(
    clocked_coordinator, tiny_bundle
) -> None:
    """The create request calibrates (fast: one full accountant evaluation, see
    test_privacy.py) and stores the smallest grid noise whose rounds keep the budget, checked
    here against dp-accounting on both sides of it."""
    admin = clocked_coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    plan = {"rounds": 40, "goal": 20, "over_selection": 1.0, "max_candidates_factor": 40.0,
            "dp": {"clip": 1.0, "epsilon": 3.0, "population": 800}}  # fmt: skip
    task = admin.create_task(bundle_id, plan)
    dp = admin.task(task["task_id"])["plan"]["dp"]
    assert dp["budget"] == 3.0
    z = dp["noise_multiplier"]
    assert _expected_epsilon([(800, 20)] * 40, z) <= 3.0
    assert _expected_epsilon([(800, 20)] * 40, z / NOISE_GRID) > 3.0


def test_the_calibration_does_not_hold_the_worker_device_requests_wait_behind(
    clocked_coordinator, tiny_bundle, monkeypatch
) -> None:
    """Requests run one at a time on the coordinator's worker: a create request's epsilon
    calibration (seconds of accountant time under load) must not run there. Held here until
    the test lets it go; meanwhile a request through the worker must answer."""
    import threading

    from coordinator import privacy

    admin = clocked_coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    entered, release, real = threading.Event(), threading.Event(), privacy.noise_for_budget

    def held(*args: Any) -> float:
        entered.set()
        release.wait(20.0)
        return real(*args)

    monkeypatch.setattr(privacy, "noise_for_budget", held)
    plan = {"rounds": 5, "goal": 10, "dp": {"clip": 1.0, "epsilon": 2.0, "population": 20}}
    created: dict[str, Any] = {}
    create = threading.Thread(target=lambda: created.update(admin.create_task(bundle_id, plan)))
    listed: list[Any] = []
    listing = threading.Thread(target=lambda: listed.append(admin.tasks()))
    create.start()
    try:
        assert entered.wait(20.0)
        listing.start()
        listing.join(5.0)
        assert listed == [[]]  # answered while the calibration was held: not on the worker
    finally:
        release.set()
        create.join(30.0)
        listing.join(30.0)
    stored = admin.task(created["task_id"])["plan"]["dp"]
    assert stored["noise_multiplier"] == real(2.0, 20, 13, 5, DELTA)


def test_a_dp_task_runs_no_evaluation_round_and_publishes_no_training_metrics(
    dp_fleet,
) -> None:
    """Evaluation metrics and the devices' training loss/accuracy are computed on device data
    without noise: the ledger does not cover them, so a DP task releases neither (and the
    refusal changes nothing). A non-DP task on the same coordinator still evaluates."""
    f = dp_fleet(15)
    with pytest.raises(ApiCallError) as e:
        f.admin.evaluate(f.task_id)
    assert (e.value.status, e.value.code) == (409, "conflict")
    assert "privacy ledger" in str(e.value)
    assert f.admin.task(f.task_id)["pending_evaluations"] == 0
    _commit_round(f)
    (r,) = f.rounds()
    assert r["state"] == "committed" and r["metrics"]["kind"] == "train"
    assert r["metrics"]["loss"] is None and r["metrics"]["accuracy"] is None
    assert f.admin.task(f.task_id)["pending_evaluations"] == 0
    # Nor does the operator's dashboard show them, per round or per device (each reported 0.5).
    views = [f.admin._call("GET", Route.ADMIN_DASHBOARD_TASK.format(task_id=f.task_id)),
             f.admin._call("GET", Route.ADMIN_DASHBOARD_ROUND.format(task_id=f.task_id,
                                                                     number=r["round"]))]
    rows = [*views[0]["rounds"], views[1]["round"], *views[1]["assignments"]]
    assert sum(1 for row in rows if row.get("num_examples")) == PLAN["goal"]
    assert all(row["loss"] is None and row["accuracy"] is None for row in rows)
    bundle_id = f.admin.task(f.task_id)["bundle_id"]
    plain = f.admin.create_task(bundle_id, {"goal": 10})["task_id"]
    assert f.admin.evaluate(plain)["pending_evaluations"] == 1
