"""Differential-privacy accounting for DP-FedAvg tasks: what a task has spent, and can spend.

Owns the arithmetic of the privacy ledger, on Google's maintained ``dp-accounting`` library;
nothing here touches HTTP, the store or any update. One round of DP-FedAvg (McMahan et al.
2018) samples a fixed-size cohort of ``cohort`` devices out of ``population`` eligible ones,
clips each device's update to L2 norm ``clip`` and adds Gaussian noise of standard deviation
``noise_multiplier * clip`` to the sum: a ``SampledWithoutReplacementDpEvent`` over a
``GaussianDpEvent``, which the RDP accountant handles under the replace-one neighbouring
relation (a fixed-size cohort cannot be neighbours by adding or removing one device).
dp-accounting takes a mechanism's noise relative to its sensitivity under that relation, and
replacing one device moves the clipped sum by up to ``2 * clip``: the Gaussian event's noise
multiplier is therefore ``noise_multiplier / 2`` (checked against the exact curve of the
Gaussian mechanism in the tests; passing ``noise_multiplier`` would understate epsilon). Rounds
compose; identical rounds are grouped so that a long task stays cheap to account::

    ledger = Ledger(delta=1e-5)
    ledger = ledger.plus(Round(population=1000, cohort=50, noise_multiplier=1.0))
    ledger.epsilon()                  # spent so far, at the task's delta
    ledger.would_exceed(next_round, budget=8.0)

Must not import: ``coordinator.service``, aiohttp, torch. Needs the ``privacy`` extra.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

__all__ = ["Ledger", "Round", "noise_for_budget"]


@dataclass(frozen=True, order=True)
class Round:
    """One DP round: ``cohort`` devices drawn without replacement from ``population``."""

    population: int
    cohort: int
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not 1 <= self.cohort <= self.population:
            raise ValueError("a round samples between 1 and `population` devices")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError("the noise multiplier must be a positive finite number")

    def event(self) -> dp_event.DpEvent:
        return dp_event.SampledWithoutReplacementDpEvent(
            self.population, self.cohort, dp_event.GaussianDpEvent(self.noise_multiplier / 2)
        )


@dataclass(frozen=True)
class Ledger:
    """The rounds a task has released, and the epsilon they cost at ``delta``."""

    delta: float
    rounds: tuple[tuple[Round, int], ...] = field(default=())

    def __post_init__(self) -> None:
        if not 0.0 < self.delta < 1.0:
            raise ValueError("delta must be in (0, 1)")

    def plus(self, rnd: Round, times: int = 1) -> Ledger:
        counts = Counter(dict(self.rounds))
        counts[rnd] += times
        return Ledger(self.delta, tuple(sorted(counts.items())))

    def epsilon(self) -> float:
        if not self.rounds:
            return 0.0
        accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
        accountant.compose(
            dp_event.ComposedDpEvent(
                [dp_event.SelfComposedDpEvent(r.event(), n) for r, n in self.rounds]
            )
        )
        return float(accountant.get_epsilon(self.delta))

    def would_exceed(self, rnd: Round, budget: float) -> bool:
        """Whether releasing ``rnd`` next would take the task past ``budget``."""
        return self.plus(rnd).epsilon() > budget


def noise_for_budget(
    budget: float, population: int, cohort: int, rounds: int, delta: float
) -> float:
    """The smallest noise multiplier (to 1 %) whose ``rounds`` rounds stay within ``budget``."""
    if not (math.isfinite(budget) and budget > 0) or rounds < 1:
        raise ValueError("the budget must be positive and finite, rounds at least 1")

    def spent(z: float) -> float:
        return Ledger(delta).plus(Round(population, cohort, z), rounds).epsilon()

    low, high = 1e-3, 1.0
    while spent(high) > budget:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError("no noise multiplier reaches that budget")
    while high - low > 1e-2 * high:
        mid = (low + high) / 2
        low, high = (low, mid) if spent(mid) <= budget else (mid, high)
    return high
