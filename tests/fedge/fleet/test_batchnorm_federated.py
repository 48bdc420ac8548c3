"""Batch norm federated end to end, both plan options: real SDK clients over HTTP, a real
coordinator on loopback, the BatchNorm model trained with the portable step.

``"aggregate"``: the running statistics and the layers' parameters are averaged with the rest
of the model vector. ``"local"`` (FedBN): they never leave the devices; the global model keeps
its initial batch norm entries while every device keeps its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.config import PacingConfig
from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.bundle import load_manifest
from edge_sdk.codecs import decode_update
from fedge.bundle_cache import REPO_CACHE
from fedge.fleet.clock import SimClock
from fedge.fleet.datasets import load_digits
from fedge.fleet.emulator import Fleet
from fedge.fleet.partition import partition
from tests.fixtures.bundles import cached_bundle

FAST_PACING = PacingConfig(min_retry_s=1.0, max_retry_s=30.0, no_task_retry_s=5.0)


@pytest.fixture(scope="module")
def bn_bundle() -> Path:
    return cached_bundle("model_export.zoo:digits_batchnorm_mlp", input_shape=(1, 64), lr=0.1)


@pytest.fixture()
def coord() -> Iterator[tuple[EmbeddedCoordinator, SimClock]]:
    clock = SimClock(speedup=20.0)
    with EmbeddedCoordinator(clock=clock.unix(), pacing=FAST_PACING, seed=0) as c:
        yield c, clock


def _federate(
    coord: EmbeddedCoordinator, clock: SimClock, bundle: Path, mode: str, tmp_path: Path
) -> tuple[str, np.ndarray, np.ndarray, Fleet]:
    admin = coord.admin()
    bundle_id = admin.upload_bundle(bundle)["bundle_id"]
    # server momentum: the running statistics must still take the plain mean of the devices'
    plan = {"rounds": 2, "goal": 3, "selection_window_s": 3.0, "round_deadline_s": 60.0,
            "steps": 4, "batch_size": 16, "lr": 0.1, "batchnorm": mode,
            "server_optimizer": {"name": "fedavgm", "lr": 1.0}}
    task_id = str(admin.create_task(bundle_id, plan)["task_id"])
    train, _ = load_digits(seed=0)
    parts = [train.subset(i) for i in partition(train.y, 6, "dirichlet:1.0",
                                                np.random.default_rng(0))]
    fleet = Fleet(coord.url, parts, seed=1, clock=clock, state_root=tmp_path / mode,
                  enrollment_token=coord.enrollment_token)
    with fleet:
        done = fleet.wait_for(lambda: admin.task(task_id)["state"] == "completed", 180.0)
    fleet.close()
    assert done, json.dumps(admin.task(task_id))[:500]
    n = load_manifest(bundle).num_parameters

    def version(v: int) -> np.ndarray:
        frame = coord.call(coord.service.version_params, None, task_id, str(v))
        return decode_update(frame, expected_length=n)

    return task_id, version(0), version(2), fleet


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["aggregate", "local"])
def test_batch_norm_layers_follow_the_plan(
    coord: tuple[EmbeddedCoordinator, SimClock], bn_bundle: Path, mode: str, tmp_path: Path
) -> None:
    manifest = load_manifest(bn_bundle)
    index = manifest.batchnorm_indices()
    stats = np.concatenate([np.arange(b.offset, b.offset + b.size) for b in manifest.buffers])
    task_id, first, last, _ = _federate(*coord, bn_bundle, mode, tmp_path)
    rest = np.setdiff1d(np.arange(first.size), index)
    assert not np.allclose(last[rest], first[rest])  # the model trained either way
    saved = sorted((tmp_path / mode).glob(f"device-*/local_layers/{task_id}.npy"))
    if mode == "aggregate":
        # the averaged running statistics moved from torch's initial 0 and 1 toward the data
        assert not np.allclose(last[stats], first[stats])
        assert np.all(last[stats][32:] > 0)  # a variance stays positive through averaging
        assert saved == []
        return
    np.testing.assert_array_equal(last[index], first[index])  # never aggregated
    assert len(saved) >= 3  # every device that trained keeps its own layers
    layers = [np.load(p) for p in saved]
    for own in layers:
        assert own.shape == (index.size,)
        assert not np.allclose(own, first[index])
    assert not all(np.array_equal(layers[0], other) for other in layers[1:])  # per device


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first run exports the model (minutes on a loaded machine)
def test_the_demo_federates_the_mobilenet_style_model(tmp_path: Path) -> None:
    """``fedge demo --model mobilenet``: depthwise convolutions and batch norm, federated over
    the emulated fleet on real digits, end better than they started."""
    from fedge.demo import DemoConfig, run_demo

    config = DemoConfig(
        devices=8, rounds=8, goal=4, steps=10, batch_size=16, lr=0.2, model="mobilenet",
        codec="fp32", server_optimizer="fedavg",
        out=tmp_path / "demo", cache_dir=REPO_CACHE.parent, timeout_s=600.0,
    )
    result = run_demo(config, say=lambda _msg: None)
    assert len(result.points) == 8
    # measured once: 0.10 -> 0.73 after 8 rounds (the pooled-data baseline reaches 0.93)
    assert result.final_accuracy > result.initial_accuracy + 0.3
