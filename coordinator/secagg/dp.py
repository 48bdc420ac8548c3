"""Distributed DP of a SecAgg task: a plan with ``dp`` together with ``secagg``.

Every device of the round clips its update to ``dp.clip``, encodes it into the ring with
equal weight (``max_weight``, as DP-FedAvg weighs each device 1), re-rounds until the
rounded vector's L2 norm is within :attr:`DistributedDp.norm_bound` (the conditional
randomized rounding of Kairouz, Liu, Steinke, ICML 2021), then adds discrete Gaussian noise
of variance :attr:`DistributedDp.sigma2` to every coordinate before masking
(``edge_sdk/secagg/noise.py``). The server unmasks only the noisy sum.

``noise_multiplier`` keeps its central-DP meaning: the noise on the sum has standard
deviation ``noise_multiplier * clip`` (in ring units ``noise_multiplier * levels``) even when
only ``min_survivors`` devices' noise is in it, the fewest a round of this plan can commit
with; each device therefore adds ``(noise_multiplier * levels)**2 / min_survivors``. A round
is accounted by :mod:`coordinator.privacy_distributed` with the committing session's own
``min_survivors`` (at least the plan's), whatever the real number of survivors: the server
could otherwise claim dropouts to spend less. The ring is widened by
:func:`~coordinator.privacy_distributed.noise_headroom` of the whole cohort's noise so that
the noisy sum cannot wrap.

``epsilon`` instead of ``noise_multiplier``: the smallest noise (bisected to 0.1 %) whose
``rounds`` rounds stay within it at ``delta``; no amplification by sampling is counted.

Must not import: ``coordinator.service``, aiohttp, torch. Needs the ``privacy`` extra.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from dp_accounting.rdp import RdpAccountant

from coordinator.errors import InvalidRequest
from coordinator.privacy import DpSpec, Ledger
from coordinator.privacy_distributed import (
    DistributedRound,
    distributed_epsilon,
    noise_headroom,
    rounded_norm_bound,
)
from coordinator.validation import Fields

__all__ = ["BETA", "SIZING_DIM", "DistributedDp", "ledger_plus", "round_record"]

_WHERE = "plan.dp"
# The conditional rounding's bound is exceeded with probability at most BETA per attempt
# (Kairouz et al.'s choice, exp(-1/2)): a device rounds about 2.5 times on average.
BETA = math.exp(-0.5)
# The norm bound and the ring's headroom are fixed at plan time, before the model's size is
# known: sized for this many coordinates, which only overstates both for smaller models.
SIZING_DIM = 10**7
# sigma2 is sent as an exact fraction; rounded up to this denominator (more noise, not less).
_SIGMA2_DENOMINATOR = 1024
_SIGMA2_MAX = 2**100  # edge_sdk.secagg.dgauss.sample's int64 draws


@dataclass(frozen=True)
class DistributedDp:
    clip: float
    noise_multiplier: float
    delta: float
    budget: float | None
    levels: int  # the ring's quantisation levels of [-clip, clip]
    min_survivors: int  # the fewest survivors a round of the plan can commit with

    @classmethod
    def from_json(cls, obj: Any, *, levels: int, rounds: int, min_survivors: int) -> DistributedDp:
        f = Fields(obj, _WHERE)
        if f.has("adaptive"):
            raise InvalidRequest(
                f"{_WHERE}.adaptive needs central DP: with plan.secagg the server never sees an "
                "update, so it cannot count the clipped ones"
            )
        clip = f.number("clip", None, minimum=0.0, maximum=1e6, exclusive_min=True)
        z = f.number("noise_multiplier", None, minimum=0.0, maximum=1e4, exclusive_min=True)
        delta = f.number("delta", 1e-5, minimum=0.0, maximum=0.1, exclusive_min=True)
        budget = f.number("budget", None, minimum=0.0, maximum=1e4, exclusive_min=True)
        epsilon = f.number("epsilon", None, minimum=0.0, maximum=1e3, exclusive_min=True)
        f.done()
        if clip is None:
            raise InvalidRequest(f"{_WHERE}.clip is required")
        if (z is None) == (epsilon is None):
            raise InvalidRequest(f"{_WHERE} needs exactly one of noise_multiplier and epsilon")
        out = cls(clip, z or 1.0, delta, budget, levels, max(1, min_survivors))
        if epsilon is not None:
            out = dataclasses.replace(
                out,
                noise_multiplier=out._calibrate(epsilon, rounds),
                budget=epsilon if budget is None else min(budget, epsilon),
            )
        if out.sigma2 < Fraction(1, 4):
            raise InvalidRequest(
                f"{_WHERE}: each device's noise variance {float(out.sigma2):.3g} (ring units) is "
                "below the accountant's 1/4: raise plan.secagg.levels or dp.noise_multiplier"
            )
        if out.sigma2 > _SIGMA2_MAX:
            raise InvalidRequest(
                f"{_WHERE}: each device's noise variance {float(out.sigma2):.3g} (ring units) is "
                "above the device sampler's 2**100: lower plan.secagg.levels or the noise"
            )
        return out

    @property
    def sigma2(self) -> Fraction:
        """Each device's variance in ring units: the plan's total over ``min_survivors``."""
        total = (self.noise_multiplier * self.levels) ** 2
        return Fraction(math.ceil(total / self.min_survivors * _SIGMA2_DENOMINATOR),
                        _SIGMA2_DENOMINATOR)  # fmt: skip

    @property
    def norm_bound(self) -> float:
        """The L2 norm, in ring units, that a device's rounded vector is kept within."""
        return rounded_norm_bound(float(self.levels), SIZING_DIM, BETA)

    def headroom(self, cohort: int) -> int:
        """Ring units the whole cohort's summed noise may add to a coordinate (but 1e-12)."""
        return noise_headroom(cohort, float(self.sigma2), SIZING_DIM)

    def round(self, dim: int, min_survivors: int) -> DistributedRound:
        """One committed round, as the accountant sees it."""
        return DistributedRound(dim, self.norm_bound, min_survivors, float(self.sigma2))

    def rdp(self, dim: int, min_survivors: int) -> np.ndarray:
        """At the accountant's default orders, as the central ledger stores its RDP."""
        return self.round(dim, min_survivors).rdp(RdpAccountant().orders)

    def _calibrate(self, epsilon: float, rounds: int) -> float:
        z = _calibrated(epsilon, rounds, self.delta, self.levels, self.min_survivors)
        if z is None:
            raise InvalidRequest(f"{_WHERE}.epsilon: no noise multiplier reaches that budget")
        return z

    def to_json(self) -> dict[str, Any]:
        """The stored plan's ``dp``: the same fields as central DP's, the noise resolved."""
        return DpSpec(self.clip, self.noise_multiplier, self.delta, self.budget).to_json()

    def client_json(self) -> dict[str, Any]:
        """What a device needs: its exact noise variance and the norm bound it rounds to."""
        s = self.sigma2
        return {"sigma2": f"{s.numerator}/{s.denominator}", "norm_bound": self.norm_bound}


@functools.lru_cache(maxsize=256)
def _calibrated(
    epsilon: float, rounds: int, delta: float, levels: int, min_survivors: int
) -> float | None:
    """The bisection behind ``epsilon`` (about a second of accountant time): cached, so that
    the create request's spare-thread pass (``coordinator.plan.calibrate_ahead``) leaves the
    answer for the worker."""
    base = DistributedDp(1.0, 1.0, delta, None, levels, min_survivors)

    def spent(z: float) -> float:
        at = dataclasses.replace(base, noise_multiplier=z)
        return distributed_epsilon([(at.round(SIZING_DIM, min_survivors), rounds)], delta)

    lo, hi = 1e-3, 1e4
    if spent(hi) > epsilon:
        return None
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if spent(mid) <= epsilon else (mid, hi)
    return hi


def ledger_plus(ledger: Ledger, rdp: np.ndarray) -> Ledger:
    """``ledger`` (the central ledger's, from the previous commit's record) with one more
    distributed round's RDP composed in: RDP adds order by order."""
    return Ledger(ledger.delta, prior=tuple(float(x) for x in ledger.rdp() + rdp))


def round_record(
    dp: DistributedDp, ledger: Ledger, *, dim: int, min_survivors: int, survivors: int,
    cohort: int, goal: int, released: int,
) -> dict[str, Any]:  # fmt: skip
    """What a committed round stores under ``metrics["dp"]`` (``ledger`` includes it), with
    the keys the central ledger reads back (``rounds``, ``rdp``, ``epsilon``, ...)."""
    return {
        "mechanism": "distributed_discrete_gaussian",
        "noise_multiplier": dp.noise_multiplier,
        "clip": dp.clip,
        "sigma2": float(dp.sigma2),  # each device's, in ring units
        "norm_bound": dp.norm_bound,
        "dim": dim,
        "min_survivors": min_survivors,  # what the round is accounted with
        "survivors": survivors,
        "cohort": cohort,
        "denominator": goal,
        "reports": survivors,
        "delta": ledger.delta,
        "epsilon": ledger.epsilon(),
        "budget": dp.budget,
        "rounds": released + 1,
        "rdp": [float(x) for x in ledger.rdp()],
    }
