"""SQLite rolling a whole transaction back under an ``atomic()`` block.

A full disk (``SQLITE_FULL``), an I/O error or an interrupt inside ``BEGIN IMMEDIATE`` may
make SQLite undo the whole transaction, not just the failed statement
(https://www.sqlite.org/lang_transaction.html, "Response To Errors Within A Transaction";
with a page limit, a write that needs a page more does so, shown below). A caller that
catches such an error inside the block (a task's failure recorded inside an upload batch)
must not go on in autocommit: the block fails with
:class:`~coordinator.store.TransactionLost` (a transient error: the batch answers 503) and
nothing of it is stored, neither what came before the error nor what the caller did after.

The full disk is real: ``PRAGMA max_page_count`` at the database's size, then a row larger
than the free space.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from coordinator.store import Device, SQLiteStore, TransactionLost
from tests.coordinator.faults.harness import page_limit


def _device(device_id: str, platform: str = "linux") -> Device:
    return Device(device_id, "00" * 16, "ab" * 32, platform, "x86_64", ("ort-step",), "default",
                  5.0)  # fmt: skip


HUGE = _device("d-huge", platform="x" * 100_000)  # overflow pages: more than the disk holds


@pytest.fixture(params=["file", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(":memory:" if request.param == "memory" else tmp_path / "store.db")
    yield s
    s.close()


def disk_full(store: SQLiteStore) -> AbstractContextManager[None]:
    return page_limit(store.db.conn)


def _stored(store: SQLiteStore) -> list[str]:
    return sorted(r[0] for r in store.db.conn.execute("select device_id from devices"))


def _usable_after(store: SQLiteStore) -> None:
    assert not store.db.conn.in_transaction
    with store.atomic():
        store.add_device(_device("d-after"))
    assert _stored(store) == ["d-after"]


def test_sqlite_rolls_the_whole_transaction_back_on_a_full_disk(store: SQLiteStore) -> None:
    """The premise: the statement's error leaves no transaction behind."""
    conn = store.db.conn
    with disk_full(store):
        conn.execute("BEGIN IMMEDIATE")
        store.add_device(_device("d-1"))
        with pytest.raises(sqlite3.OperationalError, match="full"):
            store.add_device(HUGE)
        assert not conn.in_transaction
        assert _stored(store) == []


def test_an_error_caught_after_its_savepoint_fails_the_block(store: SQLiteStore) -> None:
    """As ``Coordinator._fail`` inside a batch: the error leaves a nested block and is
    caught; what the caller writes after it is not committed on its own."""
    with disk_full(store), pytest.raises(TransactionLost) as lost, store.atomic():
        store.add_device(_device("d-1"))
        try:
            with store.atomic():
                store.add_device(_device("d-2"))
                store.add_device(HUGE)
        except sqlite3.OperationalError:
            pass  # logged, and the batch goes on
        store.add_device(_device("d-3"))
        assert _stored(store) == ["d-3"]  # held by the block, not committed on its own
        with pytest.raises(TransactionLost), store.atomic():  # no new block once it is lost
            store.add_device(_device("d-4"))
    assert isinstance(lost.value, store.transient_errors)
    assert _stored(store) == []
    _usable_after(store)


def test_an_error_caught_inside_the_savepoint_fails_it_clearly(store: SQLiteStore) -> None:
    """The savepoint went with the transaction: its block ends with the store's error, not
    SQLite's "no such savepoint"; and the outer block fails even if that is caught too."""
    with disk_full(store), pytest.raises(TransactionLost), store.atomic():
        store.add_device(_device("d-1"))
        with pytest.raises(TransactionLost), store.atomic():
            store.add_device(_device("d-2"))
            with pytest.raises(sqlite3.OperationalError, match="full"):
                store.add_device(HUGE)
        store.add_device(_device("d-3"))
    assert _stored(store) == []
    _usable_after(store)


def test_an_error_caught_in_the_outer_block_fails_it(store: SQLiteStore) -> None:
    with disk_full(store), pytest.raises(TransactionLost), store.atomic():
        store.add_device(_device("d-1"))
        with pytest.raises(sqlite3.OperationalError, match="full"):
            store.add_device(HUGE)
    assert _stored(store) == []
    _usable_after(store)


def test_a_statement_after_an_error_caught_around_a_bare_statement_fails(
    store: SQLiteStore,
) -> None:
    """No savepoint around the failed statement: the next one, which would run in
    autocommit (a write stored on its own), fails at once; what the caller runs after that
    goes into a transaction the block rolls back."""
    with disk_full(store), pytest.raises(TransactionLost), store.atomic():
        store.add_device(_device("d-1"))
        with pytest.raises(sqlite3.OperationalError, match="full"):
            store.add_device(HUGE)
        with pytest.raises(TransactionLost):
            store.get_device("d-1")  # a read too: it would not see what the block wrote
        store.add_device(_device("d-2"))
        assert _stored(store) == ["d-2"]  # held by the block, not committed on its own
    assert _stored(store) == []
    _usable_after(store)


def test_a_statement_error_that_spares_the_transaction_changes_nothing(
    store: SQLiteStore,
) -> None:
    """A savepoint rolled back by its own error, the transaction still there: the block
    goes on and commits the rest, as before."""
    with store.atomic():
        store.add_device(_device("d-1"))
        with pytest.raises(RuntimeError), store.atomic():
            store.add_device(_device("d-2"))
            raise RuntimeError("refused")
        store.add_device(_device("d-3"))
    assert _stored(store) == ["d-1", "d-3"]
