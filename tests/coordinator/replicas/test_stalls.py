"""A replica that stalls without dying while it holds a round's row lock: the others give
up waiting after the store's lock timeout (a transient error: 503, retry), and the server
ends the stalled session after its idle timeout, so another replica takes the round."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from coordinator.clock import FakeClock
from coordinator.readiness import stale_after
from coordinator.store import Round, Task, open_store
from coordinator.store.postgres import PostgresStore
from edge_sdk.protocol import Route
from tests.coordinator.replicas.fleet import start_task, thread_replicas
from tests.fixtures.coordinator import HttpConnection


def test_a_stalled_lock_holder_is_cut_off_and_another_replica_proceeds(
    postgres_url: str,
) -> None:
    stalled = PostgresStore(postgres_url, idle_timeout_s=1.5)
    other = PostgresStore(postgres_url, lock_timeout_s=0.3)
    try:
        stalled.add_bundle("b-1", {"num_parameters": 8, "files": {}}, 0.0)
        stalled.add_task(Task("t-1", "x", "b-1", "sync", "default", {}, "running", 0, 0, 0, 1.0))
        rnd = stalled.add_round(Round(0, "t-1", 1, "train", "reporting", 0, 3, 4, 3, 1.0, 9.0))
        holding, resume = threading.Event(), threading.Event()
        outcome: list[BaseException | None] = []

        def hold_and_stall() -> None:
            try:
                with stalled.atomic():
                    stalled.lock_round(rnd.round_id)
                    stalled.update_round(rnd.round_id, state="committed")  # never committed
                    holding.set()
                    resume.wait(10)  # paused: no statement, the transaction left open
                outcome.append(None)
            except BaseException as e:  # what the stalled replica meets when it wakes
                outcome.append(e)

        thread = threading.Thread(target=hold_and_stall)
        thread.start()
        assert holding.wait(10)
        started = time.monotonic()
        with pytest.raises(other.transient_errors), other.atomic():
            other.lock_round(rnd.round_id)  # gives up instead of hanging the request
        assert time.monotonic() - started < 5.0  # not until the holder resumes (10 s)
        taken = None
        while taken is None and time.monotonic() - started < 8.0:
            time.sleep(0.1)
            with other.atomic():
                taken = other.lock_round(rnd.round_id, skip_locked=True)
        # Its lock went with its session (after its idle timeout, well before it resumed),
        # and its write was rolled back.
        assert not resume.is_set() and time.monotonic() - started >= 1.0
        assert taken is not None and taken.state == "reporting"
        resume.set()
        thread.join()
        assert outcome and isinstance(outcome[0], stalled.transient_errors)
        # The stalled replica carries on with a new connection (and the same settings).
        stalled_round = stalled.get_round(rnd.round_id)
        assert stalled_round is not None and stalled_round.state == "reporting"
        row = stalled.conn.execute("show idle_in_transaction_session_timeout").fetchone()
        assert row is not None and row[0] == "1500ms"
    finally:
        stalled.close()
        other.close()


def test_settings_named_in_the_url_are_kept(postgres_url: str) -> None:
    assert "options=" in postgres_url  # the fixture's search_path
    store = open_store(postgres_url.replace("options=", "options=-clock_timeout%3D7s%20", 1))
    try:
        row = store.conn.execute("show lock_timeout").fetchone()  # type: ignore[attr-defined]
        assert row is not None and row[0] == "7s"
    finally:
        store.close()


PLAN = {"rounds": 1, "goal": 2, "over_selection": 1.0, "selection_window_s": 0.0,
        "round_deadline_s": 600.0, "robust": "none", "first_come": True,
        "eligibility": {"require_charging": False}}  # fmt: skip


@pytest.mark.slow
def test_a_round_held_past_the_readiness_window_leaves_other_replicas_ready(
    postgres_url: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """Another replica holds a round's row lock for longer than readiness allows a tick to
    be late (a long robust close; here a second connection). An upload into that round
    waits on this replica's one worker thread for the lock: it must give up (503, retry)
    while the replica's ticks still finish, or ``/v1/ready`` turns 503 and the balancer
    takes every replica with such an upload out of rotation. Before, the wait lasted the
    store's 30 s lock timeout: the worker, and so every call and tick, stood still, and the
    replica was unready from 10 s on."""
    clock = FakeClock(1_700_000_000.0)
    with thread_replicas(1, postgres_url, tmp_path / "blobs", clock,
                         tick_interval_s=0.05) as (replica,):  # fmt: skip
        _, _, (device,) = start_task([replica.url], tiny_bundle, PLAN, 1)
        answer = device.check_in()
        assert answer["action"] == "train"
        assignment_id = answer["assignment"]["assignment_id"]
        hold_s = stale_after(0.05) + 2.0
        with psycopg.connect(postgres_url) as holder:  # a transaction: the lock stays held
            holder.execute(
                "select 1 from rounds where round_id = (select round_id from assignments "
                "where assignment_id = %s) for update",
                [assignment_id],
            )
            outcome: list[tuple[int, dict[str, Any], float]] = []

            def upload() -> None:
                started = time.monotonic()
                status, body = device.upload(assignment_id, np.zeros(64, np.float32))
                outcome.append((status, body, time.monotonic() - started))

            uploading = threading.Thread(target=upload)
            uploading.start()
            probe = HttpConnection(replica.url)
            unready = []
            deadline = time.monotonic() + hold_s
            while time.monotonic() < deadline:
                status, _, body = probe.request("GET", Route.READY)
                if status != 200:
                    unready.append(body)
                time.sleep(0.25)
            uploading.join(30)
            probe.close()
        assert unready == []
        (status, body, took) = outcome[0]
        assert status == 503 and body["error"]["code"] == "overloaded", body
        assert took < stale_after(0.05)
        # The lock gone, the device's retry is stored once.
        status, body = device.upload(assignment_id, np.zeros(64, np.float32))
        assert status == 200 and body["accepted"] is True, body


def test_uploads_into_a_round_another_replica_is_closing_are_refused_at_once(
    postgres_url: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """Another replica is closing the round (its claim and row lock held, as a long robust
    close holds them while it computes). An upload into the round is refused at once
    (503, retry) instead of waiting on this replica's one worker thread for the close or
    the store's lock timeout, stopping every other call and tick meanwhile. The close gone,
    the upload's retry is stored once."""
    clock = FakeClock(1_700_000_000.0)
    closer = PostgresStore(postgres_url)
    with thread_replicas(1, postgres_url, tmp_path / "blobs", clock,
                         tick_interval_s=0.05) as (replica,):  # fmt: skip
        _, task_id, (device,) = start_task([replica.url], tiny_bundle, PLAN, 1)
        answer = device.check_in()
        assert answer["action"] == "train", answer
        assignment_id = answer["assignment"]["assignment_id"]
        (rnd,) = closer.list_rounds(task_id)
        try:
            with closer.atomic():
                assert closer.claim_round(rnd.round_id, closing=True)
                assert closer.lock_round(rnd.round_id, skip_locked=True) is not None
                # a second closer is turned away too
                store = replica.service.store
                assert not replica.call(lambda: store.claim_round(rnd.round_id, closing=True))
                started = time.monotonic()
                status, body = device.upload(assignment_id, np.zeros(64, np.float32))
                took = time.monotonic() - started
                assert status == 503 and body["error"]["code"] == "overloaded", body
                assert "being closed by another replica" in body["error"]["message"]
                assert took < 2.5, took  # the store's lock timeout is 5 s
        finally:
            closer.close()
        status, body = device.upload(assignment_id, np.zeros(64, np.float32))
        assert status == 200 and body["accepted"] is True, body
