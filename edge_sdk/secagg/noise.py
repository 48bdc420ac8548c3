"""A device's distributed-DP step in a SecAgg round: its update in the ring, with noise.

When the assignment's ``secagg`` plan carries ``dp`` (``{"sigma2": "num/den",
"norm_bound": L}``), the device encodes its clipped update with equal weight (the ring's
``max_weight``), rounds it again until the rounded vector's L2 norm is within ``L`` (the
conditional randomized rounding of Kairouz, Liu, Steinke 2021, so that the sensitivity the
server's accountant uses is a bound and not a likelihood), and adds exact discrete Gaussian
noise ``N_Z(0, sigma2)`` to every coordinate but the weight (:mod:`edge_sdk.secagg.dgauss`)
before masking. Nobody, the server included, sees the update without its noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from edge_sdk.secagg import dgauss, ring

__all__ = ["DeviceNoise", "noisy_encode"]

# With the bound exceeded at most exp(-1/2) of the time, 200 attempts all failing has
# probability below 1e-43: more than that means the plan's bound does not fit the ring.
MAX_ROUNDINGS = 200


@dataclass(frozen=True)
class DeviceNoise:
    sigma2: Fraction
    norm_bound: float

    @classmethod
    def from_json(cls, raw: Any) -> DeviceNoise | None:
        """The plan's ``secagg.dp`` (None: no distributed DP); ``ValueError`` if malformed."""
        if raw is None:
            return None
        try:
            sigma2 = Fraction(str(raw["sigma2"]))
            bound = float(raw["norm_bound"])
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise ValueError(f"plan 'secagg.dp' is malformed: {e!r}") from e
        if sigma2 <= 0 or not (math.isfinite(bound) and bound > 0):
            raise ValueError(f"plan 'secagg.dp' is out of range: {raw!r}")
        return cls(sigma2, bound)


def _signed(x: np.ndarray, bits: int) -> np.ndarray:
    s = x.astype(np.int64)
    if bits < 64:
        s[s >= (1 << (bits - 1))] -= 1 << bits
    return s


def noisy_encode(
    delta: np.ndarray,
    spec: ring.RingSpec,
    noise: DeviceNoise,
    rng: np.random.Generator,
    noise_rng: dgauss.CryptoIntegers | None = None,
) -> np.ndarray:
    """The ring vector of ``delta`` at full weight, conditionally rounded, with noise added.
    ``noise_rng``: the noise's uniform integers (default: a fresh ``os.urandom`` key)."""
    for _ in range(MAX_ROUNDINGS):
        x = ring.encode(delta, spec.max_weight, spec, rng)
        norm = float(np.linalg.norm(_signed(x[:-1], spec.bits).astype(np.float64)))
        if norm <= noise.norm_bound:
            return dgauss.add_noise(x, noise.sigma2, spec.bits, noise_rng)
    raise ring.RingError(f"no rounding of the update came within the norm bound {noise.norm_bound}")
