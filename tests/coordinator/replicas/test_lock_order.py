"""Two replicas' upload batches that lock the same rounds: each batch locks every round its
uploads will lock, in round order, before it stores anything, so the two take turns instead
of each holding one round and waiting for the other (a deadlock that PostgreSQL would end by
failing one batch: 503 for all its uploads). Sync: uploads to two tasks' rounds, listed in
opposite orders. Async: an upload locks its assignment's round and then the open buffer
round, so a batch with an update from an older version holds a round below another batch's.
On a SQLite file (one writer at a time) only the outcome is checked."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.admin import tar_directory
from coordinator.clock import FakeClock
from coordinator.config import CoordinatorConfig
from coordinator.service import Coordinator, DeviceIdentity, StagedUpload
from coordinator.store import Round, is_database_url
from edge_sdk.codecs import encode_update
from edge_sdk.protocol import device_auth_header
from tests.fixtures.coordinator import GOOD_CONDITIONS

PLAN = {"rounds": 1, "goal": 2, "over_selection": 1.0, "selection_window_s": 0.0,
        "round_deadline_s": 600.0, "robust": "none", "max_update_norm": None,
        "eligibility": {"require_charging": False}}  # fmt: skip
# How long a batch holding its first round waits for the other batch to take one too: above
# PostgreSQL's deadlock_timeout (1 s), so that a deadlock would be found (and one batch
# failed) before the wait gives up.
MEET_S = 1.5


def _replica(db: str, blobs: Path, clock: FakeClock) -> Coordinator:
    where = {"database_url": db} if is_database_url(db) else {"db_path": db}
    config = CoordinatorConfig(**where, replica=True, blob_path=str(blobs),
                               open_registration=True)  # fmt: skip
    return Coordinator(config, clock=clock)


def _staged(coord: Coordinator, tiny_bundle: Path) -> dict[str, list[StagedUpload]]:
    """Two tasks of one round each, two devices selected in each, their uploads staged and
    installed (not accepted): by task."""
    bundle_id = coord.add_bundle(tar_directory(tiny_bundle))["bundle_id"]
    checkin = json.dumps({"runtimes": ["ort-step"], "conditions": GOOD_CONDITIONS}).encode()
    out: dict[str, list[StagedUpload]] = {}
    for t in range(2):
        task_id = coord.create_task(json.dumps({"bundle_id": bundle_id, "plan": PLAN}).encode())[
            "task_id"
        ]
        out[task_id] = []
        devices = []
        for _ in range(2):  # the other task is full (or not created yet): they join this one
            reg = coord.register(json.dumps({"runtimes": ["ort-step"]}).encode())
            devices.append(coord.authenticate(device_auth_header(reg["device_id"], reg["secret"])))
        for who in devices:
            coord.checkin(who, checkin)
        for i, who in enumerate(devices):
            answer = coord.checkin(who, checkin)
            assert answer["action"] == "train", answer
            assignment = answer["assignment"]["assignment_id"]
            delta = np.full(coord.ctx.num_parameters(coord.store.get_task(task_id)), 0.01 * (i + 1))
            frame = encode_update(delta.astype(np.float32), "int8")[0]
            report = json.dumps({"num_examples": 10 + t})
            admitted = coord.admit_upload(who, assignment, f"k-{t}-{i}", report)
            out[task_id].append(coord.stage_upload(admitted, frame))
        coord.install_uploads(out[task_id])
    return out


def _meeting(coord: Coordinator, mine: threading.Event, theirs: threading.Event) -> None:
    """Once this replica's batch holds its first round, wait (a while) for the other batch to
    hold one too: without an order, each would then wait for a round the other holds."""
    store = coord.store
    by_round: Callable[..., Round | None] = store.lock_round
    by_assignment: Callable[[str], Round | None] = store.lock_round_of

    def meet(rnd: Round | None) -> Round | None:
        if not mine.is_set():
            mine.set()
            theirs.wait(MEET_S)
        return rnd

    store.lock_round = lambda *a, **k: meet(by_round(*a, **k))  # type: ignore[method-assign]
    store.lock_round_of = lambda a: meet(by_assignment(a))  # type: ignore[method-assign]


def _race(
    a: Coordinator, b: Coordinator, batch_a: list[StagedUpload], batch_b: list[StagedUpload]
) -> dict[str, list[Any]]:
    """Both batches accepted at once, each replica meeting the other at its first lock."""
    met = threading.Event(), threading.Event()
    _meeting(a, met[0], met[1])
    _meeting(b, met[1], met[0])
    answers: dict[str, list[Any]] = {}

    def accept(name: str, coord: Coordinator, batch: list[StagedUpload]) -> None:
        answers[name] = coord.accept_uploads(batch)

    threads = [
        threading.Thread(target=accept, args=("a", a, batch_a)),
        threading.Thread(target=accept, args=("b", b, batch_b)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for name, batch in (("a", batch_a), ("b", batch_b)):
        assert [type(r) for r in answers[name]] == [dict] * len(batch), answers[name]
        assert all(r["accepted"] for r in answers[name])
    return answers


@pytest.fixture
def replicas(replica_db: str, tmp_path: Path) -> Iterator[tuple[Coordinator, Coordinator]]:
    """Two replicas on one database and blob directory, on one fake clock."""
    clock = FakeClock(1_700_000_000.0)
    a, b = (_replica(replica_db, tmp_path / "blobs", clock) for _ in range(2))
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_two_batches_take_the_same_rounds_in_one_order(
    replicas: tuple[Coordinator, Coordinator], tiny_bundle: Path
) -> None:
    a, b = replicas
    (first, x), (second, y) = _staged(a, tiny_bundle).items()
    assert a.store.get_task(first) is not None and a.store.get_task(second) is not None
    # A's batch lists the first task's upload first, B's the second task's.
    _race(a, b, [x[0], y[0]], [y[1], x[1]])
    for batch in (x, y):
        assert a.store.count_updates(batch[0].admitted.round_id) == 2


ASYNC_PLAN = {"rounds": 100, "buffer_k": 3, "max_concurrency": 20, "max_staleness": 5,
              "round_deadline_s": 600.0, "robust": "none", "max_update_norm": None,
              "eligibility": {"require_charging": False}}  # fmt: skip


def test_async_batches_lock_the_buffer_round_in_order_too(
    replicas: tuple[Coordinator, Coordinator], tiny_bundle: Path
) -> None:
    a, b = replicas
    bundle_id = a.add_bundle(tar_directory(tiny_bundle))["bundle_id"]
    body = {"bundle_id": bundle_id, "mode": "async", "plan": ASYNC_PLAN}
    task_id = a.create_task(json.dumps(body).encode())["task_id"]
    checkin = json.dumps({"runtimes": ["ort-step"], "conditions": GOOD_CONDITIONS}).encode()
    n = a.ctx.num_parameters(a.store.get_task(task_id))
    keys = iter(range(1000))

    def assigned(count: int) -> list[tuple[DeviceIdentity, str]]:
        out = []
        for _ in range(count):
            reg = a.register(json.dumps({"runtimes": ["ort-step"]}).encode())
            who = a.authenticate(device_auth_header(reg["device_id"], reg["secret"]))
            answer = a.checkin(who, checkin)
            assert answer["action"] == "train", answer
            out.append((who, answer["assignment"]["assignment_id"]))
        return out

    def staged(coord: Coordinator, who: DeviceIdentity, assignment: str) -> StagedUpload:
        k = next(keys)
        frame = encode_update(np.full(n, 0.001 * (k + 1), np.float32), "int8")[0]
        admitted = coord.admit_upload(who, assignment, f"k-{k}", '{"num_examples": 5}')
        upload = coord.stage_upload(admitted, frame)
        coord.install_uploads([upload])
        return upload

    # Versions 1 and 2 committed (K = 3), one device left assigned on each older version.
    older = []
    for version in (1, 2):
        devices = assigned(4 if version == 1 else 5)
        for who, assignment in devices[:3]:
            assert a.accept_uploads([staged(a, who, assignment)])[0]["accepted"]
        a.tick()
        assert a.store.get_task(task_id).model_version == version  # type: ignore[union-attr]
        older.append(devices[3:])
    (x,), (y, z) = older
    ux, uy, uz = staged(a, *x), staged(a, *y), staged(b, *z)
    assert ux.admitted.round_id < uy.admitted.round_id == uz.admitted.round_id
    # A: version 0's round, then (buffer) the open one, then version 1's, which B holds.
    _race(a, b, [ux, uy], [uz])
    assert a.store.count_updates() == 9
