"""The SecAgg+ server state machine driven by real device-side clients (keys, AES-GCM shares,
AES-CTR masks); only the transport between them is a function call.

Every stage loses 0 %, 10 % or 30 % of its cohort; the server's decoded sum must equal the
sum of the survivors' ring vectors exactly, and numpy's weighted mean of their clipped
updates within the quantisation step.
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np
import pytest

from coordinator.errors import ApiError, Conflict, Forbidden, InvalidRequest
from coordinator.secagg import STAGES, SecAggSession
from coordinator.secagg import session as session_module
from edge_sdk.secagg import crypto, ring, shamir
from edge_sdk.secagg.client import CIPHERTEXT_BYTES, SecAggDevice, SecAggRefused, share_aad

CONTEXT = b"t-test/round-1"
LENGTH = 40
SPEC = ring.RingSpec.for_cohort(cohort=64, clip=1.0, levels=2**12, max_weight=100)


class Harness:
    def __init__(self, n: int, seed: int = 0, min_survivors: int = 1) -> None:
        self.now = 0.0
        self.names = [f"d-{i}" for i in range(n)]
        self.devices = {name: SecAggDevice(i, CONTEXT) for i, name in enumerate(self.names)}
        self.graph_seed = secrets.token_bytes(32)
        self.min_survivors = min_survivors
        self.server = self.fresh()
        rng = np.random.default_rng(seed)
        self.deltas = {d: rng.normal(0, 0.3, LENGTH) for d in self.names}
        self.weights = {d: int(rng.integers(1, 100)) for d in self.names}
        self.vectors: dict[str, np.ndarray] = {}  # the ring vectors the survivors masked
        self.rng = rng

    def fresh(self) -> SecAggSession:
        return SecAggSession.start(
            self.names,
            context=CONTEXT,
            spec=SPEC,
            length=LENGTH,
            min_survivors=self.min_survivors,
            graph_seed=self.graph_seed,
            now=0.0,
            stage_timeout_s=30.0,
        )

    def answer(self, name: str) -> None:
        s, dev = self.server, self.devices[name]
        if s.stage == "advertise":
            s.advertise(name, *dev.advertise())
        elif s.stage == "share":
            s.share(name, dev.share(s.neighbour_keys(name), s.threshold))
        elif s.stage == "mask":
            inbox, sharers = s.inbox(name)
            dev.inbox = inbox  # type: ignore[attr-defined]  # kept for stage 4
            seed = int(self.rng.integers(2**32))
            y = dev.mask(self.deltas[name], self.weights[name], SPEC, sharers,
                         np.random.default_rng(seed))  # fmt: skip
            self.vectors[name] = ring.encode(
                self.deltas[name], self.weights[name], SPEC, np.random.default_rng(seed)
            )
            s.mask(name, y)
        else:
            survivors, dropped = s.survivors(name)
            s.unmask(name, dev.unmask(dev.inbox, survivors, dropped))  # type: ignore[attr-defined]

    def stage(self, drop: float) -> list[str]:
        """The current stage's cohort answers, but a fraction ``drop`` of it vanishes."""
        s = self.server
        stage = s.stage
        cohort = [self.names[u] for u in sorted(s.cohort[stage])]
        gone = set(self.rng.choice(cohort, size=round(drop * len(cohort)), replace=False))
        for name in cohort:
            if name not in gone:
                self.answer(name)
        if gone:
            assert s.stage == stage  # still waiting for the dropouts
            self.now = s.deadline
        s.tick(self.now)
        return sorted(gone)

    def run(self, drops: dict[str, float]) -> SecAggSession:
        for stage in STAGES:
            if self.server.done:
                break
            assert self.server.stage == stage
            self.stage(drops.get(stage, 0.0))
        return self.server


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("drop", [0.0, 0.1, 0.3])
def test_survivors_sum_is_exact_with_dropouts_at_each_stage(stage: str, drop: float) -> None:
    h = Harness(40, seed=STAGES.index(stage) * 10 + int(drop * 10))
    s = h.run({stage: drop})
    assert s.stage == "unmasked", s.reason
    assert s.result is not None
    survivors = list(s.result.survivors)
    assert set(survivors) == set(h.vectors)  # those that uploaded, whoever left later
    expected_len = 40 - (round(drop * 40) if stage in ("advertise", "share", "mask") else 0)
    assert len(survivors) == expected_len
    exact = np.zeros(LENGTH + 1, np.uint64)
    for name in survivors:
        exact += h.vectors[name]
    weighted, weight = ring.decode_sum(exact & SPEC.modulus_mask, SPEC)
    np.testing.assert_array_equal(s.result.weighted_sum, weighted)
    assert s.result.total_weight == weight == sum(h.weights[d] for d in survivors)
    # ... and numpy's weighted mean of the clipped updates, within the quantisation
    clipped = [h.deltas[d] * min(1.0, 1.0 / np.linalg.norm(h.deltas[d])) for d in survivors]
    w = [h.weights[d] for d in survivors]
    step = SPEC.max_weight * SPEC.clip / SPEC.levels  # one rounding unit, per device
    np.testing.assert_allclose(
        s.result.mean, np.average(clipped, axis=0, weights=w), atol=len(w) * step / weight
    )
    # the session rebuilds from its events alone
    again = SecAggSession.replay(h.fresh(), s.events)
    assert again.stage == "unmasked" and again.result is not None
    np.testing.assert_array_equal(again.result.weighted_sum, s.result.weighted_sum)


@pytest.mark.parametrize(
    ("stage", "reason"),
    [("advertise", "too_few_after_advertise"), ("share", "too_few_after_share"),
     ("mask", "too_few_after_mask")],
)  # fmt: skip
def test_fewer_survivors_than_needed_abandon_the_round(stage: str, reason: str) -> None:
    h = Harness(20, min_survivors=16)
    s = h.run({stage: 0.3})
    assert (s.stage, s.reason, s.result) == ("abandoned", reason, None)


@pytest.mark.parametrize(
    ("stage", "reason"),
    [("advertise", "too_few_after_advertise"), ("share", "too_few_after_share"),
     ("mask", "too_few_after_mask")],
)  # fmt: skip
def test_one_survivor_is_never_unmasked_whatever_the_plan_allows(stage: str, reason: str) -> None:
    """A sum of one masked vector is that device's update. With ``min_reports`` 1 and a
    cohort of two (whose Shamir threshold is 1) it could not be unmasked anyway (the other
    device holds the share of its self-mask), but a round left with one device after the
    mask stage went on to an unmasking stage that could only fail, asking the survivor for
    its shares; now it ends there."""
    h = Harness(2, min_survivors=1)
    assert h.server.threshold == 1
    s = h.run({stage: 0.5})
    assert (s.stage, s.reason, s.result) == ("abandoned", reason, None)


def test_too_few_unmasking_answers_abandon_the_round() -> None:
    h = Harness(20)
    s = h.run({"unmask": 0.7})
    assert (s.stage, s.reason, s.result) == ("abandoned", "unmasking_failed", None)


@pytest.mark.parametrize("shift", [1, 2**200])
def test_a_crafted_unmasking_share_abandons_the_round_instead_of_committing_garbage(
    shift: int,
) -> None:
    """A survivor answering stage 4 with a share of a neighbour's self-mask seed moved so
    that the seed the server rebuilds is off by ``shift`` (the holders' Lagrange
    coefficients are public; the shares carry no proof; a random share is caught, as it
    rebuilds no 32-byte secret) made the server remove the wrong mask: the round committed a
    uniformly random vector as the model's update. A sum the survivors' vectors cannot reach
    (their coordinates lie within half the ring's range) now abandons the round."""
    h = Harness(10, seed=shift % 7)
    for _stage in STAGES[:-1]:
        h.stage(0.0)
    s = h.server
    assert s.stage == "unmask"
    liar = h.names[0]  # the lowest index: its shares are among those the server combines
    for name in h.names[1:]:
        h.answer(name)
    survivors, dropped = s.survivors(liar)
    dev = h.devices[liar]
    opened = dev.unmask(dev.inbox, survivors, dropped)  # type: ignore[attr-defined]
    victim = min(opened)
    holders = sorted(v for v, got in s.opened.items() if victim in got)
    xs = tuple(sorted([1, *[v + 1 for v in holders]][: s.threshold]))
    coefficient = shamir._lagrange_at_zero(xs)[xs.index(1)]
    moved = (int.from_bytes(opened[victim], "big") + shift * pow(coefficient, -1, shamir.PRIME))
    crafted = {**opened, victim: (moved % shamir.PRIME).to_bytes(shamir.SHARE_BYTES, "big")}
    s.unmask(liar, crafted)
    s.tick(h.now)
    assert (s.stage, s.reason, s.result) == ("abandoned", "implausible_sum", None)


def test_the_server_decodes_only_the_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[np.ndarray] = []
    real = session_module.ring.decode_sum

    def spy(total: np.ndarray, spec: ring.RingSpec) -> Any:
        calls.append(total)
        return real(total, spec)

    monkeypatch.setattr(session_module.ring, "decode_sum", spy)
    h = Harness(30)
    s = h.run({"mask": 0.1})
    assert len(calls) == 1 and s.result is not None
    assert s.result.total_weight == sum(h.weights[d] for d in s.result.survivors)


def test_what_the_server_holds_is_keys_ciphertexts_and_uniform_masked_vectors() -> None:
    h = Harness(12)
    h.deltas = {d: np.zeros(LENGTH) for d in h.names}  # the most structured input there is
    s = h.run({})
    masked = [e[2] for e in s.events if e[0] == "mask"]
    assert len(masked) == 12
    stacked = np.concatenate(masked)
    for name, y in zip(sorted(h.vectors), masked, strict=True):
        assert not np.array_equal(y, h.vectors[name])
    top = (stacked >> np.uint64(SPEC.bits - 3)).astype(np.int64)
    counts = np.bincount(top, minlength=8)
    expected = stacked.size / 8
    assert float(((counts - expected) ** 2 / expected).sum()) < 30.0  # chi2, 7 dof
    kinds = {e[0] for e in s.events}
    assert kinds == {"advertise", "share", "mask", "unmask", "close"}
    for e in s.events:
        if e[0] == "share":
            assert all(len(c) == CIPHERTEXT_BYTES for c in e[2].values())


def _state(s: SecAggSession) -> tuple[Any, ...]:
    return (s.stage, len(s.events), dict(s.keys), {k: dict(v) for k, v in s.shares.items()},
            s.masked_sum.copy().tobytes(), set(s.uploaded), dict(s.opened))  # fmt: skip


def _refused(s: SecAggSession, error: type[ApiError], call: Any, *args: Any) -> None:
    before = _state(s)
    with pytest.raises(error):
        call(*args)
    assert _state(s) == before


def test_bad_input_at_each_stage_is_refused_and_changes_nothing() -> None:
    h = Harness(12)
    s = h.server
    dev = h.devices["d-0"]
    c_pub, s_pub = dev.advertise()
    # advertise
    _refused(s, InvalidRequest, s.advertise, "d-0", c_pub[:31], s_pub)
    _refused(s, InvalidRequest, s.advertise, "d-0", c_pub, c_pub)
    _refused(s, Forbidden, s.advertise, "intruder", c_pub, s_pub)
    _refused(s, Conflict, s.share, "d-0", {})
    h.answer("d-0")
    _refused(s, Conflict, s.advertise, "d-0", c_pub, s_pub)  # a replay
    _refused(s, InvalidRequest, s.advertise, "d-1", c_pub, h.devices["d-1"].advertise()[1])
    for name in h.names[1:-1]:
        h.answer(name)
    h.now = s.deadline  # d-11 never advertised
    s.tick(h.now)
    assert s.stage == "share"
    # share
    _refused(s, Forbidden, s.neighbour_keys, "d-11")
    _refused(s, Forbidden, s.share, "d-11", {})
    good = dev.share(s.neighbour_keys("d-0"), s.threshold)
    wrong = dict(good)
    wrong[next(iter(set(range(12)) - set(good) - {0}))] = next(iter(good.values()))
    _refused(s, InvalidRequest, s.share, "d-0", wrong)
    _refused(s, InvalidRequest, s.share, "d-0", dict(list(good.items())[1:]))
    short = {v: c[:-1] for v, c in good.items()}
    _refused(s, InvalidRequest, s.share, "d-0", short)
    _refused(s, Conflict, s.mask, "d-0", np.zeros(LENGTH + 1, np.uint64))
    s.share("d-0", good)
    _refused(s, Conflict, s.share, "d-0", good)
    for name in h.names[1:-2]:
        h.answer(name)
    h.now = s.deadline  # d-10 did not share
    s.tick(h.now)
    assert s.stage == "mask"
    # mask
    _refused(s, Forbidden, s.inbox, "d-10")
    _refused(s, Forbidden, s.mask, "d-10", np.zeros(LENGTH + 1, np.uint64))
    _refused(s, InvalidRequest, s.mask, "d-0", np.zeros(LENGTH, np.uint64))
    _refused(s, InvalidRequest, s.mask, "d-0", np.zeros(LENGTH + 1, np.int64))
    too_big = np.zeros(LENGTH + 1, np.uint64)
    too_big[0] = np.uint64(1) << np.uint64(SPEC.bits)
    _refused(s, InvalidRequest, s.mask, "d-0", too_big)
    h.answer("d-0")
    _refused(s, Conflict, s.mask, "d-0", np.zeros(LENGTH + 1, np.uint64))
    for name in h.names[1:-3]:
        h.answer(name)
    h.now = s.deadline  # d-9 shared, then did not upload
    s.tick(h.now)
    assert s.stage == "unmask"
    # unmask
    survivors, dropped = s.survivors("d-0")
    assert 9 in dropped and 9 not in survivors
    _refused(s, Forbidden, s.unmask, "d-9", {})
    opened = dev.unmask(dev.inbox, survivors, dropped)  # type: ignore[attr-defined]
    _refused(s, InvalidRequest, s.unmask, "d-0", dict(list(opened.items())[1:]))
    _refused(s, InvalidRequest, s.unmask, "d-0", {u: b[:-1] for u, b in opened.items()})
    s.unmask("d-0", opened)
    _refused(s, Conflict, s.unmask, "d-0", opened)
    for name in h.names[1:-3]:
        h.answer(name)
    s.tick(h.now)  # everyone expected answered: no need to wait for the deadline
    assert s.stage == "unmasked" and s.result is not None
    assert set(s.result.survivors) == set(h.names[:-3])


def test_a_device_refuses_to_open_both_secrets_of_a_neighbour() -> None:
    h = Harness(8)
    for _ in STAGES[:3]:
        h.stage(0.0)
    dev = h.devices["d-0"]
    survivors, _ = h.server.survivors("d-0")
    inbox = dev.inbox  # type: ignore[attr-defined]
    with pytest.raises(SecAggRefused):
        dev.unmask(inbox, survivors, survivors - {0})  # survivors and dropouts overlap
    with pytest.raises(SecAggRefused):
        dev.unmask(inbox, survivors - {0}, frozenset())  # leaves this device out
    with pytest.raises(SecAggRefused):
        dev.unmask(inbox, frozenset({0}), frozenset())  # fewer than the threshold


# X25519 points of small order: agreement with any of them gives the all-zero secret.
LOW_ORDER = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
]


@pytest.mark.parametrize("point", LOW_ORDER, ids=["zero", "one", "order-8"])
def test_low_order_public_keys_are_refused_and_change_nothing(point: bytes) -> None:
    h = Harness(6)
    s = h.server
    c_pub, s_pub = h.devices["d-0"].advertise()
    _refused(s, InvalidRequest, s.advertise, "d-0", point, s_pub)
    _refused(s, InvalidRequest, s.advertise, "d-0", c_pub, point)
    s.advertise("d-0", c_pub, s_pub)  # the device's real keys still go in
    assert 0 in s.keys


def test_a_cohort_larger_than_its_ring_holds_is_refused() -> None:
    small = ring.RingSpec.for_cohort(cohort=4, clip=1.0, levels=2**12, max_weight=100)
    args: dict[str, Any] = dict(context=CONTEXT, length=LENGTH, min_survivors=1,
                                graph_seed=bytes(32), now=0.0, stage_timeout_s=1.0)  # fmt: skip
    SecAggSession.start([f"d-{i}" for i in range(4)], spec=small, **args)
    with pytest.raises(ValueError, match="cannot hold"):
        SecAggSession.start([f"d-{i}" for i in range(64)], spec=small, **args)


@pytest.mark.parametrize("drops", [{"mask": 0.3}, {"mask": 0.2, "unmask": 0.1}])
def test_the_server_gets_one_kind_of_share_per_device(drops: dict[str, float]) -> None:
    """SecAgg's core invariant: of each device the server obtains self-mask shares only (it
    uploaded) or mask-key shares only (it shared, then dropped), never both. Checked by
    opening every share ciphertext with the holder's key, as the test (not the server) can."""
    h = Harness(24, seed=5)
    s = h.run(drops)
    assert s.stage == "unmasked", s.reason
    survivors, dropped = s.cohort["unmask"], s.cohort["mask"] - s.cohort["unmask"]
    assert dropped, "the case needs devices that shared and then dropped"
    kinds: dict[int, set[str]] = {}
    for v, opened in s.opened.items():
        holder = h.devices[h.names[v]]
        for u, share in opened.items():
            key = crypto.agree(holder.c.private, s.keys[u][0], crypto.LABEL_SHARES, CONTEXT)
            plain = crypto.decrypt(key, s.shares[u][v], share_aad(CONTEXT, u, v))
            b_share, s_share = plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]
            assert share in (b_share, s_share)
            kinds.setdefault(u, set()).add("self" if share == b_share else "key")
    assert {u for u, k in kinds.items() if k == {"self"}} == set(survivors)
    assert {u for u, k in kinds.items() if k == {"key"}} == set(dropped)
    assert all(len(k) == 1 for k in kinds.values())


def test_a_device_too_few_neighbours_of_which_shared_is_left_out_not_the_round() -> None:
    """Device 0 sends its shares, but only 16 of its 32 neighbours send theirs (threshold 17):
    nobody could open 17 shares of its self mask, so it must not upload. Left in, its vector
    would make the whole sum impossible to unmask; left out, the others' round goes on."""
    h = Harness(60)
    h.graph_seed = bytes(32)  # a fixed graph, for which these 16 silent neighbours are known
    h.server = s = SecAggSession.start(
        h.names, context=CONTEXT, spec=SPEC, length=LENGTH, min_survivors=1,
        graph_seed=h.graph_seed, now=0.0, stage_timeout_s=30.0, dropout=0.1,
    )  # fmt: skip
    assert (len(s.links[0]), s.threshold) == (32, 17)
    silent = {3, 5, 12, 15, 17, 21, 25, 29, 41, 42, 44, 46, 52, 53, 54, 59}
    assert silent <= s.links[0]
    for name in h.names:
        h.answer(name)
    s.tick(0.0)  # everyone advertised
    for u in sorted(s.cohort["share"] - silent):
        h.answer(h.names[u])
    s.tick(s.deadline)
    assert s.stage == "mask" and 0 not in s.cohort["mask"]
    for stage in ("mask", "unmask"):
        for u in sorted(s.cohort[stage]):
            h.answer(h.names[u])
        s.tick(s.deadline)
    assert s.stage == "unmasked", s.reason
    assert s.result is not None and len(s.result.survivors) == len(s.cohort["mask"]) >= 17
    exact = sum((h.vectors[d] for d in s.result.survivors), start=np.zeros(LENGTH + 1, np.uint64))
    weighted, weight = ring.decode_sum(exact & SPEC.modulus_mask, SPEC)
    np.testing.assert_array_equal(s.result.weighted_sum, weighted)
    assert s.result.total_weight == weight


def test_a_device_refuses_a_threshold_short_of_a_majority_of_its_neighbours() -> None:
    """Each neighbour opens one kind of share per device; with ``2 t <= k`` a server telling
    half of the ``k`` neighbours "it survived" and half "it dropped" would get ``t`` of both."""
    dev = SecAggDevice(0, CONTEXT)
    keys = {v: SecAggDevice(v, CONTEXT).advertise() for v in range(1, 5)}
    for threshold in (0, 1, 2, 5):
        with pytest.raises(SecAggRefused):
            dev.share(keys, threshold)
    assert sorted(dev.share(keys, 3)) == [1, 2, 3, 4]


@pytest.mark.parametrize("stage", STAGES)
def test_a_replay_of_the_events_is_the_accepted_state_mid_stage(stage: str) -> None:
    """What a restarted coordinator rebuilds: every field the next message is checked
    against, with half of ``stage``'s cohort in (and earlier stages closed with dropouts)."""
    h = Harness(16, seed=2)
    s = h.server
    for earlier in STAGES[: STAGES.index(stage)]:
        h.stage(0.1 if earlier != "advertise" else 0.0)
    cohort = sorted(s.cohort[stage])
    for u in cohort[: len(cohort) // 2]:
        h.answer(h.names[u])
    again = SecAggSession.replay(h.fresh(), s.events)
    assert _state(again) == _state(s)
    assert (again.cohort, again.deadline, again.threshold) == (s.cohort, s.deadline, s.threshold)
