"""Replicas for tests: several coordinators on one database (a PostgreSQL schema or a SQLite
file: ``db``, from the ``replica_db`` fixture) and one blob directory, and devices whose every
call may reach any of them (a round-robin load balancer).

* :func:`thread_replicas`: :class:`~coordinator.embedded.EmbeddedCoordinator` s in this
  process (thread mode, real HTTP, one shared :class:`~coordinator.clock.FakeClock`);
* :func:`serve_replica`: a ``fedge serve --replica`` child process on the system clock
  (``module`` runs another entry point, e.g. one that dies at a chosen step);
* :func:`serving_children`: the serving processes of a ``fedge serve --processes K``;
* :class:`Spread`: a device registered once, its calls sent to the replicas in turn;
  :func:`start_task` and :func:`~tests.fixtures.coordinator.select_devices` set up a task
  and a round's cohort with such devices.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.admin import AdminClient
from coordinator.clock import FakeClock
from coordinator.embedded import EmbeddedCoordinator
from coordinator.store import is_database_url, open_store
from tests.fixtures.coordinator import DeviceHTTP, HttpConnection

__all__ = [
    "ADMIN",
    "ENROLL",
    "ServedReplica",
    "Spread",
    "by_pid",
    "fedavg",
    "partial_rows",
    "serve_replica",
    "serving_children",
    "shares",
    "start_task",
    "thread_replicas",
    "wait_for",
    "wait_version",
]

ROOT = Path(__file__).resolve().parents[3]
ADMIN = "admin-token-for-replicas"
ENROLL = "enrollment-token-for-replicas"


@contextmanager
def thread_replicas(
    n: int, db: str, blobs: Path, clock: FakeClock, **overrides: Any
) -> Iterator[list[EmbeddedCoordinator]]:
    replica = overrides.pop("replica", True)  # False: processes alone, for comparison
    url = db if is_database_url(db) else None
    with ExitStack() as stack:
        yield [
            stack.enter_context(
                EmbeddedCoordinator(
                    blobs.parent / f"replica{i}" / "fedge.db" if url else db,
                    database_url=url,
                    blob_path=str(blobs),
                    replica=replica,
                    clock=clock,
                    seed=i,
                    admin_token=ADMIN,
                    enrollment_token=ENROLL,
                    **overrides,
                )
            )
            for i in range(n)
        ]


class ServedReplica:
    """A ``fedge serve --replica`` child process (``replica=False``: a process alone on the
    database, for comparison); :meth:`kill` is SIGKILL."""

    def __init__(
        self,
        url: str,
        blobs: Path,
        log: Path,
        module: str = "fedge.cli",
        *extra: str,
        replica: bool = True,
    ) -> None:
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGE_")}
        env.update(FEDGE_ADMIN_TOKEN=ADMIN, FEDGE_ENROLLMENT_TOKEN=ENROLL, PYTHONPATH=str(ROOT))
        with open(log, "ab") as err:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    module,
                    "serve",
                    "--db",
                    url,
                    "--blobs",
                    str(blobs),
                    *(["--replica"] if replica else []),
                    "--port",
                    "0",
                    *extra,
                ],
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=ROOT,
                env=env,
            )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        if "listening on http" not in line:
            self.process.kill()
            raise RuntimeError(f"replica did not start: {line!r}; see {log}")
        self.url = line.split()[-1]

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def serve_replica(
    url: str, blobs: Path, log: Path, module: str = "fedge.cli", *extra: str
) -> Iterator[ServedReplica]:
    replica = ServedReplica(url, blobs, log, module, *extra)
    try:
        yield replica
    finally:
        replica.stop()


class Spread(DeviceHTTP):
    """A device behind a round-robin load balancer: each call goes to the next replica."""

    def __init__(self, urls: Sequence[str], start: int = 0) -> None:
        super().__init__(urls[start % len(urls)], enrollment_token=ENROLL)
        self.conns = [HttpConnection(u) for u in urls]
        self._turn = itertools.count(start)
        self.served_by: list[int] = []

    def raw(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        self._next()
        return super().raw(method, path, body, headers)

    def check_in(self, conditions: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        self._next()
        return super().check_in(conditions, **extra)

    def _next(self) -> None:
        i = next(self._turn) % len(self.conns)
        self.served_by.append(i)
        self.http = self.conns[i]

    def to(self, i: int) -> Spread:
        """The next call goes to replica ``i``."""
        self._turn = itertools.count(i)
        return self

    def close(self) -> None:
        for c in self.conns:
            c.close()


def start_task(
    urls: Sequence[str], bundle: Path, plan: dict[str, Any], devices: int, mode: str = "sync"
) -> tuple[AdminClient, str, list[Spread]]:
    """The bundle uploaded, a task created on it, ``devices`` devices registered (each
    starting at the next replica)."""
    admin = AdminClient(urls[-1], ADMIN)
    bundle_id = admin.upload_bundle(bundle)["bundle_id"]
    task_id = admin.create_task(bundle_id, plan, mode=mode)["task_id"]
    return admin, task_id, [Spread(urls, start=i) for i in range(devices)]


def fedavg(sent: Sequence[tuple[np.ndarray, float]]) -> np.ndarray:
    """The example-weighted mean of ``(delta, weight)`` pairs, in float64."""
    return np.average(
        np.stack([d.astype(np.float64) for d, _ in sent]), axis=0, weights=[w for _, w in sent]
    )


def partial_rows(url: str, round_id: int | None = None) -> list[Any]:
    """The partial sums stored now (of one round, or of every round)."""
    store = open_store(url)
    try:
        if round_id is not None:
            return list(store.round_partials(round_id))
        return [p for r in store.open_rounds() for p in store.round_partials(r.round_id)]
    finally:
        store.close()


def shares(url: str, round_id: int | None = None) -> dict[str, int]:
    """The updates stored now per replica id (of one round, or of every open round): what
    each replica acknowledged, durably, whether or not its partial sum covers it yet."""
    store = open_store(url)
    try:
        rounds = [round_id] if round_id is not None else [r.round_id for r in store.open_rounds()]
        ids = [u.replica_id for r in rounds for u in store.round_updates(r)]
    finally:
        store.close()
    assert None not in ids, "an update stored by a replica without its replica id"
    return {i: ids.count(i) for i in set(ids) if i is not None}


def by_pid(counts: dict[str, int]) -> dict[int, int]:
    """``shares`` per process, from replica ids of the form ``r-PID-RANDOM``."""
    return {int(replica_id.split("-")[1]): n for replica_id, n in counts.items()}


def serving_children(supervisor: int) -> set[int]:
    """The pids of a ``fedge serve --processes K`` supervisor's serving children (not
    multiprocessing's resource tracker), from ``/proc``."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if ppid == supervisor and b"spawn_main" in cmdline:
            out.add(int(stat.parent.name))
    return out


def wait_version(admin: AdminClient, task_id: str, version: int) -> None:
    """Until the task's version is ``version``: an acknowledgement comes before the commit it
    makes due, which another replica may be making."""
    wait_for(lambda: admin.task(task_id)["model_version"] >= version, what=f"version {version}")


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
