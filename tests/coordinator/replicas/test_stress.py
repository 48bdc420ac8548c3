"""Many devices at once against three replicas (thread mode, one shared fake clock that a
controller moves on): whatever the interleaving, every acknowledged update is stored once,
no round takes more than its target or its goal, and each committed version is the numpy
reference of exactly the updates its round stored."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.clock import FakeClock
from coordinator.store import open_store
from edge_sdk.frame import decode_tensor
from tests.coordinator.replicas.fleet import Spread, fedavg, start_task, thread_replicas

pytestmark = pytest.mark.slow

N = 64
PLAN = {"rounds": 4, "goal": 8, "over_selection": 1.25, "selection_window_s": 2.0,
        "round_deadline_s": 30.0, "robust": "none",
        "eligibility": {"require_charging": False}}  # fmt: skip


def _delta(device: int, round_number: int) -> np.ndarray:
    seed = 5000 + 100 * round_number + device
    return np.random.default_rng(seed).normal(0, 0.01, N).astype(np.float32)


def test_concurrent_devices_over_three_replicas(
    replica_db: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    clock = FakeClock()
    with thread_replicas(3, replica_db, tmp_path / "blobs", clock) as reps:
        admin, task_id, devices = start_task([r.url for r in reps], tiny_bundle, PLAN, 24)
        acked: dict[str, tuple[int, int]] = {}  # assignment -> (device, round number)
        lock = threading.Lock()
        done = threading.Event()
        errors: list[BaseException] = []

        def device(k: int, d: Spread) -> None:
            try:
                while not done.is_set():
                    answer = d.check_in()
                    if answer["action"] != "train":
                        time.sleep(0.02)
                        continue
                    a = answer["assignment"]
                    key = f"{a['assignment_id']}-key"
                    for _ in range(20):  # a 503 is retried with the same key, as the SDK does
                        status, body = d.upload(
                            a["assignment_id"], _delta(k, a["round"]), 1 + k, key=key
                        )
                        if status != 503:
                            break
                    if status == 200:
                        with lock:
                            acked[a["assignment_id"]] = (k, a["round"])
                    else:
                        assert status == 409, body  # the round closed or reached its goal
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=device, args=(k, d)) for k, d in enumerate(devices)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 240
        while admin.task(task_id)["state"] != "completed" and time.monotonic() < deadline:
            clock.advance(0.5)  # windows close, deadlines pass, while devices keep coming
            time.sleep(0.1)
        done.set()
        for t in threads:
            t.join(60)
        assert not errors, errors[0]
        task = admin.task(task_id)
        assert task["state"] == "completed", task
        _check(replica_db, task_id, acked, decode_tensor(devices[0].params(task_id, 0)), devices)


def _check(url: str, task_id: str, acked: dict[str, tuple[int, int]], base: np.ndarray,
           devices: list[Spread]) -> None:  # fmt: skip
    store = open_store(url)
    try:
        rounds = store.list_rounds(task_id)
        stored: dict[str, Any] = {}
        version = base
        for r in rounds:
            assert not r.is_open
            updates = list(store.round_updates(r.round_id))
            assert len(updates) <= r.goal
            assert store.count_assignments(r.round_id) <= r.target
            for u in updates:
                assert u.assignment_id not in stored
                stored[u.assignment_id] = u
            if r.state == "committed":
                terms = [(_delta(*acked[u.assignment_id]), u.num_examples) for u in updates]
                version = (version + fedavg(terms)).astype(np.float32)
                got = decode_tensor(devices[0].params(task_id, r.metrics["model_version"]))
                np.testing.assert_allclose(got, version, rtol=1e-6, atol=1e-7)
        assert set(stored) == set(acked)  # acknowledged == stored, each once
        assert sum(r.state == "committed" for r in rounds) == PLAN["rounds"]
    finally:
        store.close()
