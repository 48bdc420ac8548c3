"""A device's side of one SecAgg+ round: what it sends at each stage, from what it received.

The stages (docs/protocol.md, "Secure aggregation") and the device's answer to each::

    dev = SecAggDevice(index=3, context=b"t-1/42")
    c_pub, s_pub = dev.advertise()                        # 1. advertise keys
    shares = dev.share(neighbour_keys, threshold)         # 2. {v: ciphertext} for each neighbour
    y = dev.mask(delta, weight, spec, sharers, rng)       # 3. masked ring vector
    opened = dev.unmask(inbox, survivors, dropped)        # 4. {u: share} the server may see

The device keeps its secrets (two X25519 private keys, the self-mask seed ``b``) in memory
for the round only. At stage 4 it refuses a request that would let the server unmask it
alone: a set of survivors and dropouts that overlap, that leave it out, or that are smaller
than the threshold.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Set
from dataclasses import dataclass, field

import numpy as np

from edge_sdk.secagg import crypto, masking, ring, shamir
from edge_sdk.secagg.noise import DeviceNoise, noisy_encode

__all__ = ["CIPHERTEXT_BYTES", "SecAggDevice", "SecAggRefused", "context_for", "share_aad"]

# nonce || AES-GCM(b share || s share) || tag
CIPHERTEXT_BYTES = crypto.NONCE_BYTES + 2 * shamir.SHARE_BYTES + 16


class SecAggRefused(ValueError):
    """A stage's input the device will not act on (it would expose its update)."""


def context_for(task_id: str, round_number: int) -> bytes:
    """What a round's keys, shares and masks are bound to: device and server derive it from
    the assignment's task and round number, so nothing of one round replays into another."""
    return f"fedge/secagg/v1/{task_id}/{round_number}".encode()


def share_aad(context: bytes, sender: int, recipient: int) -> bytes:
    """The associated data binding a share ciphertext to its round, sender and recipient."""
    return context + f"/{sender}->{recipient}".encode()


@dataclass
class SecAggDevice:
    index: int
    context: bytes
    c: crypto.KeyPair = field(default_factory=crypto.KeyPair.generate)  # share encryption
    s: crypto.KeyPair = field(default_factory=crypto.KeyPair.generate)  # pairwise masks
    b: bytes = field(default_factory=lambda: secrets.token_bytes(crypto.KEY_BYTES))
    _keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    threshold: int = 0

    def advertise(self) -> tuple[bytes, bytes]:
        return self.c.public, self.s.public

    def share(
        self, neighbour_keys: Mapping[int, tuple[bytes, bytes]], threshold: int
    ) -> dict[int, bytes]:
        """Shamir shares of ``b`` and of the mask key, one ciphertext per neighbour."""
        if self.index in neighbour_keys:
            raise SecAggRefused("a device is not its own neighbour")
        if not 1 <= threshold <= len(neighbour_keys) < 2 * threshold:  # a strict majority
            raise SecAggRefused(f"threshold {threshold} for {len(neighbour_keys)} neighbours")
        self._keys = dict(neighbour_keys)
        self.threshold = threshold
        xs = [v + 1 for v in sorted(neighbour_keys)]
        b_shares = shamir.split(self.b, threshold, xs)
        s_shares = shamir.split(self.s.private, threshold, xs)
        out = {}
        for v, (c_pub, _) in sorted(neighbour_keys.items()):
            key = crypto.agree(self.c.private, c_pub, crypto.LABEL_SHARES, self.context)
            plain = b_shares[v + 1] + s_shares[v + 1]
            out[v] = crypto.encrypt(key, plain, share_aad(self.context, self.index, v))
        return out

    def mask(
        self,
        delta: np.ndarray,
        weight: int,
        spec: ring.RingSpec,
        sharers: Set[int],
        rng: np.random.Generator,
        noise: DeviceNoise | None = None,
    ) -> np.ndarray:
        """The masked ring vector of ``(delta, weight)``; pairwise masks with the neighbours
        that shared (``sharers``: the server's list of stage-2 senders). With ``noise``
        (distributed DP): at full weight, with discrete Gaussian noise, whatever ``weight``."""
        if self.index not in sharers:
            raise SecAggRefused("the server says this device did not share its keys")
        if noise is None:
            x = ring.encode(delta, weight, spec, rng)
        else:
            x = noisy_encode(delta, spec, noise, rng)
        seeds = {
            v: masking.pair_seed(self.s.private, s_pub, self.context)
            for v, (_, s_pub) in self._keys.items()
            if v in sharers
        }
        return masking.mask(self.index, x, self.b, seeds, spec.bits)

    def unmask(
        self, inbox: Mapping[int, bytes], survivors: Set[int], dropped: Set[int]
    ) -> dict[int, bytes]:
        """For each neighbour that sent this device a share: its ``b`` share if it survived,
        its mask-key share if it dropped after sharing."""
        if survivors & dropped:
            raise SecAggRefused("a device cannot both survive and drop out")
        if self.index not in survivors:
            raise SecAggRefused("the server says this device did not upload")
        if len(survivors) < self.threshold:
            raise SecAggRefused(f"{len(survivors)} survivors, fewer than the threshold")
        out = {}
        for u, ciphertext in sorted(inbox.items()):
            if u not in self._keys:
                raise SecAggRefused(f"device {u} is not a neighbour")
            if u not in survivors and u not in dropped:
                continue
            key = crypto.agree(self.c.private, self._keys[u][0], crypto.LABEL_SHARES, self.context)
            plain = crypto.decrypt(key, ciphertext, share_aad(self.context, u, self.index))
            b_share, s_share = plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]
            out[u] = b_share if u in survivors else s_share
        return out
