"""The queue of writers on one SQLite file (:class:`~coordinator.store.sqlite.WriterLock`):
held exactly for a writing transaction (committed or rolled back), freed by a holder's death,
given up after the store's busy timeout, and only a queue: SQLite's own lock still excludes a
writer that does not take it."""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.store import Task
from coordinator.store.sqlite import SQLiteStore


def _taken(db: Path) -> bool:
    """Whether some writer holds the file's queue (seen from a description of our own)."""
    fd = os.open(str(db) + "-writer", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _task(task_id: str) -> Task:
    return Task(task_id, "x", "b-1", "sync", "default", {}, "running", 0, 0, 0, 1.0)


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    s = SQLiteStore(tmp_path / "f.db")
    s.add_bundle("b-1", {"num_parameters": 8, "files": {}}, 0.0)
    return s


def test_held_for_each_writing_transaction_and_released_after_commit_or_rollback(
    store: SQLiteStore, tmp_path: Path
) -> None:
    db = tmp_path / "f.db"
    assert not _taken(db)
    with store.atomic():
        assert _taken(db)
        store.add_task(_task("t-1"))
        with store.atomic():  # a savepoint: the same turn
            assert _taken(db)
    assert not _taken(db)
    with pytest.raises(RuntimeError), store.atomic():
        store.add_task(_task("t-2"))
        raise RuntimeError("refused")
    assert not _taken(db)
    assert store.get_task("t-1") is not None and store.get_task("t-2") is None
    store.get_task("t-1")  # reads take no turn
    assert not _taken(db)


def test_memory_databases_take_no_lock_file(tmp_path: Path) -> None:
    s = SQLiteStore(":memory:")
    with s.atomic():
        s.add_bundle("b-1", {"num_parameters": 8, "files": {}}, 0.0)
    assert not list(Path.cwd().glob(":memory:*"))


_HOLDER = """
import sys, time
from coordinator.store.sqlite import SQLiteStore
s = SQLiteStore(sys.argv[1])
with s.atomic():
    s.db.conn.execute("update bundles set created_at = 1")
    print("holding", flush=True)
    time.sleep(60)
"""


def test_a_holder_killed_mid_transaction_frees_the_turn_and_its_writes_are_gone(
    store: SQLiteStore, tmp_path: Path
) -> None:
    db = tmp_path / "f.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(db)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[3])},
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        assert _taken(db)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        with store.atomic():  # the turn is free, the dead writer's transaction rolled back
            store.add_task(_task("t-1"))
        assert store.get_task("t-1") is not None
        row = store.db.conn.execute("select created_at from bundles").fetchone()
        assert row[0] == 0.0
    finally:
        holder.kill()
        holder.wait(10)


def test_a_turn_held_too_long_is_a_transient_error_and_nothing_is_written(tmp_path: Path) -> None:
    db = tmp_path / "f.db"
    impatient = SQLiteStore(db, busy_timeout_s=0.2)
    fd = os.open(str(db) + "-writer", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another writer's turn, never given back
    try:
        started = time.monotonic()
        with pytest.raises(impatient.transient_errors, match="locked"), impatient.atomic():
            impatient.add_bundle("b-1", {"num_parameters": 8, "files": {}}, 0.0)
        assert 0.15 < time.monotonic() - started < 5.0
        assert impatient.get_bundle("b-1") is None
    finally:
        os.close(fd)
    with impatient.atomic():  # given back: the next turn is taken at once
        impatient.add_bundle("b-1", {"num_parameters": 8, "files": {}}, 0.0)
    assert impatient.get_bundle("b-1") is not None


def test_a_writer_outside_the_queue_is_still_excluded_by_sqlites_lock(tmp_path: Path) -> None:
    db = tmp_path / "f.db"
    impatient = SQLiteStore(db, busy_timeout_s=0.2)
    other = sqlite3.connect(db, isolation_level=None)  # the sqlite3 shell, say
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(impatient.transient_errors), impatient.atomic():
            impatient.add_bundle("b-1", {"num_parameters": 8, "files": {}}, 0.0)
        assert not _taken(db)  # the refused transaction gave its turn back
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert impatient.get_bundle("b-1") is None
