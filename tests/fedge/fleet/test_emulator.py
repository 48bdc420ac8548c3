"""The fleet end to end: real SDK clients, a real coordinator on loopback, real training."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.admin import AdminClient
from coordinator.config import PacingConfig
from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.bundle import load_manifest
from edge_sdk.codecs import decode_update
from fedge.fleet.clock import SimClock
from fedge.fleet.datasets import Dataset, load_digits
from fedge.fleet.emulator import Fleet
from fedge.fleet.heterogeneity import Heterogeneity
from fedge.fleet.partition import partition

SPEEDUP = 20.0
FAST_PACING = PacingConfig(min_retry_s=1.0, max_retry_s=30.0, no_task_retry_s=5.0)


@dataclass
class Env:
    coord: EmbeddedCoordinator
    admin: AdminClient
    clock: SimClock
    bundle: Path


@pytest.fixture()
def env(digits_bundle: Path) -> Iterator[Env]:
    clock = SimClock(speedup=SPEEDUP)
    with EmbeddedCoordinator(clock=clock.unix(), pacing=FAST_PACING, seed=0) as coord:
        yield Env(coord, coord.admin(), clock, digits_bundle)


def _parts(n: int, spec: str = "dirichlet:1.0") -> tuple[list[Dataset], Dataset]:
    train, test = load_digits(seed=0)
    idx = partition(train.y, n, spec, np.random.default_rng(0))
    return [train.subset(i) for i in idx], test


def _task(env: Env, **plan: Any) -> str:
    bundle_id = env.admin.upload_bundle(env.bundle)["bundle_id"]
    base = {"rounds": 3, "goal": 4, "selection_window_s": 3.0, "round_deadline_s": 60.0,
            "epochs": 2, "batch_size": 16, "lr": 0.2, "codec": {"name": "int8"}}
    return str(env.admin.create_task(bundle_id, {**base, **plan})["task_id"])


def _run(
    env: Env, fleet: Fleet, task_id: str, timeout_s: float = 120.0, settle: bool = False
) -> None:
    """Run the fleet until the task completes; ``settle``: then until every update the
    coordinator accepted was heard acknowledged by its device (the last round commits, and
    the task completes, before the answer to its last upload reaches that device)."""
    with fleet:
        done = fleet.wait_for(lambda: env.admin.task(task_id)["state"] == "completed", timeout_s)
        if done and settle:
            accepted = env.admin.status()["updates_accepted"]
            fleet.wait_for(lambda: fleet.summary().uploads_acknowledged >= accepted, 30.0)
    fleet.close()
    assert done, f"task did not complete: {json.dumps(env.admin.task(task_id))[:500]}"


def _accuracy(bundle: Path, params: np.ndarray, test: Dataset) -> float:
    """The DigitsMLP forward pass in numpy, from the manifest's layout (not the trainer)."""
    w = {p.name: params[p.offset : p.offset + p.size].reshape(p.shape)
         for p in load_manifest(bundle).parameters}
    hidden = np.maximum(test.x @ w["fc1.weight"].T + w["fc1.bias"], 0.0)
    logits = hidden @ w["fc2.weight"].T + w["fc2.bias"]
    return float(np.mean(np.argmax(logits, axis=1) == test.y))


def _params(env: Env, task_id: str, version: int) -> np.ndarray:
    frame = env.coord.call(env.coord.service.version_params, None, task_id, str(version))
    n = load_manifest(env.bundle).num_parameters
    return decode_update(frame, expected_length=n)


def _train_rounds(env: Env, task_id: str) -> list[dict[str, Any]]:
    return [r for r in env.admin.rounds(task_id) if r["kind"] == "train"]


def test_a_short_fleet_run_completes_rounds_and_accuracy_rises(env: Env) -> None:
    parts, test = _parts(12)
    # Every round closes at its goal: a deadline (3 s of wall time at the default 60 s) could
    # close one short when the shared machine is slow, and the counts below are the goal's.
    task_id = _task(env, rounds=4, round_deadline_s=600.0)
    fleet = Fleet(env.coord.url, parts, seed=1, clock=env.clock,
                  enrollment_token=env.coord.enrollment_token)
    _run(env, fleet, task_id, settle=True)
    accs = [_accuracy(env.bundle, _params(env, task_id, v), test) for v in range(5)]
    assert accs[0] < 0.2
    assert accs[-1] > accs[0] + 0.4
    assert np.mean(accs[3:]) > np.mean(accs[:2])
    s = fleet.summary()
    assert s.uploads_acknowledged >= 16 and s.devices_registered == 12
    assert s.update_bytes > 0 and s.bytes_up > s.update_bytes and s.bytes_down > 0
    assert env.admin.status()["updates_accepted"] == sum(
        r["metrics"]["reported"] for r in _train_rounds(env, task_id))


def test_thirty_percent_dropouts_still_complete_every_round(env: Env) -> None:
    parts, _ = _parts(30)
    # Over-selection sized for the loss: 12 selected for 5 reports, 4 needed by the deadline.
    task_id = _task(env, rounds=3, goal=5, over_selection=2.4)
    fleet = Fleet(env.coord.url, parts, seed=2, clock=env.clock,
                  enrollment_token=env.coord.enrollment_token, rejoin_s=30.0,
                  heterogeneity=Heterogeneity(dropout_prob=0.3))
    _run(env, fleet, task_id)
    rounds = _train_rounds(env, task_id)
    assert [r["state"] for r in rounds] == ["committed"] * 3  # none abandoned
    s = fleet.summary()
    assert s.dropouts >= 3
    assert 0.1 < s.dropouts / s.tasks_started < 0.5
    # The vanished devices never said a word: the coordinator saw no abort from them.
    assert s.aborts == 0 and all(r["metrics"]["aborted"] == 0 for r in rounds)


def test_devices_losing_eligibility_mid_training_abort(env: Env) -> None:
    parts, _ = _parts(16)
    task_id = _task(env, rounds=2, goal=3, over_selection=3.0, recheck_every_steps=1)
    fleet = Fleet(env.coord.url, parts, seed=3, clock=env.clock,
                  enrollment_token=env.coord.enrollment_token,
                  heterogeneity=Heterogeneity(lapse_prob=0.5))
    _run(env, fleet, task_id)
    s = fleet.summary()
    assert s.aborts >= 1 and s.dropouts == 0
    assert sum(r["metrics"]["aborted"] for r in _train_rounds(env, task_id)) >= 1


def test_never_charging_devices_never_train(env: Env) -> None:
    parts, _ = _parts(16)
    task_id = _task(env, rounds=2, goal=3)
    fleet = Fleet(env.coord.url, parts, seed=4, clock=env.clock,
                  enrollment_token=env.coord.enrollment_token,
                  heterogeneity=Heterogeneity(never_charging_fraction=0.4))
    never = [d for d, p in zip(fleet.devices, fleet.profiles, strict=True) if p.never_charging]
    assert 2 <= len(never) <= 12
    _run(env, fleet, task_id)
    for d in never:
        # Never eligible, so never registered: the coordinator cannot have assigned it work.
        assert d.client.device_id is None
        assert d.client.transport.bytes_sent == 0 and d.trainers.log.jobs == 0
        assert not (fleet.state_root / f"device-{d.index:05d}" / "credentials.json").exists()
    registered = {i for i in fleet.device_ids() if i is not None}
    assert env.admin.status()["devices_registered"] == len(registered) == 16 - len(never)
    assert fleet.summary().ineligible_checks >= len(never)


def test_fleet_heterogeneity_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    parts, _ = _parts(20)
    model = Heterogeneity.realistic()
    # No coordinator needed: building a fleet does not touch the network.
    a = Fleet("http://127.0.0.1:9", parts, heterogeneity=model, seed=5, state_root=tmp_path / "a")
    b = Fleet("http://127.0.0.1:9", parts, heterogeneity=model, seed=5, state_root=tmp_path / "b")
    c = Fleet("http://127.0.0.1:9", parts, heterogeneity=model, seed=6, state_root=tmp_path / "c")
    assert a.profiles == b.profiles != c.profiles
    assert [d.client.config.seed for d in a.devices] == [d.client.config.seed for d in b.devices]
    assert len({d.client.config.seed for d in a.devices}) == 20
