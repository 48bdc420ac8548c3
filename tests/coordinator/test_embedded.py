"""EmbeddedCoordinator in both modes, and the AdminClient against it."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.admin import AdminClient, ApiCallError, TransportError
from coordinator.embedded import EmbeddedCoordinator


def test_thread_mode_serves_and_stops(tmp_path: Path, tiny_bundle: Path) -> None:
    with EmbeddedCoordinator(tmp_path / "f.db") as coord:
        assert coord.url.startswith("http://127.0.0.1:") and coord.db_path.exists()
        admin = coord.admin()
        assert admin.health() == {"ok": True}
        bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
        task = admin.create_task(bundle_id, {"goal": 2}, name="t")
        assert [t["task_id"] for t in admin.tasks()] == [task["task_id"]]
        assert coord.call(coord.service.store.count_devices) == 0
        url = coord.url
    with pytest.raises(TransportError):
        AdminClient(url, "x", timeout=2).health()
    # the data outlived the service
    with EmbeddedCoordinator(tmp_path / "f.db") as again:
        assert again.admin().status()["tasks"][0]["task_id"] == task["task_id"]


def test_temporary_database_is_removed(tmp_path: Path) -> None:
    with EmbeddedCoordinator() as coord:
        db = coord.db_path
        assert db.exists()
    assert not db.exists()


def test_subprocess_mode_with_admin_errors(tmp_path: Path) -> None:
    with EmbeddedCoordinator(tmp_path / "p.db", subprocess=True, max_json_bytes=1000) as coord:
        assert coord.process is not None and coord.process.poll() is None
        with pytest.raises(ApiCallError) as e:
            AdminClient(coord.url, "wrong").tasks()
        assert (e.value.status, e.value.code) == (401, "unauthorized")
        with pytest.raises(ApiCallError) as e:
            coord.admin().create_task("nope", {"goal": 1, "pad": "x" * 2000})
        assert (e.value.status, e.value.code) == (413, "body_too_large")  # config reached it
        with pytest.raises(ApiCallError) as e:
            coord.admin().task("t-nope")
        assert e.value.code == "not_found"
        process = coord.process
    assert process.poll() is not None  # stopped


def test_misuse_is_refused(tmp_path: Path) -> None:
    from coordinator.clock import FakeClock

    with pytest.raises(ValueError):
        EmbeddedCoordinator(tmp_path / "x.db", subprocess=True, clock=FakeClock())
    coord = EmbeddedCoordinator(tmp_path / "x.db")
    with pytest.raises(RuntimeError):
        coord.kill()
