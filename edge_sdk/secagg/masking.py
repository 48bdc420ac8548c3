"""Masking a device's ring vector, and unmasking the sum of the survivors.

Device ``u`` adds to its encoded vector ``x_u`` (mod 2**bits) a self mask expanded from its
own seed ``b_u`` and, for each neighbour ``v``, a pairwise mask expanded from the seed
``s_uv`` that both derive by X25519 agreement: added when ``u < v``, subtracted when
``u > v``, so that the pairwise masks of two devices that both report cancel in the sum::

    y_u = x_u + PRG(b_u) + sum_{v in N(u), u < v} PRG(s_uv) - sum_{v in N(u), u > v} PRG(s_uv)

The server, holding ``sum y_u`` over the survivors ``S``, removes ``PRG(b_u)`` for every
``u`` in ``S`` (``b_u`` rebuilt from its shares) and, for every survivor ``u`` whose neighbour
``v`` dropped after the keys were advertised, the pairwise term ``u`` added for ``v``
(``s_uv`` rebuilt from ``v``'s shared mask key). It never learns ``b_v`` of a dropped device
or a pairwise seed of two survivors, so no individual ``x_u`` is exposed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from edge_sdk.secagg.crypto import LABEL_MASK, agree, mask_stream

__all__ = ["mask", "pair_seed", "pairwise_term", "unmask"]


def pair_seed(private: bytes, peer_public: bytes, context: bytes) -> bytes:
    """The pairwise mask seed ``s_uv`` (the same from either end), bound to the round."""
    return agree(private, peer_public, LABEL_MASK, context)


def pairwise_term(u: int, v: int, seed: bytes, length: int, bits: int) -> np.ndarray:
    """What ``u`` adds for neighbour ``v`` (the negation, mod 2**bits, when ``u > v``)."""
    stream = mask_stream(seed, length, bits)
    return stream if u < v else (np.uint64(0) - stream)


def mask(
    u: int, x: np.ndarray, self_seed: bytes, pair_seeds: Mapping[int, bytes], bits: int
) -> np.ndarray:
    """``y_u`` for the encoded vector ``x`` (uint64 ring elements)."""
    y = np.asarray(x, dtype=np.uint64) + mask_stream(self_seed, x.size, bits)
    for v, seed in pair_seeds.items():
        if v == u:
            raise ValueError("a device is not its own neighbour")
        y += pairwise_term(u, v, seed, x.size, bits)
    return _reduce(y, bits)


def unmask(
    masked_sum: np.ndarray,
    self_seeds: Iterable[bytes],
    dropped_pairs: Iterable[tuple[int, int, bytes]],
    bits: int,
) -> np.ndarray:
    """``sum x_u`` over the survivors, from their masked sum.

    ``self_seeds``: the rebuilt ``b_u`` of every survivor. ``dropped_pairs``: ``(u, v, s_uv)``
    for each survivor ``u`` and each of its neighbours ``v`` that did not report.
    """
    total = np.asarray(masked_sum, dtype=np.uint64).copy()
    for seed in self_seeds:
        total -= mask_stream(seed, total.size, bits)
    for u, v, seed in dropped_pairs:
        total -= pairwise_term(u, v, seed, total.size, bits)
    return _reduce(total, bits)


def _reduce(v: np.ndarray, bits: int) -> np.ndarray:
    # uint64 arithmetic wraps mod 2**64, and 2**bits divides 2**64.
    return v if bits == 64 else v & np.uint64((1 << bits) - 1)
