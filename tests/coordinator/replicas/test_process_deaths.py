"""``fedge serve --processes 2`` when a serving process dies inside an upload batch (SIGKILL
right after one of its durable steps: payloads installed, rows written but not committed,
rows committed but no answer sent), and when the supervisor is told to stop while its
children are still starting.

The device whose upload was in the dying batch gets no answer and sends it again, with the
same Idempotency-Key, on a new connection, which reaches the sibling: stored once, whether
the dead process had committed it or not. Nothing acknowledged is lost, nothing is counted
twice, the round commits numpy's FedAvg of the acknowledged updates, and the supervisor
starts another process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from coordinator.admin import AdminClient
from coordinator.store import open_store
from edge_sdk.frame import decode_tensor
from tests.coordinator.replicas.dying_replica import STEPS
from tests.coordinator.replicas.fleet import (
    ROOT,
    ServedReplica,
    Spread,
    by_pid,
    fedavg,
    serving_children,
    shares,
    start_task,
    wait_for,
)
from tests.fixtures.coordinator import select_devices
from tests.fixtures.pki import Pki

N = 64
GOAL = 8
WINDOW = 1.0
PLAN = {"rounds": 1, "goal": GOAL, "over_selection": 1.0, "min_reporting_fraction": 1.0,
        "selection_window_s": WINDOW, "round_deadline_s": 300.0, "robust": "none",
        "eligibility": {"require_charging": False}}  # fmt: skip
DYING = GOAL // 2  # the upload in the dying batch: not the last, so no commit is due in it


def _delta(seed: int) -> np.ndarray:
    return np.random.default_rng(5000 + seed).normal(0, 0.01, N).astype(np.float32)


@contextmanager
def _dying_node(db: str, tmp_path: Path, step: str) -> Iterator[tuple[ServedReplica, Path]]:
    """``fedge serve --processes 2`` whose serving processes die after ``step`` once the
    file it yields exists (the one that removes it)."""
    trigger = tmp_path / "die"
    # Partial sums with every batch, so that "flushed" dies with one written (the default,
    # every 64 uploads, is what test_processes.py and test_sigkill.py run).
    config = tmp_path / "node.json"
    config.write_text(json.dumps({"replica_partial_every": 1}))
    node = ServedReplica(db, tmp_path / "blobs", tmp_path / "node.log",
                         "tests.coordinator.replicas.dying_replica", "--processes", "2",
                         "--config", str(config), "--die-after", step, str(trigger),
                         replica=False)  # fmt: skip
    try:
        wait_for(lambda: len(serving_children(node.process.pid)) == 2, what="two processes")
        yield node, trigger
    finally:
        node.stop()


def _round(node: ServedReplica, bundle: Path) -> tuple[AdminClient, str, list[tuple[Spread, str]]]:
    admin, task_id, devices = start_task([node.url], bundle, PLAN, GOAL)
    chosen = select_devices(devices, lambda: time.sleep(WINDOW + 0.5))
    assert len(chosen) == GOAL
    return admin, task_id, chosen


def _send(chosen: list[tuple[Spread, str]], k: int) -> None:
    """Upload ``k`` as a device sends it: again, with the same key, while the connection
    fails (the process that had it died, and a new connection may still reach its socket)."""
    d, assignment_id = chosen[k]
    for attempt in range(5):
        try:
            status, body = d.upload(assignment_id, _delta(k), 3 + k, key=f"key-{k}")
            break
        except ConnectionError:
            if attempt == 4:
                raise
            time.sleep(0.2)
    assert status == 200 and body["accepted"] is True, (k, body)


def _committed_once(node: ServedReplica, db: str, admin: AdminClient, task_id: str,
                    device: Spread, before: set[int]) -> None:  # fmt: skip
    """One process died (SIGKILL) and another replaced it; the round committed numpy's
    FedAvg of every upload, each stored once."""
    supervisor = node.process.pid
    wait_for(lambda: len(now := serving_children(supervisor)) == 2 and len(now & before) == 1,
             what="a new serving process")  # fmt: skip
    wait_for(lambda: admin.task(task_id)["model_version"] == 1, what="the commit")
    got = decode_tensor(device.params(task_id, 1))
    sent = [(_delta(k), 3 + k) for k in range(GOAL)]
    np.testing.assert_allclose(got, decode_tensor(device.params(task_id, 0)) + fedavg(sent),
                               rtol=1e-6, atol=1e-7)  # fmt: skip
    [rnd] = admin.rounds(task_id)
    assert rnd["state"] == "committed" and rnd["metrics"]["reported"] == GOAL
    store = open_store(db)
    try:
        [stored] = store.list_rounds(task_id)
        updates = list(store.round_updates(stored.round_id))
    finally:
        store.close()
    assert sorted(u.idempotency_key for u in updates) == sorted(f"key-{k}" for k in range(GOAL))
    assert node.log.read_text().count("exited with signal SIGKILL") == 1


@pytest.mark.slow
@pytest.mark.parametrize("step", list(STEPS))
def test_a_process_killed_inside_an_upload_batch_loses_and_doubles_nothing(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, step: str
) -> None:
    with _dying_node(replica_db, tmp_path, step) as (node, trigger):
        supervisor = node.process.pid
        before = serving_children(supervisor)
        admin, task_id, chosen = _round(node, tiny_bundle)
        for k in range(DYING):
            _send(chosen, k)
        folded = by_pid(shares(replica_db))
        trigger.touch()  # the batch of the next upload dies
        _send(chosen, DYING)
        assert not trigger.exists()  # a process died in this upload's batch
        now = by_pid(shares(replica_db))
        [victim] = before - serving_children(supervisor)
        [survivor] = before - {victim}
        # Committed before the death: the dead process's sum holds it and the retry is a
        # replay; otherwise its writes were rolled back and the sibling stored the retry
        # anew. Either way once, and every earlier acknowledgement stays.
        died_committed = step == "committed"
        assert now.get(victim, 0) == folded.get(victim, 0) + died_committed
        assert now.get(survivor, 0) == folded.get(survivor, 0) + (not died_committed)
        assert sum(now.values()) == DYING + 1
        for k in range(DYING + 1, GOAL):
            _send(chosen, k)
        _committed_once(node, replica_db, admin, task_id, chosen[0][0], before)


@pytest.mark.slow
@pytest.mark.parametrize("step", list(STEPS))
def test_concurrent_uploads_when_a_process_dies_are_each_stored_once(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, step: str
) -> None:
    """Half the round's uploads at once as a process dies: those in its dying batch and
    those queued behind it get no answer and are sent again, with the uploads the sibling
    answers meanwhile."""
    with _dying_node(replica_db, tmp_path, step) as (node, trigger):
        before = serving_children(node.process.pid)
        admin, task_id, chosen = _round(node, tiny_bundle)
        for k in range(DYING):
            _send(chosen, k)
        trigger.touch()
        with ThreadPoolExecutor(GOAL - DYING) as pool:
            list(pool.map(lambda k: _send(chosen, k), range(DYING, GOAL)))
        assert not trigger.exists()
        _committed_once(node, replica_db, admin, task_id, chosen[0][0], before)


def _marked(mark: str) -> set[int]:
    """Processes whose environment carries ``mark`` (a supervisor and its children)."""
    out = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mark.encode() in environ.read_bytes():
                out.add(int(environ.parent.name))
        except OSError:  # gone meanwhile
            continue
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(("signum", "group"), [(signal.SIGTERM, False), (signal.SIGINT, False),
                                               (signal.SIGINT, True)],
                         ids=["sigterm", "sigint", "ctrl-c"])  # fmt: skip
def test_a_signal_while_the_children_start_stops_everything(
    tmp_path: Path, signum: int, group: bool
) -> None:
    """Signalled once its children exist, before they all answered (``group``: the whole
    process group, as Ctrl-C in a terminal, which stops the children too): no ``listening``
    line, status 0 within a bound, no process of it left, the port free."""
    mark = f"SUPERVISOR_TEST_MARK_{uuid.uuid4().hex}"
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), mark: "1"}
    with open(tmp_path / "node.log", "wb") as log:
        node = subprocess.Popen(
            [sys.executable, "-m", "fedge.cli", "serve", "--db", str(tmp_path / "f.db"),
             "--processes", "2", "--port", str(port)],
            stdout=subprocess.PIPE, stderr=log, cwd=ROOT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: len(serving_children(node.pid)) == 2, what="two children")
        children = serving_children(node.pid)
        if group:
            os.killpg(node.pid, signum)
        else:
            node.send_signal(signum)
        started = time.monotonic()
        out, _ = node.communicate(timeout=20)
        assert time.monotonic() - started < 10.0
        assert node.returncode == 0
        assert b"listening" not in out  # it never announced the port
        assert not (children & _marked(mark))
        wait_for(lambda: not _marked(mark), timeout=5, what="every process of the node gone")
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
    with socket.socket() as alone:  # released: bindable without SO_REUSEPORT
        alone.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        alone.bind(("127.0.0.1", port))


def _tls_node(
    pki: Pki, tmp_path: Path, command: list[str]
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """``python COMMAND... --tls-cert CERT --tls-key KEY``-style node started on copies of
    the PKI's files (the test then breaks the certificate): the process, its log, the cert."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(pki.cert, cert)
    shutil.copy(pki.key, key)
    log_path = tmp_path / "node.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [a.replace("{cert}", str(cert)).replace("{key}", str(key)) for a in command]
    with open(log_path, "wb") as log:
        node = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=log,
                                cwd=ROOT, env=env)  # fmt: skip
    return node, log_path, cert


def _supervisor_said(log_path: Path, level: str | None = None) -> list[str]:
    """The messages of the supervisor's JSON log records (of ``level`` only, if given)."""
    records = [json.loads(line) for line in log_path.read_text().splitlines()
               if line.startswith("{")]  # fmt: skip
    return [r["message"] for r in records if r["logger"] == "fedge.supervisor"
            and level in (None, r["level"])]  # fmt: skip


def test_a_child_that_cannot_start_again_says_why_in_the_supervisors_log(
    pki: Pki, tmp_path: Path
) -> None:
    """A restarted child that fails at start (here its certificate, replaced by a broken one
    since the node started) is tried again with a growing pause while its sibling serves.
    Why it failed was logged at INFO: under ``--log-level WARNING`` the supervisor said only
    "exited with status 1", and the reason was left to the child's raw traceback (no JSON
    record for a log shipper)."""
    node, log_path, cert = _tls_node(pki, tmp_path, [
        "-m", "fedge.cli", "serve", "--db", str(tmp_path / "f.db"), "--processes", "2",
        "--port", str(_free_port()), "--tls-cert", "{cert}", "--tls-key", "{key}",
        "--log-level", "WARNING", "--log-format", "json"])  # fmt: skip

    def supervisor_warnings() -> list[str]:
        return _supervisor_said(log_path, "WARNING")

    try:
        assert node.stdout is not None
        assert b"listening on https://" in node.stdout.readline()
        cert.write_text("not a certificate\n")
        os.kill(min(serving_children(node.pid)), signal.SIGKILL)
        wait_for(lambda: any("cannot use --tls-cert/--tls-key" in m
                             for m in supervisor_warnings()),
                 timeout=20, what="the reason in a supervisor warning")  # fmt: skip
        assert len(serving_children(node.pid)) >= 1  # the sibling serves on
    finally:
        node.terminate()
        assert node.wait(30) == 0


_HANGING_NODE = """
import sys
from coordinator.config import CoordinatorConfig
from fedge.commands.serve import configure_logging
from fedge.supervisor import Supervisor
configure_logging("INFO", "json")
db, port, cert, key = sys.argv[1:]
cfg = CoordinatorConfig(db_path=db, port=int(port), processes=2, tls_cert=cert, tls_key=key)


class QuickRestarts(Supervisor):
    def _watch(self, wake):
        self.startup_timeout_s = 3.0  # restarts only: the first start may be slow on a busy host
        super()._watch(wake)


sys.exit(QuickRestarts(cfg).run())
"""


def test_a_restarted_child_that_hangs_at_start_is_killed_and_tried_again(
    pki: Pki, tmp_path: Path
) -> None:
    """A restarted child blocked in its start-up (here on its certificate, replaced by a
    FIFO nobody writes) held its place for ever: never killed, never tried again, the node
    one process short with no word in the log. It is killed after the start-up timeout and
    another started; once the file is readable again one answers."""
    node, log_path, cert = _tls_node(pki, tmp_path, [
        "-c", _HANGING_NODE, str(tmp_path / "f.db"), str(_free_port()), "{cert}", "{key}"])

    def said() -> list[str]:
        return _supervisor_said(log_path)

    try:
        assert node.stdout is not None
        assert b"listening on https://" in node.stdout.readline()
        cert.unlink()
        os.mkfifo(cert)
        os.kill(min(serving_children(node.pid)), signal.SIGKILL)
        wait_for(lambda: any("did not answer within 3 s of its start: killed" in m
                             for m in said()),
                 timeout=30, what="the hung child killed")  # fmt: skip
        cert.unlink()
        shutil.copy(pki.cert, cert)
        wait_for(lambda: any("started again, answers" in m for m in said()),
                 timeout=60, what="a child serving in the hung one's place")  # fmt: skip
        assert len(serving_children(node.pid)) == 2
    finally:
        node.terminate()
        assert node.wait(40) == 0
