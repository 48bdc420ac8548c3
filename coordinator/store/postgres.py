"""The PostgreSQL backend (psycopg 3): one database, shared by any number of processes.

::

    store = PostgresStore("postgresql://fedge:secret@db.internal/fedge")

The store's methods are :class:`~coordinator.store.sql.SQLStore`'s (portable SQL); this
module supplies the connection, PostgreSQL's spelling of JSON access, and migrations through
:class:`~coordinator.store.postgres_schema.PostgresSchema`, under an advisory lock so that
processes starting together migrate once. The connection is in autocommit mode and the
server's defaults (``fsync``, ``synchronous_commit=on``) make a committed write durable
before the call returns, the same guarantee as the SQLite backend's ``synchronous=FULL``.
:meth:`PostgresStore.atomic` is a real transaction; nested blocks are savepoints. The
object is used from one thread at a time (the service serialises its calls); a
``search_path`` in the URL (``?options=-csearch_path%3Dname``) puts the tables in that
schema.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from coordinator.store.base import LOCK_WAIT_S, DatabaseInUse, TransactionLost
from coordinator.store.migrations import apply_migrations
from coordinator.store.postgres_schema import PostgresSchema, _ident, pg_sql
from coordinator.store.sql import Cursor, SQLStore

__all__ = ["PostgresStore", "tables_with_rows"]

log = logging.getLogger(__name__)

# pg_advisory_lock key held while migrating (any constant; "fedge" in ASCII).
_MIGRATION_LOCK = 0x6665646765
# Held for the session by a coordinator serving the database (hold()): shared by replicas,
# exclusive by one alone. Two keys, this one ("fedg") and the schema's hash: advisory locks
# are the database's, and deployments in other schemas of it are not this one.
_SERVING_LOCK = 0x66656467
# A server or network gone silent (a host powered off, a cut without a reset) left a call
# waiting for its answer, the service's one worker thread with it, for as long as TCP keeps
# a connection with nothing to send: for ever. These bound it (a connection 10 s, a silent
# link about a minute) where the URL does not set its own.
_CONNECTION_DEFAULTS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",  # ms that sent data may go unacknowledged
}


def _connect(url: str) -> psycopg.Connection[Any]:
    given = conninfo_to_dict(url)
    defaults = {k: v for k, v in _CONNECTION_DEFAULTS.items() if k not in given}
    return psycopg.connect(make_conninfo(url, **defaults), autocommit=True)


class PostgresStore(SQLStore):
    schema: PostgresSchema
    _integrity_errors = (psycopg.IntegrityError,)
    # A lost connection, a server restarting or shutting down, a serialization failure, a
    # lock not granted in time, a session ended for idling in a transaction (a stall), a
    # transaction aborted under its block, a server taking no writes for now (a standby
    # reached after a failover, default_transaction_read_only during maintenance: no fault
    # of a task's, which must not be failed, nor a device's report refused for good).
    transient_errors = (
        psycopg.OperationalError,
        psycopg.errors.IdleInTransactionSessionTimeout,
        psycopg.errors.ReadOnlySqlTransaction,
        TransactionLost,
    )

    def __init__(
        self, url: str, *, lock_timeout_s: float = LOCK_WAIT_S, idle_timeout_s: float = 300.0
    ) -> None:
        self.url = url
        # Among replicas (coordinator.replicas) a process that stalls without dying (paused,
        # swapping, cut off) would hold its row locks for ever: the server ends its session
        # once it sits idle inside a transaction for idle_timeout_s (its transaction rolls
        # back, its locks go; longer than the slowest close, which computes between its
        # statements), and a wait for a lock gives up after lock_timeout_s (LOCK_WAIT_S: a
        # transient error, 503, before readiness gives the replica up) instead of hanging a
        # request. A value the operator set (server, database, role, or the URL's options)
        # is kept: these fill in only unset ones.
        self._settings = {
            "lock_timeout": f"{round(lock_timeout_s * 1000)}ms",
            "idle_in_transaction_session_timeout": f"{round(idle_timeout_s * 1000)}ms",
        }
        self.conn = _connect(url)
        self.schema = PostgresSchema(self.conn)
        self._depth = 0  # nesting of atomic() blocks
        self._held: bool | None = None  # the serving lock (hold()): shared, alone, none
        try:
            self.conn.execute("select pg_advisory_lock(%s)", [_MIGRATION_LOCK])
            try:
                self.schema_version = apply_migrations(self.schema)
            finally:
                self.conn.execute("select pg_advisory_unlock(%s)", [_MIGRATION_LOCK])
            self._apply_settings()  # after migrating: waiting for the migration lock is fine
        except BaseException:
            self.conn.close()
            raise

    def _apply_settings(self) -> None:
        for name, value in self._settings.items():
            row = self.conn.execute("select current_setting(%s)", [name]).fetchone()
            if row is not None and row[0] == "0":  # PostgreSQL's default: no limit
                self.conn.execute("select set_config(%s, %s, false)", [name, value])

    def _connection(self) -> psycopg.Connection[Any]:
        """The connection, opened again if the last one broke (a server restart, a network
        cut): the failing call raised a transient error, the next one carries on. Never in
        the middle of a transaction, whose earlier writes died with the old connection."""
        if self.conn.broken and self._depth == 0:
            self.conn = _connect(self.url)
            self.schema.conn = self.conn
            self._apply_settings()
            if self._held is not None:
                # The lock went with the old session. Not taken again only if a process
                # of the other kind started in the gap (a server restart): said loudly,
                # and this one serves on (stopping it would lose nothing but its answers).
                try:
                    self._take_serving_lock(self._held)
                except DatabaseInUse as e:
                    log.error("reconnected, but %s", e)
        return self.conn

    def hold(self, *, shared: bool) -> None:
        if self._held is None:
            self._take_serving_lock(shared)
            self._held = shared

    def _take_serving_lock(self, shared: bool) -> None:
        fn = "pg_try_advisory_lock_shared" if shared else "pg_try_advisory_lock"
        row = self.conn.execute(
            f"select {fn}(%s, hashtext(current_schema()))", [_SERVING_LOCK]
        ).fetchone()
        if not (row and row[0]):
            raise DatabaseInUse(shared)

    def atomic(self) -> AbstractContextManager[None]:
        @contextmanager
        def block() -> Iterator[None]:
            with self._connection().transaction():
                self._depth += 1
                try:
                    yield
                    if self.conn.info.transaction_status == TransactionStatus.INERROR:
                        # A statement failed and its error was caught: PostgreSQL has
                        # aborted the transaction, and its COMMIT would roll back without a
                        # word. What the block did must not be taken as stored (a batch
                        # would acknowledge uploads that are gone): it fails instead.
                        raise TransactionLost(
                            "a statement failed inside the transaction and its error was "
                            "caught; the transaction is rolled back"
                        )
                finally:
                    self._depth -= 1

        return block()

    def close(self) -> None:
        self.conn.close()

    def size_bytes(self) -> int:
        row = self._connection().execute("select pg_database_size(current_database())").fetchone()
        return int(row[0]) if row else 0

    def _execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        return self._connection().execute(pg_sql(sql), list(args))

    def _execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._connection().cursor() as cur:
            cur.executemany(pg_sql(sql), rows)

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        if any(isinstance(a, str) and "\x00" in a for a in args):
            # No PostgreSQL text holds NUL, so nothing matches such a key (an id from a URL
            # path); psycopg would refuse to send it at all.
            return []
        with self._connection().cursor(row_factory=dict_row) as cur:
            return cur.execute(pg_sql(sql), list(args)).fetchall()

    def _table_names(self) -> list[str]:
        self._connection()
        return self.schema.table_names()

    def _columns(self, table: str) -> list[str]:
        self._connection()
        return self.schema.columns(table)

    def _guarded(self) -> AbstractContextManager[Any]:
        idle = self._connection().info.transaction_status == TransactionStatus.IDLE
        # Outside a transaction the statement is one on its own (autocommit).
        return nullcontext() if idle else self.conn.transaction()

    def _for_update(self, skip_locked: bool) -> str:
        return " for update skip locked" if skip_locked else " for update"

    def claim_round(self, round_id: int, *, closing: bool = False) -> bool:
        # Advisory locks are the database's, not the schema's: the schema is in the key. A
        # look takes the lock shared and lets it go in the same statement: held across
        # their transactions, the looks of batches queued for the round's row would keep
        # its close from ever finding the claim free.
        key = "hashtextextended(current_schema() || ':round:' || ?, 0)"
        sql = (
            f"select pg_try_advisory_xact_lock({key})"
            if closing
            else f"select case when pg_try_advisory_lock_shared({key}) "
            f"then pg_advisory_unlock_shared({key}) else false end"
        )
        row = self._execute(sql, [str(round_id)] * (1 if closing else 2)).fetchone()
        return bool(row[0])

    def lock_blob(self, sha: str, *, shared: bool = False, wait: bool = True) -> bool:
        # A transaction-scoped advisory lock on the hash's 64-bit digest: released by the
        # commit or rollback (or the server, when the connection dies).
        fn = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
        row = self._execute(
            f"select {fn}{'_shared' if shared else ''}(hashtextextended(?, 0))", [sha]
        ).fetchone()
        return wait or bool(row[0])

    @contextmanager
    def _read_snapshot(self) -> Iterator[None]:
        with self._connection().transaction():
            self._execute("set transaction isolation level repeatable read, read only")
            yield

    def _records_copied(self) -> None:
        self.schema.sync_identities()

    def _json_text(self, expr: str, key: str) -> str:
        # json, not jsonb: jsonb refuses a "\u0000" anywhere in a device's report.
        return f"(({expr})::json ->> '{key}')"

    def _json_number(self, expr: str, key: str) -> str:
        return f"{self._json_text(expr, key)}::double precision"

    def _json_members(self, expr: str, key: str) -> str:
        return f"json_each(({expr})::json -> '{key}')"


def tables_with_rows(url: str) -> list[str]:
    """The tables of the URL's schema that hold a row, read as the database is: no store is
    opened, so no migration runs."""
    with _connect(url) as conn:

        def filled(table: str) -> bool:
            row = conn.execute(f"select exists (select 1 from {_ident(table)})").fetchone()
            return bool(row and row[0])

        return [t for t in PostgresSchema(conn).table_names() if filled(t)]
