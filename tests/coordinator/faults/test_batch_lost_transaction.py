"""A batch of uploads whose transaction SQLite rolls back under it.

One upload of the batch hits an unexpected error, so its task is marked failed (inside the
batch's transaction, as :meth:`Coordinator._fail` does), and that write finds the disk full:
SQLite undoes the whole transaction, ``_fail`` logs the error and the batch goes on with its
next upload. The batch must answer 503 for every upload and store none of them (not the
ones before the error, undone by SQLite, nor the ones after it, which would otherwise be
stored one statement at a time in autocommit); the devices' retries then go through.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.embedded import EmbeddedCoordinator
from coordinator.errors import ApiError
from coordinator.service import DeviceIdentity
from edge_sdk.codecs import encode_update
from edge_sdk.frame import decode_tensor
from tests.coordinator.faults.harness import page_limit
from tests.coordinator.test_group_commit import N, _one_round, _task_with_assignments
from tests.fixtures.coordinator import make_synthetic_bundle

GOAL = 3


def _committed(db: Path, sql: str) -> list[tuple[Any, ...]]:
    """What another connection sees: only what was committed."""
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def test_a_task_failure_finding_the_disk_full_inside_a_batch_stores_nothing(
    tmp_path: Path,
) -> None:
    bundle = make_synthetic_bundle(tmp_path / "bundle", num_parameters=N, seed=1)
    with EmbeddedCoordinator(tmp_path / "fedge.db", seed=3) as coord:
        service = coord.service
        admin = coord.admin()
        task_id, devices, aids, deltas = _task_with_assignments(coord, bundle, _one_round(GOAL),
                                                                GOAL)  # fmt: skip

        # The second upload meets a bug (once), and recording the task's failure meets a
        # full disk: a page limit at the database's size, and a failure record larger than
        # the room left.
        policy = service.policies["sync"]
        real_accept, real_update_task = policy.accept_update, service.store.update_task

        def accept_update(task: Any, plan: Any, update: Any, *rest: Any) -> Any:
            if update.assignment_id == aids[1] and not bug_fired:
                bug_fired.append(update.assignment_id)
                raise RuntimeError("a bug in one upload's step")
            return real_accept(task, plan, update, *rest)

        def update_task(task_id: str, **values: Any) -> None:
            if values.get("state") != "failed":
                return real_update_task(task_id, **values)
            failed_writes.append(task_id)
            with page_limit(service.store.db.conn):  # type: ignore[attr-defined]
                real_update_task(task_id, **{**values, "failure": "x" * 100_000})

        bug_fired: list[str] = []
        failed_writes: list[str] = []
        policy.accept_update = accept_update  # type: ignore[method-assign]
        service.store.update_task = update_task  # type: ignore[method-assign]

        def batch() -> list[Any]:
            staged = []
            for d, aid, delta, i in zip(devices, aids, deltas, range(GOAL), strict=True):
                who = DeviceIdentity(d.device_id, d.population)
                report = json.dumps({"num_examples": 10 + i, "loss": 0.5})
                admitted = service.admit_upload(who, aid, f"key-{i}", report)
                staged.append(service.stage_upload(admitted, encode_update(delta, "fp32")[0]))
            service.install_uploads(staged)
            return service.accept_uploads(staged)

        answers = coord.call(batch)
        assert bug_fired and failed_writes == [task_id]  # the path under test was taken
        assert all(isinstance(a, ApiError) and a.status == 503 for a in answers), answers
        assert _committed(coord.db_path, "select count(*) from updates") == [(0,)]
        state = "select state, failure, model_version from tasks"
        assert _committed(coord.db_path, state) == [("running", None, 0)]

        # The same uploads retried over HTTP, disk and bug gone: all stored, the round
        # committed from exactly them.
        for i, (d, aid, delta) in enumerate(zip(devices, aids, deltas, strict=True)):
            status, body = d.upload(aid, delta, num_examples=10 + i, key=f"key-{i}")
            assert status == 200 and body["accepted"], body
        assert admin.status()["updates_accepted"] == GOAL
        assert admin.task(task_id)["model_version"] == 1
        w = np.arange(GOAL) + 10.0
        mean = (w[:, None] * np.stack(deltas).astype(np.float64)).sum(0) / w.sum()
        p0 = np.fromfile(bundle / "params.f32", dtype="<f4")
        got = decode_tensor(devices[0].params(task_id, 1))
        np.testing.assert_allclose(got, (p0 + mean).astype(np.float32), rtol=1e-6, atol=1e-7)
        for d in devices:
            d.close()
