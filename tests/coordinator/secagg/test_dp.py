"""Distributed DP with SecAgg+ (plan ``dp`` together with ``secagg``), over real HTTP against
a real coordinator: the committed version is numpy's mean of the survivors' clipped updates
over the fixed denominator plus noise whose variance is the survivors' summed variance (at
least the accounted one, whoever dropped); epsilon per version is the one computed here
independently from :mod:`coordinator.privacy_distributed`; the budget stops the task; bad
plans get a clear 400 and create nothing. The device's noisy encoding is checked against
the plain encoding plus the sampler's own draws."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from coordinator.errors import InvalidRequest
from coordinator.plan import TaskPlan
from coordinator.privacy_distributed import (
    DistributedRound,
    distributed_epsilon,
    rounded_norm_bound,
)
from edge_sdk.errors import ApiError
from edge_sdk.secagg import dgauss, graph, ring
from edge_sdk.secagg.noise import DeviceNoise, noisy_encode
from tests.coordinator.secagg.peers import PARAMS, Peer, SecAggRound
from tests.coordinator.secagg.test_http import run_stages

LEVELS = 2**16
CLIP = 2.0
N = 10  # devices, goal = cohort
MIN_FRACTION = 0.3  # SecAggRound's min_reporting_fraction


def sigma2_for(z: float, fewest: int) -> float:
    """Each device's variance, ring units, as the plan must size it (rounded up to 1/1024)."""
    return math.ceil((z * LEVELS) ** 2 / fewest * 1024) / 1024


def plan_fewest() -> int:
    """The fewest survivors any round of the test plan can commit with (smallest cohort:
    min_reports devices)."""
    min_reports = math.ceil(N * MIN_FRACTION)
    return max(min_reports, graph.parameters(max(2, min_reports), 0.3)[1])


def session_fewest() -> int:
    """What the round of N devices is accounted with: its own minimum survivors."""
    return max(math.ceil(N * MIN_FRACTION), graph.parameters(N, 0.3)[1])


def epsilon_of(z: float, rounds: int, delta: float = 1e-5) -> float:
    rnd = DistributedRound(
        dim=PARAMS,
        l2=rounded_norm_bound(float(LEVELS), 10**7, math.exp(-0.5)),
        survivors=session_fewest(),
        sigma2=sigma2_for(z, plan_fewest()),
    )
    return distributed_epsilon([(rnd, rounds)], delta)


def clipped_sum(peers: list[Peer]) -> np.ndarray:
    out = np.zeros(PARAMS)
    for p in peers:
        norm = float(np.linalg.norm(p.delta))
        out += p.delta * min(1.0, CLIP / norm)
    return out


@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_a_round_commits_the_clipped_mean_plus_the_accounted_noise(
    clocked_coordinator, fake_clock, tiny_bundle, drop: float
) -> None:
    z = 0.5
    dp = {"clip": CLIP, "noise_multiplier": z, "delta": 1e-5}
    r = SecAggRound(clocked_coordinator, tiny_bundle, N, extra={"dp": dp})
    try:
        sigma2 = sigma2_for(z, plan_fewest())
        assert r.peers[0].noise == DeviceNoise(Fraction(sigma2), r.peers[0].noise.norm_bound)
        survivors = run_stages(r, fake_clock, {"mask": drop})
        assert len(survivors) == N - round(drop * N)
        [rnd] = r.admin.rounds(r.task_id)
        assert rnd["state"] == "committed", rnd["metrics"]
        rec = rnd["metrics"]["dp"]
        assert (rec["survivors"], rec["cohort"], rec["denominator"]) == (len(survivors), N, N)
        assert rec["min_survivors"] == session_fewest() <= len(survivors)
        # the fixed denominator: the goal, whatever the number of survivors; equal weights
        got = (r.version(1) - r.base) * N  # the noisy sum, model units
        noise = (got - clipped_sum(survivors)) * LEVELS / CLIP  # ring units
        # quantisation adds at most 1/4 of variance per device: tiny next to sigma2
        want = len(survivors) * sigma2
        ratio = float(np.mean(noise**2)) / want
        lo, hi = stats.chi2.ppf([1e-6, 1 - 1e-6], PARAMS) / PARAMS
        assert lo < ratio < hi, ratio
        # at least the accounted noise, and the accounted noise at least the plan's
        assert want >= rec["min_survivors"] * sigma2 >= (z * LEVELS) ** 2
        assert abs(float(np.mean(noise))) < 6 * math.sqrt(want / PARAMS)
        # epsilon: the accountant's for the same event, computed here
        assert rec["epsilon"] == pytest.approx(epsilon_of(z, 1), rel=1e-9)
        task = r.admin.task(r.task_id)
        assert task["epsilon"] == rec["epsilon"]
        assert task["privacy"]["delta"] == 1e-5
        [listed] = [t for t in r.admin.status()["tasks"] if t["task_id"] == r.task_id]
        assert listed["epsilon"] == rec["epsilon"]
        assert rnd["metrics"]["loss"] is None
    finally:
        r.close()


def test_the_budget_stops_the_task_after_the_round_it_can_pay_for(
    clocked_coordinator, fake_clock, tiny_bundle
) -> None:
    z = 0.5
    one, two = epsilon_of(z, 1), epsilon_of(z, 2)
    budget = (one + two) / 2
    dp = {"clip": CLIP, "noise_multiplier": z, "budget": budget}
    r = SecAggRound(clocked_coordinator, tiny_bundle, N, extra={"dp": dp})
    try:
        run_stages(r, fake_clock, {})
        [rnd] = r.admin.rounds(r.task_id)
        assert rnd["state"] == "committed"
        assert rnd["metrics"]["stopped"] == "privacy_budget"
        task = r.admin.task(r.task_id)
        assert task["state"] == "completed"
        assert task["privacy"]["completed_reason"] == "privacy_budget"
        assert task["epsilon"] == pytest.approx(one, rel=1e-9) and one <= budget
        assert r.http[0].check_in()["action"] != "train"
    finally:
        r.close()


def test_an_epsilon_target_calibrates_the_smallest_noise_within_it() -> None:
    raw = {"goal": N, "over_selection": 1.0, "rounds": 20, "min_reporting_fraction": 0.3,
           "secagg": {}, "dp": {"clip": 1.0, "epsilon": 4.0}}  # fmt: skip
    plan = TaskPlan.from_json(raw)
    assert plan.secagg is not None and plan.secagg.dp is not None
    dp = plan.secagg.dp
    assert dp.budget == 4.0 and plan.secagg.clip == 1.0

    def spent(z: float) -> float:
        rnd = DistributedRound(10**7, rounded_norm_bound(float(LEVELS), 10**7, math.exp(-0.5)),
                               plan_fewest(), sigma2_for(z, plan_fewest()))  # fmt: skip
        return distributed_epsilon([(rnd, 20)], 1e-5)

    assert spent(dp.noise_multiplier) <= 4.0 < spent(dp.noise_multiplier / 1.002)
    # stored and read back: the resolved noise, not a new calibration
    again = TaskPlan.from_json(plan.to_json())
    assert again == plan and plan.to_json()["dp"]["noise_multiplier"] == dp.noise_multiplier
    # the ring holds the cohort's summed noise: at least 5 of its standard deviations
    spec = plan.secagg.ring_spec
    room = 2 ** (spec.bits - 1) - N * LEVELS
    assert room >= 5 * math.sqrt(N * float(dp.sigma2))


@pytest.mark.parametrize(
    ("secagg", "dp", "message"),
    [
        ({}, {"noise_multiplier": 1.0}, "plan.dp.clip is required"),
        ({}, {"clip": 1.0}, "exactly one of noise_multiplier and epsilon"),
        ({}, {"clip": 1.0, "noise_multiplier": 1.0, "epsilon": 3.0}, "exactly one"),
        ({}, {"clip": 1.0, "epsilon": 3.0, "population": 100}, "unknown fields in plan.dp"),
        ({}, {"clip": 1.0, "noise_multiplier": 1.0, "adaptive": {"bit_noise": 5.0}},
         "plan.dp.adaptive needs central DP"),
        ({"clip": 2.0}, {"clip": 1.0, "noise_multiplier": 1.0}, "must equal plan.dp.clip"),
        ({"levels": 1}, {"clip": 1.0, "noise_multiplier": 0.01}, "below the accountant's 1/4"),
        ({}, {"clip": 1.0, "noise_multiplier": -1}, "plan.dp.noise_multiplier must be > 0"),
        ({}, {"clip": 1.0, "epsilon": 0}, "plan.dp.epsilon must be > 0"),
        ({}, {"clip": 1.0, "epsilon": 1e-9}, "no noise multiplier reaches that budget"),
        ({"levels": 2**40}, {"clip": 1.0, "noise_multiplier": 1e4}, "above the device sampler's"),
    ],
)
def test_bad_distributed_dp_plans_get_a_clear_400_and_create_nothing(
    clocked_coordinator, tiny_bundle, secagg, dp, message: str
) -> None:
    admin = clocked_coordinator.admin()
    try:
        bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
        before = admin.tasks()
        with pytest.raises(ApiError) as e:
            admin.create_task(bundle_id, {"goal": N, "secagg": secagg, "dp": dp})
        assert e.value.status == 400 and e.value.code == "invalid_request"
        assert message in str(e.value), str(e.value)
        assert admin.tasks() == before
    finally:
        admin.close()


def test_unreachable_epsilon_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="no noise multiplier reaches that budget"):
        TaskPlan.from_json({"goal": N, "rounds": 10**6, "secagg": {},
                            "dp": {"clip": 1.0, "epsilon": 1e-3}})  # fmt: skip


def test_the_device_adds_the_samplers_noise_to_a_conditionally_rounded_vector() -> None:
    spec = ring.RingSpec.for_cohort(10, 1.0, 2**10, 50, headroom=10**6)
    delta = np.random.default_rng(3).normal(0, 1.0, 500)
    noise = DeviceNoise(Fraction(900), rounded_norm_bound(2.0**10, 500, math.exp(-0.5)))
    key = bytes(range(32))
    got = noisy_encode(delta, spec, noise, np.random.default_rng(5), dgauss.CryptoIntegers(key))
    # replay: the same roundings until one is within the bound, then the same draws
    rng = np.random.default_rng(5)
    while True:
        x = ring.encode(delta, spec.max_weight, spec, rng)
        signed, _ = ring.decode_sum(x, spec)
        if np.linalg.norm(signed * spec.levels / (spec.max_weight * spec.clip)) <= noise.norm_bound:
            break
    draws = dgauss.sample(Fraction(900), 500, dgauss.CryptoIntegers(key))
    assert np.array_equal(got, (x + np.append(draws, 0).view(np.uint64)) & spec.modulus_mask)
    _, weight = ring.decode_sum(got, spec)
    assert weight == spec.max_weight  # equal weights, whatever the device's example count
    # a bound no rounding can meet is an error, not a silently larger sensitivity
    with pytest.raises(ring.RingError, match="norm bound"):
        noisy_encode(delta, spec, DeviceNoise(Fraction(900), 1.0), np.random.default_rng(5))


def test_a_malformed_noise_plan_is_refused_on_the_device() -> None:
    assert DeviceNoise.from_json(None) is None
    for bad in ({"sigma2": "x", "norm_bound": 1}, {"sigma2": "1/0", "norm_bound": 1},
                {"sigma2": "-1", "norm_bound": 1}, {"sigma2": "1"},
                {"sigma2": "1", "norm_bound": float("nan")}):  # fmt: skip
        with pytest.raises(ValueError, match=r"secagg\.dp"):
            DeviceNoise.from_json(bad)


def test_the_sdk_loop_noises_its_update_and_sends_it_at_full_weight(
    clocked_coordinator, tiny_bundle
) -> None:
    """The SDK's own SecAgg loop (edge_sdk.secagg.loop), every device in a thread: the commit
    carries the survivors' noise, and the weights the devices were given do not count."""
    import threading

    from edge_sdk.secagg.loop import SecAggLoop, SecAggResult
    from tests.edge_sdk.secagg.test_loop import _transport

    z = 0.5
    r = SecAggRound(clocked_coordinator, tiny_bundle, N,
                    extra={"dp": {"clip": CLIP, "noise_multiplier": z}})  # fmt: skip
    results: dict[int, SecAggResult | BaseException] = {}

    def device(i: int) -> None:
        p = r.peers[i]
        loop = SecAggLoop(_transport(clocked_coordinator.url, p.http), p.assignment, p.delta,
                          p.weight, rng=np.random.default_rng(i))  # fmt: skip
        try:
            results[i] = loop.run()
        except BaseException as e:  # recorded for the assertions
            results[i] = e

    threads = [threading.Thread(target=device, args=(i,)) for i in range(N)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(isinstance(x, SecAggResult) and x.counted for x in results.values()), results
        [rnd] = r.admin.rounds(r.task_id)
        assert rnd["metrics"]["dp"]["survivors"] == N
        noise = ((r.version(1) - r.base) * N - clipped_sum(r.peers)) * LEVELS / CLIP
        ratio = float(np.mean(noise**2)) / (N * sigma2_for(z, plan_fewest()))
        lo, hi = stats.chi2.ppf([1e-6, 1 - 1e-6], PARAMS) / PARAMS
        assert lo < ratio < hi, ratio
    finally:
        r.close()


def test_a_two_device_round_is_priced_at_the_two_survivors_it_needs(
    clocked_coordinator, fake_clock, tiny_bundle
) -> None:
    """min_reports 1, cohort 2: no session commits with fewer than 2 survivors, so the check
    before selection must not price the round as if one device's noise could be all of it."""
    z = 0.5
    sigma2 = sigma2_for(z, 2)  # sized for the 2 a session needs, not min_reports = 1

    def cost(survivors: int) -> float:
        rnd = DistributedRound(PARAMS, rounded_norm_bound(float(LEVELS), 10**7, math.exp(-0.5)),
                               survivors, sigma2)  # fmt: skip
        return distributed_epsilon([(rnd, 1)], 1e-5)

    two, one = cost(2), cost(1)
    assert two < one
    dp = {"clip": CLIP, "noise_multiplier": z, "budget": (one + two) / 2}
    r = SecAggRound(clocked_coordinator, tiny_bundle, 2, extra={"dp": dp})  # selects: fits
    try:
        assert r.peers[0].noise is not None and r.peers[0].noise.sigma2 == Fraction(sigma2)
        run_stages(r, fake_clock, {})
        [rnd] = r.admin.rounds(r.task_id)
        assert rnd["state"] == "committed", rnd["metrics"]
        assert rnd["metrics"]["dp"]["min_survivors"] == 2
        assert r.admin.task(r.task_id)["epsilon"] == pytest.approx(two, rel=1e-9)
    finally:
        r.close()
