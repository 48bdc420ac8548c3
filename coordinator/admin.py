"""A small HTTP client for the coordinator's operator API, on the edge SDK's transport.

::

    admin = AdminClient("http://127.0.0.1:8080", token)
    bundle_id = admin.upload_bundle("bundles/digits")["bundle_id"]
    task = admin.create_task(bundle_id, plan={"rounds": 5, "goal": 10}, name="digits")
    admin.rounds(task["task_id"])            # metrics history
    admin.status()["updates_accepted"]

HTTP is :class:`edge_sdk.transport.Transport` (one keep-alive connection, error bodies mapped
to typed errors): every non-2xx answer raises :class:`ApiCallError` (the SDK's
:class:`~edge_sdk.errors.ApiError`: ``status``, stable ``code``, ``message``); no answer at all
raises :class:`~edge_sdk.errors.TransportError`. Operator calls are not retried: creating a
task twice is worse than reporting a failure.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

from edge_sdk.errors import ApiError, TransportError
from edge_sdk.protocol import Route
from edge_sdk.tls import TlsConfig
from edge_sdk.transport import RetryPolicy, Transport

__all__ = ["AdminClient", "ApiCallError", "TransportError", "tar_directory"]

# The name operator code catches; the SDK's class, so that both sides map errors one way.
ApiCallError = ApiError


def tar_directory(directory: Path | str) -> bytes:
    """An uncompressed tar of a directory's files, paths relative to it. ``OSError`` if
    ``directory`` is none (``rglob`` finds nothing there: it would be an empty tar)."""
    root = Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(f"no bundle directory at {root}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            tar.add(path, arcname=path.relative_to(root).as_posix(), recursive=False)
    return buf.getvalue()


class AdminClient:
    def __init__(
        self, url: str, token: str, timeout: float = 120.0, *, tls: TlsConfig | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.transport = Transport(
            self.url, timeout=timeout, retry=RetryPolicy(max_attempts=1), tls=tls
        )
        self._auth = {"Authorization": f"Bearer {token}"}

    def close(self) -> None:
        self.transport.close()

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        return self.transport.call(method, path, payload, headers=self._auth)

    def health(self) -> dict[str, Any]:
        return self._call("GET", Route.HEALTH)

    def status(self) -> dict[str, Any]:
        return self._call("GET", Route.STATUS)

    def upload_bundle(self, bundle_dir: Path | str) -> dict[str, Any]:
        """Upload an exported bundle directory; returns ``{"bundle_id", "num_parameters", ...}``."""
        headers = {**self._auth, "Content-Type": "application/x-tar"}
        body = tar_directory(bundle_dir)
        answer = self.transport.request("POST", Route.ADMIN_BUNDLES, body=body, headers=headers)
        return answer.json()

    def create_task(
        self,
        bundle_id: str,
        plan: dict[str, Any] | None = None,
        *,
        name: str = "task",
        population: str = "default",
        mode: str = "sync",
    ) -> dict[str, Any]:
        payload = {
            "name": name,
            "bundle_id": bundle_id,
            "mode": mode,
            "population": population,
            "plan": plan or {},
        }
        return self._call("POST", Route.ADMIN_TASKS, payload)

    def tasks(self) -> list[dict[str, Any]]:
        return self._call("GET", Route.ADMIN_TASKS)["tasks"]

    def task(self, task_id: str) -> dict[str, Any]:
        return self._call("GET", Route.path(Route.ADMIN_TASK, task_id=task_id))

    def pause(self, task_id: str) -> dict[str, Any]:
        return self._call("POST", Route.path(Route.ADMIN_TASK_PAUSE, task_id=task_id))

    def resume(self, task_id: str) -> dict[str, Any]:
        return self._call("POST", Route.path(Route.ADMIN_TASK_RESUME, task_id=task_id))

    def rounds(self, task_id: str) -> list[dict[str, Any]]:
        return self._call("GET", Route.path(Route.ADMIN_TASK_ROUNDS, task_id=task_id))["rounds"]

    def evaluate(self, task_id: str) -> dict[str, Any]:
        return self._call("POST", Route.path(Route.ADMIN_TASK_EVALUATE, task_id=task_id), {})

    def task_bundle(self, task_id: str) -> bytes:
        """The task's current model version as an uncompressed bundle tar."""
        path = Route.path(Route.ADMIN_TASK_BUNDLE, task_id=task_id)
        return self.transport.request("GET", path, headers=self._auth).body

