"""The SQLite backend (through sqlite-utils): one database file, or ``:memory:``.

The connection runs in autocommit mode with WAL and ``synchronous=FULL``: a write that
returned is on disk, which is what lets the service acknowledge an upload right after it.
The store's methods are :class:`~coordinator.store.sql.SQLStore`'s (portable SQL); this
module supplies the connection, migrations through sqlite-utils' table API, and SQLite's
spelling of JSON access. The object is used from one thread at a time (the service
serialises its calls).

Several processes may share one file (replicas on one node, :mod:`coordinator.replicas`):
SQLite lets one writer at a time into the whole database, and :meth:`SQLiteStore.atomic`
takes that write lock as its transaction begins (``BEGIN IMMEDIATE``), so a transaction
that reads and then writes sees no other process's commit in between: the row locks the
PostgreSQL backend takes are implied. A process that finds the lock taken waits for it
(``busy_timeout``, like PostgreSQL's ``lock_timeout`` among replicas) instead of failing at
once; reads outside a transaction never wait (WAL).

The wait itself goes through :class:`WriterLock`, an ``flock`` on a file beside the database
taken before ``BEGIN IMMEDIATE``: SQLite's own wait sleeps 1, 2, 5, 10, ... ms between tries,
so two busy processes would leave the write lock idle most of the time they take turns. The
``flock`` is only the queue: SQLite's lock still decides, so a writer that does not take it
(the ``sqlite3`` shell) stays excluded as before.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from coordinator.store.base import LOCK_WAIT_S, DatabaseInUse, TransactionLost
from coordinator.store.migrations import apply_migrations
from coordinator.store.sql import Cursor, SQLStore

__all__ = ["SQLiteStore", "WriterLock", "tables_with_rows"]


class WriterLock:
    """The turn of this connection's writing transactions among the processes on one
    file: an exclusive ``flock`` on ``PATH-writer``, tried at short intervals (no blocking
    call: it could not give up) until ``timeout_s``, then SQLite's ``database is locked``
    (a transient error: 503, retry). A dead holder's lock goes with its process."""

    # The first retries follow a release within tens of microseconds; a long wait (a
    # stalled holder) settles at a poll per millisecond.
    _FIRST_PAUSE_S = 20e-6
    _LONGEST_PAUSE_S = 1e-3

    def __init__(self, db_path: str, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._fd = os.open(db_path + "-writer", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _try(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def acquire(self) -> None:
        if self._try():
            return
        deadline = time.monotonic() + self.timeout_s
        pause = self._FIRST_PAUSE_S
        while not self._try():
            if time.monotonic() >= deadline:
                raise sqlite3.OperationalError(
                    f"database is locked (another process has written for {self.timeout_s} s)"
                )
            time.sleep(pause)
            pause = min(2 * pause, self._LONGEST_PAUSE_S)

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


class SQLiteStore(SQLStore):
    _integrity_errors = (sqlite3.IntegrityError,)
    # SQLITE_FULL, SQLITE_IOERR, SQLITE_BUSY, ... all arrive as OperationalError.
    transient_errors = (sqlite3.OperationalError, TransactionLost)

    def __init__(
        self, path: str | Path, *, busy_timeout_s: float = LOCK_WAIT_S, queue_writers: bool = True
    ) -> None:
        """``queue_writers=False`` leaves the waiting to SQLite alone (benchmarks compare)."""
        self.path = str(path)
        memory = self.path == ":memory:"
        # isolation_level=None: no implicit transactions; atomic() opens explicit ones.
        # timeout: how long a write waits for another process's write lock (busy_timeout).
        conn = sqlite3.connect(
            self.path, timeout=busy_timeout_s, check_same_thread=False, isolation_level=None
        )
        self.db = Database(conn)
        self._writer = (
            WriterLock(self.path, busy_timeout_s) if queue_writers and not memory else None
        )
        # The mode in force: a file system without shared memory keeps the rollback journal.
        mode = "memory" if memory else conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        self._wal = str(mode).lower() == "wal"
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        self.schema = self.db  # what migrations run against
        self._held: int | None = None  # the serving lock's file (hold())
        self._depth = 0  # nesting of atomic() blocks
        self._lost = False  # the outermost block's transaction was rolled back under it
        # Under the write lock: processes starting together on one file migrate it once
        # (each migration's own transaction becomes a savepoint of this one).
        with self.atomic():
            self.schema_version = apply_migrations(self.db)

    def atomic(self) -> AbstractContextManager[None]:
        """A transaction (``BEGIN IMMEDIATE``), or inside one a savepoint. A block whose
        transaction SQLite rolled back under it fails with :class:`TransactionLost`, and so
        does every block of that transaction after it (see :meth:`_lose`)."""
        return self._savepoint() if self._depth else self._transaction()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        conn = self.db.conn
        # IMMEDIATE: the write lock from the start. A deferred BEGIN would read first and
        # upgrade at its first write, when another process may have committed in between
        # (SQLITE_BUSY_SNAPSHOT, which no waiting can cure).
        writer = self._writer
        if writer is not None:
            writer.acquire()
        self._depth, self._lost = 1, False
        try:
            conn.execute("BEGIN IMMEDIATE")
            # The file's write lock is held until COMMIT: no other connection, of this
            # process or another, writes meanwhile (SQLStore._txn_row).
            self._txn_rows = {}
            try:
                yield
                if self._lost or not conn.in_transaction:
                    raise self._lose()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        finally:
            self._depth = 0
            self._txn_rows = None
            if writer is not None:
                writer.release()

    @contextmanager
    def _savepoint(self) -> Iterator[None]:
        conn = self.db.conn
        if self._lost or not conn.in_transaction:
            raise self._lose()
        conn.execute("SAVEPOINT fedge")  # the innermost of that name is this block's
        self._depth += 1
        try:
            yield
        except BaseException:
            if not conn.in_transaction:
                self._lose()
            elif not self._lost:
                conn.execute("ROLLBACK TO fedge")
                conn.execute("RELEASE fedge")
                if self._txn_rows:  # what it wrote is undone: reads may differ again
                    self._txn_rows.clear()
            raise
        finally:
            self._depth -= 1
        if self._lost or not conn.in_transaction:
            raise self._lose()
        conn.execute("RELEASE fedge")

    def _lose(self) -> TransactionLost:
        """SQLite rolled back the transaction of the outermost block (a full disk, an I/O
        error, an interrupt: it may undo the whole transaction, not just the statement) and
        the caller caught the error. Until the outermost block ends, what the caller still
        runs goes into a new transaction, which that block rolls back: in autocommit each
        statement would be stored on its own, outside the guarantees of the block."""
        self._lost = True
        if self._txn_rows:
            self._txn_rows.clear()
        if not self.db.conn.in_transaction:
            self.db.conn.execute("BEGIN IMMEDIATE")
        return TransactionLost(
            "SQLite rolled the transaction back after an error that was caught inside it "
            "(storage unavailable?); nothing of it is stored"
        )

    @contextmanager
    def _read_snapshot(self) -> Iterator[None]:
        # Deferred: the first read fixes the snapshot (WAL) and no write lock is taken.
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")  # it wrote nothing

    def relaxed_durability(self) -> AbstractContextManager[None]:
        # synchronous=NORMAL in WAL mode: a commit appends to the WAL without an fsync; the
        # next FULL commit's fsync of the same file covers it (recovery replays a prefix of
        # the WAL: a power cut loses the newest commits, never leaves a gap). Only in WAL
        # mode: with a rollback journal, NORMAL risks a corrupt file, not just recent rows.
        # Only outside a transaction: the setting is the connection's, and an enclosing
        # transaction decides for itself.
        @contextmanager
        def block() -> Iterator[None]:
            conn = self.db.conn
            if not self._wal or conn.in_transaction:
                yield
                return
            conn.execute("PRAGMA synchronous=NORMAL")
            try:
                yield
            finally:
                conn.execute("PRAGMA synchronous=FULL")

        return block()

    def _change_marker(self) -> tuple[int, int] | None:
        conn = self.db.conn
        if conn.in_transaction:
            return None
        # data_version moves when another connection (of any process) commits;
        # total_changes counts the rows this one wrote (rolled back or not).
        return conn.execute("PRAGMA data_version").fetchone()[0], conn.total_changes

    def close(self) -> None:
        self.db.conn.close()
        if self._writer is not None:
            self._writer.close()
        if self._held is not None:
            os.close(self._held)
            self._held = None

    def hold(self, *, shared: bool) -> None:
        # An flock on a file beside the database: the kernel releases it with the process,
        # however it ends. Not on the database file itself, whose locks are SQLite's.
        if self._held is not None or self.path == ":memory:":
            return
        fd = os.open(self.path + "-serving", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatabaseInUse(shared) from None
        self._held = fd

    def size_bytes(self) -> int:
        if self.path == ":memory:":
            pages = self.db.conn.execute("PRAGMA page_count").fetchone()[0]
            return int(pages) * int(self.db.conn.execute("PRAGMA page_size").fetchone()[0])
        db = Path(self.path)
        # The WAL holds committed pages not yet checkpointed into the main file.
        return sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.is_file())

    def _conn(self) -> sqlite3.Connection:
        """The connection, for a statement. Inside a block whose transaction is gone (its
        error caught around a bare statement, no savepoint between), the statement would
        run in autocommit, stored on its own before the block fails: it fails at once."""
        conn = self.db.conn
        if self._depth and not conn.in_transaction:
            raise self._lose()
        return conn

    # Statements go to the connection itself: sqlite-utils' query() wraps each SELECT in a
    # savepoint of its own (three statements instead of one), a third of a check-in's cost.
    # Autocommit (isolation_level=None) opens no implicit transaction that it would guard.
    def _execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        self._may_write(sql)
        return self._conn().execute(sql, args)

    def _execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._may_write(sql)
        self._conn().executemany(sql, rows)

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        self._may_write(sql)
        cursor = self._conn().execute(sql, args)
        keys = [d[0] for d in cursor.description]
        return [dict(zip(keys, row, strict=True)) for row in cursor]

    def _table_names(self) -> list[str]:
        return self.db.table_names()

    def _columns(self, table: str) -> list[str]:
        return [c.name for c in self.db.table(table).columns]

    def _json_text(self, expr: str, key: str) -> str:
        return f"json_extract({expr}, '$.{key}')"

    def _json_number(self, expr: str, key: str) -> str:
        return self._json_text(expr, key)

    def _json_members(self, expr: str, key: str) -> str:
        return f"json_each({expr}, '$.{key}')"


def tables_with_rows(path: str) -> list[str]:
    """The tables of the SQLite file at ``path`` that hold a row, read as the file is: no
    store is opened, so no migration runs (none if there is no such file yet)."""
    if path == ":memory:" or not Path(path).is_file():
        return []
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        names = [row[0] for row in conn.execute(
            "select name from sqlite_master where type = 'table' and name not like 'sqlite_%'"
        )]  # fmt: skip
        quoted = {n: '"' + n.replace('"', '""') + '"' for n in names}
        return [n for n in names
                if conn.execute(f"select exists (select 1 from {quoted[n]})").fetchone()[0]]
    finally:
        conn.close()
