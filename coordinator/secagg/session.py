"""One SecAgg+ round on the server: four stages, each with a deadline, then the unmasked sum.

::

    advertise ──> share ──> mask ──> unmask ──> unmasked (SecAggResult)
        │           │         │         │
        └───────────┴─────────┴─────────┴──> abandoned (reason)

A stage ends when every device expected at it answered, or at its deadline
(:meth:`SecAggSession.tick`); the devices that answered are the next stage's cohort:

1. **advertise**: each selected device sends two X25519 public keys (``c`` to encrypt shares,
   ``s`` for pairwise masks). Devices with fewer than ``threshold`` advertising neighbours
   cannot be protected and are left out (repeatedly, as leaving one out may strand another).
2. **share**: each device gets its advertising neighbours' keys and sends one AES-GCM
   ciphertext per neighbour holding Shamir shares of its self-mask seed and of its mask key.
   When the stage ends, devices fewer than ``threshold`` neighbours of which shared are left
   out the same way (nobody could open their self mask).
3. **mask**: each device gets the ciphertexts addressed to it and the list of devices that
   shared, and uploads its masked ring vector; the server only ever adds these up.
4. **unmask**: each uploader gets the survivors and the dropouts (shared, did not upload) and
   opens, for each neighbour that sent it a share, the self-mask share of a survivor or the
   mask-key share of a dropout. With ``threshold`` of them per secret the server removes
   every mask of the sum (:func:`edge_sdk.secagg.masking.unmask`) and decodes it.

A stage that ends with fewer than ``min_survivors`` devices abandons the round, as do shares
that do not reconstruct. Bad input is refused before anything changes: a device outside the
stage's cohort (:class:`~coordinator.errors.Forbidden`, 403), a message for another stage or
a second message for one (:class:`~coordinator.errors.Conflict`, 409), keys, ciphertexts,
shares or vectors of the wrong size or for the wrong neighbours (:class:`~coordinator.errors.
InvalidRequest`, 400).

The session is a fold of its events (accepted messages and stage closes, in order). Each
message is checked by ``check_<stage>`` (which changes nothing and returns the event) and
folded by :meth:`SecAggSession.apply`; :meth:`SecAggSession.due` says when a stage closes.
A coordinator stores each event between the two (:mod:`coordinator.secagg.rounds`), so what
it holds in memory advances only after the write, and :meth:`SecAggSession.replay` restores
the round after a restart. ``advertise()``, ``share()``, ``mask()``, ``unmask()`` and
:meth:`SecAggSession.tick` check and fold in one call, for callers without a store.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from coordinator.errors import Conflict, Forbidden, InvalidRequest
from edge_sdk.protocol import ErrorCode
from edge_sdk.secagg import crypto, graph, masking, ring, shamir
from edge_sdk.secagg.client import CIPHERTEXT_BYTES

__all__ = ["STAGES", "Event", "SecAggResult", "SecAggSession"]

STAGES = ("advertise", "share", "mask", "unmask")
# ("advertise", device, c_public, s_public) | ("share", device, {v: ciphertext})
# | ("mask", device, vector) | ("unmask", device, {u: share}) | ("close", stage, now)
Event = tuple[Any, ...]


def _invalid(message: str) -> InvalidRequest:
    return InvalidRequest(message, ErrorCode.SECAGG_INVALID)


@dataclass(frozen=True)
class SecAggResult:
    weighted_sum: np.ndarray  # float64: sum over survivors of weight * clip(delta)
    total_weight: int
    survivors: tuple[str, ...]

    @property
    def mean(self) -> np.ndarray:
        return self.weighted_sum / self.total_weight


@dataclass
class SecAggSession:
    """The state of one round; build with :meth:`start`."""

    devices: tuple[str, ...]
    context: bytes
    spec: ring.RingSpec
    length: int  # model parameters; vectors carry one more element, the weight
    min_survivors: int
    threshold: int
    links: list[frozenset[int]]
    stage_timeout_s: float
    # the advertise stage closes once this many devices advertised (over-selection: the
    # round takes the first goal devices); None: when all did or at the deadline
    enough: int | None = None
    record: bool = True  # keep :attr:`events` (masked vectors included) in memory
    stage: str = "advertise"
    deadline: float = 0.0
    reason: str | None = None  # why the round was abandoned
    result: SecAggResult | None = None
    events: list[tuple[Any, ...]] = field(default_factory=list)
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    cohort: dict[str, frozenset[int]] = field(default_factory=dict)  # stage -> who may answer
    shares: dict[int, dict[int, bytes]] = field(default_factory=dict)  # sender -> recipient
    masked_sum: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    uploaded: set[int] = field(default_factory=set)
    opened: dict[int, dict[int, bytes]] = field(default_factory=dict)  # holder -> owner

    @classmethod
    def start(
        cls,
        devices: Sequence[str],
        *,
        context: bytes,
        spec: ring.RingSpec,
        length: int,
        min_survivors: int,
        graph_seed: bytes,
        now: float,
        stage_timeout_s: float,
        dropout: float = 0.3,
        first_deadline: float | None = None,
        enough: int | None = None,
        record: bool = True,
    ) -> SecAggSession:
        """A session for ``devices`` (their index is their position), at stage advertise.
        ``graph_seed``: 32 public random bytes drawn before any key is seen; ``dropout``: the
        fraction of devices the graph's degree and threshold are sized to lose;
        ``first_deadline``: the advertise stage's (devices train before it; default ``now +
        stage_timeout_s``), later stages get ``stage_timeout_s`` each."""
        if len(set(devices)) != len(devices):
            raise ValueError("a device appears twice in the cohort")
        needed = ring.RingSpec.for_cohort(len(devices), spec.clip, spec.levels, spec.max_weight)
        if needed.bits > spec.bits:
            # The masked sum would wrap and decode to garbage (weights included).
            raise ValueError(f"a {spec.bits}-bit ring cannot hold {len(devices)} devices' sum")
        degree, threshold = graph.parameters(len(devices), dropout)
        out = cls(
            devices=tuple(devices),
            context=context,
            spec=spec,
            length=length,
            # A sum of one is that device's update: never unmasked (its neighbours' shares
            # of its self-mask are needed and none of them uploaded), so no stage waits for it.
            min_survivors=max(2, min_survivors, threshold),
            threshold=threshold,
            links=graph.neighbours(len(devices), degree, graph_seed),
            stage_timeout_s=stage_timeout_s,
            enough=enough,
            record=record,
            deadline=now + stage_timeout_s if first_deadline is None else first_deadline,
            masked_sum=np.zeros(length + 1, np.uint64),
        )
        out.cohort["advertise"] = frozenset(range(len(devices)))
        return out

    @classmethod
    def replay(cls, session: SecAggSession, events: Sequence[tuple[Any, ...]]) -> SecAggSession:
        """``session`` (fresh from :meth:`start`) after ``events``, as they were recorded."""
        for event in events:
            session.apply(event)
        return session

    # -- what devices are told ----------------------------------------------------------------

    def index(self, device_id: str) -> int:
        try:
            return self.devices.index(device_id)
        except ValueError:
            raise Forbidden(
                "this device is not in the round's secure aggregation", ErrorCode.SECAGG_EXCLUDED
            ) from None

    def neighbour_keys(self, device_id: str) -> dict[int, tuple[bytes, bytes]]:
        """Stage share: the keys of the device's neighbours that are still in."""
        u = self._expect(device_id, "share")
        return {v: self.keys[v] for v in sorted(self.links[u] & self.cohort["share"])}

    def inbox(self, device_id: str) -> tuple[dict[int, bytes], frozenset[int]]:
        """Stage mask: the ciphertexts addressed to the device, and who shared."""
        v = self._expect(device_id, "mask")
        sharers = self.cohort["mask"]
        return {u: self.shares[u][v] for u in sorted(sharers) if v in self.shares[u]}, sharers

    def survivors(self, device_id: str) -> tuple[frozenset[int], frozenset[int]]:
        """Stage unmask: who uploaded, and who shared but did not."""
        self._expect(device_id, "unmask")
        return self.cohort["unmask"], self.cohort["mask"] - self.cohort["unmask"]

    # -- what devices send --------------------------------------------------------------------

    def check_advertise(self, device_id: str, c_public: bytes, s_public: bytes) -> Event:
        self._expect(device_id, "advertise", fresh=self.keys)
        if len(c_public) != crypto.KEY_BYTES or len(s_public) != crypto.KEY_BYTES:
            raise _invalid(f"public keys are {crypto.KEY_BYTES} bytes each")
        if c_public == s_public or any(
            k in (c_public, s_public) for pair in self.keys.values() for k in pair
        ):
            raise _invalid("public keys must be fresh: distinct from each other and others'")
        if not (_agreeable(c_public) and _agreeable(s_public)):
            # A low-order point makes every neighbour's agreement with it fail: one device
            # would stall its neighbours' shares and masks, and this server's unmasking.
            raise _invalid("a public key is a low-order X25519 point")
        return ("advertise", device_id, bytes(c_public), bytes(s_public))

    def check_share(self, device_id: str, ciphertexts: Mapping[int, bytes]) -> Event:
        u = self._expect(device_id, "share", fresh=self.shares)
        expected = self.links[u] & self.cohort["share"]
        if set(ciphertexts) != expected:
            raise _invalid(
                f"shares go to exactly the device's neighbours {sorted(expected)}, "
                f"not {sorted(ciphertexts)}"
            )
        if any(len(c) != CIPHERTEXT_BYTES for c in ciphertexts.values()):
            raise _invalid(f"each share ciphertext is {CIPHERTEXT_BYTES} bytes")
        return ("share", device_id, dict(ciphertexts))

    def check_mask(self, device_id: str, vector: np.ndarray) -> Event:
        self._expect(device_id, "mask", fresh=self.uploaded)
        y = np.asarray(vector)
        if y.dtype != np.uint64 or y.shape != (self.length + 1,):
            raise _invalid(f"a masked vector is {self.length + 1} uint64 ring elements")
        if self.spec.bits < 64 and bool((y > self.spec.modulus_mask).any()):
            raise _invalid(f"masked vector elements are below 2**{self.spec.bits}")
        return ("mask", device_id, y)

    def check_unmask(self, device_id: str, opened: Mapping[int, bytes]) -> Event:
        v = self._expect(device_id, "unmask", fresh=self.opened)
        expected = {u for u in self.links[v] & self.cohort["mask"] if v in self.shares[u]}
        if set(opened) != expected:
            raise _invalid(
                f"open exactly the shares of the neighbours that sent you one: "
                f"{sorted(expected)}, not {sorted(opened)}"
            )
        if any(len(s) != shamir.SHARE_BYTES for s in opened.values()):
            raise _invalid(f"each opened share is {shamir.SHARE_BYTES} bytes")
        return ("unmask", device_id, dict(opened))

    def apply(self, event: Event) -> None:
        """Fold an event a ``check_*`` call or :meth:`due` returned (or one recorded then)."""
        kind, who, *args = event
        if kind == "close":
            self._close(who, *args)
            return
        u = self.index(who)
        if kind == "advertise":
            self.keys[u] = (args[0], args[1])
        elif kind == "share":
            self.shares[u] = dict(args[0])
        elif kind == "mask":
            self.masked_sum = (self.masked_sum + args[0]) & self.spec.modulus_mask  # wraps
            self.uploaded.add(u)
        elif kind == "unmask":
            self.opened[u] = dict(args[0])
        else:
            raise ValueError(f"unknown SecAgg event {kind!r}")
        if self.record:
            self.events.append(tuple(event))

    def advertise(self, device_id: str, c_public: bytes, s_public: bytes) -> None:
        self.apply(self.check_advertise(device_id, c_public, s_public))

    def share(self, device_id: str, ciphertexts: Mapping[int, bytes]) -> None:
        self.apply(self.check_share(device_id, ciphertexts))

    def mask(self, device_id: str, vector: np.ndarray) -> None:
        self.apply(self.check_mask(device_id, vector))

    def unmask(self, device_id: str, opened: Mapping[int, bytes]) -> None:
        self.apply(self.check_unmask(device_id, opened))

    # -- time ---------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.stage in ("unmasked", "abandoned")

    def due(self, now: float, gone: Collection[str] = ()) -> Event | None:
        """The close of the current stage if everyone expected answered or is ``gone`` (gave
        up: it will not answer), at advertise also once ``enough`` answered, or at its
        deadline; None if it goes on."""
        if self.done:
            return None
        expected = self.cohort[self.stage]
        done = set(self._answered())
        answered = len(done)
        if gone:
            done |= {u for u, d in enumerate(self.devices) if d in gone} & expected
        enough = self.enough if self.stage == "advertise" and self.enough else None
        if (
            len(done) < len(expected)
            and (enough is None or answered < enough)
            and now < self.deadline
        ):
            return None
        return ("close", self.stage, now)

    def tick(self, now: float) -> None:
        """Close every stage that is due."""
        while (event := self.due(now)) is not None:
            self.apply(event)

    def metrics(self) -> dict[str, Any]:
        """What the round records: devices per stage, survivors, why it was abandoned."""
        answered = self._held()
        return {
            "reported": len(self.result.survivors) if self.result is not None else 0,
            # the survivors' summed weights as the ring carried them (capped at max_weight)
            "num_examples": self.result.total_weight if self.result is not None else 0,
            "secagg": {
                "cohort": len(self.devices),
                "threshold": self.threshold,
                "degree": max((len(n) for n in self.links), default=0),
                "bits": self.spec.bits,
                "answered": {stage: len(answered[stage]) for stage in STAGES},
                "stage": self.stage,
                "reason": self.reason,
            },
        }

    def has_answered(self, u: int) -> bool:
        return u in self._answered()

    def check_turn(self, device_id: str, stage: str) -> int:
        """The device's index if it may send its ``stage`` message now (before its body is
        even parsed); raises what refuses it otherwise."""
        return self._expect(device_id, stage, fresh=self._held()[stage])

    def _held(self) -> dict[str, Collection[int]]:
        """Who answered each stage."""
        return {"advertise": self.keys, "share": self.shares, "mask": self.uploaded,
                "unmask": self.opened}  # fmt: skip

    def _answered(self) -> frozenset[int]:
        return frozenset(self._held()[self.stage])

    def _close(self, stage: str, now: float) -> None:
        if stage != self.stage:
            raise ValueError(f"closing {stage} at stage {self.stage}")
        if self.record:
            self.events.append(("close", stage, now))
        answered = set(self._answered())
        if stage in ("advertise", "share"):
            # Leave out devices too few neighbours of which advertised (after advertise) or
            # hold their shares (after share): their self mask could never be opened, and
            # one such vector in the sum would leave the whole sum masked. Repeated until
            # every remaining one has enough. (Not after mask: a vector in the sum stays.)
            while True:
                short = {u for u in answered if len(self.links[u] & answered) < self.threshold}
                if not short:
                    break
                answered -= short
        if stage == "unmask":
            self._finish()
            return
        nxt = STAGES[STAGES.index(stage) + 1]
        if len(answered) < self.min_survivors:
            self.stage, self.reason = "abandoned", f"too_few_after_{stage}"
            return
        self.cohort[nxt] = frozenset(answered)
        self.stage, self.deadline = nxt, now + self.stage_timeout_s

    def _finish(self) -> None:
        survivors, dropped = self.cohort["unmask"], self.cohort["mask"] - self.cohort["unmask"]
        try:
            self_seeds = [shamir.combine(self._opened_for(u)) for u in sorted(survivors)]
            pairs = []
            for v in sorted(dropped):
                s_private = shamir.combine(self._opened_for(v))
                if _public(s_private) != self.keys[v][1]:
                    raise shamir.ShamirError(f"device {v}'s mask key does not match its shares")
                pairs += [
                    (u, v, masking.pair_seed(s_private, self.keys[u][1], self.context))
                    for u in sorted(self.links[v] & survivors)
                ]
        except (shamir.ShamirError, crypto.CryptoError):
            self.stage, self.reason = "abandoned", "unmasking_failed"
            return
        total = masking.unmask(self.masked_sum, self_seeds, pairs, self.spec.bits)
        try:
            weighted, weight = ring.decode_sum(total, self.spec)
        except ring.RingError:  # a wrong mask removed: a survivor opened a crafted share
            self.stage, self.reason = "abandoned", "implausible_sum"
            return
        if weight <= 0:
            self.stage, self.reason = "abandoned", "no_weight"
            return
        names = tuple(self.devices[u] for u in sorted(survivors))
        self.result = SecAggResult(weighted, weight, names)
        self.stage = "unmasked"

    def _opened_for(self, owner: int) -> dict[int, bytes]:
        """``threshold`` shares of ``owner``'s secret, from the lowest-numbered holders: most
        secrets then share one holder set, whose Lagrange basis is computed once."""
        holders = sorted(v for v, got in self.opened.items() if owner in got)
        if len(holders) < self.threshold:
            raise shamir.ShamirError(f"{len(holders)} shares of device {owner}'s secret")
        return {v + 1: self.opened[v][owner] for v in holders[: self.threshold]}

    def _expect(self, device_id: str, stage: str, fresh: Collection[int] = ()) -> int:
        u = self.index(device_id)
        if self.stage != stage:
            raise Conflict(
                f"the round's secure aggregation is at stage {self.stage}, not {stage}",
                ErrorCode.SECAGG_STAGE,
            )
        if u not in self.cohort[stage]:
            raise Forbidden(
                f"this device is not in stage {stage} (it missed an earlier stage)",
                ErrorCode.SECAGG_EXCLUDED,
            )
        if u in fresh:
            raise Conflict(f"this device already answered stage {stage}", ErrorCode.SECAGG_REPLAY)
        return u


# Any private key tells a low-order point: the agreement is all zeros whatever the scalar.
_PROBE = X25519PrivateKey.generate()


def _agreeable(public: bytes) -> bool:
    """Whether X25519 agreement with ``public`` yields a key (not the all-zero point that
    every low-order public key gives)."""
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return False
    return True


def _public(private: bytes) -> bytes:
    key = X25519PrivateKey.from_private_bytes(private).public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
