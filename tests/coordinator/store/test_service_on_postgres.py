"""The whole coordinator service on PostgreSQL: real HTTP, devices speaking the wire
protocol, rounds committed against a numpy reference, a restart that rebuilds everything
from the database (also after ``fedge db migrate`` from SQLite), ``fedge serve`` on a URL,
and bad input refused before it reaches the store."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg
import pytest

from coordinator.admin import AdminClient
from coordinator.clock import FakeClock
from coordinator.config import ConfigError, CoordinatorConfig
from coordinator.embedded import EmbeddedCoordinator
from coordinator.store import SQLiteStore, open_store
from coordinator.store.postgres import PostgresStore
from edge_sdk.frame import decode_tensor
from edge_sdk.protocol import HEADER_ENROLLMENT, Route
from fedge.cli import main
from tests.fixtures.coordinator import (
    GOOD_CONDITIONS,
    DeviceHTTP,
    HttpConnection,
    select_devices,
)

ROOT = Path(__file__).resolve().parents[3]
N = 64
WINDOW = 10.0
PLAN = {"rounds": 2, "goal": 4, "selection_window_s": WINDOW, "round_deadline_s": 60.0,
        "robust": "none"}  # fmt: skip


def _delta(i: int) -> np.ndarray:
    return np.random.default_rng(100 + i).normal(0, 0.01, N).astype(np.float32)


def _serve(tmp_path: Path, url: str | None, clock: FakeClock) -> EmbeddedCoordinator:
    # Blobs stay beside the SQLite path (used when url is None), in tmp_path: the same
    # directory on every start.
    return EmbeddedCoordinator(tmp_path / "fedge.db", database_url=url, clock=clock, seed=7)


def _records(coord: EmbeddedCoordinator) -> dict[str, Any]:
    snapshot = coord.call(coord.service.store.snapshot)
    return {k: v for k, v in snapshot.items() if k != "schema_version"}


def _select(
    pass_window: Callable[[], object], devices: list[DeviceHTTP]
) -> list[tuple[DeviceHTTP, str]]:
    chosen = select_devices(devices, pass_window)
    assert len(chosen) == 6  # ceil(4 x 1.3) of 6 candidates
    return chosen


def _upload(chosen: list[tuple[DeviceHTTP, str]], seeds: range) -> list[tuple[np.ndarray, int]]:
    """Known deltas and weights uploaded: the numpy reference's inputs."""
    sent = []
    for (d, assignment_id), seed in zip(chosen, seeds, strict=True):
        status, body = d.upload(assignment_id, _delta(seed), num_examples=5 + seed)
        assert status == 200 and body["accepted"] is True, body
        sent.append((_delta(seed), 5 + seed))
    return sent


def _fedavg(sent: list[tuple[np.ndarray, int]]) -> np.ndarray:
    return np.average(np.stack([d for d, _ in sent]), axis=0, weights=[w for _, w in sent])


@pytest.mark.parametrize("first", ["postgresql", "sqlite then fedge db migrate"])
def test_rounds_commit_the_numpy_reference_across_a_restart(
    first: str, postgres_url: str, tmp_path: Path, tiny_bundle: Path, capsys: Any
) -> None:
    """Round 1 commits; round 2 has two of its four updates when the process stops; a new
    process on PostgreSQL (the same database, or a copy of the SQLite one) finishes it."""
    clock = FakeClock(1_700_000_000.0)
    on_sqlite = first.startswith("sqlite")
    with _serve(tmp_path, None if on_sqlite else postgres_url, clock) as coord:
        assert isinstance(coord.service.store, SQLiteStore if on_sqlite else PostgresStore)
        admin = coord.admin()
        bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
        task_id = admin.create_task(bundle_id, PLAN)["task_id"]
        devices = [DeviceHTTP(coord) for _ in range(6)]
        base = decode_tensor(devices[0].params(task_id, 0))
        sent = _upload(_select(lambda: clock.advance(WINDOW + 0.5), devices)[:4], range(4))
        r1 = admin.rounds(task_id)[0]
        assert r1["state"] == "committed"
        assert r1["metrics"]["num_examples"] == sum(w for _, w in sent)
        v1 = decode_tensor(devices[0].params(task_id, 1))
        np.testing.assert_allclose(v1, base + _fedavg(sent), rtol=1e-6, atol=1e-7)
        chosen = _select(lambda: clock.advance(WINDOW + 0.5), devices)
        sent = _upload(chosen[:2], range(10, 12))
        records = _records(coord)
    if on_sqlite:
        migrate = ["db", "migrate", "--from", f"sqlite:{tmp_path / 'fedge.db'}", "--to",
                   postgres_url]  # fmt: skip
        assert main(migrate) == 0
        assert "copied" in capsys.readouterr().out
        assert main(migrate) == 2  # the destination holds records now: refused
        assert "already holds records" in capsys.readouterr().err
    # A new process on the same database and blobs: devices, task and version 1 are there.
    with _serve(tmp_path, postgres_url, clock) as coord:
        assert _records(coord) == records
        for d in devices:  # the same devices, their secrets checked against the database
            d.http.close()
            d.http = HttpConnection(coord.url)
        assert coord.admin().task(task_id)["model_version"] == 1
        sent += _upload(chosen[2:4], range(12, 14))  # the open round goes on
        v2 = decode_tensor(devices[0].params(task_id, 2))
        np.testing.assert_allclose(v2, v1 + _fedavg(sent), rtol=1e-6, atol=1e-7)
        assert coord.admin().task(task_id)["state"] == "completed"
        assert coord.admin().status()["updates_accepted"] == 8


def test_sigkill_mid_round_loses_no_acknowledged_update(
    postgres_url: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """A coordinator process on PostgreSQL killed (SIGKILL) after acknowledging two of a
    round's four updates: started again, it finishes the round with all four."""
    window = 1.0  # real seconds: a child process has the system clock
    with EmbeddedCoordinator(tmp_path / "fedge.db", subprocess=True, database_url=postgres_url,
                             seed=7) as coord:  # fmt: skip
        admin = coord.admin()
        bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
        plan = {**PLAN, "rounds": 1, "selection_window_s": window}
        task_id = admin.create_task(bundle_id, plan)["task_id"]
        devices = [DeviceHTTP(coord) for _ in range(6)]
        base = decode_tensor(devices[0].params(task_id, 0))
        chosen = _select(lambda: time.sleep(window + 0.5), devices)
        sent = _upload(chosen[:2], range(2))
        coord.kill()
        coord.start()
        for d in devices:
            d.http.close()
            d.http = HttpConnection(coord.url)
        assert coord.admin().status()["updates_accepted"] == 2
        sent += _upload(chosen[2:4], range(2, 4))
        v1 = decode_tensor(devices[0].params(task_id, 1))
        np.testing.assert_allclose(v1, base + _fedavg(sent), rtol=1e-6, atol=1e-7)


def test_nul_characters_that_postgresql_cannot_store(postgres_url: str, tmp_path: Path) -> None:
    """In a device's fields they are bad input (400); in a URL path an id that cannot exist
    (404); either way nothing changes and nothing fails inside the store."""
    with _serve(tmp_path, postgres_url, FakeClock(1_700_000_000.0)) as coord:
        device = DeviceHTTP(coord)
        before = _records(coord)
        headers = {HEADER_ENROLLMENT: coord.enrollment_token or "",
                   "Content-Type": "application/json"}  # fmt: skip
        bad_fields = {"platform": "linux\x00", "population": "p\x00", "runtimes": ["ort\x00step"]}
        for field, value in bad_fields.items():
            body = json.dumps({"runtimes": ["ort-step"], field: value}).encode()
            status, _, data = device.http.request("POST", Route.REGISTER, body, headers)
            assert status == 400, data
            assert json.loads(data)["error"]["code"] == "invalid_request"
        for method, path in (
            ("POST", Route.ASSIGNMENT_ABORT.format(assignment_id="a%00b")),
            ("GET", Route.VERSION_PARAMS.format(task_id="t%00", version=0)),
        ):
            status, _, data = device.raw(method, path, b'{"reason": "user"}')
            assert status == 404, data
        assert _records(coord) == before


def _fedge_serve(*args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGE_")}
    return subprocess.Popen(
        [sys.executable, "-m", "fedge.cli", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**env, "FEDGE_ADMIN_TOKEN": "tok"},
    )  # fmt: skip


def test_fedge_serve_on_a_postgresql_url(postgres_url: str, tmp_path: Path) -> None:
    proc = _fedge_serve("--db", postgres_url, "--blobs", str(tmp_path / "blobs"),
                        "--open-registration")  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, proc.stderr and proc.stderr.read()
        url = line.split()[-1]
        register = b'{"runtimes": ["ort-step"]}'
        assert HttpConnection(url).request("POST", Route.REGISTER, register)[0] == 201
        assert AdminClient(url, "tok").status()["devices_registered"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    store = open_store(postgres_url)
    assert store.count_devices() == 1  # in the database, not in a SQLite file
    store.close()
    assert (tmp_path / "blobs").is_dir() and not list(tmp_path.glob("*.db"))


def test_fedge_serve_refuses_a_url_without_blobs_and_hides_passwords(
    postgres_server: str, tmp_path: Path
) -> None:
    proc = _fedge_serve("--db", postgres_server)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "needs --blobs" in err
    parts = urlsplit(postgres_server)
    assert parts.password
    wrong = postgres_server.replace(f":{parts.password}@", ":not-the-password@", 1)
    proc = _fedge_serve("--db", wrong, "--blobs", str(tmp_path / "blobs"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "cannot open postgresql://fedge:***@" in err, err
    assert "not-the-password" not in err


def test_config_names_the_database_and_the_blobs(tmp_path: Path) -> None:
    url = "postgresql://fedge@db.internal/fedge"
    cfg = CoordinatorConfig(db_path=str(tmp_path / "f.db"), database_url=url)
    assert cfg.store_location == url and cfg.blob_dir == tmp_path / "f.db.blobs"
    cfg = CoordinatorConfig.from_dict({"database_url": url, "blob_path": "/srv/blobs"})
    assert cfg.blob_dir == Path("/srv/blobs")
    assert CoordinatorConfig(db_path="x.db").store_location == "x.db"
    with pytest.raises(ConfigError, match="postgresql://"):
        CoordinatorConfig(database_url="mysql://db/fedge")


def test_sdk_clients_train_a_round_on_postgresql(
    postgres_url: str, tmp_path: Path, digits_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Edge SDK clients (real ORT steps on sklearn digits) against a coordinator on
    PostgreSQL: the committed version is the base plus the example-weighted mean of exactly
    the frames the clients saw acknowledged, decoded here with numpy."""
    from sklearn.datasets import load_digits

    from edge_sdk.client import Client
    from edge_sdk.codecs import decode_update
    from tests.edge_sdk.test_client import _client, _completed, _parts, _run_until, _task

    acknowledged: list[tuple[bytes, int]] = []
    deliver = Client._deliver

    def recorded(self: Client, pending: Any) -> Any:
        answer = deliver(self, pending)  # raises when refused: only acknowledgements count
        acknowledged.append((pending.frame, pending.report["num_examples"]))
        return answer

    monkeypatch.setattr(Client, "_deliver", recorded)
    x, y = load_digits(return_X_y=True)
    parts = _parts(((x / 16.0).astype(np.float32), y.astype(np.int64)), 4)
    with EmbeddedCoordinator(tmp_path / "fedge.db", database_url=postgres_url) as coord:
        task_id = _task(coord, digits_bundle, goal=3, over_selection=1.0, robust="none",
                        codec={"name": "fp32"})  # fmt: skip
        clients = [_client(coord, tmp_path / f"dev{i}", part) for i, part in enumerate(parts)]
        _run_until(clients, _completed(coord, task_id))
        for c in clients:
            c.close()
        reader = DeviceHTTP(coord)
        params = [decode_tensor(reader.params(task_id, v)) for v in (0, 1)]
    assert len(acknowledged) == 3
    deltas = [decode_update(frame, expected_length=params[0].size) for frame, _ in acknowledged]
    expected = params[0] + np.average(deltas, axis=0, weights=[n for _, n in acknowledged])
    np.testing.assert_allclose(params[1], expected, rtol=1e-5, atol=1e-6)


def _terminate_backend_now(store: Any, url: str) -> None:
    """The store's database session ended by the server (an outage, a failover, an
    operator's pg_terminate_backend): its next statement meets a broken connection."""
    assert isinstance(store, PostgresStore)
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("select pg_terminate_backend(%s)", [store.conn.info.backend_pid])


def _terminate_backend(coord: EmbeddedCoordinator, url: str) -> None:
    """:func:`_terminate_backend_now` between two of the coordinator's operations."""
    coord.call(lambda: _terminate_backend_now(coord.service.store, url))


@pytest.mark.parametrize("call", ["register", "check-in", "upload", "admin"])
def test_a_lost_connection_answers_503_with_retry_after_then_serves_again(
    call: str, postgres_url: str, tmp_path: Path
) -> None:
    """deployment.md: a lost connection fails the call in progress, "which the device sees
    as a 503 to retry, and the next call connects again". The first store read of a call
    (a device's authentication, a registration's insert, an operator's listing) met the
    broken connection outside any task's step, and the answer was ``500 internal``."""
    # No tick in the test's time: the call, not the ticker, is the first to meet the break.
    clock = FakeClock(1_700_000_000.0)
    with EmbeddedCoordinator(tmp_path / "fedge.db", database_url=postgres_url, clock=clock,
                             tick_interval_s=60.0) as coord:  # fmt: skip
        device = DeviceHTTP(coord)
        headers = {HEADER_ENROLLMENT: coord.enrollment_token or "",
                   "Content-Type": "application/json"}  # fmt: skip

        def send() -> tuple[int, dict[str, str], bytes]:
            if call == "register":
                return device.http.request("POST", Route.REGISTER, b'{"runtimes": ["x"]}', headers)
            if call == "check-in":
                body = json.dumps({"runtimes": ["ort-step"]}).encode()
                return device.raw("POST", Route.CHECKIN, body)
            if call == "upload":
                path = Route.ASSIGNMENT_UPDATE.format(assignment_id="a-none")
                frame = {"Content-Type": "application/x-fedge-frame"}
                return device.raw("POST", path, b"frame", frame)
            auth = {"Authorization": f"Bearer {coord.admin_token}"}
            return device.http.request("GET", Route.ADMIN_TASKS, None, auth)

        ok_status, _, _ = send()
        _terminate_backend(coord, postgres_url)
        status, answer_headers, data = send()
        assert status == 503, data
        assert json.loads(data)["error"]["code"] == "overloaded"
        assert int(answer_headers["retry-after"]) >= 1
        assert send()[0] == ok_status  # connected again


def test_a_connection_lost_in_a_check_ins_task_step_answers_503_not_no_task(
    postgres_url: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """The one task's step of a check-in meets the lost connection (after authentication
    passed): the device must hear 503 and come back soon, as for any call. Before, the
    step's refusal was taken as "this task offers nothing" and the device was told
    ``wait``/``no_task`` for ``no_task_retry_s`` (a minute), during its round's window."""
    clock = FakeClock(1_700_000_000.0)
    with EmbeddedCoordinator(tmp_path / "fedge.db", database_url=postgres_url, clock=clock,
                             tick_interval_s=60.0) as coord:  # fmt: skip
        admin = coord.admin()
        bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
        admin.create_task(bundle_id, PLAN)
        device = DeviceHTTP(coord)
        assert device.check_in()["reason"] == "selecting"  # a candidate of the open round
        store = coord.service.store
        open_round = store.open_round

        def cut_first(task_id: str) -> Any:
            store.open_round = open_round  # type: ignore[method-assign]
            _terminate_backend_now(store, postgres_url)
            return open_round(task_id)

        store.open_round = cut_first  # type: ignore[method-assign]  # the step's first read
        body = json.dumps({"runtimes": ["ort-step"], "conditions": GOOD_CONDITIONS}).encode()
        status, headers, data = device.raw("POST", Route.CHECKIN, body)
        assert status == 503, data
        assert json.loads(data)["error"]["code"] == "overloaded"
        assert int(headers["retry-after"]) >= 1
        assert device.check_in()["reason"] == "selecting"  # connected again


def test_a_read_only_database_refuses_reports_for_now_not_for_good(
    postgres_url: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """The coordinator's session reaches a database that takes no writes for now (a standby
    after a failover, ``default_transaction_read_only`` during maintenance): a report must
    be answered 503, which the device retries. Before, the write's ReadOnlySqlTransaction
    was taken for a task that cannot proceed: an evaluation report was answered ``409
    conflict`` ("task ... failed"), a refusal after which the device drops its report, and
    an abort 500; the task was not failed at all (its failure could not be written either).
    (An upload was answered 503 already: its batch's transaction was found aborted.)"""
    clock = FakeClock(1_700_000_000.0)
    with _serve(tmp_path, postgres_url, clock) as coord:
        admin = coord.admin()
        bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
        task_id = admin.create_task(bundle_id, PLAN)["task_id"]
        admin.evaluate(task_id)  # the first round evaluates version 0
        devices = [DeviceHTTP(coord) for _ in range(6)]
        for d in devices:
            assert d.check_in()["action"] == "wait"
        clock.advance(WINDOW + 0.5)
        chosen = [(d, a["assignment"]["assignment_id"]) for d in devices
                  if (a := d.check_in())["action"] == "evaluate"]  # fmt: skip
        (reporting, evaluated), (aborting, aborted) = chosen[:2]
        store = coord.service.store
        assert isinstance(store, PostgresStore)

        def read_only(on: bool) -> None:
            setting = "on" if on else "off"
            coord.call(lambda: store.conn.execute(f"set default_transaction_read_only = {setting}"))

        read_only(True)
        for status, body in (reporting.metrics(evaluated, 5, 0.25), aborting.abort(aborted)):
            assert status == 503 and body["error"]["code"] == "overloaded", body
        read_only(False)
        assert reporting.metrics(evaluated, 5, 0.25)[0] == 200
        assert aborting.abort(aborted)[0] == 200
        task = admin.task(task_id)
        assert (task["state"], task["failure"]) == ("running", None)


def test_a_replica_holds_two_database_connections(
    postgres_url: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """What deployment.md sizes ``max_connections`` by: a replica's worker connection, and,
    once a closed round's payloads are deleted, the connection of its payload deletes'
    thread (coordinator.blobs.BackgroundDeletes). The guide said one per process."""
    name = f"fedge-{os.getpid()}-{time.monotonic_ns()}"
    clock = FakeClock(1_700_000_000.0)
    url = f"{postgres_url}&application_name={name}"  # the connections it opens are named
    with EmbeddedCoordinator(tmp_path / "fedge.db", database_url=url, replica=True, clock=clock,
                             blob_path=str(tmp_path / "blobs")) as coord:  # fmt: skip
        admin = coord.admin()
        bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
        task_id = admin.create_task(bundle_id, {**PLAN, "rounds": 1})["task_id"]
        devices = [DeviceHTTP(coord) for _ in range(6)]
        _upload(_select(lambda: clock.advance(WINDOW + 0.5), devices)[:4], range(4))
        assert admin.task(task_id)["model_version"] == 1  # the round closed, its payloads go
        coord.call(lambda: coord.service.ctx.deletes.wait())  # type: ignore[union-attr]
        with psycopg.connect(postgres_url, autocommit=True) as watcher:
            row = watcher.execute(
                "select count(*) from pg_stat_activity where application_name = %s", [name]
            ).fetchone()
        assert row is not None and row[0] == 2


def _cut_at_the_answer(store: Any, postgres_url: str) -> None:
    """The store's connection cut once, at the next read of a task's open round: an admin
    call's answer (task_json), read after the call's change."""
    open_round = store.open_round

    def cut_first(task_id: str) -> Any:
        store.open_round = open_round
        _terminate_backend_now(store, postgres_url)
        return open_round(task_id)

    store.open_round = cut_first


def test_a_task_creation_answered_503_created_no_task(
    postgres_url: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """A 503 tells the operator that nothing was done and to try again. The connection lost
    right after the new task's commit, while its answer was read: before, the answer was
    503 and the task existed all the same, so the operator's retry made a second task
    training the same model."""
    with _serve(tmp_path, postgres_url, FakeClock(1_700_000_000.0)) as coord:
        admin = coord.admin()
        bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
        _cut_at_the_answer(coord.service.store, postgres_url)
        http = HttpConnection(coord.url)
        body = json.dumps({"bundle_id": bundle_id, "plan": PLAN}).encode()
        auth = {"Authorization": f"Bearer {coord.admin_token}", "Content-Type": "application/json"}
        status, _, data = http.request("POST", Route.ADMIN_TASKS, body, auth)
        assert status == 503, data
        assert admin.tasks() == []
        status, _, data = http.request("POST", Route.ADMIN_TASKS, body, auth)  # the retry
        assert status == 201, data
        assert [t["task_id"] for t in admin.tasks()] == [json.loads(data)["task_id"]]


class _CommitCutter:
    """A TCP forwarder between the coordinator and PostgreSQL that, once armed, passes the
    next ``COMMIT`` on to the server and then cuts that connection without letting the
    server's answer through: the transaction is committed, and the coordinator cannot know
    it."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.armed = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.target)
            cut = threading.Event()  # this connection's: nothing more passes
            for a, b, up in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, up, cut), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket, up: bool, cut: threading.Event) -> None:
        try:
            while (data := a.recv(1 << 16)) and not cut.is_set():
                if up and self.armed.is_set() and b"COMMIT" in data.upper():
                    self.armed.clear()
                    cut.set()
                    b.sendall(data)
                    time.sleep(0.3)  # the server commits; its answer is not passed on
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def url(self, postgres_url: str) -> str:
        """``postgres_url`` through this forwarder."""
        parts = urlsplit(postgres_url)
        netloc = parts.netloc.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{self.port}")
        return urlunsplit(parts._replace(netloc=netloc))


@pytest.mark.parametrize("replica", [False, True])
def test_an_upload_whose_commit_outcome_was_lost_counts_once(
    replica: bool, postgres_url: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """The connection lost while the server commits an upload batch: the rows are stored,
    the coordinator cannot know it and answers 503; the device's retry (same key) gets the
    stored answer, and the round commits each update once (deployment.md: a lost
    connection's transaction is not resumed, and a retry is never counted twice)."""
    parts = urlsplit(postgres_url)
    assert parts.hostname is not None and parts.port is not None
    cutter = _CommitCutter(parts.hostname, parts.port)
    clock = FakeClock(1_700_000_000.0)
    with EmbeddedCoordinator(tmp_path / "fedge.db", database_url=cutter.url(postgres_url),
                             blob_path=str(tmp_path / "blobs"), replica=replica, clock=clock,
                             replica_partial_every=1, seed=7) as coord:  # fmt: skip
        admin = coord.admin()
        bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
        task_id = admin.create_task(bundle_id, {**PLAN, "rounds": 1})["task_id"]
        devices = [DeviceHTTP(coord) for _ in range(6)]
        base = decode_tensor(devices[0].params(task_id, 0))
        chosen = _select(lambda: clock.advance(WINDOW + 0.5), devices)
        sent = _upload(chosen[:1], range(1))
        cutter.armed.set()
        device, assignment_id = chosen[1]
        status, body = device.upload(assignment_id, _delta(1), num_examples=6, key="k")
        assert status == 503 and body["error"]["code"] == "overloaded", body
        assert not cutter.armed.is_set()  # the cut was the batch's commit
        status, body = device.upload(assignment_id, _delta(1), num_examples=6, key="k")
        assert status == 200 and body["accepted"] is True, body  # the stored answer
        sent += [(_delta(1), 6), *_upload(chosen[2:4], range(2, 4))]
        assert admin.status()["updates_accepted"] == 4
        v1 = decode_tensor(devices[0].params(task_id, 1))
        np.testing.assert_allclose(v1, base + _fedavg(sent), rtol=1e-6, atol=1e-7)
    cutter.listener.close()


def test_a_pause_answered_503_paused_nothing(
    postgres_url: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """As for a task's creation: the connection lost right after the pause's commit, while
    its answer was read. Before, the answer was 503 ("nothing done, try again") for a task
    that was paused, and the operator's retry was refused 409 ("task is paused")."""
    with _serve(tmp_path, postgres_url, FakeClock(1_700_000_000.0)) as coord:
        admin = coord.admin()
        bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
        task_id = admin.create_task(bundle_id, PLAN)["task_id"]
        _cut_at_the_answer(coord.service.store, postgres_url)
        http = HttpConnection(coord.url)
        path = Route.path(Route.ADMIN_TASK_PAUSE, task_id=task_id)
        auth = {"Authorization": f"Bearer {coord.admin_token}"}
        status, _, data = http.request("POST", path, b"", auth)
        assert status == 503, data
        assert admin.task(task_id)["state"] == "running"
        status, _, data = http.request("POST", path, b"", auth)  # the retry
        assert status == 200, data
        assert json.loads(data)["state"] == "paused" == admin.task(task_id)["state"]
