"""DP-FedAvg with the real thing: emulated SDK devices training digits over HTTP against a
coordinator on loopback; the devices clip, the coordinator noises and accounts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

from coordinator.config import PacingConfig
from coordinator.embedded import EmbeddedCoordinator
from coordinator.tensors import decode_delta
from fedge.fleet.clock import SimClock
from fedge.fleet.datasets import load_digits
from fedge.fleet.emulator import Fleet
from fedge.fleet.partition import partition

CLIP, Z = 0.5, 0.8


@pytest.mark.slow
def test_emulated_devices_train_with_dp_end_to_end(digits_bundle: Path) -> None:
    clock = SimClock(speedup=20.0)
    pacing = PacingConfig(min_retry_s=1.0, max_retry_s=30.0, no_task_retry_s=5.0)
    # retain_updates: keep the payloads so that the test can read what devices sent.
    with EmbeddedCoordinator(
        clock=clock.unix(), pacing=pacing, seed=0, retain_updates=True
    ) as coord:
        admin = coord.admin()
        bundle_id = admin.upload_bundle(digits_bundle)["bundle_id"]
        plan = {"rounds": 3, "goal": 4, "selection_window_s": 3.0, "round_deadline_s": 60.0,
                "epochs": 2, "batch_size": 16, "lr": 0.2, "codec": {"name": "fp32"},
                "dp": {"clip": CLIP, "noise_multiplier": Z}}  # fmt: skip
        task_id = admin.create_task(bundle_id, plan)["task_id"]
        train, _ = load_digits(seed=0)
        idx = partition(train.y, 12, "dirichlet:1.0", np.random.default_rng(0))
        fleet = Fleet(coord.url, [train.subset(i) for i in idx], seed=1, clock=clock,
                      enrollment_token=coord.enrollment_token)  # fmt: skip
        with fleet:
            done = fleet.wait_for(lambda: admin.task(task_id)["state"] == "completed", 180.0)
        fleet.close()
        assert done
        rounds = [r for r in admin.rounds(task_id) if r["state"] == "committed"]
        assert len(rounds) == 3
        acc = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
        service = coord.service
        n = service.ctx.num_parameters(service.store.get_task(task_id))
        for r in rounds:
            dp = r["metrics"]["dp"]
            assert dp["cohort"] <= dp["population"] <= 12 and dp["denominator"] == 4
            acc.compose(
                dp_event.SampledWithoutReplacementDpEvent(
                    dp["population"], dp["cohort"], dp_event.GaussianDpEvent(Z / 2)
                )
            )
            assert dp["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
        # What the devices sent was clipped on the device: no stored update is longer.
        norms = [
            float(np.linalg.norm(decode_delta(service.blobs.read(u.payload_sha), n)))
            for r in service.store.list_rounds(task_id)
            for u in service.store.round_updates(r.round_id)
        ]
        assert len(norms) >= 12 and max(norms) <= CLIP * (1 + 1e-5)
        assert max(norms) > 0.9 * CLIP  # training moved far enough for the clip to bite
        assert admin.task(task_id)["epsilon"] == rounds[-1]["metrics"]["dp"]["epsilon"]
