"""Splitting one data set across devices: IID, label skew, pathological shards, quantity skew.

Every partitioner returns one sorted int64 index array per client; together they cover every
example exactly once. Randomness comes only from the ``numpy.random.Generator`` passed in, so a
seed fixes the split. :func:`partition` takes a spec string, as the command line does::

    iid                 equal-sized random parts
    dirichlet:ALPHA     per class, shares across clients ~ Dirichlet(ALPHA) (Hsu et al. 2019);
                        small ALPHA (0.1) is strongly skewed, large (100) is close to IID
    shards:K            McMahan et al. 2017: sort by label, cut into K * clients shards,
                        deal K shards to each client (K=2: most clients see 2 labels)
    quantity:SIGMA      IID labels, client sizes proportional to LogNormal(0, SIGMA)
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "PartitionError",
    "dirichlet_label_skew",
    "iid",
    "label_skew",
    "partition",
    "pathological_shards",
    "quantity_skew",
]

# Resampling attempts before a Dirichlet/quantity draw that leaves a client too small fails.
_MAX_DRAWS = 1000


class PartitionError(ValueError):
    """A partition spec that is malformed or cannot be satisfied for this data."""


def _check(num_examples: int, num_clients: int, min_size: int = 1) -> None:
    if num_clients < 1:
        raise PartitionError(f"need at least one client, got {num_clients}")
    if num_examples < num_clients * min_size:
        raise PartitionError(
            f"{num_examples} examples cannot give {num_clients} clients {min_size} each"
        )


def _split_at_shares(indices: np.ndarray, shares: np.ndarray) -> list[np.ndarray]:
    """Cut ``indices`` into consecutive parts proportional to ``shares``."""
    cuts = (np.cumsum(shares)[:-1] / shares.sum() * len(indices)).astype(np.int64)
    return np.split(indices, cuts)


def iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    _check(num_examples, num_clients)
    parts = np.array_split(rng.permutation(num_examples), num_clients)
    return [np.sort(p).astype(np.int64) for p in parts]


def quantity_skew(
    num_examples: int,
    num_clients: int,
    sigma: float,
    rng: np.random.Generator,
    min_size: int = 1,
) -> list[np.ndarray]:
    if sigma < 0:
        raise PartitionError(f"quantity skew sigma must be >= 0, got {sigma}")
    _check(num_examples, num_clients, min_size)
    # Every client first gets min_size examples; the rest is dealt by lognormal shares.
    order = rng.permutation(num_examples)
    shares = rng.lognormal(0.0, sigma, num_clients)
    extra = _split_at_shares(order[num_clients * min_size :], shares)
    base = np.split(order[: num_clients * min_size], num_clients)
    return [np.sort(np.concatenate(be)).astype(np.int64) for be in zip(base, extra, strict=True)]


def dirichlet_label_skew(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Per class, the class's examples are dealt to clients in Dirichlet(alpha) shares; the
    whole draw is repeated until every client has ``min_size`` examples."""
    if not alpha > 0:
        raise PartitionError(f"Dirichlet alpha must be > 0, got {alpha}")
    labels = np.asarray(labels)
    _check(len(labels), num_clients, min_size)
    classes = np.unique(labels)
    for _ in range(_MAX_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            for client, piece in enumerate(_split_at_shares(members, shares)):
                parts[client].append(piece)
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise PartitionError(
        f"no Dirichlet({alpha}) draw in {_MAX_DRAWS} gave each of {num_clients} clients "
        f"{min_size} examples; use fewer clients or a larger alpha"
    )


def pathological_shards(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    shards_per_client: int = 2,
) -> list[np.ndarray]:
    labels = np.asarray(labels)
    if shards_per_client < 1:
        raise PartitionError(f"shards per client must be >= 1, got {shards_per_client}")
    num_shards = num_clients * shards_per_client
    _check(len(labels), num_shards)
    # Shuffle first so that the stable sort orders ties (same label) randomly.
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, num_shards)
    deal = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])).astype(np.int64) for row in deal]


def partition(
    labels: np.ndarray, num_clients: int, spec: str, rng: np.random.Generator
) -> list[np.ndarray]:
    """Dispatch on a spec string (see the module docstring)."""
    name, _, arg = spec.strip().partition(":")
    try:
        value = float(arg) if arg else None
    except ValueError as e:
        raise PartitionError(f"partition spec {spec!r}: {arg!r} is not a number") from e
    if value is not None and not math.isfinite(value):
        raise PartitionError(f"partition spec {spec!r}: {arg!r} is not a finite number")
    n = len(labels)
    if name == "iid" and value is None:
        return iid(n, num_clients, rng)
    if name == "dirichlet" and value is not None:
        return dirichlet_label_skew(labels, num_clients, value, rng)
    if name == "shards":
        k = 2 if value is None else int(value)
        if value is not None and k != value:
            raise PartitionError(f"partition spec {spec!r}: shard count must be an integer")
        return pathological_shards(labels, num_clients, rng, k)
    if name == "quantity" and value is not None:
        return quantity_skew(n, num_clients, value, rng)
    raise PartitionError(
        f"unknown partition spec {spec!r}: use iid, dirichlet:ALPHA, shards[:K] or quantity:SIGMA"
    )


def label_skew(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    """Mean over clients of the total-variation distance between the client's label
    distribution and the pooled one: 0 for identical mixes, near 1 for disjoint labels."""
    labels = np.asarray(labels)
    pooled = np.bincount(labels, minlength=num_classes) / len(labels)
    distances = []
    for p in parts:
        if len(p) == 0:
            continue
        local = np.bincount(labels[p], minlength=num_classes) / len(p)
        distances.append(0.5 * np.abs(local - pooled).sum())
    return float(np.mean(distances))
