"""Retention: which rows and blobs a pass deletes, which it must keep, and what a crash in
the middle leaves (rows on a real SQLite file, blobs in a real directory)."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.blobs import OWNER_FILE, BlobStore
from coordinator.clock import FakeClock
from coordinator.config import ConfigError, CoordinatorConfig
from coordinator.embedded import EmbeddedCoordinator
from coordinator.retention import Pruned, Retention, RetentionPolicy
from coordinator.store import (
    Assignment,
    Device,
    Round,
    SQLiteStore,
    Store,
    StoreError,
    Task,
    Update,
    Version,
)
from edge_sdk.frame import decode_tensor
from tests.fixtures.coordinator import GOOD_CONDITIONS, DeviceHTTP, HttpConnection

VERSIONS = 12  # the task is at version 12; rounds 1..12 made versions 1..12
NOW = 1000.0  # long after the history's rounds closed (at times 1..15)


@dataclasses.dataclass
class History:
    store: SQLiteStore
    blobs: BlobStore
    bundle_sha: str
    params: dict[int, str]  # version -> params blob
    state: dict[int, str]  # version -> optimizer state blob
    rounds: dict[int, Round]  # base version -> the committed round on it
    payloads: dict[int, list[str]]  # base version -> its updates' payload blobs
    open_round: Round
    straggler: Round  # an old round with an assignment still in flight (async)

    def retention(self, keep: int, max_rounds: int = 500, receipts_s: float = 0.0) -> Retention:
        # the history kept its closed rounds' payloads, as with retain_updates
        policy = RetentionPolicy(
            keep, 0.0, max_rounds, receipts_s=receipts_s, closed_round_payloads=True
        )
        return Retention(self.store, self.blobs, policy)

    def versions(self) -> list[int]:
        return [v.version for v in self.store.list_versions("t-1")]

    def round_bases(self) -> list[int]:
        return [r.base_version for r in self.store.list_rounds("t-1")]


def _round(number: int, base: int, state: str) -> Round:
    """Round ``number`` opened at time ``number`` (and closed then, unless open)."""
    closed = None if state in ("selecting", "reporting") else float(number)
    t = float(number)
    return Round(0, "t-1", number, "train", state, base, 2, 3, 2, t, t, closed_at=closed)


def _update(aid: str, rnd: Round, sha: str) -> Update:
    return Update(aid, rnd.round_id, "t-1", "d-" + aid, "k", sha, 8, 5, 0.1, {}, 1.0, {})


@pytest.fixture
def history(tmp_path: Path) -> Iterator[History]:
    """A task at version 12 with each version's parameters and optimizer state, a committed
    round per version (two updates each, payloads kept), an open round on version 12 with one
    update, an abandoned round on version 3 and an old round on version 2 whose straggler is
    still in flight."""
    store = SQLiteStore(tmp_path / "fedge.db")
    blobs = BlobStore(tmp_path / "fedge.db.blobs")
    bundle_sha = blobs.put(b"initial parameters")
    store.add_bundle("b-1", {"num_parameters": 2, "files": {"p": {"sha256": bundle_sha}}}, 0.0)
    store.add_task(Task("t-1", "demo", "b-1", "sync", "default", {}, "running", 0, 0, 0, 0.0))
    params, state = {0: bundle_sha}, {}
    store.add_version(Version("t-1", 0, bundle_sha, None, None, 0.0))
    rounds: dict[int, Round] = {}
    payloads: dict[int, list[str]] = {}
    number = 0
    straggler = None
    for v in range(VERSIONS):
        number += 1
        rnd = store.add_round(_round(number, v, "reporting"))
        shas = [blobs.put(f"payload {v} {i}".encode()) for i in range(2)]
        for i, sha in enumerate(shas):
            aid = f"a-{v}-{i}"
            store.add_assignments([Assignment(aid, rnd.round_id, "t-1", "d-" + aid, "train",
                                              "delivered", 1.0)])  # fmt: skip
            store.add_update(_update(aid, rnd, sha))
        store.update_round(rnd.round_id, state="committed", closed_at=float(number))
        store.expire_assignments(rnd.round_id, 2.0)
        rounds[v], payloads[v] = rnd, shas
        params[v + 1] = blobs.put(f"params {v + 1}".encode())
        state[v + 1] = blobs.put(f"adam state {v + 1}".encode())
        store.add_version(Version("t-1", v + 1, params[v + 1], state[v + 1], rnd.round_id, 1.0))
        if v == 2:
            number += 1
            straggler = store.add_round(_round(number, 2, "reporting"))
            store.add_assignments([Assignment("a-late", straggler.round_id, "t-1", "d-late",
                                              "train", "delivered", 1.0)])  # fmt: skip
            store.update_round(straggler.round_id, state="committed", closed_at=float(number))
        if v == 3:
            number += 1
            store.add_round(_round(number, 3, "abandoned"))
    store.update_task("t-1", model_version=VERSIONS)
    open_round = store.add_round(_round(number + 1, VERSIONS, "reporting"))
    store.add_assignments([Assignment("a-open", open_round.round_id, "t-1", "d-o", "train",
                                      "delivered", 1.0)])  # fmt: skip
    # identical bytes to a payload of round 0: the open round still needs that blob
    store.add_update(_update("a-open", open_round, payloads[0][0]))
    assert straggler is not None
    yield History(store, blobs, bundle_sha, params, state, rounds, payloads, open_round,
                  straggler)  # fmt: skip
    store.close()


def test_keeps_the_last_versions_and_what_open_work_needs(history: History) -> None:
    pruned = history.retention(keep=4).run(NOW)
    # versions 9..12 are the last four; 2 is the straggler's (it may still download it)
    assert history.versions() == [2, 9, 10, 11, 12]
    # rounds on kept versions stay, with the straggler's and the open one
    assert history.round_bases() == [2, 9, 10, 11, 12]
    assert history.store.get_round(history.straggler.round_id) is not None
    assert history.store.get_assignment("a-late") is not None
    assert history.store.get_round(history.open_round.round_id) is not None
    # rounds on 0..8 (two on 3) but the straggler's; versions 0, 1, 3..8
    assert (pruned.rounds, pruned.versions, pruned.optimizer_states) == (10, 8, 4)
    # rows hanging off deleted rounds went with them
    assert history.store.get_assignment("a-0-0") is None
    assert history.store.get_update("a-0-1") is None
    assert history.store.get_update("a-9-0") is not None
    # only the current version keeps its optimizer state (the next commit reads it)
    states = {v.version: v.optimizer_sha for v in history.store.list_versions("t-1")}
    assert states == {2: None, 9: None, 10: None, 11: None, 12: history.state[12]}


def test_deletes_exactly_the_blobs_no_remaining_row_names(history: History) -> None:
    history.retention(keep=4).run(NOW)
    b = history.blobs
    assert b.exists(history.bundle_sha)  # version 0 is gone, its bundle is not
    assert b.exists(history.payloads[0][0])  # shared with the open round's update
    assert not b.exists(history.payloads[0][1])
    assert all(not b.exists(s) for v in (1, 3, 4, 8) for s in history.payloads[v])
    assert all(not b.exists(s) for s in history.payloads[2])  # its round went (committed)
    assert all(b.exists(s) for v in (9, 11) for s in history.payloads[v])
    assert [v for v in range(1, VERSIONS + 1) if b.exists(history.params[v])] == [2, 9, 10, 11, 12]
    assert [v for v in range(1, VERSIONS + 1) if b.exists(history.state[v])] == [12]
    referenced = history.store.referenced_blobs(closed_round_payloads=True)
    assert referenced <= set(b.shas())  # nothing a row names was deleted


def test_payloads_are_left_to_the_service_unless_retained(history: History) -> None:
    # Without retain_updates the service deletes a round's payloads when it closes; a pass
    # neither looks them up nor reads every update row to find what still names them.
    policy = RetentionPolicy(4, 0.0, receipts_s=0.0)
    Retention(history.store, history.blobs, policy).run(NOW)
    assert history.versions() == [2, 9, 10, 11, 12]
    assert not history.blobs.exists(history.params[1])
    assert all(history.blobs.exists(s) for s in history.payloads[1])


def test_a_second_pass_deletes_nothing_more(history: History) -> None:
    retention = history.retention(keep=4)
    retention.run(NOW)
    before = history.store.snapshot(), sorted(history.blobs.shas())
    assert retention.run(NOW) == Pruned()
    assert (history.store.snapshot(), sorted(history.blobs.shas())) == before


def test_passes_are_capped_and_catch_up(history: History) -> None:
    retention = history.retention(keep=4, max_rounds=3)
    first = retention.run(NOW)
    assert (first.rounds, first.versions) == (3, 3)
    while retention.run(NOW) != Pruned():
        pass
    assert history.versions() == [2, 9, 10, 11, 12]
    assert history.round_bases() == [2, 9, 10, 11, 12]


def test_keep_one_keeps_the_current_version_and_the_newest_round(history: History) -> None:
    history.store.update_round(history.open_round.round_id, state="abandoned")
    history.store.update_assignment("a-late", state="expired")
    history.retention(keep=1).run(NOW)
    assert history.versions() == [VERSIONS]
    # the round that made the current version stays (the next commit reads its metrics), and
    # the newest round: the next round's number continues from it
    maker = history.rounds[VERSIONS - 1]
    kept = [r.round_id for r in history.store.list_rounds("t-1")]
    assert kept == [maker.round_id, history.open_round.round_id]


def test_recently_closed_rounds_keep_their_receipts(history: History) -> None:
    # round n closed at time n; with a 10 s window at time 20 those closed after 10 stay
    # whatever their version (a device may still replay its upload), and the versions
    # go by the version rule alone
    history.retention(keep=4, receipts_s=10.0).run(20.0)
    assert history.versions() == [2, 9, 10, 11, 12]
    rounds = history.store.list_rounds("t-1")
    straggler = history.straggler.round_id  # in flight: kept anyway
    closed = [r.closed_at for r in rounds if r.closed_at is not None and r.round_id != straggler]
    assert min(closed) == 11.0
    assert history.store.get_update("a-8-0") is not None  # round on version 8, closed at 11
    assert history.store.get_update("a-7-0") is None


def test_a_version_another_replica_commits_during_a_pass_keeps_its_optimizer_state(
    history: History, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Among replicas a pass reads the tasks, then each task's versions: another replica may
    # commit the next version in between (the open round's commit, as one transaction).
    store, blobs = history.store, history.blobs
    listed = store.list_versions
    new = VERSIONS + 1

    def commit_then_list(task_id: str) -> list[Version]:
        if store.get_version(task_id, new) is None:
            params, state = blobs.put(b"params 13"), blobs.put(b"adam state 13")
            with store.atomic():
                store.add_version(Version(task_id, new, params, state, None, 2.0))
                store.update_task(task_id, model_version=new)
        return listed(task_id)

    monkeypatch.setattr(store, "list_versions", commit_then_list)
    history.retention(keep=4).run(NOW)
    # the version the next commit reads as its base keeps its optimizer state (FedAdam's
    # moments): a pass must not take it for a stale one
    current = store.get_version("t-1", new)
    assert current is not None and current.optimizer_sha is not None
    assert blobs.exists(current.optimizer_sha)


def test_a_payload_another_replica_names_during_a_pass_stays(
    history: History, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Among replicas, between the pass's snapshot of what is named and its deletes, another
    # one stores an update with identical bytes (a zero delta, say) and its round closes,
    # its payloads kept (retain_updates): the blob is named by a remaining row.
    store, shared = history.store, history.payloads[1][0]
    snapshot = store.referenced_blobs

    def snapshot_then_store(*, closed_round_payloads: bool) -> set[str]:
        keep = snapshot(closed_round_payloads=closed_round_payloads)
        rnd = store.add_round(_round(40, VERSIONS, "reporting"))
        store.add_assignments([Assignment("a-twin", rnd.round_id, "t-1", "d-twin", "train",
                                          "delivered", 1.0)])  # fmt: skip
        store.add_update(_update("a-twin", rnd, shared))
        store.update_round(rnd.round_id, state="committed", closed_at=NOW)
        return keep

    monkeypatch.setattr(store, "referenced_blobs", snapshot_then_store)
    history.retention(keep=4).run(NOW)
    assert store.get_update("a-twin") is not None
    assert history.blobs.exists(shared)
    assert snapshot(closed_round_payloads=True) <= set(history.blobs.shas())


@pytest.mark.parametrize("between", ["list_rounds", "open_assignments"])
def test_two_replicas_passes_at_once_count_each_deletion_once(
    history: History, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, between: str
) -> None:
    # Replica B's whole pass runs while replica A's is deciding (after A listed the versions,
    # and once after it listed the rounds too): together they count what one pass would.
    other = SQLiteStore(tmp_path / "fedge.db")
    b = Retention(other, BlobStore(history.blobs.root), history.retention(keep=4).policy)
    a = history.retention(keep=4)
    real = getattr(history.store, between)
    by_b: list[Pruned] = []

    def b_first(*args: object) -> object:
        if not by_b:
            by_b.append(b.run(NOW))
        return real(*args)

    monkeypatch.setattr(history.store, between, b_first)
    by_a = a.run(NOW)
    other.close()
    assert history.versions() == [2, 9, 10, 11, 12]
    total = by_a + by_b[0]
    # what test_keeps_the_last_versions_and_what_open_work_needs counts for one pass
    assert (total.rounds, total.versions, total.optimizer_states) == (10, 8, 4), (by_a, by_b)


def test_zero_keeps_everything(history: History) -> None:
    before = history.store.snapshot()
    assert history.retention(keep=0).maybe_run(1e9) is None
    assert history.store.snapshot() == before


def test_runs_at_most_once_per_interval(history: History) -> None:
    retention = Retention(history.store, history.blobs, RetentionPolicy(4, 60.0, receipts_s=0))
    assert retention.maybe_run(100.0) is not None
    assert retention.maybe_run(159.0) is None  # too early
    assert retention.maybe_run(160.0) == Pruned()


def test_crash_between_rows_and_blobs_leaves_only_orphans(
    history: History, monkeypatch: pytest.MonkeyPatch
) -> None:
    def power_cut(sha: str) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(history.blobs, "delete", power_cut)
    with pytest.raises(OSError):
        history.retention(keep=4).run(NOW)
    assert history.versions() == [2, 9, 10, 11, 12]  # the rows' transaction was complete
    assert history.blobs.exists(history.params[1])  # the blobs not yet deleted
    monkeypatch.undo()
    # what start-up does: collect every blob no record names
    keep = history.store.referenced_blobs(closed_round_payloads=True)
    history.blobs.collect(keep)
    assert not history.blobs.exists(history.params[1])
    assert set(history.blobs.shas()) == keep


def test_failed_row_transaction_deletes_nothing(
    history: History, monkeypatch: pytest.MonkeyPatch
) -> None:
    store: Store = history.store

    def disk_full(*args: object, **kwargs: object) -> None:
        raise StoreError("disk full")

    # the last step of the transaction
    monkeypatch.setattr(store, "delete_optimizer_states", disk_full)
    before = store.snapshot(), sorted(history.blobs.shas())
    with pytest.raises(StoreError):
        history.retention(keep=4).run(NOW)
    assert (store.snapshot(), sorted(history.blobs.shas())) == before
    # a pass from tick() logs the failure instead of raising, and tries again later
    assert history.retention(keep=4).maybe_run(1.0) is None
    assert (store.snapshot(), sorted(history.blobs.shas())) == before


def test_a_task_whose_rows_fail_does_not_keep_the_others_blobs(
    history: History, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second task, listed after t-1, whose transaction fails (a lock timeout, say): t-1's
    # rows are deleted by then, and its blobs must go too (no later pass looks for them).
    store, blobs = history.store, history.blobs
    store.add_task(Task("t-2", "other", "b-1", "sync", "default", {}, "running", 5, 0, 0, 1.0))
    theirs = [blobs.put(f"t-2 params {v}".encode()) for v in range(6)]
    for v, sha in enumerate(theirs):
        store.add_version(Version("t-2", v, sha, None, None, 0.0))
    real = store.delete_versions

    def lock_timeout(task_id: str, versions: list[int]) -> int:
        if task_id == "t-2":
            raise StoreError("lock timeout")
        return real(task_id, versions)

    monkeypatch.setattr(store, "delete_versions", lock_timeout)
    with pytest.raises(StoreError):
        history.retention(keep=4).run(NOW)
    assert history.versions() == [2, 9, 10, 11, 12]
    assert not blobs.exists(history.params[1]), "t-1's deleted version left its blob"
    assert set(blobs.shas()) == store.referenced_blobs(closed_round_payloads=True)
    assert [v.version for v in store.list_versions("t-2")] == list(range(6))
    assert all(blobs.exists(sha) for sha in theirs)


# -- end to end: real HTTP, a real coordinator, a fake clock ---------------------------------

N = 64
GOAL = 2
PLAN = {"rounds": 1000, "goal": GOAL, "over_selection": 1.0, "selection_window_s": 0.0,
        "round_deadline_s": 600.0, "server_optimizer": {"name": "fedadam"}}  # fmt: skip


Sent = tuple[DeviceHTTP, str, str, np.ndarray]  # device, assignment, idempotency key, delta


def _one_round(devices: list[DeviceHTTP], clock: FakeClock, seed: int) -> list[Sent]:
    """Every device checks in until it holds an assignment, then uploads: one commit."""
    clock.advance(1.0)  # a tick (and a retention pass) is due
    held: dict[str, tuple[DeviceHTTP, str]] = {}
    for _ in range(3):
        for d in devices:
            if d.device_id not in held:
                answer = d.check_in()
                if answer["action"] == "train":
                    held[d.device_id] = (d, answer["assignment"]["assignment_id"])
    assert len(held) == len(devices)
    rng = np.random.default_rng(seed)
    sent = [(d, aid, uuid.uuid4().hex, rng.normal(0, 0.01, N).astype(np.float32))
            for d, aid in held.values()]  # fmt: skip
    for d, aid, key, delta in sent:
        status, body = d.upload(aid, delta, key=key)
        assert status == 200, body
    return sent


def _table_counts(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = ["rounds", "candidates", "assignments", "updates", "versions"]
        return {t: conn.execute(f"select count(*) from {t}").fetchone()[0] for t in tables}
    finally:
        conn.close()


def _blob_files(db: Path) -> int:
    return sum(1 for p in Path(f"{db}.blobs").rglob("*") if p.is_file() and p.name != OWNER_FILE)


def test_many_rounds_stay_bounded_and_a_restart_continues(
    tmp_path: Path, tiny_bundle: Path, fake_clock: FakeClock
) -> None:
    db = tmp_path / "fedge.db"
    config = {"retain_versions": 3, "retention_interval_s": 0.0, "retain_receipts_s": 0.0,
              "admin_token": "t" * 32}  # fmt: skip
    with EmbeddedCoordinator(db, clock=fake_clock, seed=1, **config) as coord:
        admin = coord.admin()
        task_id = admin.create_task(admin.upload_bundle(tiny_bundle)["bundle_id"], PLAN)["task_id"]
        devices = [DeviceHTTP(coord) for _ in range(GOAL)]
        sizes = []
        for r in range(24):
            last = _one_round(devices, fake_clock, r)
            devices[0].params(task_id, "current")  # every version's frame gets made once
            if r in (9, 23):
                coord.call(coord.service.tick)
                coord.service.blobs.wait_unlinked()  # deletes unlink off the worker thread
                sizes.append((_table_counts(db), _blob_files(db)))
        assert admin.task(task_id)["model_version"] == 24
        # flat: after 24 rounds the same rows and files as after 10
        assert sizes[0] == sizes[1], sizes
        counts, files = sizes[1]
        assert counts["versions"] == 3 and counts["rounds"] <= 4, counts
        assert counts["updates"] <= 4 * GOAL and counts["candidates"] <= 4 * GOAL, counts
        # the bundle's parameters + 3 versions x (parameters + frame) + 1 FedAdam state
        assert files == 1 + 3 * 2 + 1, sorted(Path(f"{db}.blobs").rglob("*"))

        status, _, body = devices[0].raw("GET", f"/v1/tasks/{task_id}/versions/5/params")
        assert status == 410 and json.loads(body)["error"]["code"] == "version_pruned", body
        status, _, body = devices[0].raw("GET", f"/v1/tasks/{task_id}/versions/99/params")
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found", body
        kept = decode_tensor(devices[0].params(task_id, 22))
        current = decode_tensor(devices[0].params(task_id, "current"))
        numbers = [r["round"] for r in admin.rounds(task_id)]
        assert numbers == sorted(numbers) and numbers[-1] == 24
        # every upload acknowledged, though most rows are gone; a resend is not one more
        d, aid, key, delta = last[0]
        status, receipt = d.upload(aid, delta, key=key)
        assert status == 200 and receipt["accepted"], receipt
        assert admin.status()["updates_accepted"] == 24 * GOAL > counts["updates"]

    with EmbeddedCoordinator(db, clock=fake_clock, seed=2, **config) as coord:
        for d in devices:
            d.http.close()
            d.http = HttpConnection(coord.url)
        np.testing.assert_array_equal(decode_tensor(devices[1].params(task_id, 22)), kept)
        np.testing.assert_array_equal(decode_tensor(devices[1].params(task_id, 24)), current)
        _one_round(devices, fake_clock, 99)
        admin = coord.admin()
        assert admin.task(task_id)["model_version"] == 25
        # round numbers continue from the newest kept round, with the old ones deleted
        assert admin.rounds(task_id)[-1]["round"] == 25
        coord.call(coord.service.tick)
        assert _table_counts(db)["versions"] == 3
        assert admin.status()["updates_accepted"] == 25 * GOAL  # across the restart


def test_parameter_frames_are_encoded_once_and_served_conditionally(
    clocked_coordinator: EmbeddedCoordinator, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import coordinator.versions as versions

    encoded: list[int] = []
    real = versions.encode_params

    def counting(params: np.ndarray) -> bytes:
        encoded.append(len(params))
        return real(params)

    monkeypatch.setattr(versions, "encode_params", counting)
    admin = clocked_coordinator.admin()
    task_id = admin.create_task(admin.upload_bundle(tiny_bundle)["bundle_id"], PLAN)["task_id"]
    d = DeviceHTTP(clocked_coordinator)
    path = f"/v1/tasks/{task_id}/versions/0/params"
    first = d.raw("GET", path)
    again = d.raw("GET", path)
    assert first[0] == again[0] == 200 and first[2] == again[2]
    assert encoded == [N]  # once, whatever the number of downloads
    expected = np.frombuffer((tiny_bundle / "params.f32").read_bytes(), dtype="<f4")
    np.testing.assert_array_equal(decode_tensor(first[2]), expected)
    assert first[1]["content-type"] == "application/x-fedge-frame"
    assert "immutable" in first[1]["cache-control"]
    status, _, body = d.raw("GET", path, headers={"If-None-Match": first[1]["etag"]})
    assert (status, body) == (304, b"")
    status, _, body = d.raw("GET", path, headers={"Range": "bytes=0-3"})
    assert (status, body) == (206, b"FEDG")
    current = d.raw("GET", f"/v1/tasks/{task_id}/versions/current/params")
    assert current[2] == first[2] and current[1]["cache-control"] == "no-cache"
    assert encoded == [N]


# -- devices --------------------------------------------------------------------------------


def _device(device_id: str, registered_at: float, last_seen_at: float | None = None) -> Device:
    return Device(device_id, "00" * 16, "ab" * 32, "linux", "x86_64", ("ort-step",), "default",
                  registered_at, last_seen_at)  # fmt: skip


def test_devices_are_kept_unless_an_inactivity_bound_is_set(history: History) -> None:
    store = history.store
    store.add_device(_device("d-gone", 0.0))  # registered, never seen since
    store.add_device(_device("d-seen", 0.0, 950.0))
    store.add_device(_device("d-new", 980.0))
    store.add_device(_device("d-late", 0.0))  # the straggler's device: still training
    store.update_device("d-late", last_seen_at=10.0)
    store.add_assignments(
        [Assignment("a-busy", history.open_round.round_id, "t-1", "d-late", "train",
                    "delivered", 1.0)]
    )  # fmt: skip
    assert history.retention(keep=4).run(1000.0).devices == 0  # no bound: nobody goes
    assert store.count_devices() == 4
    policy = RetentionPolicy(4, 0.0, device_inactivity_s=100, receipts_s=0.0)
    bounded = Retention(store, history.blobs, policy)
    assert bounded.run(1000.0).devices == 1
    assert store.get_device("d-gone") is None
    assert all(store.get_device(d) is not None for d in ("d-seen", "d-new", "d-late"))


def test_check_ins_are_recorded_coarsely(history: History) -> None:
    store = history.store
    store.add_device(_device("d-1", 0.0))
    off = history.retention(keep=4)
    off.saw("d-1", 0.0, 500.0)  # no bound: nothing is written
    device = store.get_device("d-1")
    assert device is not None and device.last_seen_at is None
    on = Retention(store, history.blobs, RetentionPolicy(4, 0.0, device_inactivity_s=100))
    on.saw("d-1", 0.0, 500.0)
    on.saw("d-1", 500.0, 509.0)  # within a tenth of the bound of the stored time: no write
    device = store.get_device("d-1")
    assert device is not None and device.last_seen_at == 500.0
    on.saw("d-1", 500.0, 510.0)
    device = store.get_device("d-1")
    assert device is not None and device.last_seen_at == 510.0


def test_inactive_devices_must_register_again(
    tmp_path: Path, tiny_bundle: Path, fake_clock: FakeClock
) -> None:
    config = {"device_inactivity_s": 100.0, "retention_interval_s": 0.0}
    with EmbeddedCoordinator(tmp_path / "fedge.db", clock=fake_clock, seed=1, **config) as coord:
        active, idle = DeviceHTTP(coord), DeviceHTTP(coord)
        for _ in range(8):  # 160 s, a check-in every 20 s
            fake_clock.advance(20.0)
            assert active.check_in()["action"] == "wait"
        coord.call(coord.service.tick)
        status, _, body = idle.raw("POST", "/v1/checkin", b'{"runtimes": ["ort-step"]}')
        assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized", body
        assert active.check_in()["action"] == "wait"
        assert coord.call(coord.service.store.count_devices) == 1


def test_a_device_deleted_while_it_checks_in_gets_no_assignment(
    tmp_path: Path, tiny_bundle: Path, fake_clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention on another replica deleted an inactive device's row between its check-in's
    authentication and the rest of it: the check-in went on, recording the visit failed (and
    was only logged) and the device was handed an assignment it could never upload (401);
    now it is answered 401 at once and nothing of it is stored."""
    config = {"device_inactivity_s": 100.0, "retention_interval_s": 3600.0}
    with EmbeddedCoordinator(tmp_path / "fedge.db", clock=fake_clock, seed=1, **config) as coord:
        admin = coord.admin()
        plan = {"goal": 1, "over_selection": 1.0, "selection_window_s": 0.0, "rounds": 3,
                "eligibility": {"require_charging": False}}  # fmt: skip
        task_id = admin.create_task(admin.upload_bundle(tiny_bundle)["bundle_id"], plan)["task_id"]
        idle = DeviceHTTP(coord)
        fake_clock.advance(200.0)  # past the bound: the next check-in records the visit
        service, store = coord.service, coord.service.store
        authenticate = service.authenticate

        def then_deleted(authorization: str | None) -> Any:
            who = authenticate(authorization)
            assert store.delete_devices(fake_clock.now() - 100.0) == 1  # the other replica
            return who

        monkeypatch.setattr(service, "authenticate", then_deleted)
        checkin = {"runtimes": idle.runtimes, "conditions": GOOD_CONDITIONS}
        status, _, body = idle.raw("POST", "/v1/checkin", json.dumps(checkin).encode())
        assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized", body
        assert [coord.call(store.round_assignments, r["round_id"])
                for r in admin.rounds(task_id)] in ([], [[]])  # fmt: skip
        assert coord.call(store.count_devices) == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"retain_versions": -1},
        {"retention_interval_s": -1.0},
        {"retain_receipts_s": -5.0},
        {"device_inactivity_s": 0.0},
        # NaN passed every comparison: passes on every tick, no round ever old enough to go,
        # and (its max with the orphan age) the replicas' orphan sweep never run
        {"retention_interval_s": float("nan")},
        {"retain_receipts_s": float("nan")},
    ],
)
def test_bad_retention_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        CoordinatorConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        CoordinatorConfig.from_dict(bad)


def test_async_straggler_keeps_its_version_until_it_reports(
    tmp_path: Path, tiny_bundle: Path, fake_clock: FakeClock
) -> None:
    config = {"retain_versions": 2, "retention_interval_s": 0.0, "retain_receipts_s": 0.0}
    with EmbeddedCoordinator(tmp_path / "fedge.db", clock=fake_clock, seed=1, **config) as coord:
        admin = coord.admin()
        plan = {"rounds": 100, "buffer_k": 2, "max_concurrency": 6, "round_deadline_s": 600.0}
        bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
        task_id = admin.create_task(bundle_id, plan, mode="async")["task_id"]
        straggler, *fast = [DeviceHTTP(coord) for _ in range(3)]
        late = straggler.check_in()["assignment"]
        assert late["model_version"] == 0
        rng = np.random.default_rng(5)
        for _ in range(6):
            for d in fast:
                work = d.check_in()["assignment"]
                status, body = d.upload(work["assignment_id"], rng.normal(0, 0.01, N))
                assert status == 200, body
            fake_clock.advance(1.0)
            coord.call(coord.service.tick)
        assert admin.task(task_id)["model_version"] == 6

        def version(v: int) -> int:
            return straggler.raw("GET", f"/v1/tasks/{task_id}/versions/{v}/params")[0]

        # versions 5 and 6 are the last two; 0 is the straggler's, still in flight
        assert [version(v) for v in range(7)] == [200, 410, 410, 410, 410, 200, 200]
        status, body = straggler.upload(late["assignment_id"], rng.normal(0, 0.01, N))
        assert status == 200, body
        fake_clock.advance(1.0)
        coord.call(coord.service.tick)
        assert version(0) == 410  # nothing needs it any more
