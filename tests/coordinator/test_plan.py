"""Task plans: defaults, derived counts, validation, and a lossless JSON round trip."""

from __future__ import annotations

import pytest

from coordinator.errors import InvalidRequest
from coordinator.plan import TaskPlan
from edge_sdk.local_training import Plan


def test_defaults_and_derived_counts() -> None:
    plan = TaskPlan.from_json(None)
    assert (plan.goal, plan.over_selection, plan.min_reporting_fraction) == (10, 1.3, 0.8)
    assert (plan.target, plan.min_reports) == (13, 8)
    p = TaskPlan.from_json({"goal": 7, "over_selection": 1.5, "min_reporting_fraction": 0.5})
    assert (p.target, p.min_reports) == (11, 4)  # ceil(10.5), ceil(3.5)
    assert plan.codec.name == "fp32" and plan.server_optimizer.name == "fedavg"


def test_round_trip_is_lossless() -> None:
    raw = {
        "rounds": 4, "goal": 25, "over_selection": 1.2, "selection_window_s": 3.5,
        "round_deadline_s": 30, "epochs": 2, "steps": 40, "batch_size": 16, "lr": 0.1,
        "lr_decay": 0.99, "prox_mu": 0.01, "codec": {"name": "topk", "fraction": 0.01},
        "eligibility": {"require_charging": False, "min_battery": 0.3, "runtimes": ["ort-step"],
                        "unknown_ok": ["unmetered"]},
        "server_optimizer": {"name": "fedyogi", "lr": 0.02, "tau": 0.01},
        "max_update_norm": None, "max_examples": 5000, "eval_goal": 5, "first_come": True,
    }  # fmt: skip
    plan = TaskPlan.from_json(raw)
    assert TaskPlan.from_json(plan.to_json()) == plan
    assert plan.max_update_norm is None and plan.steps == 40
    client = plan.client_json()
    assert client["codec"] == {"name": "topk", "fraction": 0.01, "values": "fp16"}
    assert set(client) == {"epochs", "steps", "batch_size", "lr", "lr_decay", "prox_mu",
                           "codec", "recheck_every_steps", "batchnorm"}  # fmt: skip


def test_selection_timeout_default_never_cuts_a_window_short() -> None:
    assert TaskPlan.from_json(None).selection_timeout_s == 300.0
    assert TaskPlan.from_json({"selection_window_s": 900}).selection_timeout_s == 900.0
    plan = TaskPlan.from_json({"selection_window_s": 5, "selection_timeout_s": 5})
    assert plan.selection_timeout_s == 5.0
    assert TaskPlan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize(
    "bad",
    [
        {"goal": 0},
        {"goal": 2.5},
        {"goal": True},
        {"rounds": "3"},
        {"over_selection": 0.9},
        {"min_reporting_fraction": 0},
        {"min_reporting_fraction": 1.5},
        {"round_deadline_s": 0},
        {"selection_timeout_s": 0},
        {"selection_timeout_s": 9, "selection_window_s": 10},
        {"selection_timeout_s": "300"},
        {"lr": -1},
        {"lr": float("inf")},
        {"codec": {"name": "zip"}},
        {"codec": 5},
        {"eligibility": {"require_idle": 1}},
        {"eligibility": {"min_battery": 2}},
        {"eligibility": {"bogus": True}},
        {"eligibility": {"runtimes": "ort-step"}},
        {"server_optimizer": {"name": "fedadam", "beta2": -0.1}},
        # 1 never forgets a step (momentum grows without bound; FedAdam's m never moves)
        {"server_optimizer": {"name": "fedavgm", "momentum": 1.0}},
        {"server_optimizer": {"name": "fedadam", "beta1": 1}},
        {"server_optimizer": {"name": "fedyogi", "beta1": 1.0}},
        # a staleness weight that underflows to 0 within the bound
        {"staleness": {"name": "polynomial", "a": 400}, "max_staleness": 20},
        {"max_update_norm": 0},
        {"max_update_norm": "big"},
        {"max_examples": 2**53 + 1},
        # far past what a column or a float holds: refused, not a 500 later
        {"max_concurrency": 10**400},
        {"buffer_k": 10**7},
        {"max_staleness": 10**30},
        {"staleness": {"name": "polynomial", "a": 10**400}},
        {"codec": {"name": "topk", "fraction": 10**400}},
        {"lr": 10**400},
        # sent to devices: past a 32-bit int Android's plan parser refuses the assignment,
        # and 10**400 crashes the Python SDK's (OverflowError)
        {"recheck_every_steps": 2**31},
        {"recheck_every_steps": 10**400},
        {"nonsense": 1},
        {"first_come": 1},
        # a first-come cohort is not drawn from a window: no DP amplification, no fixed
        # SecAgg cohort, no exact selection to wait for
        {"first_come": True, "wait_for_all": True},
        {"first_come": True, "dp": {"clip": 1.0, "noise_multiplier": 1.0}},
        {"first_come": True, "secagg": {}},
        "plan",
    ],
)
def test_invalid_plans_are_refused(bad: object) -> None:
    with pytest.raises(InvalidRequest):
        TaskPlan.from_json(bad)


def test_the_largest_counts_accepted_are_ones_devices_can_parse() -> None:
    """A device parses its assignment's plan with ``edge_sdk.local_training.Plan`` (Android:
    ``Plan.kt``, each count a 32-bit Int): a count the coordinator accepts and a device
    refuses fails every assignment of the task, on every device."""
    largest = {"epochs": 10_000, "batch_size": 1_000_000, "recheck_every_steps": 10_000_000}
    client = TaskPlan.from_json(largest).client_json()
    plan = Plan.from_json(client)
    assert (plan.epochs, plan.batch_size, plan.recheck_every_steps) == tuple(largest.values())
    steps = TaskPlan.from_json({"steps": 10_000_000}).client_json()["steps"]
    assert max(*largest.values(), steps) < 2**31


def test_momentum_and_beta1_just_below_1_are_accepted() -> None:
    plan = TaskPlan.from_json({"server_optimizer": {"name": "fedavgm", "momentum": 0.999}})
    assert plan.server_optimizer.momentum == 0.999
    plan = TaskPlan.from_json({"server_optimizer": {"name": "fedadam", "beta1": 0.99}})
    assert plan.server_optimizer.beta1 == 0.99
