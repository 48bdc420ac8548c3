"""What a device keeps on disk between runs: its credential and per-task error-feedback residuals.

Layout of the state directory::

    credentials.json          {"coordinator": URL, "device_id": ..., "secret": ...}  mode 0600
    residuals/<task_id>.npy   float32 residual of the task's error-feedback codec

Every write goes to a temporary file first and is renamed into place, so a device losing power
mid-write keeps the previous version. The bundle cache lives elsewhere (:mod:`edge_sdk.cache`)
because clients on one machine share it; state is per device.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from edge_sdk.codecs import ErrorFeedback

__all__ = ["Credentials", "DeviceState"]

_CREDENTIALS = "credentials.json"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


@dataclass(frozen=True)
class Credentials:
    coordinator: str
    device_id: str
    secret: str


def _write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    # A fresh file (O_EXCL) gets ``mode`` from the start; reusing a leftover tmp would keep its
    # permissions, and whoever had opened it then could read the secret before a chmod.
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class DeviceState:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- credential ---------------------------------------------------------------------------

    @property
    def credentials_path(self) -> Path:
        return self.root / _CREDENTIALS

    def load_credentials(self, coordinator: str) -> Credentials | None:
        """The stored credential for ``coordinator``, or None (none yet, another coordinator's,
        or an unreadable file, which registration will replace)."""
        try:
            raw = json.loads(self.credentials_path.read_text())
            creds = Credentials(str(raw["coordinator"]), str(raw["device_id"]), str(raw["secret"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return creds if creds.coordinator == coordinator else None

    def save_credentials(self, creds: Credentials) -> None:
        body = {"coordinator": creds.coordinator, "device_id": creds.device_id,
                "secret": creds.secret}
        _write_atomic(self.credentials_path, json.dumps(body).encode())

    def forget_credentials(self) -> None:
        self.credentials_path.unlink(missing_ok=True)

    # -- error-feedback residuals -------------------------------------------------------------

    def error_feedback(self, task_id: str) -> ErrorFeedback:
        """The task's residual store (see :class:`~edge_sdk.codecs.ErrorFeedback`)."""
        if not _SAFE_ID.match(task_id):
            raise ValueError(f"task id {task_id!r} is not safe as a file name")
        return ErrorFeedback(self.root / "residuals" / f"{task_id}.npy")
