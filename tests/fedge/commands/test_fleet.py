"""``fedge fleet`` against a real coordinator on loopback, and its argument errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.embedded import EmbeddedCoordinator
from fedge.cli import main


def test_fleet_runs_until_the_rounds_and_prints_a_json_summary(
    coordinator: EmbeddedCoordinator, digits_bundle: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    admin = coordinator.admin()
    bundle_id = admin.upload_bundle(digits_bundle)["bundle_id"]
    admin.create_task(bundle_id, plan={"rounds": 1, "goal": 3, "selection_window_s": 1,
                                       "codec": {"name": "int8"}})
    code = main(["fleet", "--coordinator", coordinator.url, "--devices", "6", "--until-rounds",
                 "1", "--partition", "shards:2", "--duration", "120",
                 "--enrollment-token", str(coordinator.enrollment_token),
                 "--admin-token", coordinator.admin_token])
    out, err = capsys.readouterr()
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    for key in ("devices", "checkins", "tasks_started", "uploads_acknowledged", "aborts",
                "bytes_up", "bytes_down"):
        assert key in summary
    assert summary["devices"] == 6 and summary["uploads_acknowledged"] >= 3
    assert admin.status()["rounds_completed"] == 1
    assert "[fleet]" in err  # the progress line


@pytest.mark.parametrize("extra, message", [
    (["--partition", "dirichlet:-1"], "alpha"),
    (["--data", "mnist"], "unknown --data"),
    (["--data", "synthetic:1"], "synthetic:ALPHA,BETA"),
    (["--dropout", "1.5"], "probability"),
])
def test_bad_arguments_fail_with_a_clear_error(
    coordinator: EmbeddedCoordinator, capsys: pytest.CaptureFixture[str], extra: list[str],
    message: str,
) -> None:
    code = main(["fleet", "--coordinator", coordinator.url, "--devices", "4", *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert coordinator.admin().status()["devices_registered"] == 0


def test_until_rounds_needs_the_admin_token(
    coordinator: EmbeddedCoordinator, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FEDGE_ADMIN_TOKEN", raising=False)
    args = ["fleet", "--coordinator", coordinator.url, "--devices", "2", "--until-rounds", "1"]
    assert main(args) == 2
    assert "admin token" in capsys.readouterr().err
    assert main([*args, "--admin-token", "wrong"]) == 2
    assert "cannot read the status" in capsys.readouterr().err


def test_an_unreachable_coordinator_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet", "--coordinator", "http://127.0.0.1:9", "--devices", "2"]) == 2
    assert "cannot reach" in capsys.readouterr().err
