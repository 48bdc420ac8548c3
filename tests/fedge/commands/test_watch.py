"""``fedge watch`` follows a task while devices (bare HTTP) drive its rounds."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.embedded import EmbeddedCoordinator
from fedge.cli import build_parser, main
from fedge.commands import watch
from tests.fixtures.coordinator import DeviceHTTP


def _task(coord: EmbeddedCoordinator, bundle: Path, rounds: int) -> str:
    admin = coord.admin()
    bundle_id = admin.upload_bundle(bundle)["bundle_id"]
    plan = {"goal": 1, "over_selection": 1.0, "selection_window_s": 0.0, "rounds": rounds}
    return str(admin.create_task(bundle_id, plan, name="watched")["task_id"])


def _one_round(dev: DeviceHTTP, delta: float) -> None:
    answer = dev.check_in()
    if answer["action"] == "wait":
        answer = dev.check_in()
    status, _ = dev.upload(answer["assignment"]["assignment_id"], np.full(64, delta),
                           loss=0.5 - delta)
    assert status == 200


def test_watch_prints_each_round_as_it_closes_and_ends_with_the_task(
    coordinator: EmbeddedCoordinator, tiny_bundle: Path
) -> None:
    task_id = _task(coordinator, tiny_bundle, rounds=3)
    args = build_parser().parse_args([
        "watch", "--coordinator", coordinator.url, "--admin-token", coordinator.admin_token,
        "--interval", "0.05", "--timeout", "60",
    ])
    out = io.StringIO()
    result: dict[str, Any] = {}
    follower = threading.Thread(target=lambda: result.update(code=watch.run(args, out=out)))
    follower.start()
    dev = DeviceHTTP(coordinator)
    seen = []
    for i in range(3):
        _one_round(dev, 0.01 * (i + 1))
        # it shows round i + 1 before the next one starts: it follows, not just summarizes
        deadline = time.monotonic() + 10
        while f"\n{i + 1:>5}  train" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.02)
        seen.append(out.getvalue().count("committed"))
    follower.join(timeout=30)
    assert result == {"code": 0}
    assert seen == [1, 2, 3]
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"watching watched ({task_id}, sync, 3 rounds planned)")
    assert lines[1].split()[:4] == ["round", "kind", "state", "version"]
    rounds = coordinator.admin().rounds(task_id)
    for line, r in zip(lines[2:5], rounds, strict=True):
        cells = line.split()
        assert cells[:4] == [str(r["round"]), "train", "committed",
                             str(r["metrics"]["model_version"])]
        assert cells[9] == f"{r['metrics']['loss']:.4f}"
    assert lines[5] == f"task {task_id} completed: version 3, 3 rounds"


def test_watch_prints_the_rounds_that_close_after_old_ones_left_the_view(
    coordinator: EmbeddedCoordinator, tiny_bundle: Path
) -> None:
    # The task view lists the last 300 rounds, and retention deletes old ones: the list of
    # closed rounds stops growing, or shrinks, while rounds go on closing.
    task_id = _task(coordinator, tiny_bundle, rounds=4)
    args = build_parser().parse_args([
        "watch", task_id, "--coordinator", coordinator.url, "--admin-token",
        coordinator.admin_token, "--interval", "0.05", "--timeout", "60",
    ])
    out = io.StringIO()
    result: dict[str, Any] = {}
    follower = threading.Thread(target=lambda: result.update(code=watch.run(args, out=out)))
    follower.start()
    dev = DeviceHTTP(coordinator)
    store = coordinator.service.store
    for i in range(4):
        _one_round(dev, 0.01 * (i + 1))
        deadline = time.monotonic() + 10
        while f"\n{i + 1:>5}  train" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.02)
        if i == 1:  # what retention does (it keeps the newest): round 1 leaves the view
            first = coordinator.call(store.list_rounds, task_id)[0]
            coordinator.call(store.delete_rounds, [first.round_id])
    follower.join(timeout=30)
    assert result == {"code": 0}
    printed = [line.split()[0] for line in out.getvalue().splitlines()[2:-1]]
    assert printed == ["1", "2", "3", "4"], out.getvalue()


def test_watch_gives_up_at_the_timeout(
    coordinator: EmbeddedCoordinator, tiny_bundle: Path, capsys: Any
) -> None:
    task_id = _task(coordinator, tiny_bundle, rounds=3)
    code = main(["watch", task_id, "--coordinator", coordinator.url,
                 "--admin-token", coordinator.admin_token, "--interval", "0.05",
                 "--timeout", "0.2"])
    assert code == 1
    assert "still running" in capsys.readouterr().err


def test_watch_ends_when_the_task_fails_and_says_why(
    coordinator: EmbeddedCoordinator, tiny_bundle: Path, capsys: Any
) -> None:
    """A failed task never completes: before, watch went on polling it until --timeout
    (without one, for ever) and then called it "still failed"."""
    admin = coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    # FedAvg with a server learning rate of 1e300: the first commit would overflow
    plan = {"goal": 1, "over_selection": 1.0, "selection_window_s": 0.0, "rounds": 3,
            "robust": "none", "server_optimizer": {"lr": 1e300}}
    task_id = admin.create_task(bundle_id, plan, name="wild")["task_id"]
    _one_round(DeviceHTTP(coordinator), 0.01)
    assert admin.task(task_id)["state"] == "failed"
    started = time.monotonic()
    code = main(["watch", task_id, "--coordinator", coordinator.url,
                 "--admin-token", coordinator.admin_token, "--interval", "0.05",
                 "--timeout", "20"])
    assert code == 1 and time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert f"task {task_id} failed" in err and "non-finite" in err, err


def test_watch_without_a_running_task_or_token(
    coordinator: EmbeddedCoordinator, capsys: Any, monkeypatch: Any
) -> None:
    auth = ["--admin-token", coordinator.admin_token]
    assert main(["watch", "--coordinator", coordinator.url, *auth]) == 2
    assert "no running task" in capsys.readouterr().err
    assert main(["watch", "t-nope", "--coordinator", coordinator.url, *auth]) == 2
    err = capsys.readouterr().err
    assert "404 not_found" in err and "cannot reach" not in err, err
    assert main(["watch", "--coordinator", coordinator.url, "--admin-token", "wrong"]) == 2
    err = capsys.readouterr().err
    assert "401 unauthorized" in err and "cannot reach" not in err, err
    monkeypatch.delenv("FEDGE_ADMIN_TOKEN", raising=False)
    assert main(["watch", "--coordinator", coordinator.url]) == 2
    assert "admin token" in capsys.readouterr().err


def test_watch_sends_the_task_id_percent_encoded(
    coordinator: EmbeddedCoordinator, tiny_bundle: Path, capsys: Any
) -> None:
    """Before, the id went into the paths as typed: "<id>?x=1" (a paste with a query) asked
    for task <id> and watched it, and "<id>/rounds" read another resource's JSON."""
    task_id = _task(coordinator, tiny_bundle, rounds=3)
    auth = ["--admin-token", coordinator.admin_token, "--interval", "0.05", "--timeout", "0.2"]
    for typed in (f"{task_id}?x=1", f"{task_id}#top"):
        assert main(["watch", typed, "--coordinator", coordinator.url, *auth]) == 2
        assert "404 not_found" in capsys.readouterr().err
    assert main(["watch", task_id, "--coordinator", coordinator.url, *auth]) == 1
    assert "still running" in capsys.readouterr().err


def test_watch_refuses_an_interval_or_timeout_that_is_not_a_number_of_seconds(
    coordinator: EmbeddedCoordinator, tiny_bundle: Path, capsys: Any
) -> None:
    """``--interval nan`` (or ``inf``) passed the ``<= 0`` check and the first sleep raised
    (ValueError, OverflowError: a traceback once a round was shown); ``--timeout nan`` never
    timed out. Each is a one-line error now, before the coordinator is asked."""
    task_id = _task(coordinator, tiny_bundle, rounds=3)
    auth = ["--coordinator", coordinator.url, "--admin-token", coordinator.admin_token]
    for option, value in (("--interval", "nan"), ("--interval", "inf"), ("--interval", "0"),
                          ("--timeout", "nan"), ("--timeout", "-1")):
        args = ["watch", task_id, *auth, "--interval", "0.05", option, value]
        assert main(args) == 2, (option, value)
        err = capsys.readouterr().err
        assert f"{option} must be" in err, err
