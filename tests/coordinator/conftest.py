"""``replica_db``: the database replicas share, once a PostgreSQL schema (the
``postgres_url`` fixture) and once a SQLite file (several processes on one node), so that
each replica test, and any coordinator test that needs a real database of each kind, runs
against both backends."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(params=["postgresql", "sqlite"])
def replica_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return str(tmp_path / "replicas.db")
