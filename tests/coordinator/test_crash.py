"""Crash safety: SIGKILL the coordinator process in the middle of reporting, restart it on the
same files, and check that nothing it acknowledged was lost and no version went backwards."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.blobs import BlobStore
from coordinator.clock import FakeClock
from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.codecs import encode_update
from edge_sdk.frame import decode_tensor
from tests.fixtures.coordinator import DeviceHTTP, make_synthetic_bundle, without_wait

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
    plan = {"rounds": 2, "goal": GOAL, "selection_window_s": 0.0, "round_deadline_s": 600.0,
            "robust": "none"}  # fmt: skip
    coord = EmbeddedCoordinator(db, subprocess=True, admin_token=token).start()
    admin = coord.admin()
    task_id = admin.create_task(admin.upload_bundle(bundle)["bundle_id"], plan)["task_id"]
    devices = [DeviceHTTP(coord) for _ in range(GOAL + 9)]
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
                acked[aid] = without_wait((status, body))[1]
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
                assert without_wait((code, body))[1] == acked[aid]
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
        # Reading the files back needs no second child process: a thread starts faster.
        coord = EmbeddedCoordinator(db, admin_token=token).start()
        for d in devices:
            d.http = type(d.http)(coord.url)
        assert coord.admin().status()["model_version"] == 1  # never backwards
        np.testing.assert_array_equal(decode_tensor(devices[0].params(task_id, "current")), v1)
        assert coord.admin().status()["updates_accepted"] == GOAL
    finally:
        coord.stop()


def _rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_restart_collects_orphaned_blobs_and_keeps_what_records_need(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    """What a crash leaves behind (a committed round's payloads not yet deleted, a blob whose
    record was never written) is removed at the next start; nothing a record needs is."""
    db, clock, n = tmp_path / "fedge.db", FakeClock(), 64
    plan = {"rounds": 3, "goal": 2, "selection_window_s": 0.0, "round_deadline_s": 600.0,
            "robust": "none"}  # fmt: skip
    deltas = [np.random.default_rng(i).normal(0, 0.01, n).astype(np.float32) for i in range(4)]

    def assignments(devices: list[DeviceHTTP]) -> list[str]:
        answers = [d.check_in() for d in devices]
        answers[0] = devices[0].check_in()  # the first came before the second made goal
        return [a["assignment"]["assignment_id"] for a in answers]

    with EmbeddedCoordinator(db, clock=clock) as coord:
        admin = coord.admin()
        task_id = admin.create_task(admin.upload_bundle(tiny_bundle)["bundle_id"], plan)["task_id"]
        devices = [DeviceHTTP(coord) for _ in range(2)]
        for d, aid, delta in zip(devices, assignments(devices), deltas[:2], strict=True):
            assert d.upload(aid, delta, num_examples=10)[0] == 200
        assert admin.task(task_id)["model_version"] == 1
        v1 = decode_tensor(devices[0].params(task_id, 1))
        round2 = assignments(devices)
        assert devices[0].upload(round2[0], deltas[2], num_examples=30)[0] == 200
        token = coord.admin_token
    blob_dir = db.with_name(db.name + ".blobs")
    blobs = BlobStore(blob_dir)
    payloads = _rows(db, "select payload_sha, state from updates join rounds using (round_id)")
    committed = {sha for sha, state in payloads if state == "committed"}
    [open_payload] = [sha for sha, state in payloads if state == "reporting"]
    assert len(committed) == 2 and not any(blobs.exists(sha) for sha in committed)
    # plant what a crash would have left: the committed round's payloads (killed before their
    # deletion) and an upload whose record was never committed
    replanted = {blobs.put(encode_update(delta, "fp32")[0]) for delta in deltas[:2]}
    assert replanted == committed
    stray = blobs.put(b"an upload the crash cut off before its record")
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    needed = {sha for (sha,) in _rows(db, "select params_sha from versions")}
    needed |= {f["sha256"] for f in manifest["files"].values()} | {open_payload}
    assert needed <= set(blobs.shas())

    # retain_updates keeps every payload a record names; the stray blob goes either way
    with EmbeddedCoordinator(db, clock=clock, admin_token=token, retain_updates=True):
        pass
    assert set(blobs.shas()) == needed | committed
    with EmbeddedCoordinator(db, clock=clock, admin_token=token) as coord:
        assert set(blobs.shas()) == needed
        for d in devices:
            d.http = type(d.http)(coord.url)
        # the open round's kept payload still counts: the commit is the mean of both reports
        assert devices[1].upload(round2[1], deltas[3], num_examples=10)[0] == 200
        expected = v1 + np.average(np.stack(deltas[2:]), axis=0, weights=[30, 10])
        np.testing.assert_allclose(
            decode_tensor(devices[0].params(task_id, 2)), expected, rtol=1e-6, atol=1e-7
        )
    assert not blobs.exists(stray)
