"""``fedge serve --log-format json``: every log line is one JSON object."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from fedge.commands.serve import JsonLogFormatter

ROOT = Path(__file__).resolve().parents[3]


def test_served_log_lines_are_json(tmp_path: Path) -> None:
    db = tmp_path / "f.db"
    # A stray blob: start-up removes it and logs that (INFO) before serving.
    sha = hashlib.sha256(b"orphan").hexdigest()
    stray = tmp_path / "f.db.blobs" / sha[:2] / sha[2:]
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"orphan")
    env = {**os.environ, "FEDGE_ADMIN_TOKEN": "tok", "FEDGE_ENROLLMENT_TOKEN": "enr"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedge.cli", "serve", "--db", str(db), "--port", "0",
         "--log-format", "json", "--log-level", "DEBUG"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line
        with urllib.request.urlopen(line.split()[-1] + "/v1/health", timeout=10) as resp:
            assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert records, err
    assert all(set(r) >= {"ts", "level", "logger", "message"} for r in records)
    removed = [r for r in records if "orphaned blobs" in r["message"]]
    assert len(removed) == 1
    assert removed[0]["level"] == "INFO" and removed[0]["logger"] == "fedge.coordinator"
    assert removed[0]["ts"].endswith("+00:00")
    assert not stray.exists()
    (access,) = [r for r in records if r["logger"] == "fedge.access"]
    assert access["level"] == "DEBUG" and access["route"] == "/v1/health"
    assert access["status"] == 200 and access["method"] == "GET" and access["duration_ms"] >= 0


def test_formatter_keeps_tracebacks_and_extras() -> None:
    logger = logging.getLogger("fedge.test")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logger.makeRecord("fedge.test", logging.ERROR, __file__, 1, "failed %s", ("x",),
                                   sys.exc_info(), extra={"task_id": "t-1"})
    out = json.loads(JsonLogFormatter().format(record))
    assert out["message"] == "failed x" and out["level"] == "ERROR"
    assert out["task_id"] == "t-1"
    assert "ValueError: boom" in out["exc"]
    assert "args" not in out and "msg" not in out
