"""The database side of replicas' turns on PostgreSQL (row locks held by one connection,
seen from another), and where replica mode is refused."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from coordinator.config import ConfigError, CoordinatorConfig
from coordinator.store import Round, Store, Task, open_store
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
        released = threading.Event()

        def hold() -> None:
            with a.atomic():
                assert a.lock_round(rnd.round_id) is not None
                a.update_round(rnd.round_id, state="committed")
                time.sleep(0.5)
            released.set()

        holder = threading.Thread(target=hold)
        holder.start()
        time.sleep(0.2)
        with b.atomic():
            assert b.lock_round(rnd.round_id, skip_locked=True) is None  # another's turn
            assert b.lock_task("t-1") is not None  # other rows are free
        with b.atomic():
            waited = b.lock_round(rnd.round_id)  # waits, then reads what the holder committed
            assert released.is_set() and waited is not None and waited.state == "committed"
        holder.join()
    finally:
        a.close()
        b.close()


def test_replica_mode_needs_a_shared_database_and_blob_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="replica needs"):
        CoordinatorConfig(replica=True)
    with pytest.raises(ConfigError, match="replica needs"):
        CoordinatorConfig(replica=True, database_url="postgresql://db/fedge")
    CoordinatorConfig(replica=True, database_url="postgresql://db/fedge", blob_path="/srv/b")
    assert main(["serve", "--db", str(tmp_path / "f.db"), "--replica", "--port", "0"]) == 2
