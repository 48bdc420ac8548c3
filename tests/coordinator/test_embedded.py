"""EmbeddedCoordinator in both modes, and the AdminClient against it."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.admin import AdminClient, ApiCallError, TransportError
from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.errors import NotFound


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


def test_the_admin_client_percent_encodes_task_ids(tmp_path: Path, tiny_bundle: Path) -> None:
    """A task id with "?" asked the coordinator for another task: ``task("t?x=1")`` read the
    task "t" (the rest a query string). Now the id is sent whole and is simply unknown."""
    with EmbeddedCoordinator(tmp_path / "fedge.db") as coord:
        admin = coord.admin()
        task_id = admin.create_task(admin.upload_bundle(tiny_bundle)["bundle_id"])["task_id"]
        assert admin.task(task_id)["task_id"] == task_id
        for odd in (f"{task_id}?x=1", f"{task_id}#frag", f"{task_id}/rounds"):
            with pytest.raises(NotFound, match="no task"):
                admin.task(odd)
