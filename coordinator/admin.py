"""A small HTTP client for the coordinator's operator API (standard library only).

::

    admin = AdminClient("http://127.0.0.1:8080", token)
    bundle_id = admin.upload_bundle("bundles/digits")["bundle_id"]
    task = admin.create_task(bundle_id, plan={"rounds": 5, "goal": 10}, name="digits")
    admin.rounds(task["task_id"])            # metrics history
    admin.status()["updates_accepted"]

Every non-2xx answer raises :class:`ApiCallError` carrying the status and the error body's
stable ``code``. :class:`HttpConnection` (one persistent keep-alive connection) is shared with
tests and benchmarks that speak the device side.
"""

from __future__ import annotations

import http.client
import io
import json
import tarfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge_sdk.protocol import Route

__all__ = ["AdminClient", "ApiCallError", "HttpConnection", "tar_directory"]


class ApiCallError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class HttpConnection:
    """One keep-alive HTTP/1.1 connection, reopened once if the server closed it."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"expected an http://host:port URL, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=body, headers=headers or {})
                resp = self._conn.getresponse()
                data = resp.read()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
            except (ConnectionError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def json(
        self,
        method: str,
        path: str,
        payload: Any = None,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Any:
        """Send JSON (or ``body``), return the decoded JSON answer; raise on non-2xx."""
        hdrs = dict(headers or {})
        if body is None and payload is not None:
            body = json.dumps(payload).encode()
            hdrs.setdefault("Content-Type", "application/json")
        status, _, data = self.request(method, path, body, hdrs)
        return check(status, data)


def check(status: int, data: bytes) -> Any:
    if status >= 300:
        try:
            err = json.loads(data)["error"]
            raise ApiCallError(status, err["code"], err["message"])
        except (ValueError, KeyError, TypeError):
            raise ApiCallError(status, "unknown", data[:200].decode("utf-8", "replace")) from None
    return json.loads(data) if data else None


def tar_directory(directory: Path | str) -> bytes:
    """An uncompressed tar of a directory's files, paths relative to it."""
    root = Path(directory)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            tar.add(path, arcname=path.relative_to(root).as_posix(), recursive=False)
    return buf.getvalue()


class AdminClient:
    def __init__(self, url: str, token: str, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self._http = HttpConnection(self.url, timeout)
        self._auth = {"Authorization": f"Bearer {token}"}

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, payload: Any = None, body: bytes | None = None) -> Any:
        return self._http.json(method, path, payload, headers=self._auth, body=body)

    def health(self) -> dict[str, Any]:
        return self._call("GET", Route.HEALTH)

    def status(self) -> dict[str, Any]:
        return self._call("GET", Route.STATUS)

    def upload_bundle(self, bundle_dir: Path | str) -> dict[str, Any]:
        """Upload an exported bundle directory; returns ``{"bundle_id", "num_parameters", ...}``."""
        return self._call("POST", Route.ADMIN_BUNDLES, body=tar_directory(bundle_dir))

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
        return self._call("GET", Route.ADMIN_TASK.format(task_id=task_id))

    def pause(self, task_id: str) -> dict[str, Any]:
        return self._call("POST", Route.ADMIN_TASK_PAUSE.format(task_id=task_id))

    def resume(self, task_id: str) -> dict[str, Any]:
        return self._call("POST", Route.ADMIN_TASK_RESUME.format(task_id=task_id))

    def rounds(self, task_id: str) -> list[dict[str, Any]]:
        return self._call("GET", Route.ADMIN_TASK_ROUNDS.format(task_id=task_id))["rounds"]

    def evaluate(self, task_id: str) -> dict[str, Any]:
        return self._call("POST", Route.ADMIN_TASK_EVALUATE.format(task_id=task_id), {})

    def task_bundle(self, task_id: str) -> bytes:
        """The task's current model version as an uncompressed bundle tar."""
        status, _, data = self._http.request(
            "GET", Route.ADMIN_TASK_BUNDLE.format(task_id=task_id), headers=self._auth
        )
        if status >= 300:
            check(status, data)
        return data
