"""The SDK's SecAgg loop (edge_sdk.secagg.loop) against a real coordinator over HTTP: devices
in threads, one of which loses its conditions before masking (a dropout); and against a
scripted loopback server, for what a coordinator does not do on its own (503s, answers that
change between two polls)."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from edge_sdk.errors import ConditionsLapsed
from edge_sdk.secagg.client import SecAggDevice, context_for
from edge_sdk.secagg.loop import SecAggLoop, SecAggPlan, SecAggResult
from edge_sdk.transport import RetryPolicy, Transport
from tests.coordinator.secagg.peers import STAGE_S, SecAggRound
from tests.edge_sdk.loopback import Loopback, Reply, Seen


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
)  # fmt: skip
def test_a_malformed_secagg_plan_is_refused_before_any_message(raw: Any) -> None:
    with pytest.raises(ValueError, match="plan 'secagg'"):
        SecAggPlan.from_json(raw)


BUSY = Reply(503, json.dumps({"error": {"code": "overloaded", "message": "busy"}}).encode(),
             {"Retry-After": "1"})  # fmt: skip


def _state(stage: str, **extra: Any) -> Reply:
    body = {"stage": stage, "index": 0, "threshold": 1, "answered": False,
            "retry_after_s": 0.1, **extra}  # fmt: skip
    return Reply(200, json.dumps(body).encode())


def _scripted(
    handle: Callable[[Seen], Reply], delta: np.ndarray, weight: int,
    sleep: Callable[[float], None] = lambda s: None,
) -> tuple[SecAggResult, list[Seen]]:  # fmt: skip
    """One device's loop against a scripted server (``handle`` answers each request)."""
    with Loopback(handle) as server:
        t = Transport(server.url, retry=RetryPolicy(max_attempts=1))
        t.credentials = ("d-0", "s")
        plan = {"bits": 20, "clip": 1.0, "levels": 100, "max_weight": 10, "stage_timeout_s": 4.0}
        assignment = {"assignment_id": "a-1", "task_id": "t-1", "round": 1,
                      "plan": {"secagg": plan}, "deadline_in_s": 10.0}  # fmt: skip
        loop = SecAggLoop(t, assignment, delta, weight, rng=np.random.default_rng(0),
                          sleep=sleep)  # fmt: skip
        result = loop.run()
        t.close()
    return result, server.seen


def test_a_busy_coordinator_is_waited_for_not_a_failed_round() -> None:
    """503 overloaded past the transport's own retries (a whole cohort polling one worker):
    the loop waits and asks again, and a resend the server already had is a replay."""
    answers = iter([
        BUSY,  # the first poll
        _state("advertise"),
        BUSY,  # the advertisement: in, its answer lost
        _state("advertise"),
        Reply(409, json.dumps({"error": {"code": "secagg_replay", "message": "again"}}).encode()),
        Reply(200, json.dumps({"stage": "closed", "outcome": "abandoned",
                               "reason": "too_few_after_share", "retry_after_s": 9.0}).encode()),
    ])  # fmt: skip
    slept: list[float] = []
    result, seen = _scripted(lambda s: next(answers), np.zeros(3), 1, slept.append)
    assert result == SecAggResult("abandoned", "advertise", "too_few_after_share", 9.0)
    assert slept == [1.0, 1.0]  # the coordinator's Retry-After, twice
    assert [s.method for s in seen] == ["GET", "GET", "POST", "GET", "POST", "GET"]


def test_a_resent_masked_vector_is_the_same_bytes() -> None:
    """A mask upload answered 503 (stored or not) and sent again must not be re-encoded: two
    vectors under the same masks differ by exactly the difference of their roundings."""
    mask = _state("mask", inbox={}, sharers=[0])
    answers = iter([
        mask, BUSY, mask, Reply(200, b'{"accepted": true, "stage": "mask"}'),
        Reply(200, b'{"stage": "closed", "outcome": "committed"}'),
    ])  # fmt: skip
    delta = np.random.default_rng(3).normal(0, 0.1, 200)
    result, seen = _scripted(lambda s: next(answers), delta, 7)
    assert result.outcome == "committed" and result.stage == "mask"
    posts = [s.body for s in seen if s.method == "POST"]
    assert len(posts) == 2 and len(posts[0]) == 201 * 3
    assert posts[0] == posts[1]


def test_a_device_answers_one_unmask_request_whatever_the_server_says_next() -> None:
    """SecAgg's core invariant on the device: after a 503 to its unmask answer, a server that
    now calls a neighbour dropped (it called it a survivor first) gets the same answer again,
    not the neighbour's mask-key share on top of its self-mask share."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    peer = SecAggDevice(1, context_for("t-1", 1))
    ok = Reply(200, b'{"accepted": true}')
    mine: dict[str, bytes] = {}

    def inbox() -> Reply:
        ciphertext = peer.share({0: (mine["c"], mine["s"])}, 1)[0]
        return _state("mask", inbox={"1": b64(ciphertext)}, sharers=[0, 1])

    def advertised(seen: Seen) -> Reply:
        keys = json.loads(seen.body)
        mine["c"], mine["s"] = (base64.b64decode(keys[k]) for k in ("c_public", "s_public"))
        return ok

    c_pub, s_pub = peer.advertise()
    script = iter([
        lambda seen: _state("advertise"), advertised,
        lambda seen: _state("share", neighbours={"1": {"c_public": b64(c_pub),
                                                       "s_public": b64(s_pub)}}),
        lambda seen: ok, lambda seen: inbox(), lambda seen: ok,
        lambda seen: _state("unmask", survivors=[0, 1], dropped=[]), lambda seen: BUSY,
        lambda seen: _state("unmask", survivors=[0], dropped=[1]), lambda seen: ok,
        lambda seen: Reply(200, b'{"stage": "closed", "outcome": "committed"}'),
    ])  # fmt: skip
    result, seen = _scripted(lambda s: next(script)(s), np.zeros(4), 3)
    assert result.outcome == "committed"
    unmasks = [s.body for s in seen if s.path.endswith("/secagg/unmask")]
    assert len(unmasks) == 2 and unmasks[0] == unmasks[1]


@pytest.mark.parametrize("asked", [1e12, float("inf")])
def test_a_poll_waits_no_longer_than_the_session_can_last(asked: float) -> None:
    """A state answer asking for an absurd wait (1e12 s; or Infinity, which Python's JSON
    reads): the loop sleeps at most until it would give up on the session anyway (the
    deadline plus five stage timeouts, 30 s here). Before, it slept what it was told:
    ``time.sleep`` of such a number raises OverflowError out of the loop."""
    answers = iter([
        _state("advertise", answered=True, retry_after_s=asked),
        Reply(200, b'{"stage": "closed", "outcome": "committed"}'),
    ])  # fmt: skip
    slept: list[float] = []
    result, _ = _scripted(lambda s: next(answers), np.zeros(3), 1, slept.append)
    assert result.outcome == "committed"
    assert len(slept) == 1 and 0 < slept[0] <= 30.0, slept
