"""Crash safety: SIGKILL the coordinator process in the middle of reporting, restart it on the
same files, and check that nothing it acknowledged was lost and no version went backwards."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.frame import decode_tensor
from tests.fixtures.coordinator import DeviceHTTP, make_synthetic_bundle

N = 5000
GOAL = 30


def _delta(i: int) -> np.ndarray:
    return np.random.default_rng(100 + i).normal(0, 0.01, N).astype(np.float32)


def _accepted_rows(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return dict(conn.execute("select assignment_id, num_examples from updates").fetchall())
    finally:
        conn.close()


def test_sigkill_mid_reporting_loses_nothing_acknowledged(tmp_path: Path) -> None:
    bundle = make_synthetic_bundle(tmp_path / "bundle", num_parameters=N, seed=3)
    db = tmp_path / "fedge.db"
    token = "crash-test-token"
    plan = {"rounds": 2, "goal": GOAL, "selection_window_s": 0.0, "round_deadline_s": 600.0}
    coord = EmbeddedCoordinator(db, subprocess=True, admin_token=token).start()
    admin = coord.admin()
    task_id = admin.create_task(admin.upload_bundle(bundle)["bundle_id"], plan)["task_id"]
    devices = [DeviceHTTP(coord.url) for _ in range(GOAL + 9)]
    for d in devices:
        d.check_in()
    work: list[tuple[int, DeviceHTTP, str]] = []
    for i, d in enumerate(devices):
        answer = d.check_in()
        if answer["action"] == "train":
            work.append((i, d, answer["assignment"]["assignment_id"]))
    assert len(work) == 39  # ceil(30 x 1.3)
    base = decode_tensor(devices[0].params(task_id, 0))

    acked: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    enough = threading.Event()

    def report(i: int, d: DeviceHTTP, aid: str) -> None:
        try:
            status, body = d.upload(aid, _delta(i), num_examples=5 + i, key=f"key-{i}")
        except OSError:
            return  # cut off by the kill: not acknowledged
        if status == 200:
            with lock:
                acked[aid] = body
                if len(acked) >= 12:
                    enough.set()

    threads = [threading.Thread(target=report, args=w) for w in work[: GOAL - 1]]
    for t in threads:
        t.start()
    assert enough.wait(60)
    coord.kill()  # SIGKILL while the other uploads are in flight
    for t in threads:
        t.join(30)
    assert 12 <= len(acked) < GOAL

    stored = _accepted_rows(db)
    print(f"acknowledged {len(acked)}, stored {len(stored)} of {GOAL - 1} sent")
    assert set(acked) <= set(stored), "an acknowledged upload was lost"

    coord = EmbeddedCoordinator(db, subprocess=True, admin_token=token).start()
    try:
        admin = coord.admin()
        status = admin.status()
        assert status["updates_accepted"] == len(stored) and status["model_version"] == 0
        for d in devices:
            d.http = type(d.http)(coord.url)
        # every device retries with its original key; the counted ones get their answer again
        for i, d, aid in work[: GOAL - 1]:
            code, body = d.upload(aid, _delta(i), num_examples=5 + i, key=f"key-{i}")
            assert code == 200, body
            if aid in acked:
                assert body == acked[aid]
        assert admin.status()["updates_accepted"] == GOAL - 1
        assert admin.task(task_id)["model_version"] == 0
        i, d, aid = work[GOAL - 1]
        assert d.upload(aid, _delta(i), num_examples=5 + i, key=f"key-{i}")[0] == 200
        rounds = admin.rounds(task_id)
        assert rounds[0]["state"] == "committed" and rounds[0]["metrics"]["reported"] == GOAL
        # the committed model is the weighted mean of exactly the 30 accepted deltas
        weights = [5 + i for i, _, _ in work[:GOAL]]
        expected = base + np.average(
            np.stack([_delta(i) for i, _, _ in work[:GOAL]]), axis=0, weights=weights
        )
        v1 = decode_tensor(devices[0].params(task_id, 1))
        np.testing.assert_allclose(v1, expected, rtol=1e-5, atol=1e-6)
        coord.kill()  # right after a commit
        coord = EmbeddedCoordinator(db, subprocess=True, admin_token=token).start()
        for d in devices:
            d.http = type(d.http)(coord.url)
        assert coord.admin().status()["model_version"] == 1  # never backwards
        np.testing.assert_array_equal(decode_tensor(devices[0].params(task_id, "current")), v1)
        assert coord.admin().status()["updates_accepted"] == GOAL
    finally:
        if coord.process is not None:
            coord.stop()
