"""The SDK's SecAgg loop (edge_sdk.secagg.loop) against a real coordinator over HTTP: devices
in threads, one of which loses its conditions before masking (a dropout)."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from edge_sdk.errors import ConditionsLapsed
from edge_sdk.secagg.loop import SecAggLoop, SecAggPlan, SecAggResult
from edge_sdk.transport import Transport
from tests.coordinator.secagg.peers import STAGE_S, SecAggRound


def _transport(url: str, http: Any) -> Transport:
    t = Transport(url)
    t.credentials = (http.device_id, http.secret)
    return t


def test_devices_run_every_stage_and_a_lapsed_one_drops_out(
    clocked_coordinator, fake_clock, tiny_bundle
) -> None:
    r = SecAggRound(clocked_coordinator, tiny_bundle, 8)
    results: dict[int, SecAggResult | BaseException] = {}
    lapsed = threading.Event()

    def device(i: int) -> None:
        p = r.peers[i]

        def recheck() -> tuple[str, ...]:
            # the last device is picked up by its user once it has shared its keys
            if i == 7 and loop.answered == "share":
                lapsed.set()
                return ("not idle",)
            return ()

        loop = SecAggLoop(_transport(clocked_coordinator.url, p.http), p.assignment, p.delta,
                          p.weight, rng=np.random.default_rng(i), recheck=recheck)  # fmt: skip
        try:
            results[i] = loop.run()
        except BaseException as e:  # recorded for the assertions
            results[i] = e

    threads = [threading.Thread(target=device, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        assert lapsed.wait(30)
        store = clocked_coordinator.service.store
        round_id = clocked_coordinator.call(store.open_round, r.task_id).round_id

        def uploaded() -> int:
            events = clocked_coordinator.call(store.secagg_events, round_id)
            return sum(e.kind == "mask" for e in events)

        waited = time.monotonic()
        while uploaded() < 7 and time.monotonic() - waited < 60:  # the others upload
            time.sleep(0.05)
        fake_clock.advance(STAGE_S + 1)  # the mask stage's deadline: device 7 is a dropout
        for t in threads:
            t.join(60)
        assert isinstance(results[7], ConditionsLapsed)
        for i in range(7):
            res = results[i]
            assert isinstance(res, SecAggResult) and res.counted, res
        expected, bound = r.expected_mean(r.peers[:7])
        assert abs(r.version(1) - r.base - expected).max() <= bound
    finally:
        r.close()


@pytest.mark.parametrize(
    "raw",
    [{}, {"bits": 20, "clip": 1.0, "levels": 10, "max_weight": 5, "stage_timeout_s": 0},
     {"bits": 65, "clip": 1.0, "levels": 10, "max_weight": 5, "stage_timeout_s": 1}, []],
)
def test_a_malformed_secagg_plan_is_refused_before_any_message(raw: Any) -> None:
    with pytest.raises(ValueError, match="plan 'secagg'"):
        SecAggPlan.from_json(raw)


def test_a_busy_coordinator_is_waited_for_not_a_failed_round() -> None:
    """503 overloaded past the transport's own retries (a whole cohort polling one worker):
    the loop waits and asks again, and a resend the server already had is a replay."""
    import json as _json

    from edge_sdk.transport import RetryPolicy
    from tests.edge_sdk.loopback import Loopback, Reply, Seen

    busy = _json.dumps({"error": {"code": "overloaded", "message": "busy"}}).encode()
    answers = iter([
        Reply(503, busy, {"Retry-After": "1"}),  # the first poll
        Reply(200, _json.dumps({"stage": "advertise", "index": 0, "threshold": 1,
                                "answered": False, "retry_after_s": 0.1}).encode()),
        Reply(503, busy, {"Retry-After": "1"}),  # the advertisement: in, its answer lost
        Reply(200, _json.dumps({"stage": "advertise", "index": 0, "threshold": 1,
                                "answered": False, "retry_after_s": 0.1}).encode()),
        Reply(409, _json.dumps({"error": {"code": "secagg_replay", "message": "again"}}).encode()),
        Reply(200, _json.dumps({"stage": "closed", "outcome": "abandoned",
                                "reason": "too_few_after_share", "retry_after_s": 9.0}).encode()),
    ])  # fmt: skip
    slept: list[float] = []

    def handle(seen: Seen) -> Reply:
        return next(answers)

    with Loopback(handle) as server:
        t = Transport(server.url, retry=RetryPolicy(max_attempts=1))
        t.credentials = ("d-1", "s")
        plan = {"bits": 20, "clip": 1.0, "levels": 100, "max_weight": 10, "stage_timeout_s": 4.0}
        assignment = {"assignment_id": "a-1", "task_id": "t-1", "round": 1,
                      "plan": {"secagg": plan}, "deadline_in_s": 10.0}  # fmt: skip
        loop = SecAggLoop(t, assignment, np.zeros(3), 1, rng=np.random.default_rng(0),
                          sleep=slept.append)  # fmt: skip
        result = loop.run()
        t.close()
    assert result == SecAggResult("abandoned", "advertise", "too_few_after_share", 9.0)
    assert slept == [1.0, 1.0]  # the coordinator's Retry-After, twice
    assert [s.method for s in server.seen] == ["GET", "GET", "POST", "GET", "POST", "GET"]
