"""The database side of replicas' turns: on PostgreSQL row locks held by one connection, seen
from another; on a SQLite file the one write lock, taken as a transaction begins, by another
process; and where replica mode (and ``processes``) is refused."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from coordinator.config import ConfigError, CoordinatorConfig
from coordinator.store import Round, SQLiteStore, Store, Task, open_store
from fedge.cli import main


def _stores(url: str) -> tuple[Store, Store, Round]:
    a, b = open_store(url), open_store(url)
    a.add_bundle("b-1", {"num_parameters": 8, "files": {}}, 0.0)
    a.add_task(Task("t-1", "x", "b-1", "sync", "default", {}, "running", 0, 0, 0, 1.0))
    rnd = a.add_round(Round(0, "t-1", 1, "train", "reporting", 0, 3, 4, 3, 10.0, 20.0))
    return a, b, rnd


def test_a_locked_round_is_skipped_or_waited_for(postgres_url: str) -> None:
    a, b, rnd = _stores(postgres_url)
    try:
        # Set inside the holder's transaction: a waiter gets the row only after its commit,
        # which may come before the holder's thread runs again.
        held, committing = threading.Event(), threading.Event()

        def hold() -> None:
            with a.atomic():
                assert a.lock_round(rnd.round_id) is not None
                a.update_round(rnd.round_id, state="committed")
                held.set()
                time.sleep(0.5)
                committing.set()

        holder = threading.Thread(target=hold)
        holder.start()
        assert held.wait(10)
        with b.atomic():
            assert b.lock_round(rnd.round_id, skip_locked=True) is None  # another's turn
            assert b.lock_task("t-1") is not None  # other rows are free
        with b.atomic():
            waited = b.lock_round(rnd.round_id)  # waits, then reads what the holder committed
            assert committing.is_set() and waited is not None and waited.state == "committed"
        holder.join()
    finally:
        a.close()
        b.close()


def _hold_write_lock(path: Path, until: threading.Event, held: threading.Event) -> None:
    """Another process on the file: a transaction that read and wrote, then waits."""
    a = SQLiteStore(path)
    try:
        with a.atomic():
            rnd = a.lock_round(1)
            assert rnd is not None
            a.update_round(1, state="committed")
            held.set()
            until.wait(10)
    finally:
        a.close()


def test_on_sqlite_a_transaction_waits_for_the_writer_then_reads_its_commit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "f.db"
    setup = SQLiteStore(path)
    setup.add_bundle("b-1", {"num_parameters": 8, "files": {}}, 0.0)
    setup.add_task(Task("t-1", "x", "b-1", "sync", "default", {}, "running", 0, 0, 0, 1.0))
    setup.add_round(Round(0, "t-1", 1, "train", "reporting", 0, 3, 4, 3, 10.0, 20.0))
    impatient = SQLiteStore(path, busy_timeout_s=0.2)
    release, held = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_write_lock, args=(path, release, held))
    holder.start()
    try:
        assert held.wait(10)
        # Reads outside a transaction do not wait (WAL): the last commit, not the holder's.
        assert impatient.get_round(1).state == "reporting"  # type: ignore[union-attr]
        started = time.monotonic()
        with pytest.raises(impatient.transient_errors), impatient.atomic():
            impatient.lock_round(1)  # gives up after its busy timeout: 503, retry later
        assert 0.15 < time.monotonic() - started < 5.0
        threading.Timer(0.3, release.set).start()
        with setup.atomic():  # waits for the holder's commit, then reads what it wrote
            waited = setup.lock_round(1, skip_locked=True)
            assert release.is_set() and waited is not None and waited.state == "committed"
            setup.update_round(1, state="abandoned")
        assert impatient.get_round(1).state == "abandoned"  # type: ignore[union-attr]
    finally:
        release.set()
        holder.join()
        setup.close()
        impatient.close()


def test_sharing_a_database_needs_a_file_or_a_blob_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="need a shared blob_path"):
        CoordinatorConfig(replica=True, database_url="postgresql://db/fedge")
    with pytest.raises(ConfigError, match="need a shared blob_path"):
        CoordinatorConfig(processes=2, database_url="postgresql://db/fedge")
    with pytest.raises(ConfigError, match="not :memory:"):
        CoordinatorConfig(replica=True, db_path=":memory:")
    with pytest.raises(ConfigError, match="processes must be at least 1"):
        CoordinatorConfig(processes=0)
    CoordinatorConfig(replica=True, database_url="postgresql://db/fedge", blob_path="/srv/b")
    CoordinatorConfig(processes=3, database_url="postgresql://db/fedge", blob_path="/srv/b")
    CoordinatorConfig(replica=True)  # a SQLite file, blobs beside it
    CoordinatorConfig(processes=2, tls_cert="c.pem", tls_key="k.pem")
    assert main(["serve", "--db", ":memory:", "--replica", "--port", "0"]) == 2
    assert main(["serve", "--db", str(tmp_path / "f.db"), "--processes", "0"]) == 2
