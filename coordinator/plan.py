"""A task's plan: how its rounds run and what devices do in them, validated from JSON.

::

    >>> plan = TaskPlan.from_json({"rounds": 20, "goal": 50, "codec": {"name": "int8"}})
    >>> plan.target        # goal x over-selection, rounded up
    65

Unknown keys and wrong types are refused (400 ``invalid_request``). ``client_json()`` is the
part a device receives in its assignment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from edge_sdk.codecs.spec import CodecSpec, CodecSpecError

from coordinator.aggregation import ServerOptimizerSpec
from coordinator.eligibility import EligibilityPolicy
from coordinator.errors import InvalidRequest
from coordinator.validation import Fields

__all__ = ["TaskPlan"]


@dataclass(frozen=True)
class TaskPlan:
    rounds: int = 10  # committed training rounds until the task completes
    goal: int = 10  # reports a round wants
    over_selection: float = 1.3
    min_reporting_fraction: float = 0.8  # of goal, by the deadline, to commit
    selection_window_s: float = 10.0
    round_deadline_s: float = 120.0  # from the end of selection
    max_candidates_factor: float = 4.0  # window admits at most target x this candidates
    # client side
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 32
    lr: float = 0.05
    lr_decay: float = 1.0
    prox_mu: float = 0.0
    recheck_every_steps: int = 5
    codec: CodecSpec = field(default_factory=lambda: CodecSpec("fp32"))
    eligibility: EligibilityPolicy = field(default_factory=EligibilityPolicy)
    # server side
    server_optimizer: ServerOptimizerSpec = field(default_factory=ServerOptimizerSpec)
    max_update_norm: float | None = 1e4  # L2 norm of a delta; None: unbounded
    max_examples: int = 1_000_000  # an update claiming more is refused (it would dominate)
    eval_goal: int | None = None  # evaluation rounds' goal; None: same as goal

    @property
    def target(self) -> int:
        return math.ceil(self.goal * self.over_selection)

    @property
    def min_reports(self) -> int:
        return max(1, math.ceil(self.goal * self.min_reporting_fraction))

    @classmethod
    def from_json(cls, obj: Any) -> TaskPlan:
        f = Fields(obj if obj is not None else {}, "plan")
        try:
            codec = CodecSpec.from_json(f.raw("codec") if f.has("codec") else "fp32")
        except CodecSpecError as e:
            raise InvalidRequest(f"plan.codec: {e}") from e
        plan = cls(
            rounds=f.int("rounds", 10, minimum=1, maximum=1_000_000),
            goal=f.int("goal", 10, minimum=1, maximum=1_000_000),
            over_selection=f.float("over_selection", 1.3, minimum=1.0, maximum=10.0),
            min_reporting_fraction=f.float(
                "min_reporting_fraction", 0.8, minimum=0.0, maximum=1.0, exclusive_min=True
            ),
            selection_window_s=f.float("selection_window_s", 10.0, minimum=0.0, maximum=86400.0),
            round_deadline_s=f.float(
                "round_deadline_s", 120.0, minimum=0.0, maximum=7 * 86400.0, exclusive_min=True
            ),
            max_candidates_factor=f.float("max_candidates_factor", 4.0, minimum=1.0, maximum=100.0),
            epochs=f.int("epochs", 1, minimum=1, maximum=10_000),
            steps=f.int("steps", None, minimum=1, maximum=10_000_000),
            batch_size=f.int("batch_size", 32, minimum=1, maximum=1_000_000),
            lr=f.float("lr", 0.05, minimum=0.0, exclusive_min=True),
            lr_decay=f.float("lr_decay", 1.0, minimum=0.0, maximum=1.0, exclusive_min=True),
            prox_mu=f.float("prox_mu", 0.0, minimum=0.0),
            recheck_every_steps=f.int("recheck_every_steps", 5, minimum=1),
            codec=codec,
            eligibility=EligibilityPolicy.from_json(f.raw("eligibility")),
            server_optimizer=ServerOptimizerSpec.from_json(f.raw("server_optimizer")),
            max_update_norm=f.float("max_update_norm", 1e4, minimum=0.0, exclusive_min=True)
            if "max_update_norm" not in f.obj or f.obj["max_update_norm"] is not None
            else None,
            max_examples=f.int("max_examples", 1_000_000, minimum=1),
            eval_goal=f.int("eval_goal", None, minimum=1, maximum=1_000_000),
        )
        f.raw("max_update_norm")
        f.done()
        return plan

    def to_json(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "goal": self.goal,
            "over_selection": self.over_selection,
            "min_reporting_fraction": self.min_reporting_fraction,
            "selection_window_s": self.selection_window_s,
            "round_deadline_s": self.round_deadline_s,
            "max_candidates_factor": self.max_candidates_factor,
            **self.client_json(),
            "eligibility": self.eligibility.to_json(),
            "server_optimizer": self.server_optimizer.to_json(),
            "max_update_norm": self.max_update_norm,
            "max_examples": self.max_examples,
            "eval_goal": self.eval_goal,
        }

    def client_json(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "lr_decay": self.lr_decay,
            "prox_mu": self.prox_mu,
            "codec": self.codec.to_json(),
            "recheck_every_steps": self.recheck_every_steps,
        }
