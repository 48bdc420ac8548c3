"""What the device keeps on disk: a private credential and per-task residual files."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.state import Credentials, DeviceState


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
