"""Direction agreement: an update that points away from where the fleet is going counts for
nothing.

Weight caps and norm clipping bound *how much* one update moves the model, not *where*: a
device that uploads its honest delta negated (a sign flip, or the inflated-count attack once
its count is capped) still pulls the mean backwards by a full clipped update every round it
is selected, which slows training by about twice its share of the weight. This check scores
each update by its cosine with a robust reference direction and drops those at or below
``min_cosine`` (0 by default: any update with a negative component along the reference):

    r     = coordinate-wise median of the (clipped) updates        (Yin et al., ICML 2018)
    c_i   = <x_i, r> / (||x_i|| ||r||)                              (0 if either is 0)
    w_i  <- w_i          if c_i > min_cosine, else dropped
    w_i  <- w_i c_i      with ``weigh`` (FLTrust's ReLU-cosine trust score)

The trust score is FLTrust's (Cao, Fang, Liu, Gong, "FLTrust: Byzantine-robust federated
learning via trust bootstrapping", NDSS 2021), which compares each update with one computed
by the server on a small root data set. A coordinator here holds no data, so the reference is
the coordinate-wise median of the same aggregate, which a hostile minority cannot move past
the honest range in any coordinate. Both passes read the updates in column chunks (memory
``O(n x chunk + d)``) and the result is a function of the stored updates only.

Dropping (the default) rather than FLTrust's weighing: on the non-IID synthetic data of
``benchmarks/bench_poisoning.py`` honest updates are nearly orthogonal (median cosine with
the reference 0.1-0.2), so weighing by the cosine mostly reweighs honest devices at random;
in a 40-round trial (one seed) it cost 4.3 points under 10 % sign flips where dropping cost
none. The benchmark's figures for the defaults are in docs/benchmarks.md ("Poisoning").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coordinator.robust.aggregators import DEFAULT_CHUNK, blocks, coordinate_median
from coordinator.robust.spec import AgreementSpec

__all__ = ["Agreement", "agree", "cosines"]


@dataclass(frozen=True)
class Agreement:
    cosines: np.ndarray  # one per row
    keep: np.ndarray  # indices of the rows that count, ascending
    weights: np.ndarray  # one per kept row


def cosines(rows: np.ndarray, reference: np.ndarray, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Each row's cosine with ``reference`` (0 where either norm is 0)."""
    n = rows.shape[0]
    dots = np.zeros(n)
    squares = np.zeros(n)
    # einsum without optimize: elementwise products summed in numpy, not BLAS, so the result
    # does not depend on the machine's thread count.
    for cols, block in blocks(rows, chunk):
        dots += np.einsum("ij,j->i", block, reference[cols])
        squares += np.einsum("ij,ij->i", block, block)
    ref_norm = float(np.sqrt(np.einsum("i,i->", reference, reference)))
    norms = np.sqrt(squares) * ref_norm
    out = np.zeros(n)
    np.divide(dots, norms, out=out, where=norms > 0)
    return np.clip(out, -1.0, 1.0)


def agree(
    spec: AgreementSpec, rows: np.ndarray, weights: np.ndarray, chunk: int = DEFAULT_CHUNK
) -> Agreement:
    """Which rows count, and with what weight (see the module docstring)."""
    c = cosines(rows, coordinate_median(rows, chunk), chunk)
    # A weight scaled by the cosine must stay positive, whatever min_cosine says.
    floor = max(spec.min_cosine, 0.0) if spec.weigh else spec.min_cosine
    keep = np.flatnonzero(c > floor)
    w = np.asarray(weights, dtype=np.float64)[keep]
    if spec.weigh:
        w = w * c[keep]
    return Agreement(c, keep, w)
