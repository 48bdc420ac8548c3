"""The ``secagg`` plan key: validated like every plan field, sized so the sum cannot wrap,
and refused where the server would have to see updates (robust aggregation, central DP) or
where a fixed cohort does not exist (async mode)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from coordinator.errors import InvalidRequest
from coordinator.plan import TaskPlan
from edge_sdk.secagg import graph, ring


def test_defaults_round_trip_and_reach_the_device() -> None:
    plan = TaskPlan.from_json({"goal": 20, "secagg": {}})
    assert plan.secagg is not None and plan.robust.undefended
    assert TaskPlan.from_json(plan.to_json()) == plan
    sent = plan.client_json()["secagg"]
    # the ring holds the sum of the whole cohort (goal x over-selection) at its extremes
    want = ring.RingSpec.for_cohort(plan.target, 1.0, 2**16, 1000)
    assert (sent["bits"], sent["levels"], sent["max_weight"]) == (want.bits, 2**16, 1000)
    assert plan.secagg.threshold == graph.parameters(plan.target, 0.3)[1]


@pytest.mark.parametrize(
    ("secagg", "extra", "message"),
    [
        ({"dropout": 0.5}, {}, "plan.secagg.dropout must be < 0.5"),
        ({"dropout": "x"}, {}, "plan.secagg.dropout must be a finite number"),
        ({"clip": 0}, {}, "plan.secagg.clip must be > 0"),
        ({"levels": 0}, {}, "plan.secagg.levels must be in"),
        ({"stage_timeout_s": -1}, {}, "plan.secagg.stage_timeout_s must be > 0"),
        ({"surprise": 1}, {}, "unknown fields in plan.secagg: surprise"),
        ([], {}, "plan.secagg must be a JSON object"),
        ({"levels": 2**40}, {"goal": 10**6, "over_selection": 10.0}, "more than 64"),
        ({}, {"goal": 1, "over_selection": 1.0}, "at least 2 devices"),
        # 20 selected, threshold 10, but stage 1 closes at 10 advertisers with 9 neighbours
        ({}, {"over_selection": 2.0}, "fewer than the Shamir threshold 10"),
        ({}, {"robust": {"aggregator": "median"}}, "plan.robust cannot be combined"),
        ({"clip": 2.0}, {"dp": {"clip": 1.0, "noise_multiplier": 1.0}}, "must equal plan.dp.clip"),
    ],
)
def test_bad_secagg_plans_are_refused(secagg: Any, extra: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        TaskPlan.from_json({"goal": 10, **extra, "secagg": secagg})
    assert message in e.value.message


def test_async_mode_is_refused_with_its_reason() -> None:
    plan = TaskPlan.from_json({"goal": 10, "secagg": {}})
    plan.check_mode("sync")
    with pytest.raises(InvalidRequest, match="not available in async mode"):
        plan.check_mode("async")


def test_refused_over_http_and_nothing_is_created(clocked_coordinator, tiny_bundle) -> None:
    from coordinator.admin import ApiCallError

    admin = clocked_coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    with pytest.raises(ApiCallError) as e:
        admin.create_task(bundle_id, {"goal": 10, "secagg": {}}, mode="async")
    assert (e.value.status, e.value.code) == (400, "invalid_request")
    assert admin.tasks() == []


def _majority_survives(cohort: int, goal: int, dropout: float, degree: int, threshold: int,
                       trials: int, seed: int) -> float:
    """The fraction of simulated rounds in which every survivor keeps ``threshold`` surviving
    neighbours: stage 1 takes the first ``goal`` of the ``cohort``, then ``dropout`` of those
    vanish (each independently)."""
    rng = np.random.default_rng(seed)
    links = graph.neighbours(cohort, degree, bytes(32))
    ok = 0
    for _ in range(trials):
        advertised = rng.permutation(cohort)[:goal]
        alive = set(advertised[rng.random(goal) >= dropout].tolist())
        ok += all(len(links[u] & alive) >= threshold for u in alive)
    return ok / trials


def test_the_graph_is_sized_for_the_devices_over_selection_leaves_out() -> None:
    """Stage 1 closes at ``goal`` advertisers, so the over-selected rest are dropouts too: a
    graph sized for ``dropout`` alone loses its majority; the plan's sizing keeps it."""
    plan = TaskPlan.from_json({"goal": 300, "over_selection": 1.3, "secagg": {"dropout": 0.2}})
    assert plan.secagg is not None
    cohort = plan.target
    degree, threshold = plan.secagg.graph_parameters(cohort)
    naive = graph.parameters(cohort, 0.2)
    assert degree > naive[0]
    assert _majority_survives(cohort, 300, 0.2, degree, threshold, 40, seed=1) == 1.0
    assert _majority_survives(cohort, 300, 0.2, *naive, 40, seed=1) < 0.9
