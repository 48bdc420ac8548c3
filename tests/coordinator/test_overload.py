"""Overload: a real coordinator whose worker is saturated answers 503 + Retry-After at once,
stays reachable for health checks, does nothing for the refused requests, and the SDK's
transport waits what it was told (plus jitter) and then gets through."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.protocol import (
    FRAME_CONTENT_TYPE,
    HEADER_IDEMPOTENCY_KEY,
    HEADER_REPORT,
    ErrorCode,
    Route,
)
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


def _stalled_upload(coord: EmbeddedCoordinator, d: DeviceHTTP, assignment_id: str) -> socket.socket:
    """An upload whose body stops after its first bytes (a phone gone out of coverage, or a
    client holding the connection on purpose): headers for a 100 kB frame, then 10 bytes."""
    host, port = coord.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    path = Route.ASSIGNMENT_UPDATE.format(assignment_id=assignment_id)
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Length: 100000",
            f"Content-Type: {FRAME_CONTENT_TYPE}", f"{HEADER_IDEMPOTENCY_KEY}: stalled",
            HEADER_REPORT + ": " + json.dumps({"num_examples": 5, "loss": 0.5}),
            *(f"{k}: {v}" for k, v in d.auth.items())]  # fmt: skip
    s.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + b"\0" * 10)
    return s


def _answer(s: socket.socket, timeout_s: float) -> bytes:
    s.settimeout(timeout_s)
    try:
        return s.recv(4096)
    finally:
        s.close()


@pytest.fixture
def one_slot(tmp_path: Any, tiny_bundle: Any) -> Iterator[tuple[EmbeddedCoordinator, str]]:
    """A coordinator with room for two uploads at once, and a task (async: any device may
    report at any time)."""
    with EmbeddedCoordinator(tmp_path / "f.db", seed=5, max_queued_operations=2,
                             group_commit_max_batch=2, upload_body_timeout_s=2.0) as coord:
        admin = coord.admin()
        bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
        plan = {"buffer_k": 10, "max_concurrency": 10, "robust": "none",
                "eligibility": {"require_charging": False}}  # fmt: skip
        task_id = admin.create_task(bundle_id, plan, mode="async")["task_id"]
        yield coord, task_id


def test_one_device_holds_at_most_one_upload_slot_per_assignment(
    one_slot: tuple[EmbeddedCoordinator, str],
) -> None:
    """A device opening uploads of its assignment and never finishing their bodies took a
    slot each: two of them and every other device's upload was refused (503) until the
    connections closed, hours later for a phone gone silent. Now a second upload of an
    assignment still reading its body is refused at once, and the one reading gives up
    after upload_body_timeout_s, freeing its slot."""
    coord, _ = one_slot
    hog, other = DeviceHTTP(coord), DeviceHTTP(coord)
    mine = hog.check_in()["assignment"]["assignment_id"]
    theirs = other.check_in()["assignment"]["assignment_id"]
    first = _stalled_upload(coord, hog, mine)
    second = _stalled_upload(coord, hog, mine)
    answer = _answer(second, 10.0)
    assert answer.startswith(b"HTTP/1.1 503") and b"in progress" in answer, answer
    n = coord.call(lambda: coord.service.ctx.num_parameters(coord.service.store.list_tasks()[0]))
    status, body = other.upload(theirs, np.full(n, 0.01, np.float32), 5)
    assert status == 200, body
    t0 = time.monotonic()
    answer = _answer(first, 30.0)
    assert answer.startswith(b"HTTP/1.1 503") and b"did not arrive" in answer, answer
    assert 1.0 <= time.monotonic() - t0 <= 20.0
    # its slot is free again: the device's own upload, whole this time, is taken
    status, body = hog.upload(mine, np.full(n, 0.02, np.float32), 5)
    assert status == 200, body
    hog.close()
    other.close()
