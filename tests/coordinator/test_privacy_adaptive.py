"""DP-FedAvg with adaptive clipping (plan ``dp.adaptive``), over real HTTP and SQLite with a
fake clock: the bound each assignment carries, the commit at that bound, the noised count
that moves it, the ledger, a restart, and refused plans.

Epsilon is checked against dp-accounting driven here from the paper (Andrew et al. 2021,
Thm 1, under replace-one): the update sum (sensitivity ``2 C``, noise ``z_delta C``) and the
count of unclipped updates (sensitivity 1, noise ``sigma_b``) form one Gaussian mechanism.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant
from scipy import stats

from coordinator.admin import ApiCallError
from coordinator.embedded import EmbeddedCoordinator
from coordinator.privacy import DpSpec, noised_mean
from edge_sdk.dp import clip_to_norm
from tests.coordinator.rounds.test_sync import PLAN, Fleet, N
from tests.coordinator.test_privacy_dp import CLIP, DELTA, Z, _expected_epsilon
from tests.fixtures.coordinator import HttpConnection

SIGMA_B = 1.0
ADAPTIVE = {"quantile": 0.5, "lr": 0.2, "bit_noise": SIGMA_B}
# The update noise that keeps a round at Z (computed here, not by the code under test).
Z_DELTA = (Z**-2 - (2 * SIGMA_B) ** -2) ** -0.5


def _fleet(coord: EmbeddedCoordinator, clock: Any, bundle: Any, **adaptive: Any) -> Fleet:
    dp = {"clip": CLIP, "noise_multiplier": Z, "adaptive": {**ADAPTIVE, **adaptive}}
    return Fleet(coord, clock, bundle, 15, dp=dp, rounds=5)


@pytest.fixture
def adaptive_fleet(clocked_coordinator, fake_clock, tiny_bundle):
    return lambda **adaptive: _fleet(clocked_coordinator, fake_clock, tiny_bundle, **adaptive)


def _update(i: int, norm: float) -> np.ndarray:
    d = np.random.default_rng(i).normal(0, 1, N)
    return (d * (norm / np.linalg.norm(d))).astype(np.float32)


def _round(f: Fleet, norms: list[float], offset: int = 0) -> tuple[float, list[np.ndarray]]:
    """One round whose ``goal`` reports have these norms before clipping; the bound the
    assignments carried, and what the devices sent (clipped on the device, as the SDK does)."""
    chosen = f.select()
    bounds = {a["plan"]["dp"]["clip"] for _, a in chosen}
    assert len(bounds) == 1
    bound = bounds.pop()
    sent = []
    for i, ((d, a), norm) in enumerate(zip(chosen, norms, strict=False)):
        delta = clip_to_norm(_update(offset + i, norm), bound)
        assert d.upload(a["assignment_id"], delta)[0] == 200
        sent.append(delta)
    return bound, sent


def _committed(f: Fleet) -> list[dict[str, Any]]:
    return [r["metrics"]["dp"] for r in f.rounds() if r["state"] == "committed"]


def _step(dp: dict[str, Any]) -> float:
    return dp["clip"] * math.exp(-ADAPTIVE["lr"] * (dp["unclipped_noised"] / PLAN["goal"] - 0.5))


def test_the_bound_moves_toward_the_quantile_and_devices_get_it(adaptive_fleet) -> None:
    f = adaptive_fleet()
    # 8 of 10 updates far below the first bound: the fraction unclipped (0.8) is above the
    # target quantile (0.5), so the bound shrinks, round after round.
    norms = [0.2 * CLIP] * 8 + [3 * CLIP] * 2
    bound, _ = _round(f, norms)
    assert bound == CLIP
    first = _committed(f)[0]
    assert first["clip"] == CLIP and first["clipped"] is None  # the exact count stays private
    # The count's noise: N(0, sigma_b^2) around the 8 devices that did not clip.
    assert abs(first["unclipped_noised"] - 8) < 6 * SIGMA_B
    assert first["clip_next"] == pytest.approx(_step(first), rel=1e-12)
    for k in range(1, 4):
        bound, _ = _round(f, norms, offset=20 * k)
        previous = _committed(f)[k - 1]
        assert bound == previous["clip_next"]  # the assignment carries the last commit's bound
    last = _committed(f)[-1]
    assert last["clip_next"] == pytest.approx(_step(last), rel=1e-12)
    # Noise removed, each step is exp(-0.2 x (0.8 - 0.5)); the bound stays above 3 x the
    # small norms and below the large ones, so 8 of 10 stay unclipped every round. The mean
    # noised fraction of 4 rounds has std sigma_b / (10 x 2) = 0.05: 0.3 from 0.5 is 6 std.
    noised = sum(dp["unclipped_noised"] for dp in _committed(f)) / (4 * PLAN["goal"])
    assert abs(noised - 0.8) < 6 * SIGMA_B / math.sqrt(4) / PLAN["goal"]
    assert last["clip_next"] < CLIP
    assert last["clip_next"] == pytest.approx(
        CLIP * math.exp(-ADAPTIVE["lr"] * 4 * (noised - 0.5)), rel=1e-9
    )


def test_the_commit_is_the_mean_clipped_to_the_round_bound_plus_noise(adaptive_fleet) -> None:
    f = adaptive_fleet()
    _round(f, [0.2 * CLIP] * 10)  # everyone unclipped: the bound drops
    c1 = _committed(f)[0]["clip_next"]
    assert c1 < CLIP
    base = f.params(1).astype(np.float64)
    bound, sent = _round(f, [0.5 * c1] * 5 + [4 * CLIP] * 5, offset=30)
    assert bound == c1
    dp = _committed(f)[1]
    assert (dp["clip"], dp["bit_noise"]) == (c1, SIGMA_B)
    assert dp["noise_multiplier"] == pytest.approx(Z_DELTA, rel=1e-12)
    clipped = [d * min(1.0, c1 / float(np.linalg.norm(d.astype(np.float64)))) for d in sent]
    plain = np.sum(clipped, axis=0) / PLAN["goal"]
    noise = (f.params(2).astype(np.float64) - base - plain) * PLAN["goal"] / (Z_DELTA * c1)
    assert abs(noise.mean()) < 4 / math.sqrt(N)
    assert 0.6 < noise.std() < 1.4
    assert stats.kstest(noise, "norm").pvalue > 1e-4


def _adaptive_epsilon(rounds: int) -> float:
    z_eff = ((Z_DELTA / 2) ** -2 + SIGMA_B**-2) ** -0.5
    acc = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    event = dp_event.GaussianDpEvent(z_eff)
    acc.compose(dp_event.SampledWithoutReplacementDpEvent(15, 13, event), rounds)
    return float(acc.get_epsilon(DELTA))


def test_epsilon_per_version_matches_dp_accounting(adaptive_fleet) -> None:
    f = adaptive_fleet()
    _round(f, [0.5 * CLIP] * 10)
    _round(f, [0.5 * CLIP] * 10, offset=20)
    eps = [dp["epsilon"] for dp in _committed(f)]
    assert eps[0] == pytest.approx(_adaptive_epsilon(1), rel=1e-9)
    assert eps[1] == pytest.approx(_adaptive_epsilon(2), rel=1e-9)
    # z_delta was chosen so that a round costs what a non-adaptive one at Z costs
    assert eps[1] == pytest.approx(_expected_epsilon([(15, 13)] * 2), rel=1e-6)
    # the two mechanisms composed separately (no sampling) are that one Gaussian
    apart = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    apart.compose(dp_event.GaussianDpEvent(Z_DELTA / 2))
    apart.compose(dp_event.GaussianDpEvent(SIGMA_B))
    half = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    half.compose(dp_event.GaussianDpEvent(Z / 2))
    assert apart.get_epsilon(DELTA) == pytest.approx(half.get_epsilon(DELTA), rel=1e-6)


def test_a_restart_gives_the_same_bound(tmp_path, fake_clock, tiny_bundle) -> None:
    db, token = tmp_path / "fedge.db", "adaptive-restart"
    with EmbeddedCoordinator(db, clock=fake_clock, seed=1, admin_token=token) as coord:
        f = _fleet(coord, fake_clock, tiny_bundle)
        _round(f, [0.2 * CLIP] * 10)
        expected = _committed(f)[0]["clip_next"]
    with EmbeddedCoordinator(db, clock=fake_clock, seed=2, admin_token=token) as coord:
        for d in f.devices:
            d.http.close()
            d.http = HttpConnection(coord.url)
        f.coord, f.admin = coord, coord.admin()
        bound, _ = _round(f, [0.2 * CLIP] * 10, offset=20)
        assert bound == expected
        assert _committed(f)[1]["clip"] == expected


def test_noised_mean_counts_device_clipped_updates_as_clipped() -> None:
    """A float32 update the device scaled to the bound lands within the tolerance of it."""
    spec = DpSpec.from_json(
        {"clip": 0.3, "noise_multiplier": Z, "adaptive": ADAPTIVE}, rounds=3, cohort=13, window=52
    ).at_bound(0.3)
    ups = [clip_to_norm(_update(i, n), 0.3) for i, n in enumerate([0.1, 0.29, 0.5, 7.0, 0.3])]
    ups.append(_update(9, 0.9))  # a device that did not clip: the server does, and it counts
    result = noised_mean(ups, N, spec, 10)
    assert (result.reports, result.unclipped) == (6, 2)


@pytest.mark.parametrize(
    ("adaptive", "message"),
    [
        ({"quantile": 0.5, "lr": 0.2}, "plan.dp.adaptive.bit_noise is required"),
        ({"bit_noise": 0.5}, "must exceed noise_multiplier / 2"),
        ({"bit_noise": 0.3}, "must exceed noise_multiplier / 2"),
        ({"bit_noise": 2.0, "quantile": 1.5}, "plan.dp.adaptive.quantile must be"),
        ({"bit_noise": 2.0, "lr": 0}, "plan.dp.adaptive.lr must be"),
        ({"bit_noise": 2.0, "rate": 0.1}, "unknown fields in plan.dp.adaptive"),
        ("on", "plan.dp.adaptive must be"),
    ],
)
def test_bad_adaptive_plans_are_refused_and_create_nothing(
    clocked_coordinator, tiny_bundle, adaptive: Any, message: str
) -> None:
    admin = clocked_coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    dp = {"clip": 1.0, "noise_multiplier": Z, "adaptive": adaptive}
    with pytest.raises(ApiCallError) as e:
        admin.create_task(bundle_id, {"goal": 10, "dp": dp})
    assert (e.value.status, e.value.code) == (400, "invalid_request")
    assert message in str(e.value)
    assert admin.tasks() == []


def test_an_adaptive_plan_round_trips() -> None:
    raw = {"clip": 1.0, "noise_multiplier": Z, "adaptive": ADAPTIVE}
    spec = DpSpec.from_json(raw, rounds=3, cohort=13, window=52)
    assert DpSpec.from_json(spec.to_json(), rounds=3, cohort=13, window=52) == spec
    assert spec.to_json()["adaptive"] == ADAPTIVE
    assert spec.client_json() == {"clip": 1.0}
