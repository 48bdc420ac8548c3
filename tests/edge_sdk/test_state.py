"""What the device keeps on disk: a private credential and per-task residual files."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk.state import Credentials, DeviceState, PendingUpload


def test_credentials_round_trip_privately(tmp_path: Path) -> None:
    state = DeviceState(tmp_path / "s")
    creds = Credentials("http://127.0.0.1:1", "d-1", "secret")
    assert state.load_credentials(creds.coordinator) is None
    state.save_credentials(creds)
    assert stat.S_IMODE(state.credentials_path.stat().st_mode) == 0o600
    assert DeviceState(tmp_path / "s").load_credentials(creds.coordinator) == creds
    assert not list((tmp_path / "s").glob(".*.tmp"))


def test_a_leftover_readable_tmp_file_never_sees_the_secret(tmp_path: Path) -> None:
    state = DeviceState(tmp_path)
    leftover = tmp_path / f".{state.credentials_path.name}.tmp"
    leftover.write_text("")
    leftover.chmod(0o644)
    with open(leftover, "rb") as reader:  # someone who opened it while it was readable
        state.save_credentials(Credentials("http://127.0.0.1:1", "d-1", "secret"))
        assert b"secret" not in reader.read()
    assert stat.S_IMODE(state.credentials_path.stat().st_mode) == 0o600


def test_credentials_of_another_coordinator_or_garbage_are_ignored(tmp_path: Path) -> None:
    state = DeviceState(tmp_path)
    state.save_credentials(Credentials("http://a:1", "d-1", "x"))
    assert state.load_credentials("http://b:1") is None
    state.credentials_path.write_text("{not json")
    assert state.load_credentials("http://a:1") is None
    state.forget_credentials()
    assert not state.credentials_path.exists()


def test_residual_store_is_per_task_and_safe(tmp_path: Path) -> None:
    state = DeviceState(tmp_path)
    vec = np.linspace(-1, 1, 10, dtype=np.float32)
    state.error_feedback("t-1").save(vec)
    np.testing.assert_array_equal(state.error_feedback("t-1").load(10), vec)
    assert state.error_feedback("t-2").load(10) is None
    assert state.error_feedback("t-1").load(11) is None  # another model layout
    with pytest.raises(ValueError, match="safe"):
        state.error_feedback("../escape")


def _pending(frame: bytes = b"frame-bytes", residual: np.ndarray | None = None) -> PendingUpload:
    return PendingUpload(
        coordinator="http://127.0.0.1:1", device_id="d-1", assignment_id="a-1", task_id="t-1",
        round=3, key=PendingUpload.key_for("a-1", frame), report={"num_examples": 5},
        frame=frame, uses_feedback=True,
        residual=np.arange(6, dtype=np.float32) if residual is None else residual,
    )


def test_pending_upload_round_trips_and_commits_idempotently(tmp_path: Path) -> None:
    state = DeviceState(tmp_path)
    assert state.load_pending() is None
    pending = _pending()
    state.save_pending(pending)
    loaded = DeviceState(tmp_path).load_pending()  # another process reads it back
    assert loaded is not None and loaded.frame == pending.frame and loaded.key == pending.key
    assert (loaded.report, loaded.round, loaded.task_id) == ({"num_examples": 5}, 3, "t-1")
    np.testing.assert_array_equal(loaded.residual, pending.residual)
    assert state.error_feedback("t-1").load(6) is None  # not the task's until acknowledged
    state.commit_pending(loaded)
    state.commit_pending(loaded)  # a crash after the first commit repeats it: same state
    np.testing.assert_array_equal(state.error_feedback("t-1").load(6), pending.residual)
    assert state.load_pending() is None
    assert sorted(p.name for p in (tmp_path / "pending").iterdir()) == []


def test_a_refused_pending_upload_leaves_the_residual_as_it_was(tmp_path: Path) -> None:
    state = DeviceState(tmp_path)
    old = np.full(6, 0.5, np.float32)
    state.error_feedback("t-1").save(old)
    state.save_pending(_pending())
    state.clear_pending()
    np.testing.assert_array_equal(state.error_feedback("t-1").load(6), old)
    assert state.load_pending() is None


@pytest.mark.parametrize("damage", ["frame changed", "residual gone", "json garbage",
                                    "unsafe task id"])
def test_a_pending_upload_that_cannot_be_resent_as_it_was_is_dropped(
    tmp_path: Path, damage: str
) -> None:
    state = DeviceState(tmp_path)
    state.save_pending(_pending())
    d = tmp_path / "pending"
    if damage == "frame changed":
        (d / "upload.frame").write_bytes(b"other bytes")
    elif damage == "residual gone":
        (d / "upload.residual.npy").unlink()
    elif damage == "json garbage":
        (d / "upload.json").write_text("{")
    else:
        meta = json.loads((d / "upload.json").read_text())
        (d / "upload.json").write_text(json.dumps({**meta, "task_id": "../x"}))
    assert state.load_pending() is None
    assert not (d / "upload.json").exists()


def test_every_step_is_on_disk_before_the_next_one_counts_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename or unlink is durable only once its directory is fsync'ed; a power cut can
    otherwise lose it while later steps survive. So: the credential and the pending upload
    are durable before save_* returns (the upload is sent next), and the task's new residual
    before the pending upload's marker goes (else the old residual would be sent again)."""
    events: list[tuple[str, Path]] = []
    real_fsync, real_replace, real_unlink = os.fsync, os.replace, os.unlink

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            events.append(("fsync dir", Path(os.readlink(f"/proc/self/fd/{fd}")).resolve()))
        real_fsync(fd)

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        events.append(("rename", Path(dst).resolve()))
        real_replace(src, dst, **kw)

    def unlink(path: Any, **kw: Any) -> None:
        events.append(("unlink", Path(path).resolve()))
        real_unlink(path, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)
    root = tmp_path.resolve()
    state = DeviceState(root)

    def durable_at(i: int, directory: Path) -> bool:
        """Whether ``directory`` was fsync'ed after event ``i``."""
        return ("fsync dir", directory) in events[i + 1 :]

    state.save_credentials(Credentials("http://127.0.0.1:1", "d-1", "secret"))
    assert durable_at(events.index(("rename", root / "credentials.json")), root)

    events.clear()
    state.save_pending(_pending())
    assert durable_at(events.index(("rename", root / "pending" / "upload.json")), root / "pending")

    pending = state.load_pending()
    assert pending is not None
    events.clear()
    state.commit_pending(pending)
    saved = events.index(("rename", root / "residuals" / "t-1.npy"))
    marker_gone = events.index(("unlink", root / "pending" / "upload.json"))
    assert ("fsync dir", root / "residuals") in events[saved + 1 : marker_gone]

    # An upload that left no residual, on a device that never stored one: nothing to persist.
    fresh = DeviceState(root / "fresh")
    fresh.save_pending(dataclasses.replace(_pending(), residual=None))
    empty = fresh.load_pending()
    assert empty is not None
    fresh.commit_pending(empty)
    assert fresh.load_pending() is None and fresh.error_feedback("t-1").load(6) is None


def test_a_damaged_credential_is_reported_before_it_is_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Registration replaces an unreadable credential (a new identity for the device): the
    operator must be able to see why a device came back as someone else."""
    state = DeviceState(tmp_path)
    state.save_credentials(Credentials("http://a:1", "d-1", "x"))
    state.credentials_path.write_bytes(b'{"coordinator": "http://a:1", "devi')
    with caplog.at_level("WARNING", logger="edge_sdk.state"):
        assert state.load_credentials("http://a:1") is None
    assert any("credentials.json" in r.getMessage() for r in caplog.records)
    caplog.clear()
    state.forget_credentials()
    with caplog.at_level("WARNING", logger="edge_sdk.state"):
        assert state.load_credentials("http://a:1") is None  # none yet: nothing to report
    assert caplog.records == []
