"""scripts/postgres.sh from nothing: a cluster initialised, started, answering, stopped and
started again on a new port, in a copy of the script whose repository is a temporary one."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "postgres.sh"


def _run(script: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "FEDGE_TEST_POSTGRES_DSN"}
    done = subprocess.run([str(script), *args], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.slow
def test_the_script_starts_a_server_from_nothing() -> None:
    if not shutil.which("psql") or (os.geteuid() != 0 and not shutil.which("initdb")):
        pytest.skip("needs PostgreSQL's binaries, or root to install them")
    psycopg = pytest.importorskip("psycopg")
    # Not pytest's tmp_path: its parents are private to us, and the postgres user must reach
    # the cluster's directory under the repository.
    repo = Path(tempfile.mkdtemp(prefix="fedge-repo-", dir="/var/tmp"))
    repo.chmod(0o755)
    (repo / "scripts").mkdir()
    script = repo / "scripts" / "postgres.sh"
    shutil.copy(SCRIPT, script)
    try:
        first = _run(script, "dsn")
        with psycopg.connect(first) as conn:
            row = conn.execute("select current_user, current_setting('fsync'), "
                               "current_setting('synchronous_commit')").fetchone()  # fmt: skip
            assert row == ("fedge", "on", "on")  # the durable defaults the store relies on
        assert _run(script, "dsn") == first  # running: the same server
        _run(script, "stop")
        again = _run(script, "dsn")  # the same cluster, role and password on a new port
        psycopg.connect(again).close()
        assert _run(script, "env") == f"export FEDGE_TEST_POSTGRES_DSN='{again}'"
        assert (repo / ".cache" / "postgres" / "data" / "PG_VERSION").is_file()
    finally:
        _run(script, "stop")
        shutil.rmtree(repo)


def test_env_fails_when_no_server_can_be_had() -> None:
    """``eval "$(scripts/postgres.sh env)"`` (docs/deployment.md) printed an ``export`` line
    and exited 0 when the server could not be started: the ``dsn`` it wraps ran inside a
    command substitution, where bash drops ``set -e``, so a failed step went on to the next
    one. Here the cluster's directory cannot be made (``.cache`` is a file)."""
    repo = Path(tempfile.mkdtemp(prefix="fedge-repo-", dir="/var/tmp"))
    repo.chmod(0o755)  # reachable by the postgres user: the cluster would go under .cache
    try:
        (repo / "scripts").mkdir()
        script = repo / "scripts" / "postgres.sh"
        shutil.copy(SCRIPT, script)
        (repo / ".cache").write_text("not a directory")
        env = {k: v for k, v in os.environ.items() if k != "FEDGE_TEST_POSTGRES_DSN"}
        for command in ("dsn", "env"):
            done = subprocess.run([str(script), command], capture_output=True, text=True,
                                  env=env, timeout=120)  # fmt: skip
            assert done.returncode != 0, (command, done.stdout, done.stderr)
            assert done.stdout == "", (command, done.stdout)
    finally:
        shutil.rmtree(repo)
