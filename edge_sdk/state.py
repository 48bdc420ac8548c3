"""What a device keeps on disk between runs: its credential, per-task error-feedback residuals
and the upload it has not seen acknowledged yet.

Layout of the state directory::

    credentials.json          {"coordinator": URL, "device_id": ..., "secret": ...}  mode 0600
    residuals/<task_id>.npy   float32 residual of the task's error-feedback codec
    pending/upload.json       the upload in flight: assignment, task, idempotency key, report
    pending/upload.frame      its encoded update, byte for byte what is sent
    pending/upload.residual.npy   the residual that becomes the task's once it is acknowledged

Every write goes to a temporary file first, fsync'ed, renamed into place and its directory
fsync'ed, so a device losing power mid-write keeps the previous version, and a step is on
disk before the next one relies on it. The bundle cache lives elsewhere (:mod:`edge_sdk.cache`)
because clients on one machine share it; state is per device.

Exactly-once delivery of the residual: the pending upload is written (``upload.json`` last,
it is the marker) before the first byte is sent, and resolved with the same idempotency key
(same bytes) until the coordinator's answer is known: accepted (the stored residual is
replaced by the pending one, then the pending upload is removed) or refused (removed; the old
residual stays). Each step is atomic and repeating a step is harmless, so a crash anywhere,
or an acknowledgement lost on the way, neither drops the residual nor delivers it twice. When
the answer can no longer be known (the coordinator has since forgotten the device or the
assignment), the client settles the upload as acknowledged: the old residual may have been
delivered, so it is never applied again (``edge_sdk.client._fate_unknown``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.codecs import ErrorFeedback
from edge_sdk.durable import write_durably
from edge_sdk.protocol import SAFE_ID

__all__ = ["Credentials", "DeviceState", "PendingUpload"]

log = logging.getLogger(__name__)

_CREDENTIALS = "credentials.json"


@dataclass(frozen=True)
class Credentials:
    coordinator: str
    device_id: str
    secret: str


@dataclass(frozen=True)
class PendingUpload:
    """An upload sent (or about to be) whose answer the device has not seen yet.

    ``residual`` is the error-feedback residual the encoding left (None: the codec keeps
    none, or nothing was left); ``uses_feedback`` says whether acknowledging it replaces the
    task's stored residual at all."""

    coordinator: str
    device_id: str
    assignment_id: str
    task_id: str
    round: int
    key: str
    report: dict[str, Any]
    frame: bytes
    uses_feedback: bool
    residual: np.ndarray | None

    @staticmethod
    def key_for(assignment_id: str, frame: bytes) -> str:
        """The idempotency key: a digest of what is sent, so a retry of these bytes (even
        from a restarted process) is the same upload and anything else a different one."""
        return hashlib.sha256(assignment_id.encode() + frame).hexdigest()[:32]


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
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            # Registering replaces it, and the device comes back as a new one: say why.
            log.warning("ignoring unreadable %s (the device will register anew): %r",
                        self.credentials_path, e)
            return None
        return creds if creds.coordinator == coordinator else None

    def save_credentials(self, creds: Credentials) -> None:
        body = {"coordinator": creds.coordinator, "device_id": creds.device_id,
                "secret": creds.secret}
        write_durably(self.credentials_path, json.dumps(body).encode())

    def forget_credentials(self) -> None:
        self.credentials_path.unlink(missing_ok=True)

    # -- the upload in flight -----------------------------------------------------------------

    @property
    def _pending_dir(self) -> Path:
        return self.root / "pending"

    def save_pending(self, pending: PendingUpload) -> None:
        """Make ``pending`` durable before it is sent (the JSON marker is written last)."""
        if not SAFE_ID.match(pending.task_id):
            raise ValueError(f"task id {pending.task_id!r} is not safe as a file name")
        d = self._pending_dir
        d.mkdir(exist_ok=True, mode=0o700)
        (d / "upload.json").unlink(missing_ok=True)  # a half-replaced pending is no pending
        write_durably(d / "upload.frame", pending.frame)
        ErrorFeedback(d / "upload.residual.npy").save(pending.residual)
        meta = {
            "coordinator": pending.coordinator,
            "device_id": pending.device_id,
            "assignment_id": pending.assignment_id,
            "task_id": pending.task_id,
            "round": pending.round,
            "key": pending.key,
            "report": pending.report,
            "uses_feedback": pending.uses_feedback,
            "has_residual": pending.residual is not None,
            "residual_length": None if pending.residual is None else int(pending.residual.size),
        }
        write_durably(d / "upload.json", json.dumps(meta).encode())

    def load_pending(self) -> PendingUpload | None:
        """The upload in flight, or None. A pending upload whose files do not match each
        other (say, a disk that lost a write) is dropped: it could not be resent as it was."""
        d = self._pending_dir
        try:
            meta = json.loads((d / "upload.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("dropping an unreadable pending upload: %s", e)
            self.clear_pending()
            return None
        try:
            frame = (d / "upload.frame").read_bytes()
            residual = None
            if meta["has_residual"]:
                residual = ErrorFeedback(d / "upload.residual.npy").load(
                    int(meta["residual_length"])
                )
                if residual is None:
                    raise ValueError("its residual is missing or unreadable")
            pending = PendingUpload(
                coordinator=str(meta["coordinator"]),
                device_id=str(meta["device_id"]),
                assignment_id=str(meta["assignment_id"]),
                task_id=str(meta["task_id"]),
                round=int(meta["round"]),
                key=str(meta["key"]),
                report=dict(meta["report"]),
                frame=frame,
                uses_feedback=bool(meta["uses_feedback"]),
                residual=residual,
            )
            if not SAFE_ID.match(pending.task_id):
                raise ValueError(f"task id {pending.task_id!r} is not safe as a file name")
            if PendingUpload.key_for(pending.assignment_id, frame) != pending.key:
                raise ValueError("its frame does not match its idempotency key")
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("dropping a pending upload that cannot be resent: %s", e)
            self.clear_pending()
            return None
        return pending

    def commit_pending(self, pending: PendingUpload) -> None:
        """The coordinator acknowledged ``pending``: its residual becomes the task's, then the
        pending upload goes. Repeating this (after a crash in between) gives the same state."""
        if pending.uses_feedback:
            # Durable when save returns, before the marker goes: else a power cut could keep
            # the old residual and lose the pending upload, and the old residual would be
            # sent a second time.
            self.error_feedback(pending.task_id).save(pending.residual)
        self.clear_pending()

    def clear_pending(self) -> None:
        """Forget the upload in flight (after it was committed, or refused: not counted)."""
        d = self._pending_dir
        (d / "upload.json").unlink(missing_ok=True)  # the marker first: then it is gone
        (d / "upload.frame").unlink(missing_ok=True)
        ErrorFeedback(d / "upload.residual.npy").clear()

    # -- error-feedback residuals -------------------------------------------------------------

    def error_feedback(self, task_id: str) -> ErrorFeedback:
        """The task's residual store (see :class:`~edge_sdk.codecs.ErrorFeedback`)."""
        if not SAFE_ID.match(task_id):
            raise ValueError(f"task id {task_id!r} is not safe as a file name")
        return ErrorFeedback(self.root / "residuals" / f"{task_id}.npy")
