"""Bounding what one update can do: its weight (declared examples, capped) and its norm
(clipped to a bound that adapts to the fleet).

Adaptive clipping is Andrew et al., "Differentially private learning with adaptive clipping"
(NeurIPS 2021), without the noise their private version adds to the count: after each
aggregate of updates with norms ``||d_i||`` clipped at ``C``::

    b  = (1/n) sum_i [ ||d_i|| <= C ]            # fraction left unclipped
    C' = C * exp(-eta (b - gamma))               # geometric step toward the gamma-quantile

so ``C`` settles where a fraction ``gamma`` of honest updates go unclipped, whatever the
model's scale, and a hostile minority moves it by at most a factor ``exp(eta)`` per commit.
The bound is task state: the commit records it with the version it made (the round's
metrics, in the same transaction), and the next commit reads it from there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from coordinator.robust.spec import ClipSpec, RobustSpec

__all__ = [
    "MIN_BOUND",
    "clip_factor",
    "example_cap",
    "first_bound",
    "geometric_step",
    "next_bound",
]

# A bound never falls below this: at 0 no update passes, the fraction unclipped stays 0 and
# the geometric step can never bring it back (zero updates for many commits would get there).
MIN_BOUND = 1e-12


def example_cap(spec: RobustSpec, declared: Sequence[int]) -> float:
    """The most examples one update of this aggregate may count for (inf: no cap)."""
    cap = math.inf if spec.example_cap is None else float(spec.example_cap)
    if spec.example_cap_factor is not None and declared:
        cap = min(cap, spec.example_cap_factor * float(np.median(declared)))
    return cap


def first_bound(clip: ClipSpec, norms: Sequence[float]) -> float:
    """The bound of a task's first aggregate: the plan's, else the target quantile of the
    norms (a hostile minority below ``1 - quantile`` cannot move it past the honest range)."""
    if clip.initial is not None:
        return clip.initial
    return max(MIN_BOUND, float(np.quantile(np.asarray(norms, dtype=np.float64), clip.quantile)))


def next_bound(clip: ClipSpec, bound: float, norms: Sequence[float]) -> float:
    if not clip.adaptive or not norms:
        return bound
    unclipped = sum(1 for n in norms if n <= bound) / len(norms)
    return geometric_step(bound, unclipped, clip.quantile, clip.lr)


def geometric_step(bound: float, unclipped: float, quantile: float, lr: float) -> float:
    """The step above; DP-FedAvg's adaptive clipping takes it with a noised ``unclipped``."""
    return max(MIN_BOUND, bound * math.exp(-lr * (unclipped - quantile)))


def clip_factor(norm: float, bound: float) -> float:
    """Scale that brings an update of ``norm`` within ``bound`` (1 if it already is)."""
    return 1.0 if norm <= bound else bound / norm
