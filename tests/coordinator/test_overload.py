"""Overload: a real coordinator whose worker is saturated answers 503 + Retry-After at once,
stays reachable for health checks, does nothing for the refused requests, and the SDK's
transport waits what it was told (plus jitter) and then gets through."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.protocol import ErrorCode, Route
from edge_sdk.transport import RetryPolicy, Transport
from tests.fixtures.coordinator import GOOD_CONDITIONS, DeviceHTTP, HttpConnection

BOUND = 2


@pytest.fixture
def busy(tmp_path: Any) -> Iterator[EmbeddedCoordinator]:
    with EmbeddedCoordinator(tmp_path / "f.db", seed=5, max_queued_operations=BOUND,
                             overload_retry_after_s=1.5) as coord:
        yield coord


class Blocker:
    """Occupies the worker thread (outside the bounded queue's count) until released."""

    def __init__(self, coord: EmbeddedCoordinator) -> None:
        self.release = threading.Event()
        self.running = threading.Event()

        def hold() -> None:
            self.running.set()
            self.release.wait(30)

        self.future = coord.work_queue.executor.submit(hold)
        assert self.running.wait(10)

    def __enter__(self) -> Blocker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.future.result(30)


def _wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def _checkin_body() -> bytes:
    return json.dumps({"runtimes": ["ort-step"], "conditions": GOOD_CONDITIONS}).encode()


def test_a_saturated_coordinator_refuses_at_once_and_serves_what_it_admitted(
    busy: EmbeddedCoordinator,
) -> None:
    devices = [DeviceHTTP(busy) for _ in range(8)]
    before = busy.call(busy.service.store.snapshot)
    answers: list[tuple[int, dict[str, str], bytes, float]] = []
    lock = threading.Lock()

    def check_in(d: DeviceHTTP) -> None:
        t0 = time.monotonic()
        status, headers, body = d.raw("POST", Route.CHECKIN, _checkin_body(),
                                      {"Content-Type": "application/json"})
        with lock:
            answers.append((status, headers, body, time.monotonic() - t0))

    with Blocker(busy) as blocker:
        threads = [threading.Thread(target=check_in, args=(d,)) for d in devices]
        for t in threads:
            t.start()
        # Everything past the bound is answered while the worker is still blocked.
        _wait_for(lambda: len(answers) == len(devices) - BOUND)
        assert busy.work_queue.pending == BOUND
        health = HttpConnection(busy.url).request("GET", Route.HEALTH)
        assert health[0] == 200  # load balancers still see a live process
        refused = list(answers)
        blocker.release.set()
        for t in threads:
            t.join(30)
    assert len(refused) == len(devices) - BOUND
    for status, headers, body, _ in refused:
        assert status == 503 and headers["retry-after"] == "2"  # 1.5 s, in whole seconds
        assert headers["content-type"].startswith("application/json")
        assert json.loads(body)["error"]["code"] == ErrorCode.OVERLOADED.value
    admitted = [a for a in answers if a not in refused]
    assert [a[0] for a in admitted] == [200] * BOUND
    assert all(json.loads(a[2])["action"] == "wait" for a in admitted)  # no task: nothing to do
    assert busy.work_queue.refused == len(refused) and busy.work_queue.pending == 0
    assert busy.call(busy.service.store.snapshot) == before  # check-ins with no task write nothing
    for d in devices:
        d.close()


def test_the_transport_waits_the_retry_after_with_jitter_then_gets_through(
    busy: EmbeddedCoordinator,
) -> None:
    holders = [DeviceHTTP(busy) for _ in range(BOUND)]
    sleeps: list[float] = []
    with Blocker(busy) as blocker:
        # fill the queue with real requests
        threads = [threading.Thread(target=h.check_in) for h in holders]
        for t in threads:
            t.start()
        _wait_for(lambda: busy.work_queue.pending == BOUND)

        def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            blocker.release.set()  # the overload passes while the device waits
            for t in threads:
                t.join(30)

        transport = Transport(busy.url, retry=RetryPolicy(max_attempts=5, jitter=0.5),
                              sleep=sleep, rng=random.Random(0))
        transport.credentials = (holders[0].device_id, holders[0].secret)
        answer = transport.call("POST", Route.CHECKIN,
                                {"runtimes": ["ort-step"], "conditions": GOOD_CONDITIONS})
    assert answer["action"] == "wait"
    assert len(sleeps) == 1 and 2.0 <= sleeps[0] <= 3.0  # Retry-After 2, times [1, 1.5]
    assert busy.work_queue.refused == 1
    for h in holders:
        h.close()


def test_deadline_ticks_are_never_refused(busy: EmbeddedCoordinator) -> None:
    """Internal work bypasses the bound: a full queue must not stop deadlines from applying."""
    import asyncio

    with Blocker(busy):
        for _ in range(BOUND + 3):
            asyncio.run_coroutine_threadsafe(
                busy.work_queue.run(busy.service.tick, internal=True), busy._loop
            )
        _wait_for(lambda: busy.work_queue.pending == BOUND + 3)
    _wait_for(lambda: busy.work_queue.pending == 0)
    assert busy.work_queue.refused == 0
