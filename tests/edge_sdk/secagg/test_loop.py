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
