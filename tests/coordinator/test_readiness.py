"""``GET /v1/ready`` (coordinator/readiness.py): a replica whose store stops answering is
taken out of a load balancer's rotation and put back when it answers again; ``/v1/health``
keeps saying the process is up."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from coordinator.embedded import EmbeddedCoordinator
from coordinator.readiness import Readiness, stale_after
from coordinator.store import SQLiteStore, is_database_url
from edge_sdk.protocol import Route
from tests.coordinator.replicas.fleet import wait_for
from tests.fixtures.coordinator import HttpConnection


def _run_sql(database: str) -> Callable[[str], None]:
    """Runs a statement on the coordinator's database through a connection of its own, as
    an operator's mistake or an outage would change it under the coordinator."""

    def run(sql: str) -> None:
        if is_database_url(database):
            with psycopg.connect(database, autocommit=True) as conn:
                conn.execute(sql)
        else:
            with sqlite3.connect(database) as conn:
                conn.execute(sql)

    return run


@pytest.fixture
def served(replica_db: str, tmp_path: Path) -> Iterator[tuple[EmbeddedCoordinator, str]]:
    url = replica_db if is_database_url(replica_db) else None
    with EmbeddedCoordinator(
        replica_db if url is None else tmp_path / "fedge.db", database_url=url,
        blob_path=str(tmp_path / "blobs"),
        tick_interval_s=0.05,
    ) as coord:  # fmt: skip
        yield coord, replica_db


def _get(coord: EmbeddedCoordinator, route: str) -> tuple[int, Any]:
    http = HttpConnection(coord.url)
    status, _, body = http.request("GET", route)
    http.close()
    return status, json.loads(body)


def test_a_store_that_stops_answering_makes_the_process_unready_until_it_answers(
    served: tuple[EmbeddedCoordinator, str],
) -> None:
    coord, database = served
    run = _run_sql(database)
    assert _get(coord, Route.READY) == (200, {"ready": True})

    run("alter table rounds rename to rounds_elsewhere")  # every tick reads the open rounds
    wait_for(lambda: _get(coord, Route.READY)[0] == 503, what="the process unready")
    status, body = _get(coord, Route.READY)
    assert status == 503 and body["ready"] is False
    assert body["reason"].startswith("the last tick failed") and "rounds" in body["reason"]
    assert _get(coord, Route.HEALTH) == (200, {"ok": True})  # the process itself is up

    run("alter table rounds_elsewhere rename to rounds")
    wait_for(lambda: _get(coord, Route.READY)[0] == 200, what="the process ready again")
    assert _get(coord, Route.READY) == (200, {"ready": True})


def test_readiness_goes_with_the_last_tick_and_its_age() -> None:
    now = [100.0]
    r = Readiness(stale_after(0.5), clock=lambda: now[0])
    assert r.stale_after_s == 10.0 and stale_after(2.0) == 40.0
    assert r.problem() is not None and r.problem().startswith("starting")  # type: ignore[union-attr]
    r.succeeded()
    assert r.problem() is None
    now[0] += 10.0
    assert r.problem() is None  # at the bound still
    now[0] += 0.5
    assert "no tick has finished for 10.5 s" in (r.problem() or "")  # a stuck worker
    r.failed(ConnectionError("server closed the connection"))
    assert r.problem() == (
        "the last tick failed (ConnectionError: server closed the connection)"
    )
    r.succeeded()  # the next good tick: ready again, whatever came before
    assert r.problem() is None


@pytest.mark.slow
def test_a_write_waiting_on_another_process_gives_up_before_readiness_does(
    tmp_path: Path,
) -> None:
    """Processes on one SQLite file (``fedge serve --processes K``) take turns writing. One
    holding the file for long (a long close) makes another's request wait on that process's
    one worker thread, its ticks included: the wait must end (503, retry) before the 10 s
    after which the waiting process is unready, as PostgreSQL's lock timeout does among
    replicas. Before, it lasted SQLite's 30 s."""
    holder, waiter = (SQLiteStore(tmp_path / "fedge.db") for _ in range(2))
    try:
        with holder.atomic():
            started = time.monotonic()
            with pytest.raises(sqlite3.OperationalError, match="locked"), waiter.atomic():
                pass
            waited = time.monotonic() - started
        assert 1.0 < waited < stale_after(0.5), waited
        with waiter.atomic():  # its turn, once the holder committed
            pass
    finally:
        holder.close()
        waiter.close()
