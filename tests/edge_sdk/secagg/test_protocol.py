"""SecAgg+ end to end on the primitives: the server recovers exactly the survivors' sum.

The devices and the server below follow the protocol's stages with real keys, encrypted
Shamir shares and AES-CTR masks; only the transport between them is a function call.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import numpy as np
import pytest

from edge_sdk.secagg import crypto, graph, masking, ring, shamir

CONTEXT = b"task-1/round-7"


@dataclass
class Device:
    index: int
    c: crypto.KeyPair = field(default_factory=crypto.KeyPair.generate)  # share encryption
    s: crypto.KeyPair = field(default_factory=crypto.KeyPair.generate)  # pairwise masks
    b: bytes = field(default_factory=lambda: secrets.token_bytes(32))  # self mask seed

    def shares_for(
        self, neighbours: frozenset[int], threshold: int, publics: dict[int, bytes]
    ) -> dict[int, bytes]:
        xs = [v + 1 for v in sorted(neighbours)]
        b_shares = shamir.split(self.b, threshold, xs)
        s_shares = shamir.split(self.s.private, threshold, xs)
        out = {}
        for v in sorted(neighbours):
            key = crypto.agree(self.c.private, publics[v], crypto.LABEL_SHARES, CONTEXT)
            aad = CONTEXT + f"/{self.index}->{v}".encode()
            out[v] = crypto.encrypt(key, b_shares[v + 1] + s_shares[v + 1], aad)
        return out

    def open_share(self, sender: int, ciphertext: bytes, c_publics: dict[int, bytes]) -> bytes:
        key = crypto.agree(self.c.private, c_publics[sender], crypto.LABEL_SHARES, CONTEXT)
        return crypto.decrypt(key, ciphertext, CONTEXT + f"/{sender}->{self.index}".encode())


def run_round(n: int, drop_after_shares: float, seed: int, tolerated: float = 0.3) -> None:
    rng = np.random.default_rng(seed)
    spec = ring.RingSpec.for_cohort(cohort=n, clip=1.0, levels=2**12, max_weight=100)
    devices = [Device(i) for i in range(n)]
    degree, threshold = graph.parameters(n, dropout=tolerated)
    links = graph.neighbours(n, degree, secrets.token_bytes(32))
    c_pub = {d.index: d.c.public for d in devices}
    s_pub = {d.index: d.s.public for d in devices}

    # Stage 2: every device sends encrypted shares to its neighbours (through the server).
    inbox: dict[int, dict[int, bytes]] = {u: {} for u in range(n)}
    for d in devices:
        for v, ct in d.shares_for(links[d.index], threshold, c_pub).items():
            inbox[v][d.index] = ct

    # Stage 3: some devices drop before uploading their masked vector.
    dropped = set(rng.choice(n, size=round(drop_after_shares * n), replace=False).tolist())
    survivors = [u for u in range(n) if u not in dropped]
    inputs = {u: ring.encode(rng.normal(0, 0.2, 40), int(rng.integers(1, 50)), spec, rng)
              for u in survivors}
    masked_sum = np.zeros(41, np.uint64)
    for u in survivors:
        pairs = {v: masking.pair_seed(devices[u].s.private, s_pub[v], CONTEXT) for v in links[u]}
        y = masking.mask(u, inputs[u], devices[u].b, pairs, spec.bits)
        assert not np.array_equal(y, inputs[u])
        masked_sum += y

    # Stage 4: survivors open, for the server, b-shares of survivors and s-shares of dropouts.
    b_of: dict[int, dict[int, bytes]] = {u: {} for u in survivors}
    s_of: dict[int, dict[int, bytes]] = {v: {} for v in dropped}
    for holder in survivors:
        for sender, ct in inbox[holder].items():
            plain = devices[holder].open_share(sender, ct, c_pub)
            b_share, s_share = plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]
            if sender in dropped:
                s_of[sender][holder + 1] = s_share
            else:
                b_of[sender][holder + 1] = b_share
    self_seeds = [shamir.combine(b_of[u]) for u in survivors]
    dropped_pairs = []
    for v in dropped:
        s_private = shamir.combine(s_of[v])
        for u in links[v]:
            if u not in dropped:
                dropped_pairs.append((u, v, masking.pair_seed(s_private, s_pub[u], CONTEXT)))
    total = masking.unmask(masked_sum, self_seeds, dropped_pairs, spec.bits)

    exact = np.zeros(41, np.uint64)
    for u in survivors:
        exact += inputs[u]
    assert np.array_equal(total, exact & spec.modulus_mask)
    assert self_seeds == [devices[u].b for u in survivors]


@pytest.mark.parametrize(("n", "dropout"), [(30, 0.0), (30, 0.1), (30, 0.3), (60, 0.3)])
def test_server_recovers_exact_sum_of_survivors(n: int, dropout: float) -> None:
    run_round(n=n, drop_after_shares=dropout, seed=int(dropout * 10))


def test_too_few_survivors_cannot_unmask() -> None:
    # Half the cohort gone: some secret has fewer shares than its threshold (the round is
    # abandoned), and no partial reconstruction passes for a secret.
    with pytest.raises(shamir.ShamirError):
        run_round(n=20, drop_after_shares=0.6, seed=3)


def test_a_single_masked_vector_looks_uniform() -> None:
    spec = ring.RingSpec.for_cohort(cohort=10, clip=1.0, levels=2**10, max_weight=1)
    x = ring.encode(np.zeros(50_000), 1, spec, np.random.default_rng(0))  # all-zero input
    a, b = crypto.KeyPair.generate(), crypto.KeyPair.generate()
    seed = masking.pair_seed(a.private, b.public, CONTEXT)
    y = masking.mask(0, x, secrets.token_bytes(32), {1: seed}, spec.bits)
    top = (y >> np.uint64(spec.bits - 4)).astype(np.int64)
    counts = np.bincount(top, minlength=16)
    chi2 = float(((counts - y.size / 16) ** 2 / (y.size / 16)).sum())
    assert chi2 < 50.0
