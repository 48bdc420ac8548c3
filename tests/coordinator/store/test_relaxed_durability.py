"""Store.relaxed_durability on SQLite: commits inside skip the fsync (synchronous=NORMAL in
WAL mode), everything else keeps waiting for the disk, and what was written is still there
for the next process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coordinator.clock import FakeClock
from coordinator.embedded import EmbeddedCoordinator
from coordinator.store import Device, SQLiteStore
from tests.fixtures.coordinator import DeviceHTTP


def _device(device_id: str) -> Device:
    return Device(device_id, "00" * 16, "ab" * 32, "linux", "x86_64", ("ort-step",), "default", 5.0)


def _synchronous(store: SQLiteStore) -> int:
    return int(store.db.conn.execute("PRAGMA synchronous").fetchone()[0])


FULL, NORMAL = 2, 1


def test_relaxed_only_inside_the_block(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    try:
        assert _synchronous(store) == FULL
        with store.relaxed_durability():
            assert _synchronous(store) == NORMAL
            store.add_device(_device("d-1"))
        assert _synchronous(store) == FULL
        with pytest.raises(RuntimeError), store.relaxed_durability():
            raise RuntimeError("a failed check-in")
        assert _synchronous(store) == FULL  # an error does not leave the connection relaxed
    finally:
        store.close()


def test_an_enclosing_transaction_keeps_its_own_setting(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    try:
        with store.atomic(), store.relaxed_durability():
            assert _synchronous(store) == FULL
            store.add_device(_device("d-1"))
        assert store.get_device("d-1") is not None
    finally:
        store.close()


def test_relaxed_writes_reach_the_next_connection(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    with store.relaxed_durability():
        store.add_device(_device("d-1"))
    store.add_device(_device("d-2"))  # a commit that waits for the disk, after them
    store.db.conn.close()  # no checkpoint on purpose beyond what close does
    again = SQLiteStore(tmp_path / "s.db")
    try:
        assert again.get_device("d-1") is not None and again.get_device("d-2") is not None
    finally:
        again.close()


def test_a_check_in_writes_relaxed_and_leaves_the_connection_full(
    coordinator: EmbeddedCoordinator, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service's check-in path: its candidate row is stored, and the connection waits for
    the disk again afterwards (an upload's commit after it must)."""
    admin = coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    admin.create_task(bundle_id, {"rounds": 1, "goal": 2, "selection_window_s": 60.0})
    device = DeviceHTTP(coordinator)
    seen: list[int] = []
    store = coordinator.service.store
    real = store.add_candidate

    def add_candidate(*args: object) -> None:
        seen.append(_synchronous(store))
        real(*args)

    monkeypatch.setattr(store, "add_candidate", add_candidate)
    assert device.check_in()["reason"] == "selecting"
    assert seen == [NORMAL]
    rnd = coordinator.call(lambda: store.open_round(store.list_tasks()[0].task_id))
    assert coordinator.call(lambda: store.candidates(rnd.round_id)) == [device.device_id]
    assert coordinator.call(lambda: _synchronous(store)) == FULL


def test_a_selection_made_by_a_check_in_waits_for_the_disk(
    tmp_path: Path, tiny_bundle: Path, fake_clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the check-in's own bookkeeping is relaxed: a selection (cohort, round state), a
    round opened or closed, a version committed, reached from a check-in, waits for the disk
    like any other. The tick is kept from running first, so the check-in makes the selection."""
    with EmbeddedCoordinator(
        tmp_path / "fedge.db", clock=fake_clock, seed=1, tick_interval_s=3600.0
    ) as coord:
        admin = coord.admin()
        bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
        admin.create_task(bundle_id, {"rounds": 1, "goal": 1, "selection_window_s": 10.0})
        device = DeviceHTTP(coord)
        assert device.check_in()["reason"] == "selecting"
        store = coord.service.store
        seen: dict[str, list[int]] = {"update_round": [], "update_assignment": []}
        for name, calls in seen.items():
            real = getattr(store, name)

            def spy(*args: Any, _real: Any = real, _calls: list[int] = calls, **kw: Any) -> Any:
                _calls.append(_synchronous(store))
                return _real(*args, **kw)

            monkeypatch.setattr(store, name, spy)
        fake_clock.advance(11.0)
        assert device.check_in()["action"] == "train"
        assert seen["update_round"] and set(seen["update_round"]) == {FULL}  # the selection
        assert seen["update_assignment"] == [NORMAL]  # its delivery
        assert coord.call(lambda: _synchronous(store)) == FULL


def test_without_wal_nothing_is_relaxed() -> None:
    """A rollback journal (here: a database in memory; also a file system without shared
    memory, where journal_mode=WAL is refused) under synchronous=NORMAL can be corrupted by a
    power cut, not merely lose its newest commits."""
    store = SQLiteStore(":memory:")
    try:
        with store.relaxed_durability():
            assert _synchronous(store) == FULL
            store.add_device(_device("d-1"))
        assert store.get_device("d-1") is not None
    finally:
        store.close()
