"""SecAgg+ rounds served by three replicas (one PostgreSQL schema or SQLite file, one blob
directory, real HTTP), every device call going to the next replica as behind a round-robin
load balancer: a device reads its session on one replica and answers on another, so each
replica must answer from every event the others stored, and replicas race for the next
event. Devices are driven step by step with the device-side primitives
(tests/coordinator/secagg/peers.py), or run the SDK's own loop all at once through a real
balancer (tests/coordinator/replicas/balancer.py). The committed version is numpy's weighted
mean of the survivors' clipped updates, within the ring's quantisation bound, whoever
dropped at whichever stage, and whichever replica was SIGKILLed meanwhile."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from coordinator.admin import AdminClient
from coordinator.clock import FakeClock
from coordinator.secagg import STAGES
from coordinator.store import SecAggEvent, open_store
from edge_sdk.errors import ConditionsLapsed
from edge_sdk.secagg.loop import SecAggLoop, SecAggResult
from edge_sdk.transport import Transport
from tests.coordinator.replicas.balancer import Balancer
from tests.coordinator.replicas.fleet import (
    ADMIN,
    Spread,
    serve_replica,
    thread_replicas,
    wait_for,
)
from tests.coordinator.replicas.test_sigkill import _dying_and_two_others
from tests.coordinator.secagg.peers import STAGE_S, Peer, SecAggRound
from tests.fixtures.coordinator import HttpConnection

N = 8


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


def _spread_round(
    front: Any, urls: Sequence[str], bundle: Path, n: int, **secagg: Any
) -> SecAggRound:
    """A SecAgg round whose devices each start at the next replica and move on every call."""
    devices = [Spread(urls, start=i) for i in range(n)]
    return SecAggRound(front, bundle, n, devices=devices, **secagg)


def _state_at(p: Peer, replica: int) -> dict[str, Any]:
    """The session as replica ``replica`` shows it to ``p``."""
    cast(Spread, p.http).to(replica)
    return p.state()


def _stage_everywhere(peers: Sequence[Peer], replicas: int) -> set[str]:
    """The stage each replica tells each device."""
    return {_state_at(p, i)["stage"] for p in peers for i in range(replicas)}


def _assert_reference(r: SecAggRound, survivors: Sequence[Peer]) -> None:
    [rnd] = r.admin.rounds(r.task_id)
    assert rnd["state"] == "committed", rnd["metrics"]
    assert rnd["metrics"]["reported"] == len(survivors)
    expected, bound = r.expected_mean(list(survivors))
    got = r.version(1) - r.base
    assert abs(got - expected).max() <= bound
    assert abs(got).max() > 10 * bound  # the update really moved the model


def test_a_round_spread_over_three_replicas_commits_the_reference(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, clock: FakeClock
) -> None:
    """Each device reads the session from one replica and answers on the next: no answer is
    refused (no stale session, no lost race), and after each stage every replica tells
    every device the next one."""
    with thread_replicas(3, replica_db, tmp_path / "blobs", clock) as reps:
        r = _spread_round(reps[0], [x.url for x in reps], tiny_bundle, N)
        try:
            for k, stage in enumerate(STAGES):
                assert _stage_everywhere(r.peers, 3) == {stage}
                for j, p in enumerate(r.peers):  # read on replica j + k, answer on the next
                    cast(Spread, p.http).to(j + k)
                    assert p.answer() == {"accepted": True, "stage": stage}
                if k + 1 < len(STAGES):
                    assert _stage_everywhere(r.peers, 3) == {STAGES[k + 1]}
            _assert_reference(r, r.peers)
            assert _stage_everywhere(r.peers, 3) == {"closed"}
            assert {i for d in r.http for i in cast(Spread, d).served_by} == {0, 1, 2}
        finally:
            r.close()


def test_dropouts_at_mask_and_unmask_are_unmasked_among_replicas(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, clock: FakeClock
) -> None:
    """One device shares its keys but never uploads its masked vector (its pairwise masks are
    removed with its neighbours' shares of its mask key), one uploads but never opens its
    shares; the stages end at their deadlines, applied by whichever replica ticks first."""
    with thread_replicas(3, replica_db, tmp_path / "blobs", clock) as reps:
        r = _spread_round(reps[0], [x.url for x in reps], tiny_bundle, N)
        try:
            order = r.by_index()
            gone = {"mask": order[2], "unmask": order[5]}
            alive = list(order)
            for k, stage in enumerate(STAGES):
                for j, p in enumerate(alive):
                    if p is not gone.get(stage):
                        cast(Spread, p.http).to(j + k)
                        p.answer()
                if stage in gone:
                    alive.remove(gone[stage])
                    clock.advance(STAGE_S + 1)
                    nxt = "closed" if stage == "unmask" else "unmask"
                    wait_for(lambda n=nxt: _stage_everywhere(alive, 3) == {n},
                             what=f"the {stage} deadline")  # fmt: skip
                if stage == "mask":
                    [state] = {_unmask_view(_state_at(p, i)) for p in alive for i in range(3)}
                    assert state == ((0, 1, 3, 4, 5, 6, 7), (2,))
            survivors = [p for p in order if p is not gone["mask"]]
            _assert_reference(r, survivors)
        finally:
            r.close()


def test_a_masked_vector_swept_before_its_row_is_written_again(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A masked vector's file is gone between its write and its row (another replica's
    orphan sweep deleting identical bytes that an earlier, failed attempt left): the row
    is written with the file written again under its lock, as a version's are. Before, the
    row named a missing file and the round could not be unmasked."""
    with thread_replicas(2, replica_db, tmp_path / "blobs", clock) as reps:
        r = _spread_round(reps[0], [x.url for x in reps], tiny_bundle, 4)
        try:
            swept: set[str] = set()
            for k, stage in enumerate(STAGES):
                if stage == "mask":
                    for rep in reps:
                        blobs = rep.service.ctx.blobs

                        def put(data: bytes, blobs: Any = blobs, put: Any = blobs.put) -> str:
                            sha = str(put(data))
                            if sha not in swept:  # the sweep ran once, just after this put
                                swept.add(sha)
                                blobs.path(sha).unlink()
                            return sha

                        monkeypatch.setattr(blobs, "put", put)
                for j, p in enumerate(r.peers):
                    cast(Spread, p.http).to(j + k)
                    assert p.answer() == {"accepted": True, "stage": stage}
                if stage == "mask":  # every row's file there (the close deletes them later)
                    masks = [str(e.payload_sha) for e in _events(replica_db) if e.kind == "mask"]
                    assert len(swept) == 4 and sorted(masks) == sorted(swept)
                    assert all(reps[0].service.ctx.blobs.exists(sha) for sha in masks)
            _assert_reference(r, r.peers)
        finally:
            r.close()


def _unmask_view(state: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(state["survivors"]), tuple(state["dropped"])


def test_a_replica_that_loses_the_race_for_the_next_event_stores_its_own_after_it(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Replica 0 has checked device A's keys against the session it holds and is about to
    store them when device B's keys are stored by replica 2: replica 0's insert collides.
    It folds B's event, checks A's again and stores it next; A is answered 200, not 503."""
    with thread_replicas(3, replica_db, tmp_path / "blobs", clock) as reps:
        r = _spread_round(reps[0], [x.url for x in reps], tiny_bundle, N)
        try:
            a, b = r.peers[:2]
            for p in (a, b):
                _state_at(p, 0)  # replica 0 holds the session, at its start
            store = reps[0].service.store
            real = store.add_secagg_event
            raced: list[int] = []

            def meanwhile(event: SecAggEvent) -> None:
                if not raced:
                    raced.append(event.seq)
                    cast(Spread, b.http).to(1)  # reads on 1, answers on 2
                    assert b.answer() == {"accepted": True, "stage": "advertise"}
                real(event)

            monkeypatch.setattr(store, "add_secagg_event", meanwhile)
            cast(Spread, a.http).to(2)  # reads on 2, answers on 0
            assert a.answer() == {"accepted": True, "stage": "advertise"}
            monkeypatch.undo()
            events = _events(replica_db)
            assert [(e.seq, e.kind, e.device_id) for e in events] == [
                (0, "start", None),
                (1, "advertise", b.http.device_id),
                (2, "advertise", a.http.device_id),
            ]
            assert raced == [1]
            for k, stage in enumerate(STAGES):
                for j, p in enumerate(r.peers):
                    if stage != "advertise" or p not in (a, b):
                        cast(Spread, p.http).to(j + k)
                        p.answer()
            _assert_reference(r, r.peers)
        finally:
            r.close()


class _Loops:
    """Every peer of a round running the SDK's own loop (edge_sdk.secagg.loop) in a thread of
    its own, all at once, through ``url``; the peer at ``lapses`` stops once it has shared
    its keys (its conditions lapsed: a dropout at mask)."""

    def __init__(self, r: SecAggRound, url: str, lapses: int | None = None) -> None:
        self.r, self.url, self.lapses = r, url, lapses
        self.results: dict[int, SecAggResult | BaseException] = {}
        self.threads = [threading.Thread(target=self._device, args=(i,))
                        for i in range(len(r.peers))]  # fmt: skip
        for t in self.threads:
            t.start()

    def join(self) -> dict[int, SecAggResult | BaseException]:
        for t in self.threads:
            t.join(120)
        return self.results

    def _device(self, i: int) -> None:
        p = self.r.peers[i]
        with Transport(self.url) as transport:
            transport.credentials = (p.http.device_id, p.http.secret)
            loop = SecAggLoop(transport, p.assignment, p.delta, p.weight,
                              rng=np.random.default_rng(i),
                              recheck=lambda: self._lapsed(i, loop))  # fmt: skip
            try:
                self.results[i] = loop.run()
            except BaseException as e:  # recorded for the assertions
                self.results[i] = e

    def _lapsed(self, i: int, loop: SecAggLoop) -> tuple[str, ...]:
        return ("not idle",) if i == self.lapses and loop.answered == "share" else ()


def _all_counted(results: dict[int, SecAggResult | BaseException]) -> bool:
    return all(isinstance(x, SecAggResult) and x.counted for x in results.values())


def _masks(db: str) -> int:
    return [e.kind for e in _events(db)].count("mask")


def test_sdk_loops_at_once_behind_a_load_balancer_commit_the_reference(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, clock: FakeClock
) -> None:
    """Every device runs the SDK's loop at the same time through a round-robin balancer over
    three replicas: the replicas race for each event's ``seq`` all along. The last device
    drops out at mask; its pairwise masks are removed with its neighbours' shares."""
    stage_s = 2.0  # devices poll every 5 % of it
    with thread_replicas(3, replica_db, tmp_path / "blobs", clock) as reps, \
            Balancer([x.url for x in reps]) as lb:  # fmt: skip
        r = _spread_round(reps[0], lb.backends, tiny_bundle, N, stage_timeout_s=stage_s)
        try:
            loops = _Loops(r, lb.url, lapses=N - 1)
            wait_for(lambda: _masks(replica_db) == N - 1, timeout=120, what="the masks")
            clock.advance(stage_s + 1)  # the mask stage's deadline: the last device dropped
            results = loops.join()
            assert isinstance(results.pop(N - 1), ConditionsLapsed)
            assert _all_counted(results), results
            _assert_reference(r, r.peers[: N - 1])
            assert {replica for replica, _ in lb.served} == {0, 1, 2}
        finally:
            r.close()


def _events(db: str) -> list[SecAggEvent]:
    """The SecAgg events of every round (each test runs one)."""
    store = open_store(db)
    try:
        return [e for t in store.list_tasks() for rnd in store.list_rounds(t.task_id)
                for e in store.secagg_events(rnd.round_id)]  # fmt: skip
    finally:
        store.close()


class _Served:
    """What :class:`SecAggRound` sets a round up through, for replicas in child processes on
    the system clock: an admin client, and a selection window that passes by waiting."""

    class clock:
        advance = staticmethod(time.sleep)

    def __init__(self, url: str) -> None:
        self.url = url

    def admin(self) -> AdminClient:
        return AdminClient(self.url, ADMIN)


def _only(r: SecAggRound, urls: Sequence[str]) -> None:
    """The devices' own calls reach only ``urls`` (a dead replica left the rotation)."""
    for d in r.http:
        d.close()
        cast(Spread, d).conns = [HttpConnection(u) for u in urls]


@pytest.mark.slow
def test_sigkill_of_a_replica_mid_round_the_others_finish_it(
    replica_db: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """``fedge serve --replica`` processes: half the masked vectors are in (the last one
    stored by replica 1, which holds the session in memory) when replica 1 is SIGKILLed;
    the load balancer drops it, and the other two take the remaining vectors and the
    unmasking from the stored events: the round commits the reference, nobody dropped."""
    blobs = tmp_path / "blobs"
    with ExitStack() as stack:
        reps = [stack.enter_context(serve_replica(replica_db, blobs, tmp_path / f"r{i}.log"))
                for i in range(3)]  # fmt: skip
        r = _spread_round(_Served(reps[2].url), [x.url for x in reps], tiny_bundle, N)
        try:
            for k in range(2):  # advertise, share
                for j, p in enumerate(r.peers):
                    cast(Spread, p.http).to(j + k)
                    p.answer()
            for j, p in enumerate(r.peers[:4]):  # the last one answers on replica 1
                cast(Spread, p.http).to(j + 1)
                p.answer()
            assert _masks(replica_db) == 4
            reps[1].kill()
            _only(r, [reps[0].url, reps[2].url])
            for p in r.peers[4:]:
                p.answer()
            for p in r.peers:
                p.answer()  # unmask
            wait_for(lambda: r.admin.rounds(r.task_id)[0]["state"] != "reporting",
                     what="the commit")  # fmt: skip
            _assert_reference(r, r.peers)
        finally:
            r.close()


@pytest.mark.slow
def test_sigkill_of_a_replica_amid_sdk_loops_the_others_finish_the_round(
    replica_db: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """``fedge serve --replica`` processes behind the balancer, every device's SDK loop
    running at once: replica 1 is SIGKILLed once some masked vectors are in, wherever its
    requests are (one may die after its event is stored, before it answers: the device's
    retry on another replica is a replay, which the loop counts as in). The balancer drops
    it; the devices' retries and the two others finish the round: the reference."""
    blobs = tmp_path / "blobs"
    with ExitStack() as stack:
        reps = [stack.enter_context(serve_replica(replica_db, blobs, tmp_path / f"r{i}.log"))
                for i in range(3)]  # fmt: skip
        lb = stack.enter_context(Balancer([x.url for x in reps]))
        r = _spread_round(_Served(reps[2].url), lb.backends, tiny_bundle, N)
        try:
            loops = _Loops(r, lb.url)
            wait_for(lambda: _masks(replica_db) >= 2, timeout=120, what="some masks")
            reps[1].kill()
            lb.drop(1)
            _only(r, [reps[0].url, reps[2].url])
            assert _all_counted(loops.join()), loops.results
            _assert_reference(r, r.peers)
            assert not reps[1].alive() and (1, 200) in lb.served
        finally:
            r.close()


@pytest.mark.slow
def test_sigkill_of_the_replica_committing_a_secagg_round(
    replica_db: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """The last opened shares reach a replica that stores them, finishes the session and dies
    as it starts the commit, holding the round's lock with its transaction half done
    (tests/coordinator/replicas/dying_replica.py); the device never hears back. Its resend to
    another replica is refused as too late (the session is over), and the other two, whose
    ticks (slowed, so that the dying one commits first) find the session finished in the
    stored events, commit the reference once the dead one's transaction is rolled back."""
    with _dying_and_two_others(replica_db, tmp_path) as (dying, others):
        r = _spread_round(_Served(others[1].url), [x.url for x in (dying, *others)],
                          tiny_bundle, N)  # fmt: skip
        try:
            *first, last = r.peers
            for k, stage in enumerate(STAGES):
                for j, p in enumerate(first if stage == "unmask" else r.peers):
                    cast(Spread, p.http).to(j + k)
                    p.answer()
            stage, opened = last.message(_state_at(last, 1))
            cast(Spread, last.http).to(0)
            with pytest.raises(ConnectionError):
                last.post(stage, opened)
            wait_for(lambda: not dying.alive(), what="the committing replica's death")
            assert dying.process.returncode == -9
            _only(r, [x.url for x in others])
            status, body = last.post(stage, opened)
            assert status == 409 and body["error"]["code"] in ("secagg_stage", "round_closed")
            wait_for(lambda: r.admin.rounds(r.task_id)[0]["state"] != "reporting",
                     what="the takeover")  # fmt: skip
            _assert_reference(r, r.peers)
            assert [e.kind for e in _events(replica_db)][-2:] == ["unmask", "close"]
        finally:
            r.close()
