"""Two replicas' upload batches with uploads to the same two rounds, listed in opposite
orders: each batch locks its rounds in round order, so the two take turns instead of each
holding one round and waiting for the other (a deadlock that PostgreSQL would end by failing
one batch: 503 for all its uploads)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.admin import tar_directory
from coordinator.clock import FakeClock
from coordinator.config import CoordinatorConfig
from coordinator.service import Coordinator, StagedUpload
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
    hold one too: without an order, each would then wait for the other's round."""
    store = coord.store
    lock: Callable[[str], Round | None] = store.lock_round_of

    def lock_then_meet(assignment_id: str) -> Round | None:
        rnd = lock(assignment_id)
        if not mine.is_set():
            mine.set()
            theirs.wait(MEET_S)
        return rnd

    store.lock_round_of = lock_then_meet  # type: ignore[method-assign]


def test_two_batches_take_the_same_rounds_in_one_order(
    replica_db: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    clock = FakeClock(1_700_000_000.0)
    a, b = (_replica(replica_db, tmp_path / "blobs", clock) for _ in range(2))
    try:
        (first, x), (second, y) = _staged(a, tiny_bundle).items()
        assert a.store.get_task(first) is not None and a.store.get_task(second) is not None
        met = threading.Event(), threading.Event()
        _meeting(a, met[0], met[1])
        _meeting(b, met[1], met[0])
        answers: dict[str, list[Any]] = {}

        def accept(name: str, coord: Coordinator, batch: list[StagedUpload]) -> None:
            answers[name] = coord.accept_uploads(batch)

        # A's batch lists the first task's upload first, B's the second task's.
        threads = [
            threading.Thread(target=accept, args=("a", a, [x[0], y[0]])),
            threading.Thread(target=accept, args=("b", b, [y[1], x[1]])),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for name in ("a", "b"):
            assert [type(r) for r in answers[name]] == [dict, dict], answers[name]
            assert all(r["accepted"] for r in answers[name])
        for batch in (x, y):
            assert a.store.count_updates(batch[0].admitted.round_id) == 2
    finally:
        a.close()
        b.close()
