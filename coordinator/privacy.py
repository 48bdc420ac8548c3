"""Differential-privacy accounting for DP-FedAvg tasks: what a task has spent, and can spend.

Owns the arithmetic of the privacy ledger, on Google's maintained ``dp-accounting`` library,
and the noised mean of a DP commit; nothing here touches HTTP or the store. One round of
DP-FedAvg (McMahan et al. 2018) samples a fixed-size cohort of ``cohort`` devices out of
``population`` eligible ones, clips each device's update to L2 norm ``clip`` and adds
Gaussian noise of standard deviation ``noise_multiplier * clip`` to the sum: a
``SampledWithoutReplacementDpEvent`` over a ``GaussianDpEvent``, which the RDP accountant
handles under the replace-one neighbouring relation (a fixed-size cohort cannot be
neighbours by adding or removing one device). dp-accounting takes a mechanism's noise
relative to its sensitivity under that relation, and replacing one device moves the clipped
sum by up to ``2 * clip``: the Gaussian event's noise multiplier is therefore
``noise_multiplier / 2`` (checked against the exact curve of the Gaussian mechanism in the
tests; passing ``noise_multiplier`` would understate epsilon). Rounds compose; identical
rounds are grouped so that a long task stays cheap to account::

    ledger = Ledger(delta=1e-5)
    ledger = ledger.plus(Round(population=1000, cohort=50, noise_multiplier=1.0))
    ledger.epsilon()                  # spent so far, at the task's delta
    ledger.would_exceed(next_round, budget=8.0)

The plan's ``dp`` object (:class:`DpSpec`) and the commit's noised mean
(:func:`noised_mean`) live here too: every DP-FedAvg device weighs the same and the sum is
divided by the round's goal whatever the number of reports (the paper's fixed denominator),
so that one device moves the mean by at most ``clip / goal``. The noise comes from AES-CTR
keyed by 32 bytes of ``os.urandom`` drawn at each commit and never stored: nobody, the
coordinator's operator included, can subtract it again. Each committed round records its
``(population, cohort, noise_multiplier)`` in its metrics, in the version's transaction
(:func:`round_record`), with the RDP of all rounds so far summed
at the accountant's orders (RDP composes by addition; ``dp_accounting``'s own
``compute_epsilon`` turns it into epsilon); the next commit starts from there
(:func:`ledger_after`), so retention deleting old rounds loses no privacy spent, and a
commit costs one new RDP computation however long the task ran.

With the plan's ``dp.adaptive`` (:class:`AdaptiveClip`; Andrew et al., NeurIPS 2021) the
bound follows a quantile of the update norms: each commit also releases the count of updates
left unclipped, noised, and records the next round's bound (``clip_next``); a round then
records its update noise and its count's noise, and :meth:`Round.gaussian` accounts for both
as one Gaussian mechanism.

Must not import: ``coordinator.service``, aiohttp, torch. Needs the ``privacy`` extra.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

from coordinator.errors import InvalidRequest
from coordinator.robust.clipping import geometric_step
from coordinator.validation import Fields
from edge_sdk.secagg.crypto import mask_stream

__all__ = [
    "BUDGET_REASON",
    "NOISE_GRID",
    "AdaptiveClip",
    "DpSpec",
    "Ledger",
    "Round",
    "gaussian_noise",
    "ledger_after",
    "noise_for_budget",
    "noise_grid",
    "noised_mean",
    "privacy_json",
    "round_record",
]

# Why a task stopped (round metrics ``reason``, task JSON ``completed_reason``).
BUDGET_REASON = "privacy_budget"
_WHERE = "plan.dp"


@dataclass(frozen=True, order=True)
class Round:
    """One DP round: ``cohort`` devices drawn without replacement from ``population``."""

    population: int
    cohort: int
    noise_multiplier: float
    # Adaptive clipping's noise on the count of unclipped updates (0: not adaptive).
    bit_noise: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.cohort <= self.population:
            raise ValueError("a round samples between 1 and `population` devices")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError("the noise multiplier must be a positive finite number")
        if not (math.isfinite(self.bit_noise) and self.bit_noise >= 0):
            raise ValueError("the bit noise must be a finite number >= 0")

    def gaussian(self) -> float:
        """The round's noise relative to its sensitivity under replace-one, as ONE Gaussian
        mechanism: the update sum (sensitivity ``2 C``, noise ``z C``) and, if adaptive, the
        bit count (sensitivity 1, noise ``bit_noise``) released together; two Gaussian
        mechanisms on one input compose to one with ``(a**-2 + b**-2) ** -0.5``
        (Andrew et al. 2021, Thm 1)."""
        z = self.noise_multiplier / 2
        if not self.bit_noise:
            return z
        return float((z**-2 + self.bit_noise**-2) ** -0.5)

    def event(self) -> dp_event.DpEvent:
        return dp_event.SampledWithoutReplacementDpEvent(
            self.population, self.cohort, dp_event.GaussianDpEvent(self.gaussian())
        )


@functools.lru_cache(maxsize=4096)
def _round_rdp(rnd: Round) -> tuple[float, ...]:
    """One round's RDP at each of the accountant's orders (computing it for a
    sampled-without-replacement event takes about a second: done once per distinct round)."""
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    accountant.compose(rnd.event())
    return tuple(float(x) for x in accountant.rdp)


def _orders() -> tuple[float, ...]:
    return tuple(float(x) for x in RdpAccountant().orders)


# RDP composes by addition, order by order; an order whose bound is infinite (or beyond any
# useful value) is stored as this, which no epsilon ever comes from, so that it fits JSON.
_RDP_CAP = 1e300


@dataclass(frozen=True)
class Ledger:
    """The rounds a task has released, and the epsilon they cost at ``delta``.

    ``prior``: the summed RDP (at the accountant's orders) of rounds released before these,
    as a previous commit stored it (:func:`ledger_after`); empty for none.
    """

    delta: float
    rounds: tuple[tuple[Round, int], ...] = field(default=())
    prior: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        if not 0.0 < self.delta < 1.0:
            raise ValueError("delta must be in (0, 1)")
        if self.prior and len(self.prior) != len(_orders()):
            raise ValueError("prior RDP of the wrong length for the accountant's orders")

    def plus(self, rnd: Round, times: int = 1) -> Ledger:
        counts = Counter(dict(self.rounds))
        counts[rnd] += times
        return Ledger(self.delta, tuple(sorted(counts.items())), self.prior)

    def rdp(self) -> np.ndarray:
        """The composed RDP of every round, at the accountant's orders (what
        ``RdpAccountant`` adds up internally when it composes the same events)."""
        total = np.array(self.prior or np.zeros(len(_orders())), dtype=np.float64)
        for r, n in self.rounds:
            total += n * np.array(_round_rdp(r))
        return np.minimum(total, _RDP_CAP)

    def epsilon(self) -> float:
        if not self.rounds and not any(self.prior):
            return 0.0
        eps, _ = compute_epsilon(_orders(), self.rdp(), self.delta)
        return float(eps)

    def would_exceed(self, rnd: Round, budget: float) -> bool:
        """Whether releasing ``rnd`` next would take the task past ``budget``."""
        return self.plus(rnd).epsilon() > budget


# Calibrated noise multipliers are powers of this (steps of 0.5 %): "the smallest grid point
# that keeps the budget" is one exact answer, whatever search finds it.
NOISE_GRID = 1.005
_K_MIN = math.ceil(math.log(1e-3) / math.log(NOISE_GRID))
_K_MAX = math.floor(math.log(1e4) / math.log(NOISE_GRID))
# The calibration's first pass looks at these orders only (all cheap to compute); an epsilon
# from fewer orders is never smaller than the accountant's, so it can only overshoot the noise.
_COARSE_ORDERS = (1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 32.0, 48.0, 63.0)


def noise_grid(k: int) -> float:
    return float(NOISE_GRID**k)


def _epsilon(rnd: Round, rounds: int, delta: float, orders: Sequence[float] | None) -> float:
    """Epsilon of ``rounds`` such rounds at ``delta``, from ``orders`` (None: all of the
    accountant's, exactly what the ledger computes)."""
    if orders is None:
        return Ledger(delta).plus(rnd, rounds).epsilon()
    accountant = RdpAccountant(orders, NeighboringRelation.REPLACE_ONE)
    accountant.compose(rnd.event(), rounds)
    return float(accountant.get_epsilon(delta))


def _first_within(spent: Any, budget: float, guess: int, hi: int | None = None) -> int:
    """The smallest grid index ``k`` with ``spent(k) <= budget`` (``spent`` decreasing in
    ``k``), from a ``guess``; ``hi``: an index already known to be within. Brackets the answer,
    then interpolates ``log spent`` linearly in ``k`` (epsilon is close to a power of the
    noise) and checks the neighbour of each interpolated point, which usually ends the search
    in two evaluations; halves the bracket when interpolation cannot help."""
    lo, margin = None, 2
    k = min(max(guess, _K_MIN), _K_MAX if hi is None else hi)
    while lo is None or hi is None:  # bracket: spent(lo) > budget >= spent(hi)
        e = spent(k)
        if e <= budget:
            hi = k
        else:
            lo = k
        if lo is not None and hi is not None:
            break
        if (k == _K_MIN and lo is None) or (k == _K_MAX and hi is None):
            if hi is not None:
                return hi
            raise ValueError("no noise multiplier reaches that budget")
        # Jump as if epsilon were inversely proportional to the noise, a little past.
        jump = math.log(e / budget) / math.log(NOISE_GRID) if 0 < e < math.inf else 0
        k += round(jump) + (margin if lo is not None else -margin)
        k = min(max(k, _K_MIN), _K_MAX)
        margin *= 4
    while hi - lo > 1:
        a, b = spent(lo), spent(hi)
        mid = (lo + hi) // 2
        if math.isfinite(a) and a > b > 0:
            t = (math.log(a) - math.log(budget)) / (math.log(a) - math.log(b))
            mid = min(hi - 1, max(lo + 1, round(lo + t * (hi - lo))))
        if spent(mid) <= budget:
            hi = mid
            if mid - 1 > lo and spent(mid - 1) > budget:
                lo = mid - 1
        else:
            lo = mid
            if mid + 1 < hi and spent(mid + 1) <= budget:
                hi = mid + 1
    return hi


@functools.lru_cache(maxsize=256)
def noise_for_budget(
    budget: float, population: int, cohort: int, rounds: int, delta: float
) -> float:
    """The smallest noise multiplier on the grid ``NOISE_GRID ** k`` whose ``rounds`` rounds
    stay within ``budget`` at ``delta`` by the ledger's accountant.

    Cached, and run for a create request on a spare thread before the request reaches the
    serialized worker (:func:`coordinator.plan.calibrate_ahead`). A search on a few cheap RDP
    orders, a second on the accountant's orders around the best of those, then one evaluation
    with all of its orders one grid step below the answer (epsilon from a subset of orders is
    never below the accountant's, so the answer can only be too high, and that check proves it
    is not). About ten evaluations of a few orders and one full one, against a dozen full ones
    for a plain bisection; the answer is the same grid point.
    """
    if not (math.isfinite(budget) and budget > 0) or rounds < 1:
        raise ValueError("the budget must be positive and finite, rounds at least 1")
    full = _orders()

    def at(orders: Sequence[float] | None) -> Any:
        cache: dict[int, float] = {}

        def spent(k: int) -> float:
            if k not in cache:
                cache[k] = _epsilon(Round(population, cohort, noise_grid(k)), rounds, delta,
                                    orders)  # fmt: skip
            return cache[k]

        return spent

    coarse = at(_COARSE_ORDERS)
    k = _first_within(coarse, budget, 0)
    # The orders around the coarse pass's best one at its answer.
    best = _optimal_order(Round(population, cohort, noise_grid(k)), rounds, delta)
    i = _COARSE_ORDERS.index(best)
    low = _COARSE_ORDERS[max(0, i - 1)]
    high = _COARSE_ORDERS[min(len(_COARSE_ORDERS) - 1, i + 1)]
    k = _first_within(at([a for a in full if low <= a <= high]), budget, k, hi=k)
    exact = at(None)
    if k == _K_MIN or exact(k - 1) > budget:
        return noise_grid(k)
    return noise_grid(_first_within(exact, budget, k - 1, hi=k - 1))


def _optimal_order(rnd: Round, rounds: int, delta: float) -> float:
    accountant = RdpAccountant(_COARSE_ORDERS, NeighboringRelation.REPLACE_ONE)
    accountant.compose(rnd.event(), rounds)
    return float(accountant.get_epsilon_and_optimal_order(delta)[1])


@dataclass(frozen=True)
class AdaptiveClip:
    """The plan's ``dp.adaptive`` object: DP-FedAvg with adaptive clipping (Andrew, Thakkar,
    McMahan, Ramaswamy, NeurIPS 2021)::

        "adaptive": {"quantile": 0.5, "lr": 0.2, "bit_noise": 10.0}

    Each commit counts the updates that were not clipped, noised with std ``bit_noise``, and
    moves the bound geometrically toward the norm ``quantile`` of the updates unclipped.
    """

    quantile: float
    lr: float
    bit_noise: float

    @classmethod
    def from_json(cls, obj: Any, z: float) -> AdaptiveClip:
        where = f"{_WHERE}.adaptive"
        f = Fields(obj, where)
        quantile = f.number("quantile", 0.5, minimum=0.0, maximum=1.0)
        lr = f.number("lr", 0.2, minimum=0.0, maximum=10.0, exclusive_min=True)
        bit_noise = f.number("bit_noise", None, minimum=0.0, maximum=1e6, exclusive_min=True)
        f.done()
        if bit_noise is None:
            raise InvalidRequest(f"{where}.bit_noise is required")
        if 2 * bit_noise <= z * (1 + 1e-9):
            # The update noise that keeps the round at z would have to be infinite (or
            # imaginary): the count alone would spend the round's whole budget.
            raise InvalidRequest(
                f"{where}.bit_noise ({bit_noise}) must exceed noise_multiplier / 2 ({z / 2}): "
                "the noised count would spend more than the whole round's privacy"
            )
        return cls(quantile=quantile, lr=lr, bit_noise=bit_noise)

    def update_noise(self, z: float) -> float:
        """The update sum's noise multiplier that, with the noised count, costs what a
        non-adaptive round at ``z`` costs: ``(z**-2 - (2 bit_noise)**-2) ** -0.5``."""
        return float((z**-2 - (2 * self.bit_noise) ** -2) ** -0.5)

    def to_json(self) -> dict[str, Any]:
        return {"quantile": self.quantile, "lr": self.lr, "bit_noise": self.bit_noise}


# An update the device clipped to the bound arrives with its norm at the bound up to rounding
# (float32 scaling, and a lossy codec's error, well under this); one unclipped arrives below
# it. The server infers each device's bit from that, which central DP lets it see anyway.
_AT_BOUND = 1e-3


@dataclass(frozen=True)
class DpSpec:
    """The plan's ``dp`` object::

        "dp": {"clip": 1.0, "noise_multiplier": 1.1, "delta": 1e-5, "budget": 8.0}
        "dp": {"clip": 1.0, "epsilon": 8.0, "population": 1000, "delta": 1e-5}

    ``clip``: the L2 norm every update is clipped to (on the device, and again at the
    commit). ``noise_multiplier``: Gaussian noise of std ``noise_multiplier * clip`` on the
    sum. ``budget``: the task completes (reason ``privacy_budget``) rather than release a
    round that would take epsilon at ``delta`` past it. ``epsilon`` with ``population`` (the
    eligible devices expected per selection window) instead of ``noise_multiplier``: the
    noise that keeps the plan's ``rounds`` rounds of ``target`` devices within ``epsilon``,
    which also becomes the budget; a smaller real population spends faster and the budget
    stops the task early. The stored plan holds the resolved noise multiplier. ``adaptive``
    (:class:`AdaptiveClip`): ``clip`` is the first round's bound, and each round costs what a
    non-adaptive one at ``noise_multiplier`` costs (its update noise is a little higher).
    """

    clip: float
    noise_multiplier: float
    delta: float = 1e-5
    budget: float | None = None
    adaptive: AdaptiveClip | None = None

    @classmethod
    def from_json(cls, obj: Any, *, rounds: int, cohort: int, window: int) -> DpSpec:
        """``cohort``: the devices a round selects; ``window``: the most candidates a
        selection window admits (the largest population a round can sample from)."""
        f = Fields(obj, _WHERE)
        clip = f.number("clip", None, minimum=0.0, maximum=1e6, exclusive_min=True)
        z = f.number("noise_multiplier", None, minimum=0.0, maximum=1e4, exclusive_min=True)
        delta = f.number("delta", 1e-5, minimum=0.0, maximum=0.1, exclusive_min=True)
        budget = f.number("budget", None, minimum=0.0, maximum=1e4, exclusive_min=True)
        epsilon = f.number("epsilon", None, minimum=0.0, maximum=1e3, exclusive_min=True)
        population = f.integer("population", None, minimum=1, maximum=10**9)
        adaptive = f.raw("adaptive")
        f.done()
        if clip is None:
            raise InvalidRequest(f"{_WHERE}.clip is required")
        if (z is None) == (epsilon is None):
            raise InvalidRequest(f"{_WHERE} needs exactly one of noise_multiplier and epsilon")
        if epsilon is not None:
            if population is None or population < cohort:
                raise InvalidRequest(
                    f"{_WHERE}.epsilon needs population: the eligible devices expected per "
                    f"selection window, at least the round's target ({cohort})"
                )
            if population > window:
                # Calibrating for a population no window can hold understates what each
                # round spends: the budget would stop the task long before its rounds.
                raise InvalidRequest(
                    f"{_WHERE}.population ({population}) exceeds the candidates a selection "
                    f"window admits (target x max_candidates_factor = {window}): raise "
                    "plan.max_candidates_factor or lower the population"
                )
            try:
                z = noise_for_budget(epsilon, population, cohort, rounds, delta)
            except ValueError as e:
                raise InvalidRequest(f"{_WHERE}.epsilon: {e}") from e
            budget = epsilon if budget is None else min(budget, epsilon)
        elif population is not None:
            raise InvalidRequest(f"{_WHERE}.population goes with epsilon only")
        return cls(
            clip=clip,
            noise_multiplier=z,
            delta=delta,
            budget=budget,
            adaptive=None if adaptive is None else AdaptiveClip.from_json(adaptive, z),
        )

    def round(self, population: int, cohort: int) -> Round:
        """A round of this plan (adaptive: its update noise and its count's noise)."""
        if self.adaptive is None:
            return Round(population, cohort, self.noise_multiplier)
        z = self.adaptive.update_noise(self.noise_multiplier)
        return Round(population, cohort, z, self.adaptive.bit_noise)

    def at_bound(self, clip: float) -> DpSpec:
        """This plan at a round's clipping bound, with the noise that round adds to the sum."""
        if self.adaptive is None:
            return self
        z = self.adaptive.update_noise(self.noise_multiplier)
        return dataclasses.replace(self, clip=clip, noise_multiplier=z)

    def next_bound(self, bound: float, unclipped: int, goal: int) -> tuple[float, float]:
        """``(noised count, next bound)`` after a round at ``bound`` with ``unclipped``
        updates not clipped: the count gets N(0, bit_noise**2) from the same cryptographic
        source as the update noise; ``goal`` is the fixed denominator."""
        assert self.adaptive is not None
        a = self.adaptive
        count = unclipped + float(gaussian_noise(1, a.bit_noise, os.urandom(32))[0])
        return count, geometric_step(bound, count / goal, a.quantile, a.lr)

    def to_json(self) -> dict[str, Any]:
        return {
            "clip": self.clip,
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "budget": self.budget,
            **({} if self.adaptive is None else {"adaptive": self.adaptive.to_json()}),
        }

    def client_json(self) -> dict[str, Any]:
        """What a device needs: the norm to clip its delta to before encoding it."""
        return {"clip": self.clip}


def gaussian_noise(length: int, std: float, seed: bytes) -> np.ndarray:
    """``length`` draws of N(0, std**2) from AES-256-CTR keyed by ``seed`` (Box-Muller on
    53-bit uniforms: a cryptographic stream, unlike numpy's generators)."""
    half = (length + 1) // 2
    words = mask_stream(seed, 2 * half, 64) >> np.uint64(11)
    u = words.astype(np.float64) * 2.0**-53  # [0, 1)
    radius = np.sqrt(-2.0 * np.log1p(-u[:half]))  # 1 - u in (0, 1]: log is finite
    angle = 2.0 * np.pi * u[half:]
    return (std * np.concatenate([radius * np.cos(angle), radius * np.sin(angle)]))[:length]


@dataclass(frozen=True)
class NoisedMean:
    mean: np.ndarray  # float64
    reports: int
    clipped: int  # updates whose norm exceeded the clip
    unclipped: int = 0  # updates that arrived below the clip: the device did not clip them


def noised_mean(
    deltas: Iterable[np.ndarray], num_parameters: int, spec: DpSpec, goal: int
) -> NoisedMean:
    """``(sum_i clip(delta_i) + N(0, (z C)^2 I)) / goal``, with fresh noise from ``os.urandom``."""
    total = np.zeros(num_parameters, dtype=np.float64)
    reports = clipped = unclipped = 0
    for raw in deltas:
        d = np.asarray(raw, dtype=np.float64)
        # The sensitivity bound needs the norm within the clip, not the device's exact bits
        # (edge_sdk.dp.clip_to_norm): numpy's norm keeps a commit of large models fast.
        norm = float(np.linalg.norm(d))
        over = norm > spec.clip
        total += d * (spec.clip / norm) if over else d
        clipped += over
        unclipped += norm < spec.clip * (1 - _AT_BOUND)
        reports += 1
    noise = gaussian_noise(num_parameters, spec.noise_multiplier * spec.clip, os.urandom(32))
    return NoisedMean((total + noise) / goal, reports, clipped, unclipped)


def ledger_after(delta: float, previous: dict[str, Any] | None) -> Ledger:
    """The ledger a commit starts from: what the previous DP commit recorded (None: none)."""
    prior = (previous or {}).get("rdp")
    return Ledger(delta, prior=tuple(float(x) for x in prior) if prior else ())


def round_record(
    spec: DpSpec,
    ledger: Ledger,
    rnd: Round,
    result: NoisedMean,
    goal: int,
    released: int,
    adaptive: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """What a committed round stores under ``metrics["dp"]`` (``ledger`` includes ``rnd``;
    ``released``: the DP rounds released before it; ``adaptive``: the noised count of
    unclipped updates and the next round's bound)."""
    extra: dict[str, Any] = {}
    if adaptive is not None:
        # The exact clipped count would release the bits the count's noise hides.
        extra = {"bit_noise": rnd.bit_noise, "unclipped_noised": adaptive[0],
                 "clip_next": adaptive[1], "clipped": None}  # fmt: skip
    return {
        "population": rnd.population,
        "cohort": rnd.cohort,
        "noise_multiplier": rnd.noise_multiplier,
        "clip": spec.clip,
        "denominator": goal,
        "reports": result.reports,
        "clipped": result.clipped,
        "delta": ledger.delta,
        "epsilon": ledger.epsilon(),
        "budget": spec.budget,
        "rounds": released + sum(n for _, n in ledger.rounds),
        "rdp": [float(x) for x in ledger.rdp()],
        **extra,
    }


def privacy_json(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A DP task's privacy status from the metrics of its latest closed rounds, oldest first:
    epsilon spent (the latest DP commit's; 0 before the first), and ``completed_reason``
    ``privacy_budget`` if the last closed round stopped the task."""
    dp = next((m["dp"] for m in reversed(rounds) if "dp" in m), None)
    stopped = bool(rounds) and rounds[-1].get("stopped") == BUDGET_REASON
    return {
        "epsilon": 0.0 if dp is None else dp["epsilon"],
        "delta": None if dp is None else dp["delta"],
        "budget": None if dp is None else dp["budget"],
        "completed_reason": BUDGET_REASON if stopped else None,
    }
