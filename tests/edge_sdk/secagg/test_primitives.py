"""Shamir sharing, key agreement, share encryption, the mask stream, the ring and the graph."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from edge_sdk.secagg import crypto, graph, ring, shamir


def test_any_threshold_subset_reconstructs_and_fewer_do_not() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, threshold=3, xs=range(1, 7))
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine({x: shares[x] for x in subset}) == secret
    assert shamir.combine(shares) == secret
    for subset in itertools.combinations(shares, 2):
        with pytest.raises(shamir.ShamirError):
            shamir.combine({x: shares[x] for x in subset})


@pytest.mark.parametrize(
    ("secret", "threshold", "xs"),
    [(b"short", 2, [1, 2]), (bytes(32), 3, [1, 2]), (bytes(32), 2, [1, 1]), (bytes(32), 1, [0])],
)
def test_bad_sharing_parameters_are_refused(secret: bytes, threshold: int, xs: list[int]) -> None:
    with pytest.raises(shamir.ShamirError):
        shamir.split(secret, threshold, xs)


def test_malformed_shares_are_refused() -> None:
    with pytest.raises(shamir.ShamirError):
        shamir.combine({1: b"\x00" * 10})
    with pytest.raises(shamir.ShamirError):
        shamir.combine({1: b"\xff" * shamir.SHARE_BYTES})  # >= p


def test_agreement_is_symmetric_and_label_separated() -> None:
    a, b = crypto.KeyPair.generate(), crypto.KeyPair.generate()
    k_ab = crypto.agree(a.private, b.public, crypto.LABEL_SHARES, b"round-1")
    assert k_ab == crypto.agree(b.private, a.public, crypto.LABEL_SHARES, b"round-1")
    assert k_ab != crypto.agree(a.private, b.public, crypto.LABEL_MASK, b"round-1")
    assert k_ab != crypto.agree(a.private, b.public, crypto.LABEL_SHARES, b"round-2")
    with pytest.raises(crypto.CryptoError):
        crypto.agree(a.private, b.public[:31], crypto.LABEL_SHARES)
    with pytest.raises(crypto.CryptoError):
        crypto.agree(a.private, bytes(32), crypto.LABEL_SHARES)  # low-order point


def test_share_ciphertexts_authenticate_their_context() -> None:
    key = bytes(range(32))
    ct = crypto.encrypt(key, b"share", aad=b"1->2")
    assert crypto.decrypt(key, ct, aad=b"1->2") == b"share"
    with pytest.raises(crypto.CryptoError):
        crypto.decrypt(key, ct, aad=b"1->3")
    tampered = ct[:-1] + bytes([ct[-1] ^ 1])
    with pytest.raises(crypto.CryptoError):
        crypto.decrypt(key, tampered, aad=b"1->2")


def test_mask_stream_is_aes_ctr_built_independently_from_ecb_blocks() -> None:
    seed = bytes(range(32, 64))
    got = crypto.mask_stream(seed, 10, 64)
    key = crypto._hkdf(seed, crypto.LABEL_STREAM, b"")
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    blocks = b"".join(ecb.update(i.to_bytes(16, "big")) for i in range(5))
    assert np.array_equal(got, np.frombuffer(blocks, dtype="<u8"))
    assert np.array_equal(crypto.mask_stream(seed, 10, 64), got)  # deterministic


def test_mask_stream_is_uniform_in_the_ring() -> None:
    words = crypto.mask_stream(b"\x07" * 32, 200_000, 12)
    assert int(words.max()) < 2**12
    counts = np.bincount((words >> np.uint64(8)).astype(np.int64), minlength=16)
    expected = words.size / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50.0  # 15 degrees of freedom: p ~ 1e-5


def test_ring_is_sized_so_that_extreme_sums_do_not_wrap() -> None:
    spec = ring.RingSpec.for_cohort(cohort=50, clip=1.0, levels=1000, max_weight=10)
    rng = np.random.default_rng(0)
    for sign in (1.0, -1.0):
        # Every device at the clip bound in one coordinate, with the largest weight.
        delta = np.array([sign, 0.0])
        total = sum(
            (ring.encode(delta, 10, spec, rng) for _ in range(50)), start=np.zeros(3, np.uint64)
        )
        weighted, weight = ring.decode_sum(total, spec)
        assert weight == 500
        assert weighted[0] == pytest.approx(sign * 500.0)
    # Past what the cohort can add up to (a sum unmasked with a wrong seed is uniform over
    # the ring: half its coordinates land there) is refused, not decoded.
    bound = 50 * max(1000, 10)
    assert bound < 1 << (spec.bits - 2) <= 2 * bound
    for beyond in (1 << (spec.bits - 2), -(1 << (spec.bits - 2)) - 1):
        total = np.array([0, beyond, 500], np.int64).astype(np.uint64) & spec.modulus_mask
        with pytest.raises(ring.RingError, match="no vectors of this ring add up to"):
            ring.decode_sum(total, spec)
    uniform = rng.integers(0, 1 << spec.bits, 64, dtype=np.uint64)
    with pytest.raises(ring.RingError):
        ring.decode_sum(uniform, spec)
    with pytest.raises(ring.RingError):
        ring.RingSpec.for_cohort(cohort=2**40, clip=1.0, levels=2**30, max_weight=1)


def test_ring_sum_matches_numpy_within_the_quantisation_bound() -> None:
    rng = np.random.default_rng(1)
    spec = ring.RingSpec.for_cohort(cohort=30, clip=2.0, levels=2**14, max_weight=64)
    deltas = [rng.normal(0, 0.5, 100) for _ in range(30)]
    weights = [int(w) for w in rng.integers(1, 100, 30)]
    total = np.zeros(101, np.uint64)
    for d, w in zip(deltas, weights, strict=True):
        total += ring.encode(d, w, spec, rng)
    weighted, weight = ring.decode_sum(total, spec)

    def clipped(d: np.ndarray) -> np.ndarray:
        n = np.linalg.norm(d)
        return d * min(1.0, 2.0 / n)

    capped = [min(w, 64) for w in weights]
    reference = sum(w * clipped(d) for d, w in zip(deltas, capped, strict=True))
    step = spec.max_weight * spec.clip / spec.levels
    assert weight == sum(capped)
    assert np.max(np.abs(weighted - reference)) <= 30 * step


def test_ring_rounding_is_unbiased() -> None:
    spec = ring.RingSpec.for_cohort(cohort=4000, clip=1.0, levels=4, max_weight=1)
    rng = np.random.default_rng(2)
    delta = np.array([0.1, -0.37])
    total = sum(
        (ring.encode(delta, 1, spec, rng) for _ in range(4000)), start=np.zeros(3, np.uint64)
    )
    weighted, _ = ring.decode_sum(total, spec)
    assert weighted / 4000 == pytest.approx(delta, abs=0.01)


def test_ring_refuses_non_finite_updates() -> None:
    spec = ring.RingSpec.for_cohort(cohort=2, clip=1.0, levels=10, max_weight=1)
    with pytest.raises(ring.RingError):
        ring.encode(np.array([np.nan]), 1, spec, np.random.default_rng())


@pytest.mark.parametrize("n", [2, 3, 10, 57, 200])
def test_neighbour_graph_is_symmetric_regular_and_connected(n: int) -> None:
    degree, threshold = graph.parameters(n)
    links = graph.neighbours(n, degree, b"\x01" * 32)
    assert all(u not in links[u] and all(u in links[v] for v in links[u]) for u in range(n))
    assert {len(s) for s in links} == {degree}
    assert 1 <= threshold <= degree
    seen, frontier = {0}, [0]
    while frontier:
        nxt = [v for u in frontier for v in links[u] if v not in seen]
        seen.update(nxt)
        frontier = nxt
    assert len(seen) == n
    if n > 20:
        assert degree < n - 1
        assert links != graph.neighbours(n, degree, b"\x02" * 32)  # the seed decides


@pytest.mark.parametrize("bits", [1, 8, 20, 33, 64])
def test_packed_ring_vectors_round_trip_at_their_byte_width(bits: int) -> None:
    rng = np.random.default_rng(bits)
    top = np.uint64(2**bits - 1) if bits < 64 else np.uint64(2**64 - 1)
    v = rng.integers(0, 2**63, 1000, dtype=np.uint64) * np.uint64(2) & top
    data = ring.pack(v, bits)
    assert len(data) == 1000 * ((bits + 7) // 8)
    np.testing.assert_array_equal(ring.unpack(data, bits, 1000), v)
    with pytest.raises(ring.RingError):
        ring.unpack(data[:-1], bits, 1000)
    if bits % 8:
        over = bytearray(data)
        over[(bits + 7) // 8 - 1] |= 0x80  # a bit above the ring in the first element
        with pytest.raises(ring.RingError):
            ring.unpack(bytes(over), bits, 1000)
