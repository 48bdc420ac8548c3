"""``fedge task`` against a running coordinator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedge.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_create_list_show_pause_resume_evaluate(
    coordinator, tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--coordinator", coordinator.url, f"--admin-token={coordinator.admin_token}"]
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"goal": 3, "rounds": 2}))
    code, out, _ = run(capsys, "task", "create", *common, "--bundle", str(tiny_bundle),
                       "--name", "cli", "--plan", f"@{plan_file}")  # fmt: skip
    task = json.loads(out)
    assert code == 0 and task["name"] == "cli" and task["plan"]["goal"] == 3
    tid = task["task_id"]
    code, out, _ = run(capsys, "task", "list", *common)
    assert [t["task_id"] for t in json.loads(out)] == [tid]
    assert json.loads(run(capsys, "task", "pause", *common, tid)[1])["state"] == "paused"
    code, _, err = run(capsys, "task", "pause", *common, tid)
    assert code == 2 and "409 conflict" in err
    assert json.loads(run(capsys, "task", "resume", *common, tid)[1])["state"] == "running"
    assert json.loads(run(capsys, "task", "evaluate", *common, tid)[1])["pending_evaluations"] == 1
    code, out, _ = run(capsys, "task", "show", *common, tid, "--rounds")
    shown = json.loads(out)
    assert shown["task_id"] == tid and shown["rounds"] == []


def test_errors_are_one_line(coordinator, tiny_bundle: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("FEDGE_ADMIN_TOKEN", raising=False)
    code, _, err = run(capsys, "task", "list", "--coordinator", coordinator.url)
    assert code == 2 and "admin token" in err
    code, _, err = run(capsys, "task", "list", "--coordinator", coordinator.url,
                       "--admin-token", "wrong")  # fmt: skip
    assert code == 2 and "401 unauthorized" in err
    code, _, err = run(capsys, "task", "create", "--coordinator", coordinator.url,
                       f"--admin-token={coordinator.admin_token}", "--bundle", str(tiny_bundle),
                       "--plan", "{not json")  # fmt: skip
    assert code == 2 and "--plan" in err
    monkeypatch.setenv("FEDGE_ADMIN_TOKEN", coordinator.admin_token)
    code, _, err = run(capsys, "task", "show", "--coordinator", coordinator.url, "t-nope")
    assert code == 2 and "404 not_found" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["missing", "file"])
def test_a_bundle_that_is_no_directory_is_refused_before_any_upload(
    coordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    """Before, a --bundle naming no directory went up as an empty tar and came back as the
    coordinator's '422 bundle_invalid: no manifest.json', and an error reading the bundle
    was reported as 'cannot reach' the coordinator."""
    bundle = tmp_path / "bundle"
    if where == "file":
        bundle.write_text("{}")
    code, _, err = run(capsys, "task", "create", "--coordinator", coordinator.url,
                       f"--admin-token={coordinator.admin_token}", "--bundle", str(bundle))
    assert code == 2 and f"--bundle {bundle}" in err, err
    assert "cannot reach" not in err and "bundle_invalid" not in err
    assert coordinator.admin().tasks() == []
