"""The service's event loop: by default uvloop over TLS (where installed, and the
``coordinator`` extra installs it here) and asyncio's over plain HTTP, or one of them on
request; ``fedge serve`` and its supervised processes serve on the one chosen and say so in
their log."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from coordinator.config import EVENT_LOOPS, ConfigError, CoordinatorConfig
from coordinator.embedded import EmbeddedCoordinator
from coordinator.event_loop import loop_kind, new_loop, run
from fedge.commands import serve as serve_command
from tests.fixtures.pki import Pki

ROOT = Path(__file__).resolve().parents[2]


async def _kind() -> str:
    return loop_kind(asyncio.get_running_loop())


@pytest.mark.parametrize(("choice", "tls", "kind"), [
    ("auto", True, "uvloop"), ("auto", False, "asyncio"),
    ("uvloop", False, "uvloop"), ("uvloop", True, "uvloop"),
    ("asyncio", True, "asyncio"), ("asyncio", False, "asyncio"),
])  # fmt: skip
def test_the_chosen_loop_runs(choice: str, tls: bool, kind: str) -> None:
    loop = new_loop(choice, tls)
    try:
        assert loop_kind(loop) == kind
        assert loop.run_until_complete(_kind()) == kind
    finally:
        loop.close()
    assert run(_kind(), choice, tls) == kind


def test_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    loop = new_loop("auto", tls=True)
    loop.close()
    assert loop_kind(loop) == "asyncio"
    assert run(_kind(), "auto", tls=True) == "asyncio"
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        new_loop("uvloop")
    main = _kind()
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        run(main, "uvloop")
    assert main.cr_frame is None  # closed, not left to warn that it was never awaited


def test_config_refuses_other_loops() -> None:
    with pytest.raises(ConfigError, match="event_loop must be one of asyncio, auto, uvloop"):
        CoordinatorConfig(event_loop="trio")


@pytest.mark.parametrize(("choice", "tls", "kind"), [
    (None, False, "asyncio"), (None, True, "uvloop"), ("uvloop", False, "uvloop"),
    ("asyncio", True, "asyncio"),
])  # fmt: skip
def test_in_process_coordinator_runs_the_chosen_loop(
    tmp_path: Path, pki: Pki, choice: str | None, tls: bool, kind: str
) -> None:
    config = CoordinatorConfig(db_path=str(tmp_path / "f.db"))
    if tls:
        config = dataclasses.replace(config, tls_cert=str(pki.cert), tls_key=str(pki.key))
    if choice is not None:
        config = dataclasses.replace(config, event_loop=choice)
    with EmbeddedCoordinator(config=config, ca_file=pki.ca) as coord:
        assert coord._loop is not None and loop_kind(coord._loop) == kind
        context = coord.client_tls.context() if tls else None
        with urllib.request.urlopen(coord.url + "/v1/health", timeout=10,
                                    context=context) as resp:  # fmt: skip
            assert resp.status == 200


def test_unknown_loop_names_are_refused() -> None:
    with pytest.raises(ValueError, match="no event loop called 'trio'"):
        new_loop("trio")
    assert serve_command.EVENT_LOOPS == EVENT_LOOPS  # the command's choices are the config's


def _serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None
           ) -> subprocess.Popen[str]:  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "fedge.cli", "serve", "--db", str(tmp_path / "f.db"),
         "--port", "0", "--log-format", "json", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "FEDGE_ADMIN_TOKEN": "tok", "FEDGE_ENROLLMENT_TOKEN": "enr",
             **(env or {})},
    )  # fmt: skip


@pytest.mark.parametrize(("args", "tls", "kinds"), [
    ((), False, ["asyncio"]),
    ((), True, ["uvloop"]),
    (("--event-loop", "uvloop", "--processes", "2"), False, ["uvloop", "uvloop"]),
    (("--event-loop", "asyncio", "--processes", "2"), True, ["asyncio", "asyncio"]),
    (("--processes", "2"), True, ["uvloop", "uvloop"]),  # the default, in each child
])  # fmt: skip
def test_serve_logs_its_loop(
    tmp_path: Path, pki: Pki, args: tuple[str, ...], tls: bool, kinds: list[str]
) -> None:
    if tls:
        args = (*args, "--tls-cert", str(pki.cert), "--tls-key", str(pki.key))
    proc = _serve(tmp_path, *args)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line
        context = ssl.create_default_context(cafile=str(pki.ca)) if tls else None
        with urllib.request.urlopen(line.split()[-1] + "/v1/health", timeout=10,
                                    context=context) as resp:  # fmt: skip
            assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        err = _finish(proc)
    assert proc.returncode == 0, err
    records = [json.loads(r) for r in err.splitlines() if r.startswith("{")]
    assert sorted(r["event_loop"] for r in records if "event_loop" in r) == kinds, records


def _finish(proc: subprocess.Popen[str]) -> str:
    """Its stderr once it exited; killed if it does not within a minute."""
    try:
        return proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise


def _without_uvloop(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python cannot import uvloop."""
    hidden = tmp_path / "hide"
    hidden.mkdir()
    (hidden / "uvloop.py").write_text("raise ImportError('not installed for this test')\n")
    path = os.pathsep.join(filter(None, [str(hidden), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path}


@pytest.mark.parametrize("args", [(), ("--processes", "2")])
def test_serve_refuses_uvloop_where_missing(tmp_path: Path, args: tuple[str, ...]) -> None:
    """One line, exit 2, before anything starts (with K processes: no child started)."""
    proc = _serve(tmp_path, "--event-loop", "uvloop", *args, env=_without_uvloop(tmp_path))
    err = _finish(proc)
    assert proc.returncode == 2, err
    assert "uvloop is not installed" in err and "Traceback" not in err
    assert not (tmp_path / "f.db").exists()  # nothing opened, migrated or served


def test_serve_over_tls_without_uvloop_runs_asyncio_by_default(tmp_path: Path, pki: Pki) -> None:
    """The default asks for uvloop over TLS only where it is installed: without it the
    service starts on asyncio's loop and says so."""
    proc = _serve(tmp_path, "--tls-cert", str(pki.cert), "--tls-key", str(pki.key),
                  env=_without_uvloop(tmp_path))  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on https://" in line, line
    finally:
        proc.send_signal(signal.SIGTERM)
        err = _finish(proc)
    assert proc.returncode == 0, err
    records = [json.loads(r) for r in err.splitlines() if r.startswith("{")]
    assert [r["event_loop"] for r in records if "event_loop" in r] == ["asyncio"], records


def test_a_coordinator_that_fails_to_start_closes_its_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvloop's loop, dropped open, logs an error and keeps its descriptors."""
    import coordinator.event_loop as module

    made: list[asyncio.AbstractEventLoop] = []
    monkeypatch.setattr(module, "new_loop", lambda *args: made.append(new_loop(*args))
                        or made[-1])  # fmt: skip
    missing = str(tmp_path / "missing.pem")
    config = CoordinatorConfig(db_path=str(tmp_path / "f.db"), tls_cert=missing, tls_key=missing,
                               event_loop="uvloop")
    with pytest.raises(RuntimeError, match="failed to start"):
        EmbeddedCoordinator(config=config).start()
    assert len(made) == 1 and loop_kind(made[0]) == "uvloop" and made[0].is_closed()
