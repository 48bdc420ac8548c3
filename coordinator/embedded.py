"""A coordinator inside the current process (thread with its own event loop) or as a child
process, on 127.0.0.1 and a free port: for tests, the fleet emulator and the demo.

::

    with EmbeddedCoordinator(tmp_path / "fedge.db") as coord:          # thread
        admin = coord.admin()
        ...
    with EmbeddedCoordinator(db, subprocess=True) as coord:            # child process
        coord.kill()                                                   # SIGKILL, for crash tests
    with EmbeddedCoordinator(db, subprocess=True, processes=2) as coord:   # fedge.supervisor
        ...                             # coord.process is the supervisor; its children serve

Thread mode also exposes the :class:`~coordinator.service.Coordinator` (``.service``) and
accepts an injected clock (``clock=FakeClock()``); ``call(fn)`` runs a function on the
service's worker thread, where it cannot interleave with requests.

Registration needs ``coord.enrollment_token`` (drawn at random unless given, like the admin
token; ``open_registration=True`` opens it). With ``tls_cert``/``tls_key`` (PEM files) the
service speaks HTTPS on ``https://127.0.0.1:PORT``; ``ca_file`` is the CA that
:meth:`admin` (and whoever reads ``client_tls``) trusts for it.

With ``processes=K`` (subprocess mode) the child is ``fedge serve --processes K``: a
supervisor whose K children share the port and the database; :meth:`kill` kills the
supervisor, and its children then stop (cleanly: they are told by SIGTERM).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess as sp
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from coordinator.admin import AdminClient
from coordinator.clock import Clock
from coordinator.config import CoordinatorConfig
from edge_sdk.tls import TlsConfig

__all__ = ["EmbeddedCoordinator"]

T = TypeVar("T")


class EmbeddedCoordinator:
    def __init__(
        self,
        db_path: Path | str | None = None,
        *,
        subprocess: bool = False,
        admin_token: str | None = None,
        clock: Clock | None = None,
        config: CoordinatorConfig | None = None,
        startup_timeout_s: float = 60.0,
        ca_file: str | Path | None = None,
        **overrides: Any,
    ) -> None:
        if subprocess and clock is not None:
            raise ValueError("an injected clock needs thread mode")
        self._tmpdir: str | None = None
        if db_path is None:
            self._tmpdir = tempfile.mkdtemp(prefix="fedge-coordinator-")
            db_path = Path(self._tmpdir) / "fedge.db"
        self.db_path = Path(db_path)
        self.admin_token = admin_token or secrets.token_hex(24)
        base = dataclasses.replace(config or CoordinatorConfig(), **overrides)
        if base.processes > 1 and not subprocess:
            raise ValueError("processes > 1 needs subprocess mode (fedge serve --processes)")
        # Drawn here, not by the service, so that a child process gets the same one.
        self.enrollment_token: str | None = base.enrollment_token or (
            None if base.open_registration else secrets.token_hex(16)
        )
        self.config = dataclasses.replace(
            base,
            db_path=str(self.db_path),
            host="127.0.0.1",
            port=0,
            admin_token=self.admin_token,
            enrollment_token=self.enrollment_token,
        )
        self.client_tls = TlsConfig(ca_file=None if ca_file is None else str(ca_file))
        self.subprocess = subprocess
        self.clock = clock
        self.startup_timeout_s = startup_timeout_s
        self.url = ""
        self.port = 0
        self.service: Any = None
        self.process: sp.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: Any = None

    # -- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> EmbeddedCoordinator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> EmbeddedCoordinator:
        if self.subprocess:
            self._start_process()
        else:
            self._start_thread()
        scheme = "https" if self.config.tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        return self

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=15)
                except sp.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
        if self._loop is not None and self._thread is not None:
            loop = self._loop

            async def shutdown() -> None:
                await self._runner.cleanup()

            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=30)
            self._loop = self._thread = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def kill(self) -> None:
        """SIGKILL the child process (subprocess mode): no cleanup, no flush, like a crash."""
        if self.process is None:
            raise RuntimeError("kill() needs subprocess mode and a running child")
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process = None

    # -- helpers ----------------------------------------------------------------------------

    def admin(self) -> AdminClient:
        return AdminClient(self.url, self.admin_token,
                           tls=self.client_tls if self.config.tls else None)

    @property
    def work_queue(self) -> Any:
        """The service's :class:`~coordinator.app.WorkQueue` (thread mode): its ``pending``
        and ``refused`` counters, and its executor for blocking it in overload tests."""
        if self._runner is None or self.process is not None:
            raise RuntimeError("work_queue needs thread mode")
        from coordinator.app import _QUEUE_KEY

        return self._runner.app[_QUEUE_KEY]

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the service's worker thread (thread mode) and return its result."""
        if self._loop is None:
            raise RuntimeError("call() needs thread mode")
        from coordinator.app import _EXECUTOR_KEY

        executor = self._runner.app[_EXECUTOR_KEY]
        return executor.submit(fn, *args).result(timeout=60)

    def _start_thread(self) -> None:
        from coordinator.app import build_app, server_tls, start
        from coordinator.event_loop import new_loop
        from coordinator.service import Coordinator

        loop = new_loop(self.config.event_loop, self.config.tls)
        try:
            self.service = Coordinator(self.config, clock=self.clock)
        except BaseException:
            loop.close()
            raise
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                context = server_tls(self.config)
                app = build_app(self.service)
                self._runner, self.port = loop.run_until_complete(
                    start(app, "127.0.0.1", 0, ssl_context=context)
                )
            except BaseException as e:
                failure.append(e)
                loop.close()  # uvloop logs an error for a loop dropped open, and keeps its fds
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=main, name="fedge-embedded-coordinator", daemon=True)
        self._thread.start()
        if not ready.wait(self.startup_timeout_s):
            raise RuntimeError("embedded coordinator did not start in time")
        if failure:
            self._loop = self._thread = None
            raise RuntimeError("embedded coordinator failed to start") from failure[0]

    def _start_process(self) -> None:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        cfg = dataclasses.asdict(self.config)
        for key in ("db_path", "host", "port", "admin_token", "enrollment_token"):
            cfg.pop(key)
        config_file = self.db_path.with_name(self.db_path.name + ".config.json")
        config_file.write_text(json.dumps(cfg))
        log_file = open(self.db_path.with_name(self.db_path.name + ".log"), "ab")  # noqa: SIM115
        env = dict(os.environ, FEDGE_ADMIN_TOKEN=self.admin_token)
        env.pop("FEDGE_ENROLLMENT_TOKEN", None)
        if self.enrollment_token is not None:
            env["FEDGE_ENROLLMENT_TOKEN"] = self.enrollment_token
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        cmd = [
            sys.executable,
            "-m",
            "fedge.cli",
            "serve",
            "--db",
            str(self.db_path),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--config",
            str(config_file),
        ]
        self.process = sp.Popen(cmd, stdout=sp.PIPE, stderr=log_file, env=env)
        log_file.close()
        deadline = time.monotonic() + self.startup_timeout_s
        assert self.process.stdout is not None
        line = b""
        # The child prints one line, "fedge coordinator listening on http(s)://HOST:PORT".
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if line or self.process.poll() is not None:
                break
        text = line.decode().strip()
        if "listening on http" not in text:
            self.kill() if self.process.poll() is None else None
            raise RuntimeError(
                f"coordinator process did not start (see {self.db_path}.log): {text!r}"
            )
        self.port = int(text.rsplit(":", 1)[1])
