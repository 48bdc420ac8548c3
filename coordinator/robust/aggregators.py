"""Robust aggregators over ``n`` updates of ``d`` coordinates, one coordinate chunk at a time.

The updates are the rows of an ``(n, d)`` array that may live on disk (a ``numpy.memmap``:
see :mod:`coordinator.robust.commit`); each function reads ``(n, chunk)`` blocks of it, so
memory is ``O(n x chunk + d)`` whatever ``d``.

* **Coordinate-wise median** and **trimmed mean** (Yin et al., "Byzantine-robust distributed
  learning: towards optimal statistical rates", ICML 2018): per coordinate, the median of the
  ``n`` values, or the mean after dropping the ``k`` smallest and ``k`` largest.
* **Multi-Krum** (Blanchard et al., "Machine learning with adversaries: Byzantine tolerant
  gradient descent", NeurIPS 2017; El Mhamdi et al. 2018 for the multi- form): with ``f``
  assumed hostile updates, each update's score is the sum of squared distances to its
  ``n - f - 2`` nearest others; the ``m = n - f`` lowest scores are averaged (weighted).

Median and trimmed mean ignore weights: a weight is what a device declares, which is exactly
what an attacker controls.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = [
    "DEFAULT_CHUNK",
    "blocks",
    "coordinate_median",
    "krum_scores",
    "multi_krum",
    "trimmed_mean",
    "weighted_mean",
]

# Coordinates per block: 64 Ki float64 x n rows (n = 100: 50 MiB).
DEFAULT_CHUNK = 1 << 16


def _count(rows: np.ndarray, select: np.ndarray | None) -> int:
    return int(rows.shape[0] if select is None else len(select))


def blocks(
    rows: np.ndarray, chunk: int, select: np.ndarray | None = None
) -> Iterator[tuple[slice, np.ndarray]]:
    """``(columns, block)`` pairs covering ``rows`` (or the rows ``select`` names, in that
    order) ``chunk`` columns at a time, as float64."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    d = rows.shape[1]
    if _count(rows, select) == 0:
        raise ValueError("no updates to aggregate")
    for start in range(0, d, chunk):
        cols = slice(start, min(d, start + chunk))
        block = np.asarray(rows[:, cols], dtype=np.float64)
        yield cols, block if select is None else block[select]


def coordinate_median(
    rows: np.ndarray, chunk: int = DEFAULT_CHUNK, select: np.ndarray | None = None
) -> np.ndarray:
    out = np.empty(rows.shape[1], dtype=np.float64)
    for cols, block in blocks(rows, chunk, select):
        out[cols] = np.median(block, axis=0)
    return out


def trimmed_mean(
    rows: np.ndarray, trim: float, chunk: int = DEFAULT_CHUNK, select: np.ndarray | None = None
) -> np.ndarray:
    """Drop ``floor(trim x n)`` values at each end of every coordinate, average the rest."""
    n = _count(rows, select)
    k = int(trim * n)
    if not 0 <= 2 * k < n:
        raise ValueError(f"trimming {k} at each end of {n} values leaves none")
    out = np.empty(rows.shape[1], dtype=np.float64)
    for cols, block in blocks(rows, chunk, select):
        out[cols] = np.sort(block, axis=0)[k : n - k].mean(axis=0)
    return out


def weighted_mean(
    rows: np.ndarray,
    weights: np.ndarray,
    chunk: int = DEFAULT_CHUNK,
    select: np.ndarray | None = None,
) -> np.ndarray:
    """``sum_i w_i x_i / sum_i w_i`` over all rows, or over the rows ``select`` names (then
    ``weights`` has one entry per selected row)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (_count(rows, select),) or not np.all(w > 0):
        raise ValueError("need one positive weight per update")
    out = np.empty(rows.shape[1], dtype=np.float64)
    for cols, block in blocks(rows, chunk, select):
        out[cols] = w @ block / w.sum()
    return out


def krum_scores(
    rows: np.ndarray, f: int, chunk: int = DEFAULT_CHUNK, select: np.ndarray | None = None
) -> np.ndarray:
    """Each update's Krum score: the sum of its ``max(1, n - f - 2)`` smallest squared
    distances to the other updates."""
    n = _count(rows, select)
    if n < 2:
        return np.zeros(n)
    # ||a - b||^2 summed over chunks: sq_a + sq_b - 2 a.b, from one Gram matrix per block.
    dist = np.zeros((n, n), dtype=np.float64)
    for _, block in blocks(rows, chunk, select):
        sq = np.einsum("ij,ij->i", block, block)
        dist += sq[:, None] + sq[None, :] - 2.0 * (block @ block.T)
    np.maximum(dist, 0.0, out=dist)  # rounding can leave -1e-17 where rows are equal
    np.fill_diagonal(dist, np.inf)
    neighbours = max(1, n - f - 2)
    return np.sort(dist, axis=1)[:, :neighbours].sum(axis=1)


def multi_krum(
    rows: np.ndarray,
    weights: np.ndarray,
    f: int,
    chunk: int = DEFAULT_CHUNK,
    select: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The weighted mean of the ``n - f`` updates with the lowest Krum scores, and their row
    indices (ties broken by position, so the result does not depend on the sort). With
    ``select``, over those rows only: ``weights`` has one entry per selected row and the
    indices returned are rows of ``rows``."""
    n = _count(rows, select)
    if not 0 <= f < n:
        raise ValueError(f"f={f} hostile updates out of {n} leaves none to select")
    scores = krum_scores(rows, f, chunk, select)
    chosen = np.sort(np.argsort(scores, kind="stable")[: n - f])
    w = np.asarray(weights, dtype=np.float64)[chosen]
    rows_chosen = chosen if select is None else np.asarray(select)[chosen]
    return weighted_mean(rows, w, chunk, select=rows_chosen), rows_chosen
