"""``fedge serve`` as people start it: a config file, a token from the environment, signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.admin import AdminClient
from tests.fixtures.coordinator import HttpConnection

ROOT = Path(__file__).resolve().parents[3]


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fedge.cli", "serve", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_serve_with_config_file_and_env_token(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        'max_json_bytes = 2048\ntick_interval_s = 0.2\nenrollment_token = "from-config"\n'
    )
    env = {"FEDGE_ADMIN_TOKEN": "tok", "FEDGE_ENROLLMENT_TOKEN": "from-env"}
    proc = _serve("--db", str(tmp_path / "f.db"), "--port", "0", "--config", str(config), env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line
        admin = AdminClient(line.split()[-1], "tok")
        assert admin.tasks() == []
        http = HttpConnection(admin.url)
        register = b'{"runtimes": ["ort-step"]}'
        for token in (None, "from-config"):  # the environment's token overrides the file's
            headers = {} if token is None else {"X-Fedge-Enrollment": token}
            status, _, body = http.request("POST", "/v1/devices", register, headers)
            assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized"
        enrolled = {"X-Fedge-Enrollment": "from-env"}
        assert http.request("POST", "/v1/devices", register, enrolled)[0] == 201
        status, _, body = http.request("POST", "/v1/devices", b"x" * 4096, enrolled)
        assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert (tmp_path / "f.db").exists() and (tmp_path / "f.db.blobs").is_dir()


def test_serve_prints_a_random_token_without_one(tmp_path: Path) -> None:
    unset = ("FEDGE_ADMIN_TOKEN", "FEDGE_ENROLLMENT_TOKEN")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedge.cli", "serve", "--db", str(tmp_path / "f.db"), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        url = proc.stdout.readline().split()[-1]
        token_line = proc.stderr.readline()
        assert token_line.startswith("admin token: ")
        admin = AdminClient(url, token_line.split()[-1])
        assert admin.tasks() == []
        http = HttpConnection(url)
        # no enrollment token configured: registration is open
        # registration needs the enrollment token it printed, and status the admin token
        enrollment_line = proc.stderr.readline()
        assert enrollment_line.startswith("enrollment token: ")
        enroll = {"X-Fedge-Enrollment": enrollment_line.split()[-1]}
        status, _, body = http.request("POST", "/v1/devices", b'{"runtimes": []}')
        assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized"
        assert http.request("POST", "/v1/devices", b'{"runtimes": []}', enroll)[0] == 201
        assert http.request("GET", "/v1/status")[0] == 401
        assert http.request("GET", "/v1/health")[0] == 200
        assert admin.status()["devices_registered"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_open_registration_is_explicit(tmp_path: Path) -> None:
    proc = _serve("--db", str(tmp_path / "f.db"), "--port", "0", "--open-registration",
                  env={"FEDGE_ADMIN_TOKEN": "tok"})
    try:
        assert proc.stdout is not None and proc.stderr is not None
        http = HttpConnection(proc.stdout.readline().split()[-1])
        assert http.request("POST", "/v1/devices", b'{"runtimes": []}')[0] == 201
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert "registration is open" in proc.stderr.read()


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text('{"prot": 1}')
    proc = _serve("--db", str(tmp_path / "f.db"), "--config", str(tmp_path / "c.json"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "unknown config keys: prot" in err


def test_processes_beyond_a_few_per_cpu_are_refused_before_any_starts(tmp_path: Path) -> None:
    """``--processes 100000`` (a typo) started interpreters until the kernel's OOM killer
    took the supervisor; now it is a one-line error and nothing is started or written."""
    from fedge.commands.serve import PROCESSES_PER_CPU, usable_cpus

    most = PROCESSES_PER_CPU * usable_cpus()
    proc = _serve("--db", str(tmp_path / "f.db"), "--port", "0", "--processes", str(most + 1))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert f"--processes {most + 1}: at most {PROCESSES_PER_CPU} per CPU, {most}" in err
    assert list(tmp_path.iterdir()) == []  # not even the database


def test_a_port_out_of_range_is_a_one_line_error_before_anything_is_written(
    tmp_path: Path,
) -> None:
    """``--port 70000`` (or -1) was taken as given: alone, the coordinator made its database
    and printed its tokens, then died with an OverflowError traceback from bind(); with
    ``--processes 2`` the supervisor died the same way."""
    for port, processes in (("70000", "1"), ("-1", "1"), ("65536", "2")):
        proc = _serve("--db", str(tmp_path / "f.db"), "--port", port, "--processes", processes)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        assert "port must be 0-65535" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # not even the database


def test_a_port_in_use_is_a_one_line_error_alone_too(tmp_path: Path) -> None:
    """With ``--processes 2`` a taken port was one line (``cannot bind``, status 2); alone,
    ``fedge serve`` died with an OSError traceback (status 1) after its start-up tick."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        proc = _serve("--db", str(tmp_path / "f.db"), "--port", port)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert f"cannot bind 127.0.0.1:{port}" in err and "Traceback" not in err


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
@pytest.mark.parametrize("processes", ["1", "2"])  # 2: the supervisor prints the line
def test_the_listening_line_is_a_url_on_an_ipv6_address(tmp_path: Path, processes: str) -> None:
    """``--host ::1`` printed ``http://::1:PORT``, which no client parses (an IPv6 literal
    goes in brackets in a URL): whoever reads the line to find the service could not use it."""
    proc = _serve("--db", str(tmp_path / "f.db"), "--host", "::1", "--port", "0",
                  "--processes", processes, env={"FEDGE_ADMIN_TOKEN": "tok"})  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert "listening on http://[::1]:" in line, line
        assert AdminClient(line.split()[-1], "tok").tasks() == []
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity (Linux)")
def test_the_processes_limit_counts_the_cpus_this_process_may_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The limit counted every CPU of the host (``os.cpu_count()``): in a container or under
    ``taskset`` pinned to one CPU of many, ``--processes`` up to 4 per host CPU started."""
    from fedge.cli import main
    from fedge.commands.serve import PROCESSES_PER_CPU
    from fedge.supervisor import Supervisor

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(Supervisor, "run", lambda self: 99)  # started: the limit let it by
    args = ["serve", "--db", str(tmp_path / "f.db"), "--port", "0"]
    assert main([*args, "--processes", str(PROCESSES_PER_CPU + 1)]) == 2
    assert f"at most {PROCESSES_PER_CPU} per CPU, {PROCESSES_PER_CPU} on" in capsys.readouterr().err
    assert main([*args, "--processes", str(PROCESSES_PER_CPU)]) == 99


def test_db_on_the_command_line_wins_over_the_config_files_database_url(tmp_path: Path) -> None:
    """The way back from PostgreSQL (``fedge db migrate --to f.db``) keeps the replicas'
    config file: ``--db f.db`` serves that file. Before, the file's ``database_url`` won
    silently, and the coordinator served (or failed to reach) the old database."""
    config = tmp_path / "c.toml"
    config.write_text(f'database_url = "postgresql://fedge@127.0.0.1:1/gone"\n'
                      f'blob_path = "{tmp_path / "blobs"}"\n')  # fmt: skip
    proc = _serve("--db", str(tmp_path / "f.db"), "--port", "0", "--config", str(config),
                  env={"FEDGE_ADMIN_TOKEN": "tok"})  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, proc.stderr.read()
        assert AdminClient(line.split()[-1], "tok").tasks() == []
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert (tmp_path / "f.db").is_file() and (tmp_path / "blobs").is_dir()


def test_a_replica_needs_its_tokens_given_not_drawn(tmp_path: Path) -> None:
    """Each ``--replica`` drew random tokens of its own: an operator's call or a new device's
    registration passed or got 401 by which replica the load balancer picked."""
    cases = (({"FEDGE_ADMIN_TOKEN": "", "FEDGE_ENROLLMENT_TOKEN": "e"}, "admin"),
             ({"FEDGE_ADMIN_TOKEN": "a", "FEDGE_ENROLLMENT_TOKEN": ""}, "enrollment"))
    for env, missing in cases:
        proc = _serve("--db", str(tmp_path / "f.db"), "--port", "0", "--replica", env=env)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        assert f"--replica needs the {missing} token" in err and "same on every replica" in err
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_log_level_is_a_one_line_error_before_anything_is_written(
    tmp_path: Path,
) -> None:
    """``--log-level verbose`` (or any name logging does not know) was taken as given: the
    configuration was read, then logging raised ``ValueError: Unknown level`` with a
    traceback (status 1)."""
    proc = _serve("--db", str(tmp_path / "f.db"), "--port", "0", "--log-level", "verbose",
                  env={"FEDGE_ADMIN_TOKEN": "tok"})  # fmt: skip
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "--log-level" in err and "VERBOSE" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    # Any case is taken, as before: logging's names are upper case.
    from fedge.cli import build_parser

    args = build_parser().parse_args(["serve", "--db", "f.db", "--log-level", "debug"])
    assert args.log_level == "DEBUG"


def test_a_second_coordinator_on_a_database_served_alone_is_refused(tmp_path: Path) -> None:
    """Before, a second ``fedge serve`` on the same file (a mistake, or a restart while the
    old process still ran) started and served too: two processes each keeping a round's sums
    in memory and sweeping blobs at start-up as if alone. It is one line, status 2; so is a
    node of replicas on a database served alone. Once the first stops, the file serves."""
    db = str(tmp_path / "f.db")
    first = _serve("--db", db, "--port", "0")
    try:
        assert first.stdout is not None
        assert "listening on" in first.stdout.readline()
        for extra in ([], ["--processes", "2"]):
            second = _serve("--db", db, "--port", "0", *extra)
            _, err = second.communicate(timeout=120)
            assert second.returncode == 2, err
            assert "another coordinator serves this database" in err or (
                "without --replica serves this database" in err), err
            assert "Traceback" not in err
    finally:
        first.terminate()
        first.communicate(timeout=60)
    again = _serve("--db", db, "--port", "0")
    try:
        assert again.stdout is not None
        assert "listening on" in again.stdout.readline()
    finally:
        again.terminate()
        again.communicate(timeout=60)
