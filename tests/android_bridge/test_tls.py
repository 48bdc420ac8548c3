"""The Kotlin client over HTTPS to a real TLS coordinator (certificates from the coordinator's
TLS tests): it registers and checks in when it trusts the coordinator's CA and the pin
matches, and sends nothing when the pin is wrong."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from coordinator.embedded import EmbeddedCoordinator
from tests.android_bridge.jvm import KotlinTools, write_raw_data
from tests.fixtures.pki import Pki

pytestmark = pytest.mark.slow


def _one_pass(tools: KotlinTools, tmp_path: Path, coord: EmbeddedCoordinator, *extra: str) -> dict:
    import numpy as np

    data = write_raw_data(tmp_path / "data", np.zeros((4, 64), np.float32), np.zeros(4, np.int64))
    log = tmp_path / "jvm.jsonl"
    tools.run(
        "device", "--coordinator", coord.url, "--state", str(tmp_path / "state"),
        "--data", str(data), "--enrollment-token", str(coord.enrollment_token),
        "--stop-file", str(tmp_path / "stop"), "--log", str(log), "--max-runs", "1",
        "--max-wait-s", "0", *extra,
    )  # fmt: skip
    entry: dict = json.loads(log.read_text().splitlines()[0])
    return entry


def test_kotlin_client_speaks_tls_with_the_ca_and_pin(
    kotlin_tools: KotlinTools, pki: Pki, tmp_path: Path
) -> None:
    with EmbeddedCoordinator(tmp_path / "c.db", seed=3, **pki.coordinator_tls()) as coord:
        assert coord.url.startswith("https://")
        wrong = _one_pass(kotlin_tools, tmp_path / "wrong", coord, "--ca-file", str(pki.ca),
                          "--pin", f"sha256/{pki.wrong_pin}")  # fmt: skip
        assert wrong["action"] == "failed" and "pin" in wrong["error"]
        assert coord.admin().status()["devices_registered"] == 0  # nothing reached the service
        ok = _one_pass(kotlin_tools, tmp_path / "ok", coord, "--ca-file", str(pki.ca),
                       "--pin", f"sha256/{pki.pin}")  # fmt: skip
        assert ok["action"] == "wait" and ok["reasons"] == ["no_task"], ok
        assert coord.admin().status()["devices_registered"] == 1
        assert base64.b64decode(pki.pin)  # the pin format fedge serve prints
