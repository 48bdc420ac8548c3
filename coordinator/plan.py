"""A task's plan: how its rounds run and what devices do in them, validated from JSON.

::

    >>> plan = TaskPlan.from_json({"rounds": 20, "goal": 50, "codec": {"name": "int8"}})
    >>> plan.target        # goal x over-selection, rounded up
    65

Unknown keys and wrong types are refused (400 ``invalid_request``). ``client_json()`` is the
part a device receives in its assignment.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from coordinator.aggregation import ServerOptimizerSpec
from coordinator.async_buffer import AsyncConfig
from coordinator.eligibility import TaskEligibility
from coordinator.errors import ApiError, InvalidRequest
from coordinator.robust.spec import RobustSpec
from coordinator.secagg.spec import SecAggSpec
from coordinator.validation import Fields
from edge_sdk.codecs.spec import CodecSpec, CodecSpecError
from edge_sdk.local_training import BATCHNORM_MODES

if TYPE_CHECKING:
    from coordinator.privacy import DpSpec

__all__ = ["TaskPlan", "calibrate_ahead"]

# A selection phase that has not gathered goal candidates by then gives up or starts smaller;
# five minutes is a few pace-steering intervals of a small population.
DEFAULT_SELECTION_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class TaskPlan:
    rounds: int = 10  # committed training rounds until the task completes
    goal: int = 10  # reports a round wants
    over_selection: float = 1.3
    min_reporting_fraction: float = 0.8  # of goal, by the deadline, to commit
    selection_window_s: float = 10.0
    # From the round's opening: then start with the candidates if >= min_reports, else abandon.
    selection_timeout_s: float = DEFAULT_SELECTION_TIMEOUT_S
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
    # batch norm layers: "aggregate" (averaged with the parameters) or "local" (FedBN: each
    # device keeps its own, see edge_sdk.local_training)
    batchnorm: str = "aggregate"
    eligibility: TaskEligibility = field(default_factory=TaskEligibility)
    # server side
    server_optimizer: ServerOptimizerSpec = field(default_factory=ServerOptimizerSpec)
    max_update_norm: float | None = 1e4  # L2 norm of a delta; None: unbounded
    max_examples: int = 1_000_000  # an update claiming more is refused (it would dominate)
    # weight cap, norm clipping and aggregator (coordinator.robust); default: defended FedAvg
    robust: RobustSpec = field(default_factory=RobustSpec)
    eval_goal: int | None = None  # evaluation rounds' goal; None: same as goal
    # sync straggler policy: select exactly goal devices and close when all of them reported
    # or gave up (or at the deadline), instead of over-selecting and taking the first goal.
    wait_for_all: bool = False
    # sync selection: no window to draw from; a round starts reporting when it opens and its
    # first target eligible check-ins are assigned (plain plans: not with dp, secagg or
    # wait_for_all). For populations not much larger than a round's target.
    first_come: bool = False
    # async mode (coordinator.rounds.buffered): buffer_k, max_concurrency, staleness policy
    buffer: AsyncConfig = field(default_factory=AsyncConfig)
    # DP-FedAvg (coordinator.privacy.DpSpec): clip on the device, Gaussian noise on the sum
    dp: DpSpec | None = None
    # SecAgg+ (coordinator.secagg): the server sees only the sum of the round's updates
    secagg: SecAggSpec | None = None

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
        except (CodecSpecError, OverflowError) as e:  # Overflow: a 400-digit integer
            raise InvalidRequest(f"plan.codec: {e}") from e
        plan = cls(
            rounds=f.integer("rounds", 10, minimum=1, maximum=1_000_000),
            goal=f.integer("goal", 10, minimum=1, maximum=1_000_000),
            over_selection=f.number("over_selection", 1.3, minimum=1.0, maximum=10.0),
            min_reporting_fraction=f.number(
                "min_reporting_fraction", 0.8, minimum=0.0, maximum=1.0, exclusive_min=True
            ),
            selection_window_s=f.number("selection_window_s", 10.0, minimum=0.0, maximum=86400.0),
            selection_timeout_s=f.number(
                "selection_timeout_s",
                DEFAULT_SELECTION_TIMEOUT_S,
                minimum=0.0,
                maximum=7 * 86400.0,
                exclusive_min=True,
            ),
            round_deadline_s=f.number(
                "round_deadline_s", 120.0, minimum=0.0, maximum=7 * 86400.0, exclusive_min=True
            ),
            max_candidates_factor=f.number(
                "max_candidates_factor", 4.0, minimum=1.0, maximum=100.0
            ),
            epochs=f.integer("epochs", 1, minimum=1, maximum=10_000),
            steps=f.integer("steps", None, minimum=1, maximum=10_000_000),
            batch_size=f.integer("batch_size", 32, minimum=1, maximum=1_000_000),
            lr=f.number("lr", 0.05, minimum=0.0, exclusive_min=True),
            lr_decay=f.number("lr_decay", 1.0, minimum=0.0, maximum=1.0, exclusive_min=True),
            prox_mu=f.number("prox_mu", 0.0, minimum=0.0),
            # Sent to devices, like steps: Android parses it as a 32-bit Int and refuses the
            # whole plan past that; re-checking less often than every 10M steps is never.
            recheck_every_steps=f.integer(
                "recheck_every_steps", 5, minimum=1, maximum=10_000_000
            ),
            batchnorm=f.string("batchnorm", "aggregate", choices=BATCHNORM_MODES),
            codec=codec,
            eligibility=TaskEligibility.from_json(f.raw("eligibility")),
            server_optimizer=ServerOptimizerSpec.from_json(f.raw("server_optimizer")),
            # An explicit null lifts the bound; absent means the default.
            max_update_norm=None
            if "max_update_norm" in f.obj and f.raw("max_update_norm") is None
            else f.number("max_update_norm", 1e4, minimum=0.0, exclusive_min=True),
            # Weights are float64 and counts SQLite integers: keep every count exact.
            max_examples=f.integer("max_examples", 1_000_000, minimum=1, maximum=2**53),
            robust=RobustSpec.from_json(f.raw("robust")),
            eval_goal=f.integer("eval_goal", None, minimum=1, maximum=1_000_000),
            wait_for_all=f.boolean("wait_for_all", False),
            first_come=f.boolean("first_come", False),
            buffer=AsyncConfig.from_fields(f),
        )
        dp_raw = f.raw("dp")
        secagg_raw = f.raw("secagg")
        f.done()
        if not f.has("selection_timeout_s"):  # the default never cuts a long window short
            timeout = max(DEFAULT_SELECTION_TIMEOUT_S, plan.selection_window_s)
            plan = dataclasses.replace(plan, selection_timeout_s=timeout)
        elif plan.selection_timeout_s < plan.selection_window_s:
            raise InvalidRequest(
                "plan.selection_timeout_s must be at least plan.selection_window_s"
            )
        if plan.first_come and (plan.wait_for_all or dp_raw is not None or secagg_raw is not None):
            raise InvalidRequest(
                "plan.first_come cannot be combined with wait_for_all, dp or secagg: they need "
                "a cohort drawn from a selection window"
            )
        if plan.wait_for_all:
            if f.has("over_selection") and plan.over_selection != 1.0:
                raise InvalidRequest("plan.over_selection must be 1 (or absent) with wait_for_all")
            plan = dataclasses.replace(plan, over_selection=1.0)
        if dp_raw is not None and secagg_raw is None:
            # "robust": "none" (as a stored DP plan says) is what DP-FedAvg does anyway
            plan = plan._with_dp(
                dp_raw, robust_given=f.has("robust") and not plan.robust.undefended
            )
        if secagg_raw is not None:
            plan = plan._with_secagg(
                secagg_raw, dp_raw, robust_given=f.has("robust") and not plan.robust.undefended
            )
        return plan

    def _with_secagg(self, raw: Any, dp_raw: Any, *, robust_given: bool) -> TaskPlan:
        if robust_given:
            raise InvalidRequest(
                "plan.robust cannot be combined with plan.secagg: the server sees only the "
                "sum of the round's updates, so no robust aggregator can look at one; each "
                "update is clipped on the device to plan.secagg.clip instead"
            )
        spec = SecAggSpec.from_json(raw, cohort=self.target, goal=self.goal)
        if self.goal - 1 < spec.threshold:
            # Stage 1 closes at goal advertisers, each with at most goal - 1 neighbours
            # among them: with fewer than the threshold, every round would be abandoned.
            raise InvalidRequest(
                f"plan.secagg: goal {self.goal} leaves each device at most {self.goal - 1} "
                f"neighbours, fewer than the Shamir threshold {spec.threshold} of a "
                f"{self.target}-device cohort; raise goal or lower over_selection"
            )
        if dp_raw is not None:  # distributed DP: each device noises its own update
            try:  # the privacy extra (dp-accounting), as for central DP
                from coordinator.secagg.dp import DistributedDp
            except ImportError as e:
                raise InvalidRequest(f"plan.dp needs the coordinator's privacy extra: {e}") from e
            # The fewest survivors a round can commit with: min_reports, or the SecAgg
            # threshold of the smallest cohort selection allows (it grows with the cohort),
            # and never one (SecAggSession.start): sized for one, each device would add
            # twice the noise the plan's noise_multiplier asks of a sum of two.
            smallest = max(2, min(self.min_reports, self.target))
            fewest = max(2, self.min_reports, spec.graph_parameters(smallest)[1])
            dp = DistributedDp.from_json(
                dp_raw, levels=spec.levels, rounds=self.rounds, min_survivors=fewest
            )
            spec = spec.with_dp(dp, clip_given=isinstance(raw, dict) and "clip" in raw)
        return dataclasses.replace(self, secagg=spec, robust=RobustSpec.none())

    def _with_dp(self, raw: Any, *, robust_given: bool) -> TaskPlan:
        try:  # the privacy extra (dp-accounting) is optional for coordinators without DP
            from coordinator.privacy import DpSpec
        except ImportError as e:
            raise InvalidRequest(f"plan.dp needs the coordinator's privacy extra: {e}") from e
        if robust_given:
            # Robust aggregators and adaptive clipping look at individual updates in ways the
            # Gaussian mechanism's sensitivity (clip / goal per device) does not account for.
            raise InvalidRequest(
                "plan.robust cannot be combined with plan.dp: DP-FedAvg clips every update "
                "to dp.clip itself and averages with equal weights"
            )
        window = math.ceil(self.target * self.max_candidates_factor)  # the selection's cap
        dp = DpSpec.from_json(raw, rounds=self.rounds, cohort=self.target, window=window)
        return dataclasses.replace(self, dp=dp, robust=RobustSpec.none())

    def check_mode(self, mode: str) -> None:
        """Refuse plan options the task's mode cannot honour."""
        # A sync round commits with min_reports, an async buffer with buffer_k: each mode's
        # count alone, so that a field the mode ignores (goal, buffer_k) refuses nothing.
        self.robust.check_updates_per_aggregate(
            self.buffer.buffer_k if mode == "async" else self.min_reports
        )
        if mode == "async" and self.secagg is not None:
            # docs/benchmarks.md, "Secure aggregation": four stages of round trips per buffer
            raise InvalidRequest(
                "plan.secagg is not available in async mode: a SecAgg+ instance needs its "
                "cohort fixed and four stages of round trips, which per FedBuff buffer of "
                "buffer_k devices costs each device more than its training; use sync rounds"
            )
        if mode == "async" and self.dp is not None:
            raise InvalidRequest(
                "plan.dp is not available in async mode: the accountant's fixed-size cohort "
                "sampling (replace-one) does not describe FedBuff's first-come buffers; use "
                "sync rounds"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "goal": self.goal,
            "over_selection": self.over_selection,
            "min_reporting_fraction": self.min_reporting_fraction,
            "selection_window_s": self.selection_window_s,
            "selection_timeout_s": self.selection_timeout_s,
            "round_deadline_s": self.round_deadline_s,
            "max_candidates_factor": self.max_candidates_factor,
            **self.client_json(),
            "eligibility": self.eligibility.to_json(),
            "server_optimizer": self.server_optimizer.to_json(),
            "max_update_norm": self.max_update_norm,
            "max_examples": self.max_examples,
            "robust": self.robust.to_json(),
            "eval_goal": self.eval_goal,
            "wait_for_all": self.wait_for_all,
            "first_come": self.first_come,
            **self.buffer.to_plan(),
            **({} if self.dp is None else {"dp": self.dp.to_json()}),
            **({} if self.secagg is None else self.secagg.plan_json()),
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
            "batchnorm": self.batchnorm,
            **({} if self.dp is None else {"dp": self.dp.client_json()}),
            **({} if self.secagg is None else {"secagg": self.secagg.client_json()}),
        }


def calibrate_ahead(body: bytes) -> None:
    """Validate a task-create body's plan once for a side effect: a ``dp.epsilon`` target's
    noise calibration (``coordinator.privacy.noise_for_budget``, up to seconds of accountant
    time under load) lands in that function's cache. The HTTP layer runs this on a spare
    thread before queueing the request, so that the serialized worker which device requests
    wait behind finds the answer there. Errors are left to the worker's own validation."""
    try:
        raw = json.loads(body)
        plan = raw.get("plan") if isinstance(raw, dict) else None
        dp = plan.get("dp") if isinstance(plan, dict) else None
        if isinstance(dp, dict) and "epsilon" in dp:
            TaskPlan.from_json(plan)
    except (ValueError, TypeError, ApiError):
        pass
