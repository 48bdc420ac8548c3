"""Orphaned blobs among replicas: collected while the others write, but only when old and
named by no row (a payload is installed moments before the row naming it commits)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from coordinator.blobs import Collected
from coordinator.clock import FakeClock
from tests.coordinator.replicas.fleet import start_task, thread_replicas
from tests.fixtures.coordinator import select_devices

WINDOW = 10.0
PLAN = {"rounds": 1, "goal": 2, "over_selection": 1.0, "selection_window_s": WINDOW,
        "round_deadline_s": 86400.0, "robust": "none",
        "eligibility": {"require_charging": False}}  # fmt: skip
HOUR = 3600.0


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_old_unnamed_blobs_go_and_everything_else_stays(
    replica_db: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    clock = FakeClock(1_700_000_000.0)
    with thread_replicas(2, replica_db, tmp_path / "blobs", clock) as reps:
        _, task_id, devices = start_task([r.url for r in reps], tiny_bundle, PLAN, 2)
        (device, aid), (second, aid2) = select_devices(devices, lambda: clock.advance(WINDOW + 0.5))
        delta = np.random.default_rng(0).normal(0, 0.01, 64).astype(np.float32)
        device.upload(aid, delta)  # its payload is named by an update of the open round
        service = reps[0].service
        blobs = service.blobs
        named = set(blobs.shas())
        old, fresh = blobs.put(b"orphan of a crash"), blobs.put(b"being stored right now")
        for sha in [*named, old]:
            _age(blobs.path(sha), 2 * HOUR)

        got = reps[0].call(service.collect_garbage)

        assert got == Collected(1, len(b"orphan of a crash"))
        assert set(blobs.shas()) == named | {fresh}
        # The other replica's tick collects at the retention cadence, on its own.
        _age(blobs.path(fresh), 2 * HOUR)
        clock.advance(reps[1].config.replica_orphan_age_s)
        reps[1].call(reps[1].service.tick)
        assert set(blobs.shas()) == named
        # The round still commits from what stayed.
        second.upload(aid2, delta)
        assert reps[0].admin().task(task_id)["model_version"] == 1
