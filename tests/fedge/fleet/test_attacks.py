"""Hostile devices: what each attack sends, and that the transport's tampering reaches a real
coordinator over HTTP as a well-formed, accepted upload."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.codecs import decode_update, encode_update
from edge_sdk.protocol import (
    FRAME_CONTENT_TYPE,
    HEADER_IDEMPOTENCY_KEY,
    HEADER_REPORT,
    Route,
)
from fedge.fleet.attacks import ATTACKS, Attack, AttackTransport, choose_attackers
from fedge.fleet.clock import SimClock
from fedge.fleet.heterogeneity import Heterogeneity
from tests.fixtures.coordinator import GOOD_CONDITIONS, DeviceHTTP


def _delta(n: int = 50) -> np.ndarray:
    return np.random.default_rng(0).normal(0, 0.1, n)


@pytest.mark.parametrize("name", ATTACKS)
def test_each_attack_sends_what_it_claims(name: str) -> None:
    d = _delta()
    a = Attack(name, scale=30.0, max_norm=200.0, max_examples=5000, margin=0.95)
    sent, n = a.tamper(d, 40, np.random.default_rng(1))
    if name == "scale":
        np.testing.assert_allclose(sent, 30.0 * d)
        assert n == 40
    elif name == "sign_flip":
        np.testing.assert_allclose(sent, -30.0 * d)
        assert n == 40
    elif name == "inflate":
        np.testing.assert_allclose(sent, -d)
        assert n == 5000
    else:
        assert np.isfinite(sent).all()
        assert np.linalg.norm(sent) == pytest.approx(0.95 * 200.0)
        assert n == 4750
        # a random direction, unrelated to the honest one
        assert abs(np.dot(sent, d)) / (np.linalg.norm(sent) * np.linalg.norm(d)) < 0.5


def test_attack_and_attacker_choice_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown attack"):
        Attack("nan")
    with pytest.raises(ValueError):
        Attack("scale", scale=0)
    with pytest.raises(ValueError):
        Attack("outlier", margin=1.5)
    with pytest.raises(ValueError):
        choose_attackers(10, 1.5, 0)
    chosen = choose_attackers(20, 0.3, seed=4)
    assert len(chosen) == 6 == len(set(chosen)) and all(0 <= i < 20 for i in chosen)
    assert chosen == choose_attackers(20, 0.3, seed=4)
    assert choose_attackers(20, 0.0, seed=4) == []


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_tampered_upload_is_what_the_coordinator_stores(
    tmp_path: Path, tiny_bundle: Path, codec: str
) -> None:
    """The attacker's frame is in the plan's codec, which the coordinator holds uploads to
    (re-encoded fp32 under an int8 plan, every tampered upload was refused, 422)."""
    with EmbeddedCoordinator(tmp_path / "fedge.db", retain_updates=True) as coord:
        admin = coord.admin()
        bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
        plan = {"buffer_k": 1, "max_concurrency": 1, "robust": "none", "codec": {"name": codec}}
        task_id = admin.create_task(bundle_id, plan, mode="async")["task_id"]
        device = DeviceHTTP(coord)
        profile = Heterogeneity.uniform().sample(1, 0)[0]
        attack = Attack("inflate", max_examples=1_000_000)
        link = AttackTransport(coord.url, attack=attack, profile=profile, clock=SimClock())
        link.credentials = (device.device_id, device.secret)
        # The check-in through the attacker's link, as the device's client makes it.
        body = {"population": device.population, "runtimes": device.runtimes,
                "conditions": GOOD_CONDITIONS}  # fmt: skip
        checkin = link.request("POST", Route.CHECKIN, body=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})  # fmt: skip
        a = checkin.json()["assignment"]
        honest = _delta(64).astype(np.float32)
        frame, _ = encode_update(honest, codec, rng=np.random.default_rng(0))
        path = Route.ASSIGNMENT_UPDATE.format(assignment_id=a["assignment_id"])
        headers = {
            "Content-Type": FRAME_CONTENT_TYPE,
            HEADER_IDEMPOTENCY_KEY: hashlib.sha256(frame).hexdigest()[:32],
            HEADER_REPORT: json.dumps({"num_examples": 37, "loss": 0.4}),
        }
        assert link.request("POST", path, body=frame, headers=headers).status == 200
        assert link.tampered == 1
        stored = coord.call(coord.service.store.get_update, a["assignment_id"])
        assert stored.num_examples == 1_000_000
        sent = decode_update(coord.call(coord.service.blobs.read, stored.payload_sha))
        tolerance = 1e-6 if codec == "fp32" else 2 * np.abs(honest).max() / 127  # a step
        np.testing.assert_allclose(sent, -decode_update(frame), atol=tolerance)
        # the version it made is the tampered one (plain FedAvg, one update)
        coord.call(coord.service.tick)
        version = decode_update(device.params(task_id, 1))
        base = decode_update(device.params(task_id, 0))
        np.testing.assert_allclose(version - base, sent, atol=1e-6)
        link.close()
        device.close()


def _bench_poisoning() -> ModuleType:
    path = Path(__file__).parents[3] / "benchmarks" / "bench_poisoning.py"
    spec = importlib.util.spec_from_file_location("bench_poisoning", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_poisoning_benchmark_tiny_run_defended_beats_undefended(tmp_path: Path) -> None:
    """The benchmark end to end, tiny: a real fleet with three hostile devices of ten (scaled
    updates: nearly every round of five has one) against FedAvg undefended and with the
    plan's defaults. (Undefended FedAvg recovers within a round or two from a scaled update
    when no attacker is drawn, so the attackers must be frequent for a stable verdict.)"""
    bench = _bench_poisoning()
    setup = dataclasses.replace(
        bench.Setup(), datasets=("digits",), fractions=(0.3,), attacks=("scale",),
        aggregators=("fedavg", "defaults"), devices=10, rounds=6, goal=5, final_window=3,
    )  # fmt: skip
    results = bench.run(setup, lambda *a, **k: None, tmp_path)
    assert [(r.attack, r.fraction) for r in results] == [("clean", 0.0), ("scale", 0.3)]
    attacked = results[1]
    assert len(attacked.attackers) == 3
    final = attacked.final(setup.final_window)
    assert final["defaults"] > final["fedavg"] + 0.15, final
    assert all(len(attacked.curve(a)) == setup.rounds + 1 for a in setup.aggregators)
    doc = json.loads((tmp_path / "poisoning.json").read_text())
    assert set(doc["summary"]["digits"]) == {"clean", "scale@30%"}
    assert (tmp_path / "poisoning.png").stat().st_size > 0
