"""SecAgg+ rounds over real HTTP against a real coordinator (SQLite file, blob directory),
devices built from the device-side primitives (tests/coordinator/secagg/peers.py).

The committed version must equal numpy's weighted mean of the survivors' clipped updates
within the quantisation bound, whoever dropped at whichever stage; too few survivors abandon
the round; nothing the server stores is an update in the clear.
"""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from coordinator.secagg import STAGES
from tests.coordinator.secagg.peers import STAGE_S, TRAIN_S, Peer, SecAggRound
from tests.fixtures.coordinator import DeviceHTTP


def run_stages(r: SecAggRound, fake_clock, drops: dict[str, float], seed: int = 0) -> list[Peer]:
    """Every stage's cohort answers but a fraction ``drops[stage]`` of it, which vanishes
    (the clock then passes the stage's deadline); returns the peers that uploaded a masked
    vector: the survivors whose sum the server must unmask."""
    rng = np.random.default_rng(seed)
    alive, uploaded = list(r.peers), list[Peer]()
    for stage in STAGES:
        if alive[0].state()["stage"] == "closed":  # abandoned
            break
        assert all(p.state()["stage"] == stage for p in alive)
        gone = set(rng.choice(len(alive), size=round(drops.get(stage, 0.0) * len(alive)),
                              replace=False).tolist())  # fmt: skip
        for i, p in enumerate(alive):
            if i not in gone:
                p.answer()
        answered = [p for i, p in enumerate(alive) if i not in gone]
        uploaded = answered if stage == "mask" else uploaded
        alive = answered
        if gone:
            fake_clock.advance((TRAIN_S if stage == "advertise" else STAGE_S) + 1)
            alive[0].state()  # any call applies the deadline that passed
    return uploaded


@pytest.mark.parametrize(
    ("stage", "drop"), [("advertise", 0.0)] + [(s, d) for s in STAGES for d in (0.1, 0.3)]
)
def test_committed_version_is_the_survivors_weighted_mean(
    clocked_coordinator, fake_clock, tiny_bundle, stage: str, drop: float
) -> None:
    r = SecAggRound(clocked_coordinator, tiny_bundle, 10)
    try:
        survivors = run_stages(r, fake_clock, {stage: drop})
        assert len(survivors) == 10 - (round(drop * 10) if stage != "unmask" else 0)
        [rnd] = r.admin.rounds(r.task_id)
        assert rnd["state"] == "committed", rnd["metrics"]
        assert rnd["metrics"]["reported"] == len(survivors)
        for p in r.peers:  # the session's end, with pace steering like an upload's answer
            state = p.state()
            assert state.pop("retry_after_s") > 0
            assert state == {"stage": "closed", "outcome": "committed"}
        expected, bound = r.expected_mean(survivors)
        got = r.version(1) - r.base
        assert abs(got - expected).max() <= bound
        assert abs(got).max() > 10 * bound  # the update really moved the model
    finally:
        r.close()


@pytest.mark.parametrize(("stage", "drop"), [("advertise", 0.6), ("share", 0.6), ("mask", 0.6)])
def test_fewer_survivors_than_the_threshold_abandon_the_round(
    clocked_coordinator, fake_clock, tiny_bundle, stage: str, drop: float
) -> None:
    r = SecAggRound(clocked_coordinator, tiny_bundle, 10)
    try:
        run_stages(r, fake_clock, {stage: drop})
        [rnd] = r.admin.rounds(r.task_id)
        assert rnd["state"] == "abandoned"
        assert rnd["metrics"]["reason"] == f"too_few_after_{stage}"
        assert r.admin.task(r.task_id)["model_version"] == 0
        # like any abandoned round: the next check-in opens a new one on the same version
        assert r.http[0].check_in()["action"] == "wait"
        assert [x["base_version"] for x in r.admin.rounds(r.task_id)] == [0, 0]
    finally:
        r.close()


@pytest.mark.parametrize("extra", [{}, {"dp": {"clip": 2.0, "noise_multiplier": 1.0}}])
def test_a_window_that_times_out_with_one_candidate_abandons_the_selection_not_the_task(
    clocked_coordinator, fake_clock, tiny_bundle, extra: dict
) -> None:
    """``min_reports`` may be 1 (goal 3 x 0.3), but no SecAgg session has one device: a
    window that times out with a single candidate is abandoned like one with too few
    candidates, and the check-in opens a new one. Selecting it failed the task (the session,
    or distributed DP's threshold for it, could not be built)."""
    admin = clocked_coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    plan = {"goal": 3, "over_selection": 1.0, "min_reporting_fraction": 0.3, "secagg": {},
            "selection_window_s": 1.0, "selection_timeout_s": 5.0, **extra}  # fmt: skip
    task_id = admin.create_task(bundle_id, plan)["task_id"]
    d = DeviceHTTP(clocked_coordinator)
    try:
        assert d.check_in()["action"] == "wait"
        fake_clock.advance(6.0)  # past the selection timeout
        assert d.check_in()["action"] == "wait"
        task = admin.task(task_id)
        assert task["state"] == "running", task
        timed_out, opened = admin.rounds(task_id)
        assert (timed_out["state"], timed_out["metrics"]["reason"]) == (
            "abandoned", "selection_timeout")  # fmt: skip
        assert opened["state"] == "selecting"
    finally:
        d.close()
        admin.close()


def test_over_selection_takes_the_first_goal_devices_that_advertise(
    clocked_coordinator, fake_clock, tiny_bundle
) -> None:
    r = SecAggRound(clocked_coordinator, tiny_bundle, 10, goal=7)
    try:
        for p in r.peers[:7]:
            p.answer()
        # the stage closed at goal, without waiting for the deadline: the rest are out
        assert r.peers[0].state()["stage"] == "share"
        late = r.peers[7].state()
        assert late.get("excluded") is True
        status, body = r.peers[7].post(*r.peers[7].message({**late, "stage": "advertise"}))
        assert (status, body["error"]["code"]) == (409, "secagg_stage")
        for _stage in STAGES[1:]:
            for p in r.peers[:7]:
                p.answer()
        [rnd] = r.admin.rounds(r.task_id)
        assert rnd["state"] == "committed" and rnd["metrics"]["reported"] == 7
        expected, bound = r.expected_mean(r.peers[:7])
        assert abs(r.version(1) - r.base - expected).max() <= bound
    finally:
        r.close()


def test_a_restarted_coordinator_resumes_the_session_mid_stage(
    tmp_path, fake_clock, tiny_bundle
) -> None:
    from coordinator.embedded import EmbeddedCoordinator
    from tests.fixtures.coordinator import HttpConnection

    coord = EmbeddedCoordinator(tmp_path / "fedge.db", clock=fake_clock, seed=1).start()
    r = SecAggRound(coord, tiny_bundle, 8)
    try:
        for _stage in ("advertise", "share"):
            for p in r.peers:
                p.answer()
        half = r.peers[:4]
        for p in half:  # half the masked vectors are in, then the coordinator goes down
            p.answer()
        coord.stop()
        coord.start()  # a new service on the same database and blobs: nothing in memory
        for d in r.http:
            d.http = HttpConnection(coord.url)
        r.admin = coord.admin()
        assert r.peers[0].state()["stage"] == "mask"
        status, body = half[0].post("mask", b"\x00" * 10)  # its upload was kept: a replay
        assert (status, body["error"]["code"]) == (409, "secagg_replay")
        for p in r.peers[4:]:
            p.answer()
        for p in r.peers:
            p.answer()  # unmask
        [rnd] = r.admin.rounds(r.task_id)
        assert rnd["state"] == "committed", rnd["metrics"]
        expected, bound = r.expected_mean(r.peers)
        assert abs(r.version(1) - r.base - expected).max() <= bound
    finally:
        r.close()
        coord.stop()


def test_the_server_stores_no_update_in_the_clear(
    tmp_path, fake_clock, tiny_bundle, monkeypatch
) -> None:
    from scipy import stats

    from coordinator import service
    from coordinator.embedded import EmbeddedCoordinator
    from coordinator.rounds import sync
    from coordinator.secagg import session
    from edge_sdk.codecs import encode_update
    from edge_sdk.secagg import ring

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("an individual update was decoded")

    # the plain-update decoders are never reached; the ring decoder sees one vector: the sum
    monkeypatch.setattr(sync, "decode_delta", never)
    monkeypatch.setattr(service, "decode_delta", never)
    sums: list[object] = []
    real_decode = session.ring.decode_sum

    def decode_once(total: np.ndarray, spec: ring.RingSpec) -> tuple[np.ndarray, int]:
        sums.append(total)
        return real_decode(total, spec)

    monkeypatch.setattr(session.ring, "decode_sum", decode_once)
    # closed rounds' payloads kept, so that everything the round ever stored is inspected
    coord = EmbeddedCoordinator(tmp_path / "fedge.db", clock=fake_clock, retain_updates=True)
    r = SecAggRound(coord.start(), tiny_bundle, 12)
    try:
        run_stages(r, fake_clock, {"mask": 0.25})
        assert r.admin.rounds(r.task_id)[0]["state"] == "committed"
        assert len(sums) == 1
        store = coord.service.store
        snapshot = repr(coord.call(store.snapshot)).encode()
        blob_dir = coord.config.blob_dir
        blobs = [f.read_bytes() for f in blob_dir.rglob("*") if f.is_file()]
        spec = r.peers[0].spec
        for p in r.peers:
            clear = [
                p.delta.astype("<f4").tobytes()[:64],
                encode_update(p.delta.astype(np.float32), "fp32")[0][-64:],
                ring.pack(
                    ring.encode(p.delta, p.weight, spec, np.random.default_rng(p.weight)),
                    spec.bits,
                )[:48],
            ]
            for needle in clear:
                assert needle not in snapshot
                assert not any(needle in b for b in blobs)
        # what it stored of the round: masked vectors, which look uniform in the ring
        events = coord.call(store.secagg_events, 1)
        masked = [coord.service.blobs.read(e.payload_sha) for e in events if e.kind == "mask"]
        assert len(masked) == 9
        values = np.concatenate([ring.unpack(m, spec.bits, 65) for m in masked])
        uniform = values.astype(np.float64) / 2.0**spec.bits
        assert stats.kstest(uniform, "uniform").pvalue > 1e-3
        # the test can fail: the same devices' unmasked ring vectors are far from uniform
        plain = np.concatenate([ring.encode(p.delta, p.weight, spec, np.random.default_rng(0))
                                for p in r.peers]).astype(np.float64) / 2.0**spec.bits  # fmt: skip
        assert stats.kstest(plain, "uniform").pvalue < 1e-6
    finally:
        r.close()
        coord.stop()


def test_bad_input_at_each_stage_gets_a_clear_refusal_and_changes_nothing(
    clocked_coordinator, fake_clock, tiny_bundle
) -> None:
    from tests.coordinator.secagg.peers import b64
    from tests.fixtures.coordinator import DeviceHTTP

    coord = clocked_coordinator
    r = SecAggRound(coord, tiny_bundle, 8)
    store = coord.service.store

    def refused(peer: Peer, stage: str, payload: object, status: int, code: str) -> None:
        before = coord.call(store.snapshot)
        got_status, body = peer.post(stage, payload)
        assert (got_status, body["error"]["code"]) == (status, code), body
        assert body["error"]["message"]
        assert coord.call(store.snapshot) == before

    try:
        first, last = r.peers[0], r.peers[-1]
        good = first.message(first.state())[1]
        key = good["c_public"]
        # advertise
        refused(first, "advertise", {**good, "c_public": b64(b"\x01" * 31)}, 400, "secagg_invalid")
        refused(first, "advertise", {**good, "s_public": "not base64!"}, 400, "secagg_invalid")
        refused(first, "advertise", {"c_public": key, "s_public": key}, 400, "secagg_invalid")
        refused(first, "advertise", {**good, "extra": 1}, 400, "invalid_request")
        refused(first, "advertise", [1, 2], 400, "invalid_request")
        low_order = b64(bytes(32))  # agreement with it fails: it would stall the neighbours
        refused(first, "advertise", {**good, "s_public": low_order}, 400, "secagg_invalid")
        refused(first, "share", {"shares": {}}, 409, "secagg_stage")
        refused(first, "mask", b"\x00" * 8, 409, "secagg_stage")
        refused(first, "sideways", {}, 400, "secagg_invalid")
        assert first.post("advertise", good)[0] == 200
        refused(first, "advertise", good, 409, "secagg_replay")
        refused(r.peers[1], "advertise", {**good, "s_public": b64(b"\x02" * 32)}, 400,
                "secagg_invalid")  # another device's key: keys must be fresh  # fmt: skip
        stranger = DeviceHTTP(coord)  # not selected: the assignment is someone else's
        stranger.http, first_http = first.http.http, first.http
        first.http = stranger
        refused(first, "advertise", good, 403, "forbidden")
        first.http = first_http
        for p in r.peers[1:-1]:
            p.answer()
        fake_clock.advance(101.0)  # the last device never advertised
        # share
        state = first.state()
        assert state["stage"] == "share" and last.state()["excluded"] is True
        shares = first.message(state)[1]["shares"]
        refused(last, "share", {"shares": {}}, 403, "secagg_excluded")
        outsider = next(str(u) for u in range(8) if str(u) not in shares
                        and u != state["index"])  # fmt: skip
        refused(first, "share", {"shares": {**shares, outsider: next(iter(shares.values()))}},
                400, "secagg_invalid")  # fmt: skip
        refused(first, "share", {"shares": dict(list(shares.items())[1:])}, 400,
                "secagg_invalid")  # fmt: skip
        short = {v: b64(b"\x00" * 10) for v in shares}
        refused(first, "share", {"shares": short}, 400, "secagg_invalid")
        refused(first, "share", {"shares": {"-1": key}}, 400, "secagg_invalid")
        v = next(iter(shares))  # the same neighbour twice, once as "0<v>"
        refused(first, "share", {"shares": {**shares, "0" + v: shares[v]}}, 400,
                "secagg_invalid")  # fmt: skip
        assert first.post("share", {"shares": shares})[0] == 200
        refused(first, "share", {"shares": shares}, 409, "secagg_replay")
        for p in r.peers[1:-1]:
            p.answer()
        # mask
        stage, vector = first.message(first.state())
        assert stage == "mask"
        refused(first, "mask", vector[:-1], 400, "secagg_invalid")
        refused(first, "mask", vector + b"\x00" * 3, 400, "secagg_invalid")
        width = len(vector) // 65
        too_big = b"\xff" * width + vector[width:]  # an element at or above 2**bits
        if first.spec.bits % 8:
            refused(first, "mask", too_big, 400, "secagg_invalid")
        refused(last, "mask", vector, 403, "secagg_excluded")
        assert first.post("mask", vector)[0] == 200
        refused(first, "mask", vector, 409, "secagg_replay")
        # a plain upload is refused in a SecAgg task
        status, body = first.http.upload(first.id, np.zeros(64, np.float32))
        assert (status, body["error"]["code"]) == (409, "secagg_stage")
        for p in r.peers[1:-1]:
            p.answer()
        # unmask
        stage, opened = first.message(first.state())
        assert stage == "unmask"
        refused(first, "unmask", {"shares": dict(list(opened["shares"].items())[1:])}, 400,
                "secagg_invalid")  # fmt: skip
        zeros = {u: b64(b"\x00" * 65) for u in opened["shares"]}
        refused(first, "unmask", {"shares": zeros}, 400, "secagg_invalid")
        assert first.post("unmask", opened)[0] == 200
        refused(first, "unmask", opened, 409, "secagg_replay")
        for p in r.peers[1:-1]:
            p.answer()
        [rnd] = r.admin.rounds(r.task_id)
        assert rnd["state"] == "committed" and rnd["metrics"]["reported"] == 7
        # the wrong round: a message for a session whose round has closed
        refused(first, "unmask", opened, 409, "round_closed")
        expected, bound = r.expected_mean(r.peers[:-1])
        assert abs(r.version(1) - r.base - expected).max() <= bound
        stranger.close()
    finally:
        r.close()


def test_a_step_another_coordinator_took_is_folded_in_not_a_failed_task(
    clocked_coordinator, fake_clock, tiny_bundle
) -> None:
    """Two coordinators on one database: the one holding a stale session loses the race for
    the next event, folds the other's event, checks its message again and stores it after
    it; the task goes on."""
    from coordinator.store import SecAggEvent

    coord = clocked_coordinator
    r = SecAggRound(coord, tiny_bundle, 4)
    try:
        r.peers[0].answer()
        store = coord.service.store
        round_id = coord.call(store.open_round, r.task_id).round_id
        seq = len(coord.call(store.secagg_events, round_id))
        # what another replica would have written: the next device's advertisement
        other = r.peers[1]
        stage, msg = other.message(other.state())
        event = SecAggEvent(round_id, seq, "advertise", other.http.device_id,
                            {k: msg[k] for k in ("c_public", "s_public")}, None, 0.0)  # fmt: skip
        coord.call(store.add_secagg_event, event)
        status, body = r.peers[2].post(*r.peers[2].message(r.peers[2].state()))
        assert (status, body) == (200, {"accepted": True, "stage": "advertise"})
        kinds = [(e.kind, e.device_id) for e in coord.call(store.secagg_events, round_id)]
        assert kinds[seq:] == [("advertise", other.http.device_id),
                               ("advertise", r.peers[2].http.device_id)]  # fmt: skip
        # the other coordinator's step is in this one's session too
        assert other.post(stage, msg)[1]["error"]["code"] == "secagg_replay"
        r.peers[3].answer()
        for _ in range(3):
            for p in r.peers:
                p.answer()
        [rnd] = r.admin.rounds(r.task_id)
        assert rnd["state"] == "committed" and r.admin.task(r.task_id)["state"] == "running"
        expected, bound = r.expected_mean(r.peers)
        assert abs(r.version(1) - r.base - expected).max() <= bound
    finally:
        r.close()


def test_a_device_that_aborts_is_a_dropout_no_stage_waits_for(
    clocked_coordinator, fake_clock, tiny_bundle
) -> None:
    r = SecAggRound(clocked_coordinator, tiny_bundle, 6)
    try:
        for p in r.peers:
            p.answer()  # advertise
        quitter = r.peers[0]
        status, _ = quitter.http.abort(quitter.id)  # its conditions lapsed before sharing
        assert status == 200
        for p in r.peers[1:]:
            p.answer()  # share: the stage ends at once, without its deadline
        assert r.peers[1].state()["stage"] == "mask"
        assert quitter.state().get("excluded") is True
        for _stage in ("mask", "unmask"):
            for p in r.peers[1:]:
                p.answer()
        [rnd] = r.admin.rounds(r.task_id)
        assert rnd["state"] == "committed" and rnd["metrics"]["reported"] == 5
        assert rnd["metrics"]["aborted"] == 1
        expected, bound = r.expected_mean(r.peers[1:])
        assert abs(r.version(1) - r.base - expected).max() <= bound
    finally:
        r.close()


def test_a_device_that_aborted_sends_nothing_more_to_its_session(
    clocked_coordinator, fake_clock, tiny_bundle
) -> None:
    """An abort is final, as for a plain upload (``409 round_closed``): the device's later
    messages are refused and its assignment stays aborted. Before, its share (sent while
    the stage still waited for others) was accepted, it went on to mask and unmask, counted
    as a survivor, and the commit marked the aborted assignment "reported"."""
    r = SecAggRound(clocked_coordinator, tiny_bundle, 6)
    try:
        for p in r.peers:
            p.answer()  # advertise
        quitter = r.peers[0]
        state = quitter.state()
        assert quitter.http.abort(quitter.id)[0] == 200
        status, body = quitter.post(*quitter.message(state))
        assert status == 409 and body["error"]["code"] == "round_closed", body
        for _stage in ("share", "mask", "unmask"):
            for p in r.peers[1:]:
                p.answer()
        [rnd] = r.admin.rounds(r.task_id)
        assert rnd["state"] == "committed" and rnd["metrics"]["reported"] == 5
        assert rnd["metrics"]["aborted"] == 1
        store = clocked_coordinator.service.store
        a = clocked_coordinator.call(store.get_assignment, quitter.id)
        assert a.state == "aborted"
    finally:
        r.close()


def test_a_failing_event_write_at_each_stage_answers_503_and_the_retry_goes_through(
    clocked_coordinator, tiny_bundle
) -> None:
    """A storage error while a stage's message is stored (the masked vector's blob is already
    in place at the mask stage) refuses it with 503 and changes nothing the session holds:
    the same message again is accepted, and the round commits the survivors' mean."""
    r = SecAggRound(clocked_coordinator, tiny_bundle, 6)
    store = clocked_coordinator.service.store
    real = store.add_secagg_event
    try:
        for stage in STAGES:
            first, *rest = r.peers
            state = first.state()
            assert state["stage"] == stage
            message = first.message(state)
            round_id = clocked_coordinator.call(store.open_round, r.task_id).round_id
            before = clocked_coordinator.call(store.secagg_events, round_id)

            def failing(event: object) -> None:
                raise sqlite3.OperationalError("disk I/O error")

            store.add_secagg_event = failing
            try:
                status, body = first.post(*message)
            finally:
                store.add_secagg_event = real
            assert (status, body["error"]["code"]) == (503, "overloaded"), body
            assert clocked_coordinator.call(store.secagg_events, round_id) == before
            assert first.state()["stage"] == stage  # not taken as answered
            status, body = first.post(*message)
            assert status == 200, body
            for p in rest:
                p.answer()
        [rnd] = r.admin.rounds(r.task_id)
        assert rnd["state"] == "committed", rnd["metrics"]
        expected, bound = r.expected_mean(r.peers)
        assert abs(r.version(1) - r.base - expected).max() <= bound
    finally:
        store.add_secagg_event = real
        r.close()
