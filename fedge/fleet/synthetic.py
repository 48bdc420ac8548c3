"""The FedProx Synthetic(alpha, beta) federated data set (Li et al., MLSys 2020, section 5.1).

Device k has its own softmax-regression "true model" and its own feature distribution::

    u_k ~ N(0, alpha^2),  W_k[i, j] ~ N(u_k, 1),  b_k[i] ~ N(u_k, 1)     (W_k: 10 x 60)
    B_k ~ N(0, beta^2),   v_k[j] ~ N(B_k, 1)
    x ~ N(v_k, Sigma),    Sigma = diag(j^-1.2), j = 1..60
    y = argmax softmax(W_k x + b_k)

``alpha`` controls how much the local models differ, ``beta`` how much the local data differ;
the paper writes N(0, alpha) and its reference generator uses alpha and beta as standard
deviations, as here. ``iid=True`` gives the paper's Synthetic-IID: one W, b ~ N(0, 1) for all
devices and v_k = 0. Sample counts per device follow the reference's power law:
``floor(LogNormal(4, 2)) + 50``, optionally capped.
"""

from __future__ import annotations

import math

import numpy as np

from fedge.fleet.datasets import Dataset

__all__ = ["NUM_CLASSES", "NUM_FEATURES", "fedprox_synthetic"]

NUM_FEATURES = 60
NUM_CLASSES = 10


def fedprox_synthetic(
    alpha: float,
    beta: float,
    num_devices: int,
    seed: int,
    *,
    iid: bool = False,
    min_samples: int = 50,
    max_samples: int | None = None,
    lognormal_mean: float = 4.0,
    lognormal_sigma: float = 2.0,
) -> list[Dataset]:
    """One :class:`Dataset` per device, deterministic for ``seed``."""
    # Finite too: an infinite beta makes every feature NaN or Inf, a NaN alpha every label 0.
    if not all(math.isfinite(v) and v >= 0 for v in (alpha, beta)):
        raise ValueError(f"alpha and beta must be finite numbers >= 0, got {alpha}, {beta}")
    if num_devices < 1:
        raise ValueError(f"need at least one device, got {num_devices}")
    rng = np.random.default_rng(seed)
    counts = rng.lognormal(lognormal_mean, lognormal_sigma, num_devices).astype(np.int64)
    counts += min_samples
    if max_samples is not None:
        counts = np.minimum(counts, max_samples)
    cov_diag = np.arange(1, NUM_FEATURES + 1, dtype=np.float64) ** -1.2
    shared_w = rng.normal(0.0, 1.0, (NUM_CLASSES, NUM_FEATURES))
    shared_b = rng.normal(0.0, 1.0, NUM_CLASSES)
    devices = []
    for n in counts:
        if iid:
            w, b, v = shared_w, shared_b, np.zeros(NUM_FEATURES)
        else:
            u = rng.normal(0.0, alpha)
            w = rng.normal(u, 1.0, (NUM_CLASSES, NUM_FEATURES))
            b = rng.normal(u, 1.0, NUM_CLASSES)
            v = rng.normal(rng.normal(0.0, beta), 1.0, NUM_FEATURES)
        x = v + rng.standard_normal((int(n), NUM_FEATURES)) * np.sqrt(cov_diag)
        # argmax of softmax is argmax of the logits.
        y = np.argmax(x @ w.T + b, axis=1)
        devices.append(Dataset(x.astype(np.float32), y.astype(np.int64), NUM_CLASSES))
    return devices
