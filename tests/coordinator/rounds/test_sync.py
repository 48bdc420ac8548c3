"""The synchronous round state machine, over real HTTP and SQLite, with a fake clock.

Each test drives devices by hand: check in, advance the clock past the selection window,
check in again to receive assignments, upload (or not), advance to deadlines.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from coordinator.admin import AdminClient, ApiCallError
from coordinator.clock import FakeClock
from coordinator.config import PacingConfig
from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.frame import decode_tensor
from tests.fixtures.coordinator import DeviceHTTP, without_wait

N = 64
# Plain FedAvg ("robust": "none"); robust aggregation has its own tests (test_robust*).
PLAN = {"rounds": 3, "goal": 10, "selection_window_s": 10.0, "round_deadline_s": 60.0,
        "robust": "none"}  # fmt: skip


class Fleet:
    def __init__(
        self,
        coord: EmbeddedCoordinator,
        clock: FakeClock,
        tiny_bundle: Any,
        devices: int,
        **plan: Any,
    ) -> None:
        self.coord = coord
        self.clock = clock
        self.admin: AdminClient = coord.admin()
        bundle_id = self.admin.upload_bundle(tiny_bundle)["bundle_id"]
        self.task = self.admin.create_task(bundle_id, {**PLAN, **plan})
        self.task_id = self.task["task_id"]
        self.devices = [DeviceHTTP(coord) for _ in range(devices)]

    def select(self) -> list[tuple[DeviceHTTP, dict[str, Any]]]:
        """Everyone checks in, the window passes, everyone checks in again."""
        first = [d.check_in() for d in self.devices]
        assert {a["reason"] for a in first} == {"selecting"}
        self.clock.advance(PLAN["selection_window_s"] + 0.5)
        chosen = []
        for d in self.devices:
            answer = d.check_in()
            if answer["action"] == "train":
                chosen.append((d, answer["assignment"]))
            else:
                assert answer == {**answer, "action": "wait", "reason": "window_full"}
        return chosen

    def rounds(self) -> list[dict[str, Any]]:
        return self.admin.rounds(self.task_id)

    def params(self, version: int | str) -> np.ndarray:
        return decode_tensor(self.devices[0].params(self.task_id, version))


@pytest.fixture
def fleet(clocked_coordinator, fake_clock, tiny_bundle):
    return lambda devices, **plan: Fleet(
        clocked_coordinator, fake_clock, tiny_bundle, devices, **plan
    )


def _delta(i: int) -> np.ndarray:
    return np.random.default_rng(i).normal(0, 0.01, N).astype(np.float32)


def test_goal_reached_early_commits_fedavg_of_the_first_goal_reports(fleet) -> None:
    f = fleet(15)
    chosen = f.select()
    assert len(chosen) == 13  # ceil(10 x 1.3) of 15 candidates
    assert len({a["assignment_id"] for _, a in chosen}) == 13
    base = f.params(0)
    deltas, weights = [], []
    for i, (d, a) in enumerate(chosen[:10]):
        assert a["model_version"] == 0 and a["deadline_in_s"] == pytest.approx(60.0)
        status, body = d.upload(a["assignment_id"], _delta(i), num_examples=10 + i)
        assert status == 200 and body.pop("retry_after_s") > 0
        assert body == {"accepted": True, "round": 1, "model_version": 0}
        deltas.append(_delta(i))
        weights.append(10 + i)
    # committed right at the 10th report, no clock movement needed
    r = f.rounds()[0]
    assert r["state"] == "committed" and r["metrics"]["model_version"] == 1
    assert r["metrics"]["reported"] == 10 and r["metrics"]["participants"] == 13
    assert r["metrics"]["num_examples"] == sum(weights)
    expected = base + np.average(np.stack(deltas), axis=0, weights=weights)
    np.testing.assert_allclose(f.params(1), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(f.params("current"), f.params(1))
    # the 3 over-selected stragglers are now late
    d, a = chosen[10]
    status, body = d.upload(a["assignment_id"], _delta(99))
    assert status == 409 and body["error"]["code"] == "round_closed"
    assert f.admin.status()["updates_accepted"] == 10


def test_a_commit_writes_the_new_versions_download_frame(fleet, clocked_coordinator) -> None:
    """The next round's first download serves a file the commit wrote, with the parameters'
    fsyncs, instead of encoding and syncing it then."""
    f = fleet(10)
    chosen = f.select()
    base = f.params(0)
    for i, (d, a) in enumerate(chosen):
        assert d.upload(a["assignment_id"], _delta(i), num_examples=1)[0] == 200
    service = clocked_coordinator.service
    version = clocked_coordinator.call(service.store.get_version, f.task_id, 1)
    frame = service.blobs.derived_path(version.params_sha, "frame")
    assert frame.is_file()  # before anyone downloaded version 1
    expected = base + np.mean(np.stack([_delta(i) for i in range(10)]), axis=0)
    np.testing.assert_allclose(decode_tensor(frame.read_bytes()), expected, rtol=1e-6, atol=1e-7)
    assert f.devices[0].params(f.task_id, 1) == frame.read_bytes()
    frame.unlink()  # a cache: made again from the parameters if it is missing
    np.testing.assert_array_equal(f.params(1), decode_tensor(frame.read_bytes()))


def test_first_come_assigns_the_first_target_check_ins_at_once(fleet, fake_clock) -> None:
    """Without a window (plan first_come) the round opens reporting: each of the first
    target eligible check-ins is assigned on the spot, and it commits FedAvg as usual."""
    f = fleet(15, first_come=True, over_selection=1.2)  # target 12 of 15
    answers = [d.check_in() for d in f.devices]
    assert [a["action"] for a in answers] == ["train"] * 12 + ["wait"] * 3
    assert {a["reason"] for a in answers[12:]} == {"window_full"}
    rnd = f.admin.task(f.task_id)["current_round"]
    assert rnd["state"] == "reporting" and rnd["selected_at"] == rnd["opened_at"]
    assert rnd["deadline_at"] == rnd["opened_at"] + PLAN["round_deadline_s"]
    chosen = [(d, a["assignment"]) for d, a in zip(f.devices[:12], answers[:12], strict=True)]
    assert [a["deadline_in_s"] for _, a in chosen] == [pytest.approx(60.0)] * 12
    base = f.params(0)
    for i, (d, a) in enumerate(chosen[:10]):
        assert d.upload(a["assignment_id"], _delta(i), num_examples=3 + i)[0] == 200
    r = f.rounds()[0]
    assert r["state"] == "committed" and r["metrics"]["participants"] == 12
    # its candidates are the check-ins it took: those turned away came after its "draw"
    assert r["metrics"]["candidates"] == 12
    expected = base + np.average(
        np.stack([_delta(i) for i in range(10)]), axis=0, weights=[3 + i for i in range(10)]
    )
    np.testing.assert_allclose(f.params(1), expected, rtol=1e-6, atol=1e-7)
    # the next check-in opens round 2 the same way, on version 1
    nxt = f.devices[14].check_in()
    assert nxt["action"] == "train" and nxt["assignment"]["model_version"] == 1
    # too few reports by the deadline: abandoned as any round, the version stays
    fake_clock.advance(61.0)
    assert [r["state"] for r in f.rounds()] == ["committed", "abandoned"]
    assert f.rounds()[1]["metrics"]["candidates"] == 1
    assert f.admin.task(f.task_id)["model_version"] == 1


def test_deadline_with_enough_reports_commits(fleet, fake_clock) -> None:
    f = fleet(13)
    chosen = f.select()
    for i, (d, a) in enumerate(chosen[:8]):  # min_reporting_fraction 0.8 x goal 10 = 8
        assert d.upload(a["assignment_id"], _delta(i))[0] == 200
    assert f.rounds()[0]["state"] == "reporting"
    fake_clock.advance(59.0)
    assert f.admin.task(f.task_id)["current_round"]["state"] == "reporting"
    fake_clock.advance(1.5)
    r = f.rounds()[0]
    assert r["state"] == "committed" and r["metrics"]["reported"] == 8
    assert r["metrics"]["dropouts"] == 5
    assert f.admin.task(f.task_id)["model_version"] == 1


def test_deadline_with_too_few_reports_abandons_and_retries(fleet, fake_clock) -> None:
    f = fleet(13)
    chosen = f.select()
    base = f.params(0)
    for i, (d, a) in enumerate(chosen[:7]):
        assert d.upload(a["assignment_id"], _delta(i))[0] == 200
    fake_clock.advance(61.0)
    first = f.rounds()[0]
    assert first["state"] == "abandoned" and first["metrics"]["reported"] == 7
    task = f.admin.task(f.task_id)
    assert task["model_version"] == 0 and task["rounds_completed"] == 0
    np.testing.assert_array_equal(f.params("current"), base)
    # a late upload of the abandoned round changes nothing
    d, a = chosen[8]
    assert d.upload(a["assignment_id"], _delta(8))[1]["error"]["code"] == "round_closed"
    # the retry: a new round on the same version, which can commit
    again = f.select()
    assert {a["round"] for _, a in again} == {2} and {a["model_version"] for _, a in again} == {0}
    for i, (d, a) in enumerate(again[:10]):
        assert d.upload(a["assignment_id"], _delta(i))[0] == 200
    rounds = f.rounds()
    assert [r["state"] for r in rounds] == ["abandoned", "committed"]
    assert f.admin.task(f.task_id)["model_version"] == 1
    assert f.admin.status()["updates_accepted"] == 17


def test_over_selection_absorbs_20_percent_dropouts(fleet, fake_clock) -> None:
    f = fleet(20)
    chosen = f.select()
    assert len(chosen) == 13
    # 20 % of the selected devices drop: 2 abort explicitly, 1 silently vanishes
    for d, a in chosen[:2]:
        status, body = d.abort(a["assignment_id"])
        assert status == 200 and body["aborted"] is True
    for i, (d, a) in enumerate(chosen[3:]):
        assert d.upload(a["assignment_id"], _delta(i))[0] == 200
    r = f.rounds()[0]
    assert r["state"] == "committed"  # goal 10 reached without waiting for the deadline
    m = r["metrics"]
    assert (m["participants"], m["reported"], m["dropouts"], m["aborted"]) == (13, 10, 3, 2)
    # an aborted assignment can no longer upload
    d, a = chosen[0]
    assert d.upload(a["assignment_id"], _delta(0))[1]["error"]["code"] == "round_closed"


def test_late_and_duplicate_uploads(fleet, fake_clock) -> None:
    f = fleet(13, rounds=5)
    chosen = f.select()
    d0, a0 = chosen[0]
    status, first = without_wait(d0.upload(a0["assignment_id"], _delta(0), key="k-0"))
    assert status == 200

    def replayed() -> tuple[int, dict[str, Any]]:
        return without_wait(d0.upload(a0["assignment_id"], _delta(0), key="k-0"))

    before = f.coord.call(f.coord.service.store.snapshot)
    # the same key again (a client retry): the same answer, counted once
    assert replayed() == (200, first)
    # a different upload for the reported assignment
    status, body = d0.upload(a0["assignment_id"], _delta(5), key="k-other")
    assert status == 409 and body["error"]["code"] == "duplicate_upload"
    assert f.coord.call(f.coord.service.store.snapshot) == before
    # past the deadline: late
    d1, a1 = chosen[1]
    fake_clock.advance(61.0)
    status, body = d1.upload(a1["assignment_id"], _delta(1))
    assert status == 409 and body["error"]["code"] == "round_closed"
    # the replay is still answered the same after the round closed
    assert replayed() == (200, first)
    assert f.admin.status()["updates_accepted"] == 1
    assert f.rounds()[0]["state"] == "abandoned"


def test_checkin_is_idempotent_and_selection_uniform(fleet, fake_clock) -> None:
    f = fleet(25, goal=5, rounds=20)
    chosen = f.select()
    assert len(chosen) == 7
    # asking again returns the same assignment
    d, a = chosen[0]
    again = d.check_in()
    assert again["assignment"]["assignment_id"] == a["assignment_id"]
    assert again["assignment"]["deadline_in_s"] == pytest.approx(60.0)
    # selection is a uniform draw, not the first to arrive: over many rounds every device
    # gets picked, and the first 7 arrivals are not always the ones
    picked_first_seven = 0
    seen: set[str] = {dv.device_id for dv, _ in chosen}
    for _ in range(8):  # 9 rounds of 7 of 25: a uniform draw misses > 5 devices w.p. 2e-4
        for dv, a in chosen[:5]:
            assert dv.upload(a["assignment_id"], _delta(0))[0] == 200
        fake_clock.advance(1.0)
        chosen = f.select()
        seen |= {dv.device_id for dv, _ in chosen}
        picked_first_seven += {dv.device_id for dv, _ in chosen} == {
            dv.device_id for dv in f.devices[:7]
        }
        if f.admin.task(f.task_id)["state"] == "completed":
            break
    assert picked_first_seven <= 1
    assert len(seen) >= 20


def test_window_waits_for_goal_candidates_then_tops_up(fleet, fake_clock) -> None:
    f = fleet(12, goal=10)
    early = f.devices[:9]
    for d in early:
        assert d.check_in()["reason"] == "selecting"
    fake_clock.advance(11.0)
    # 9 < goal: the window stays open
    assert early[0].check_in()["reason"] == "selecting"
    assert f.devices[9].check_in()["action"] == "train"  # the 10th closes it, and is drawn
    # 10 candidates < target 13: latecomers fill the free slots directly
    assert f.devices[10].check_in()["action"] == "train"
    assert f.devices[11].check_in()["action"] == "train"
    assert f.admin.task(f.task_id)["current_round"]["state"] == "reporting"


def test_a_candidate_sent_away_comes_back_in_time_to_report(
    clocked_coordinator, fake_clock, tiny_bundle
) -> None:
    """A window over with one candidate: the other nine may arrive right after it left and
    select it while away; it must be back with most of the round's deadline still ahead."""
    f = Fleet(clocked_coordinator, fake_clock, tiny_bundle, 10, goal=10, over_selection=1.0,
              selection_window_s=10.0, round_deadline_s=60.0)  # fmt: skip
    first = f.devices[0]
    assert first.check_in()["reason"] == "selecting"
    fake_clock.advance(10.5)
    told = first.check_in()
    assert told["action"] == "wait"
    for d in f.devices[1:]:
        d.check_in()
    rnd = f.admin.task(f.task_id)["current_round"]
    assert rnd["state"] == "reporting"  # selected, the first one included, while it is away
    left = rnd["deadline_at"] - fake_clock.now()
    assert told["retry_after_s"] <= 60.0 / 4 + 2.0 < left  # the spread on top of the cap


def test_candidates_short_of_the_goal_return_when_the_rest_should_have_come(
    fleet, fake_clock
) -> None:
    """Past its window, a round short of its goal tells its candidates to come back when the
    missing ones should have arrived at the pace seen so far (not to poll every second), but
    never after the selection timeout; inside the window they return just after it."""
    # a long deadline: its quarter (the other cap, tested below) is not what binds here
    f = fleet(12, goal=10, selection_timeout_s=100.0, round_deadline_s=1000.0)
    spread = PacingConfig().selection_return_spread_s
    first = [d.check_in() for d in f.devices[:4]]
    opened = f.admin.task(f.task_id)["current_round"]["opened_at"]
    now = fake_clock.now()
    for a in first:  # the window (10 s) is still open
        assert a["reason"] == "selecting"
        back = now + a["retry_after_s"]
        assert opened + 10.0 + 0.05 - 1e-3 <= back <= opened + 10.0 + spread + 1e-3
    fake_clock.advance(opened + 20.0 - fake_clock.now())  # 4 candidates in 20 s: one per 5 s
    again = f.devices[0].check_in()
    assert again["reason"] == "selecting"
    eta = (10 - 4) * 20.0 / 4  # 6 missing at 5 s each
    assert eta + 0.05 - 1e-3 <= again["retry_after_s"] <= eta + spread + 1e-3
    fake_clock.advance(opened + 90.0 - fake_clock.now())  # 6 x 22.5 s would pass the timeout
    late = f.devices[1].check_in()
    assert late["reason"] == "selecting"
    assert 10.0 + 0.05 - 1e-3 <= late["retry_after_s"] <= 10.0 + spread + 1e-3
    assert f.admin.task(f.task_id)["current_round"]["state"] == "selecting"


def test_selection_timeout_starts_a_short_round_with_enough_candidates(fleet, fake_clock) -> None:
    f = fleet(10, goal=10, selection_timeout_s=40.0)  # min_reports = ceil(10 x 0.8) = 8
    early, late = f.devices[:8], f.devices[8:]
    assert {d.check_in()["reason"] for d in early} == {"selecting"}
    fake_clock.advance(39.0)  # window over, 8 < goal: still waiting
    assert f.admin.task(f.task_id)["current_round"]["state"] == "selecting"
    fake_clock.advance(1.0)  # the timeout: 8 >= min_reports, the round starts with all of them
    rnd = f.admin.task(f.task_id)["current_round"]
    assert rnd["state"] == "reporting" and rnd["deadline_at"] == rnd["opened_at"] + 40.0 + 60.0
    chosen = [(d, d.check_in()) for d in early]
    assert {a["action"] for _, a in chosen} == {"train"}
    # latecomers fill the slots up to target 13 until the deadline
    assert {d.check_in()["action"] for d in late} == {"train"}
    base = f.params(0)
    for i, (d, a) in enumerate(chosen):
        assert d.upload(a["assignment"]["assignment_id"], _delta(i), num_examples=5 + i)[0] == 200
    fake_clock.advance(60.0)
    r = f.rounds()[0]
    assert r["state"] == "committed" and r["metrics"]["candidates"] == 8
    assert (r["metrics"]["reported"], r["metrics"]["participants"]) == (8, 10)
    expected = base + np.average(
        np.stack([_delta(i) for i in range(8)]), axis=0, weights=[5 + i for i in range(8)]
    )
    np.testing.assert_allclose(f.params(1), expected, rtol=1e-6, atol=1e-7)


def test_selection_timeout_with_too_few_candidates_abandons_and_retries(fleet, fake_clock) -> None:
    f = fleet(10, goal=10, selection_timeout_s=40.0)
    few = f.devices[:7]  # < min_reports 8
    assert {d.check_in()["reason"] for d in few} == {"selecting"}
    fake_clock.advance(40.0)
    [first] = f.rounds()
    assert first["state"] == "abandoned" and first["closed_at"] == first["opened_at"] + 40.0
    m = first["metrics"]
    assert (m["outcome"], m["reason"]) == ("abandoned", "selection_timeout")
    assert (m["candidates"], m["participants"], m["reported"]) == (7, 0, 0)
    assert f.admin.task(f.task_id)["current_round"] is None
    assert f.admin.task(f.task_id)["model_version"] == 0
    # the next check-in opens a fresh window, which fills and selects as usual
    chosen = f.select()
    assert len(chosen) == 10 and {a["round"] for _, a in chosen} == {2}
    assert [r["state"] for r in f.rounds()] == ["abandoned", "reporting"]


def test_a_check_in_that_finds_the_window_timed_out_opens_the_next(
    tmp_path, fake_clock, tiny_bundle
) -> None:
    # No tick runs on its own here, so the check-in itself meets the expired window.
    with EmbeddedCoordinator(
        tmp_path / "f.db", clock=fake_clock, seed=1, tick_interval_s=3600.0
    ) as coord:
        f = Fleet(coord, fake_clock, tiny_bundle, 2, goal=10, selection_timeout_s=40.0)
        assert f.devices[0].check_in()["reason"] == "selecting"
        fake_clock.advance(45.0)
        assert f.devices[1].check_in()["reason"] == "selecting"
        rounds = f.rounds()
        assert [(r["round"], r["state"]) for r in rounds] == [(1, "abandoned"), (2, "selecting")]
        assert rounds[0]["metrics"]["candidates"] == 1
        assert rounds[1]["opened_at"] == rounds[0]["closed_at"] == rounds[0]["opened_at"] + 45.0


def test_ineligible_devices_are_steered_away(fleet) -> None:
    f = fleet(3)
    d = f.devices[0]
    answer = d.check_in({"charging": False, "idle": True, "unmetered": True})
    assert answer["action"] == "wait" and answer["reason"] == "ineligible"
    assert answer["retry_after_s"] > 0
    # a condition not reported is unknown, and unknown fails the requirement
    assert d.check_in({"charging": True, "idle": True})["reason"] == "ineligible"
    # a runtime the bundle does not support (litert-step is unsupported in the tiny bundle)
    lite = DeviceHTTP(f.coord, runtimes=("litert-step",))
    assert lite.check_in()["reason"] == "ineligible"
    # a device that cannot encode the plan's codec
    assert d.check_in(capabilities={"codecs": ["fp16"]})["reason"] == "ineligible"


def test_no_task_and_paused(clocked_coordinator, fake_clock, tiny_bundle) -> None:
    d = DeviceHTTP(clocked_coordinator)
    assert d.check_in()["reason"] == "no_task"
    admin = clocked_coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    task = admin.create_task(bundle_id, {**PLAN, "goal": 1})
    assert admin.pause(task["task_id"])["state"] == "paused"
    assert d.check_in()["reason"] == "paused"
    assert admin.resume(task["task_id"])["state"] == "running"
    assert d.check_in()["reason"] == "selecting"
    fake_clock.advance(11)
    assert d.check_in()["action"] == "train"


def test_evaluation_round(fleet, fake_clock) -> None:
    f = fleet(13, rounds=1)
    for i, (d, a) in enumerate(f.select()[:10]):
        assert d.upload(a["assignment_id"], _delta(i))[0] == 200
    task = f.admin.task(f.task_id)
    assert task["state"] == "completed"
    assert f.admin.evaluate(f.task_id)["pending_evaluations"] == 1
    first = [d.check_in() for d in f.devices]
    assert {a["reason"] for a in first} == {"selecting"}
    fake_clock.advance(11)
    evals = [(d, d.check_in()) for d in f.devices]
    evals = [(d, a["assignment"]) for d, a in evals if a["action"] == "evaluate"]
    assert len(evals) == 13 and {a["model_version"] for _, a in evals} == {1}
    # an evaluate assignment takes metrics, not an update
    d, a = evals[0]
    status, body = d.upload(a["assignment_id"], _delta(0))
    assert status == 409 and body["error"]["code"] == "conflict"
    for i, (d, a) in enumerate(evals[:10]):
        status, body = d.metrics(a["assignment_id"], 20 + i, 0.5 + i / 100, 0.8)
        assert status == 200 and body["round"] == 2
    r = f.rounds()[-1]
    assert r["kind"] == "evaluate" and r["state"] == "completed"
    weights = np.arange(20, 30)
    losses = 0.5 + np.arange(10) / 100
    assert r["metrics"]["loss"] == pytest.approx(float(np.average(losses, weights=weights)))
    assert r["metrics"]["accuracy"] == pytest.approx(0.8)
    task = f.admin.task(f.task_id)
    assert task["pending_evaluations"] == 0 and task["model_version"] == 1


def test_identical_payloads_shared_by_an_open_round_survive_a_commit(
    clocked_coordinator, tiny_bundle
) -> None:
    """Blobs are content-addressed: a zero delta uploaded to two tasks is one blob. Committing
    one task must not delete what the other's open round needs to rebuild its sum."""
    coord = clocked_coordinator
    admin = coord.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    plan = {"goal": 2, "selection_window_s": 0.0, "rounds": 3}
    tasks = {p: admin.create_task(bundle_id, plan, population=p)["task_id"] for p in "ab"}
    devs = {p: [DeviceHTTP(coord, population=p) for _ in range(2)] for p in "ab"}
    aids = {}
    for p in "ab":
        first = [d.check_in() for d in devs[p]]
        first[0] = devs[p][0].check_in()
        aids[p] = [a["assignment"]["assignment_id"] for a in first]
    zero = np.zeros(N, dtype=np.float32)
    assert devs["b"][0].upload(aids["b"][0], zero)[0] == 200
    for d, aid in zip(devs["a"], aids["a"], strict=True):
        assert d.upload(aid, zero)[0] == 200
    assert admin.task(tasks["a"])["model_version"] == 1
    # as after a restart: task b's running sum must be rebuilt from the stored payloads
    service = coord.service
    open_b = coord.call(service.store.open_round, tasks["b"])
    coord.call(service.ctx.sums.drop, open_b.round_id)
    assert devs["b"][1].upload(aids["b"][1], _delta(1))[0] == 200
    assert admin.task(tasks["b"])["model_version"] == 1


def test_a_paused_task_selects_nobody(fleet, fake_clock) -> None:
    f = fleet(13)
    for d in f.devices:
        assert d.check_in()["reason"] == "selecting"
    f.admin.pause(f.task_id)
    fake_clock.advance(11.0)
    assert {d.check_in()["reason"] for d in f.devices} == {"paused"}
    fake_clock.advance(300.0)  # nor does a paused window time out
    assert f.admin.task(f.task_id)["current_round"]["state"] == "selecting"
    f.admin.resume(f.task_id)
    answers = [d.check_in()["action"] for d in f.devices]
    assert answers.count("train") == 13


def _steered_bounds(population: int, target: int, period_s: float) -> tuple[float, float]:
    """The range pace steering may answer (coordinator/pacing.py's formula, default config)."""
    c = PacingConfig()
    interval = min(c.max_retry_s, max(c.min_retry_s, population * period_s / (c.headroom * target)))
    return interval * (1 - c.jitter), interval * (1 + c.jitter)


def test_reports_and_aborts_are_pace_steered(fleet, fake_clock) -> None:
    """A device that just reported or gave up gets a steered wait, not an immediate return.

    40 devices, goal 10 (target 13), no round closed yet: the round period is the window plus
    the deadline (70 s), so each device should come back after about 40 x 70 / (1.5 x 13) s.
    """
    f = fleet(40)
    chosen = f.select()
    assert len(chosen) == 13
    low, high = _steered_bounds(40, 13, PLAN["selection_window_s"] + PLAN["round_deadline_s"])
    d, a = chosen[0]
    status, body = d.abort(a["assignment_id"])
    assert status == 200 and body["aborted"] is True
    waits = [body["retry_after_s"]]
    assert d.abort(a["assignment_id"])[1]["retry_after_s"] > 0  # a repeated abort too
    for i, (d, a) in enumerate(chosen[1:9]):
        status, body = d.upload(a["assignment_id"], _delta(i), key=f"k-{i}")
        assert status == 200 and (body["accepted"], body["round"]) == (True, 1)
        waits.append(body["retry_after_s"])
    assert all(low <= w <= high for w in waits), (low, high, waits)
    # jittered: the devices that finished together do not come back together
    assert len(set(waits)) == len(waits) and max(waits) - min(waits) > 0.2 * (high - low)
    # a replay of an accepted upload is steered afresh, the rest of its answer unchanged
    d, a = chosen[1]
    status, again = d.upload(a["assignment_id"], _delta(0), key="k-0")
    assert status == 200 and low <= again["retry_after_s"] <= high
    assert (again["accepted"], again["round"], again["model_version"]) == (True, 1, 0)


def _committed_then_evaluating(f, fake_clock):
    """Commit the task's one training round, then hand its first device an evaluation."""
    for i, (d, a) in enumerate(f.select()[:10]):
        assert d.upload(a["assignment_id"], _delta(i))[0] == 200
    f.admin.evaluate(f.task_id)
    [d.check_in() for d in f.devices]
    fake_clock.advance(11)
    d = f.devices[0]
    return d, d.check_in()["assignment"]


def test_evaluation_reports_are_pace_steered(fleet, fake_clock) -> None:
    f = fleet(13, rounds=1)
    d, a = _committed_then_evaluating(f, fake_clock)
    status, body = d.metrics(a["assignment_id"], 20, 0.5, 0.8)
    # the training round opened at t = 0 and committed at t = 10.5 s: that is the period now
    low, high = _steered_bounds(13, 13, 10.5)
    assert status == 200 and low <= body["retry_after_s"] <= high


def test_evaluation_reports_obey_the_examples_bound(fleet, fake_clock) -> None:
    f = fleet(13, rounds=1, max_examples=100)
    d, a = _committed_then_evaluating(f, fake_clock)
    before = f.coord.call(f.coord.service.store.snapshot)
    for claimed in (101, 2**70):  # past the bound; past what SQLite can even store
        status, body = d.metrics(a["assignment_id"], claimed, 0.5, 0.8)
        assert status == 422 and body["error"]["code"] == "bad_update", body
    assert f.coord.call(f.coord.service.store.snapshot) == before
    assert d.metrics(a["assignment_id"], 100, 0.5, 0.8)[0] == 200


def test_an_abort_after_the_round_closed_is_round_closed(fleet, fake_clock) -> None:
    f = fleet(13)
    chosen = f.select()
    fake_clock.advance(PLAN["round_deadline_s"] + 1)  # the deadline closes the round
    assert f.rounds()[0]["state"] == "abandoned"
    d, a = chosen[0]
    before = f.coord.call(f.coord.service.store.snapshot)
    status, body = d.abort(a["assignment_id"])
    assert status == 409 and body["error"]["code"] == "round_closed"
    assert f.coord.call(f.coord.service.store.snapshot) == before


def test_a_task_paused_during_its_last_round_completes_and_trains_no_more(
    fleet, fake_clock
) -> None:
    f = fleet(10, rounds=1, over_selection=1.0)
    chosen = f.select()
    f.admin.pause(f.task_id)  # during the only round: its devices still report
    for i, (d, a) in enumerate(chosen):
        assert d.upload(a["assignment_id"], _delta(i))[0] == 200
    task = f.admin.task(f.task_id)
    assert (task["state"], task["rounds_completed"], task["model_version"]) == ("completed", 1, 1)
    with pytest.raises(ApiCallError) as e:  # completed: nothing to resume
        f.admin.resume(f.task_id)
    assert (e.value.status, e.value.code) == (409, "conflict")
    assert {d.check_in()["reason"] for d in f.devices} == {"no_task"}
    assert [r["state"] for r in f.rounds()] == ["committed"]


def test_learning_rate_decays_per_committed_version_only(fleet, fake_clock) -> None:
    """Round numbers also count abandoned and evaluation rounds; the decay must not: the
    assignment carries lr x lr_decay**version with lr_decay 1 (the device multiplies by
    lr_decay**round)."""
    f = fleet(13, rounds=3, lr=0.1, lr_decay=0.5)
    first = f.select()
    assert {(a["round"], a["plan"]["lr"], a["plan"]["lr_decay"]) for _, a in first} == {
        (1, 0.1, 1.0)
    }
    fake_clock.advance(61.0)  # nobody reported: round 1 abandoned
    assert f.rounds()[0]["state"] == "abandoned"
    second = f.select()
    assert {(a["round"], a["plan"]["lr"]) for _, a in second} == {(2, 0.1)}  # still version 0
    for i, (d, a) in enumerate(second[:10]):
        assert d.upload(a["assignment_id"], _delta(i))[0] == 200
    f.admin.evaluate(f.task_id)
    for d in f.devices:
        d.check_in()
    fake_clock.advance(11.0)
    evals = [(d, d.check_in()) for d in f.devices]
    evals = [(d, a["assignment"]) for d, a in evals if a["action"] == "evaluate"]
    for d, a in evals[:10]:
        assert d.metrics(a["assignment_id"], 10, 0.5)[0] == 200
    assert f.rounds()[-1]["kind"] == "evaluate" and f.rounds()[-1]["state"] == "completed"
    third = f.select()
    # round 4, after an abandoned and an evaluation round: one committed version, one decay
    assert {(a["round"], a["model_version"]) for _, a in third} == {(4, 1)}
    assert [a["plan"]["lr"] for _, a in third] == [pytest.approx(0.05)] * len(third)
