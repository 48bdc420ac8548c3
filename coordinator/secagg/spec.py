"""The ``secagg`` key of a task plan: how a sync round's secure aggregation is sized.

::

    >>> spec = SecAggSpec.from_json({"dropout": 0.3, "clip": 1.0}, cohort=13)
    >>> spec.ring_spec.bits               # the smallest ring the sum of 13 vectors cannot wrap
    22

``dropout`` is the fraction of the cohort the neighbour graph is sized to lose (its degree
and Shamir threshold come from :func:`edge_sdk.secagg.graph.parameters`); ``clip`` the L2
norm each update is clipped to on the device; ``levels`` the quantisation levels of
``[-clip, clip]``; ``max_weight`` the cap on a device's weight (its example count), which
rides in the vector as one more coordinate; ``stage_timeout_s`` each stage's deadline after
the first (the first is the round's training deadline).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from coordinator.errors import InvalidRequest
from coordinator.validation import Fields
from edge_sdk.secagg import graph, ring

if TYPE_CHECKING:
    from coordinator.secagg.dp import DistributedDp

__all__ = ["SecAggSpec"]


@dataclass(frozen=True)
class SecAggSpec:
    dropout: float = 0.3
    clip: float = 1.0
    levels: int = 2**16
    max_weight: int = 1000
    stage_timeout_s: float = 60.0
    cohort: int = 2  # the round's target: the most vectors a sum can hold
    goal: int | None = None  # stage 1 closes at this many advertisers (None: the cohort)
    dp: DistributedDp | None = None  # distributed DP (coordinator.secagg.dp): noise per device

    @classmethod
    def from_json(cls, raw: Any, *, cohort: int, goal: int | None = None) -> SecAggSpec:
        f = Fields(raw, "plan.secagg")
        spec = cls(
            dropout=f.number("dropout", 0.3, minimum=0.0, maximum=0.5, exclusive_max=True),
            clip=f.number("clip", 1.0, minimum=0.0, maximum=1e6, exclusive_min=True),
            levels=f.integer("levels", 2**16, minimum=1, maximum=2**40),
            max_weight=f.integer("max_weight", 1000, minimum=1, maximum=2**20),
            stage_timeout_s=f.number(
                "stage_timeout_s", 60.0, minimum=0.0, maximum=86400.0, exclusive_min=True
            ),
            cohort=cohort,
            goal=goal,
        )
        f.done()
        if cohort < 2:
            raise InvalidRequest(
                "plan.secagg needs a cohort of at least 2 devices (goal x over_selection)"
            )
        return spec._checked()

    def with_dp(self, dp: DistributedDp, *, clip_given: bool) -> SecAggSpec:
        """The spec with distributed DP: the ring clips to ``dp.clip`` and holds the noise."""
        if clip_given and self.clip != dp.clip:
            raise InvalidRequest("plan.secagg.clip must equal plan.dp.clip (or be left out)")
        return replace(self, clip=dp.clip, dp=dp)._checked()

    def _checked(self) -> SecAggSpec:
        try:
            self.ring_spec  # noqa: B018  # sized now: a plan whose sum cannot fit is refused here
        except ring.RingError as e:
            raise InvalidRequest(f"plan.secagg: {e}") from e
        return self

    @property
    def ring_spec(self) -> ring.RingSpec:
        headroom = 0 if self.dp is None else self.dp.headroom(self.cohort)
        return ring.RingSpec.for_cohort(
            self.cohort, self.clip, self.levels, self.max_weight, headroom
        )

    def graph_dropout(self, cohort: int) -> float:
        """The fraction of a ``cohort`` its neighbour graph must be able to lose: stage 1
        closes at ``goal`` advertisers, which leaves out the over-selected rest, and then
        ``dropout`` of those may vanish."""
        kept = min(self.goal or cohort, cohort) / cohort
        return 1.0 - (1.0 - self.dropout) * kept

    def graph_parameters(self, cohort: int) -> tuple[int, int]:
        """``(degree, threshold)`` of a ``cohort``'s neighbour graph."""
        return graph.parameters(cohort, self.graph_dropout(cohort))

    @property
    def threshold(self) -> int:
        return self.graph_parameters(self.cohort)[1]

    def to_json(self) -> dict[str, Any]:
        return {
            "dropout": self.dropout,
            "clip": self.clip,
            "levels": self.levels,
            "max_weight": self.max_weight,
            "stage_timeout_s": self.stage_timeout_s,
        }

    def plan_json(self) -> dict[str, Any]:
        """The stored plan's keys: ``secagg``, and ``dp`` with distributed DP."""
        return {"secagg": self.to_json(), **({} if self.dp is None else {"dp": self.dp.to_json()})}

    def client_json(self) -> dict[str, Any]:
        """What a device needs to encode its update: the ring (and the clip it implies)."""
        r = self.ring_spec
        return {"bits": r.bits, "clip": r.clip, "levels": r.levels, "max_weight": r.max_weight,
                "stage_timeout_s": self.stage_timeout_s,
                **({} if self.dp is None else {"dp": self.dp.client_json()})}  # fmt: skip
