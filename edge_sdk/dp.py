"""Differential privacy on the device: bounding what one update can say.

A DP-FedAvg task's assignment carries ``plan.dp.clip``; the device scales its delta down to
that L2 norm before encoding it, so that the coordinator's Gaussian noise, calibrated to the
clip, covers it (the coordinator clips again: a lossy codec may move the norm a little).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["clip_to_norm", "plan_clip"]


def clip_to_norm(x: np.ndarray, bound: float) -> np.ndarray:
    """``x`` scaled to L2 norm ``bound`` if it is longer; ``x`` itself (same object) if not.

    The norm is the correctly rounded one: float32 squares are exact in float64 and
    ``math.fsum`` rounds their exact sum once, so the result does not depend on a summation
    order (numpy's pairwise sum, BLAS, a loop) and the Kotlin client (``Dp.kt``) gets the same
    bits. The scale is applied in ``x``'s dtype (float32 for a delta), as Kotlin does.
    """
    norm = math.sqrt(math.fsum(np.square(x, dtype=np.float64).ravel().tolist()))
    return x if norm <= bound else x * (bound / norm)


def plan_clip(plan: Any) -> float | None:
    """The clip an assignment's plan asks for (``plan.dp.clip``), None without DP."""
    dp = plan.get("dp") if isinstance(plan, dict) else None
    clip = dp.get("clip") if isinstance(dp, dict) else None
    if clip is None:
        return None
    if (
        isinstance(clip, bool)
        or not isinstance(clip, int | float)
        or not math.isfinite(clip)
        or clip <= 0
    ):
        raise ValueError(f"plan 'dp.clip' must be a positive finite number, got {clip!r}")
    return float(clip)
