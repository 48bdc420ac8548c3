"""The SDK's SecAgg loop end to end: an emulated fleet of real SDK clients (real training on
the digits model) runs a SecAgg task against a real coordinator over loopback HTTP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.config import PacingConfig
from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.bundle import load_manifest
from edge_sdk.codecs import decode_update
from fedge.fleet.clock import SimClock
from fedge.fleet.datasets import load_digits
from fedge.fleet.emulator import Fleet
from fedge.fleet.partition import partition

FAST_PACING = PacingConfig(min_retry_s=1.0, max_retry_s=30.0, no_task_retry_s=5.0)


def _accuracy(bundle: Path, params: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    w = {p.name: params[p.offset : p.offset + p.size].reshape(p.shape)
         for p in load_manifest(bundle).parameters}  # fmt: skip
    hidden = np.maximum(x @ w["fc1.weight"].T + w["fc1.bias"], 0.0)
    return float(np.mean(np.argmax(hidden @ w["fc2.weight"].T + w["fc2.bias"], axis=1) == y))


@pytest.mark.slow
def test_a_fleet_trains_a_secagg_task_and_the_server_sees_no_update(digits_bundle: Path) -> None:
    clock = SimClock(speedup=20.0)
    train, test = load_digits(seed=0)
    parts = [train.subset(i) for i in partition(train.y, 12, "dirichlet:1.0",
                                                np.random.default_rng(0))]  # fmt: skip
    with EmbeddedCoordinator(clock=clock.unix(), pacing=FAST_PACING, seed=0) as coord:
        admin = coord.admin()
        bundle_id = admin.upload_bundle(digits_bundle)["bundle_id"]
        plan = {"rounds": 3, "goal": 6, "over_selection": 1.5, "selection_window_s": 3.0,
                "round_deadline_s": 60.0, "epochs": 2, "batch_size": 16, "lr": 0.2,
                "secagg": {"stage_timeout_s": 100.0, "clip": 5.0, "max_weight": 200}}  # fmt: skip
        task_id = admin.create_task(bundle_id, plan)["task_id"]
        fleet = Fleet(coord.url, parts, seed=1, clock=clock,
                      enrollment_token=coord.enrollment_token)  # fmt: skip
        with fleet:
            done = fleet.wait_for(lambda: admin.task(task_id)["state"] == "completed", 240.0)
        fleet.close()
        assert done, admin.rounds(task_id)
        rounds = [r for r in admin.rounds(task_id) if r["state"] == "committed"]
        assert len(rounds) == 3
        assert all(r["metrics"]["secagg"]["answered"]["mask"] >= 6 for r in rounds)
        # every report went through the SecAgg stages: no plain update was ever stored
        assert admin.status()["updates_accepted"] == 0
        # the devices saw their rounds commit with their vectors in them (the last round's
        # may still be polling when the task completes and the fleet stops)
        s = fleet.summary()
        assert s.uploads_acknowledged >= 2 * 6 and s.failures == 0
        n = load_manifest(digits_bundle).num_parameters
        accs = [
            _accuracy(digits_bundle, decode_update(
                coord.call(coord.service.version_params, None, task_id, str(v)),
                expected_length=n), test.x, test.y)
            for v in (0, 3)
        ]  # fmt: skip
        assert accs[1] > accs[0] + 0.3, accs
