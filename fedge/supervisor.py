"""One node, several processes: ``fedge serve --processes K``.

One Python process runs about one core of Python (the GIL). The supervisor runs K coordinator
processes on the same host and port (``SO_REUSEPORT``: the kernel spreads new connections
over them) and on the same database and blob directory, as replicas
(:mod:`coordinator.replicas`): on a SQLite file each transaction that writes takes the
file's one write lock (:class:`~coordinator.store.SQLiteStore`), on PostgreSQL row locks.

The supervisor itself serves nothing. It migrates the database once, draws the tokens every
child shares, reserves the port (bound, never listening: with port 0 it chooses one, and no
other program can take it between two children's starts), starts the children (spawned,
so that none inherits a database connection) and prints the one ``listening`` line once all
answer. A child that dies, or that is started again and does not answer in time, is started
again (logged); what it acknowledged is durable in the database, and its siblings answer
meanwhile. The children publish their event counters in a
directory the supervisor makes for the run, so that ``/metrics`` on the shared port reports
the node's sum (:mod:`coordinator.metrics_sharing`). SIGTERM or SIGINT stops every child cleanly,
then the supervisor; a child whose supervisor died (even by SIGKILL) stops as well.

::

    fedge serve --db fl.sqlite --port 8080 --processes 2
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from coordinator.config import CoordinatorConfig
from fedge.cli import CommandError

__all__ = ["Supervisor"]

log = logging.getLogger("fedge.supervisor")

# A child that dies sooner than this after its start is started again only after a pause
# that doubles each time (up to the maximum): a crash at start-up must not spin a core.
_STABLE_S = 10.0
_MAX_PAUSE_S = 30.0
_STOP_TIMEOUT_S = 30.0


class Supervisor:
    """K children serving ``config`` (with ``replica`` on) on one port; :meth:`run` returns
    the exit status once stopped by a signal."""

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        print_token: bool = True,
        log: tuple[str, str] = ("INFO", "text"),
        startup_timeout_s: float = 120.0,
    ) -> None:
        self.config = config
        self.print_token = print_token
        self.log_settings = log
        self.startup_timeout_s = startup_timeout_s
        self._mp = multiprocessing.get_context("spawn")
        self._children: list[BaseProcess | None] = [None] * config.processes
        self._started_at = [0.0] * config.processes
        self._pause = [0.0] * config.processes
        self._due = [0.0] * config.processes  # when a dead child is started again
        # Restarted children not answering yet, and when they must have answered by.
        self._restarting: dict[Connection, tuple[int, BaseProcess, float]] = {}
        self._stopping = False

    def run(self) -> int:
        from fedge.commands.serve import announce_tokens, listening, tls_context

        tls_context(self.config)  # checked (and its pin printed) once, not by every child
        child_cfg = self._child_config()
        self._migrate(child_cfg)
        announce_tokens(self.config, child_cfg.admin_token or "", child_cfg.enrollment_token,
                        self.print_token)  # fmt: skip
        _remove_dead_metrics_dirs()
        with self._reserve_port() as placeholder, tempfile.TemporaryDirectory(
            prefix=_metrics_prefix(os.getpid())
        ) as metrics_dir:
            port = int(placeholder.getsockname()[1])
            # Each child publishes its counters there; a scrape of any reports their sum.
            self.child_config = dataclasses.replace(child_cfg, port=port, metrics_dir=metrics_dir)
            wake_r, wake_w = socket.socketpair()
            wake_w.setblocking(False)
            previous = {sig: signal.signal(sig, self._on_signal) for sig in _SIGNALS}
            old_fd = signal.set_wakeup_fd(wake_w.fileno())
            try:
                self._start_all()
                if not self._stopping:
                    print(listening(self.config, port), flush=True)
                    self._watch(wake_r)
            finally:
                self._stopping = True
                self._stop_all()
                signal.set_wakeup_fd(old_fd)
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                wake_r.close()
                wake_w.close()
        return 0

    # -- setting up -------------------------------------------------------------------------

    def _child_config(self) -> CoordinatorConfig:
        """Replicas, one process each, sharing the tokens drawn here."""
        cfg = self.config
        return dataclasses.replace(
            cfg,
            replica=True,
            processes=1,
            # Devices come back to any of the K: each child sees 1/K of the check-ins.
            pacing=dataclasses.replace(cfg.pacing, replicas=cfg.pacing.replicas * cfg.processes),
            admin_token=cfg.admin_token or secrets.token_hex(24),
            enrollment_token=cfg.enrollment_token
            or (None if cfg.open_registration else secrets.token_hex(24)),
        )

    def _migrate(self, cfg: CoordinatorConfig) -> None:
        """Open (create, migrate) the database once, before any child does."""
        from coordinator.store import open_store, redacted

        try:
            open_store(cfg.store_location).close()
        except Exception as e:
            where = cfg.store_location
            raise CommandError(redacted(where, f"cannot open {where}: {e}")) from e

    def _reserve_port(self) -> socket.socket:
        host, port = self.config.host, self.config.port
        if not hasattr(socket, "SO_REUSEPORT"):
            raise CommandError("--processes needs SO_REUSEPORT (Linux, BSD, macOS)")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            if port != 0:
                # Bound alone first: a port that another SO_REUSEPORT group (another
                # supervisor of this user) listens on is refused, not silently shared.
                with socket.socket(family, socket.SOCK_STREAM) as alone:
                    alone.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    alone.bind((host, port))
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            raise CommandError(f"cannot bind {host}:{port}: {e}") from e
        try:
            # The same options aiohttp's reuse_port sets: a child binds beside this socket.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise CommandError(f"cannot bind {host}:{port}: {e}") from e
        return sock

    # -- children ---------------------------------------------------------------------------

    def _spawn(self, i: int) -> tuple[BaseProcess, Connection]:
        ours, theirs = self._mp.Pipe(duplex=False)
        child = self._mp.Process(
            target=_child_main,
            args=(self.child_config, theirs, os.getpid(), self.log_settings),
            name=f"fedge-serve-{i}",
        )
        child.start()
        theirs.close()
        self._children[i] = child
        self._started_at[i] = time.monotonic()
        return child, ours

    def _start_all(self) -> None:
        pending: dict[Any, tuple[int, BaseProcess, Connection]] = {}
        for i in range(len(self._children)):
            if self._stopping:  # a signal while starting them: start no more
                break
            child, conn = self._spawn(i)
            pending[conn] = (i, child, conn)
        deadline = time.monotonic() + self.startup_timeout_s
        while pending and not self._stopping:  # a signal meanwhile: stop, do not announce
            left = deadline - time.monotonic()
            if left <= 0:
                raise CommandError(f"{len(pending)} serving processes did not start in time")
            for ready in wait(list(pending), min(left, 0.5)):
                if self._stopping:  # children a signal stopped too (Ctrl-C): no failure
                    break
                i, child, conn = pending.pop(ready)
                message = _receive(conn)
                if message != "ready":
                    raise CommandError(f"serving process {i} did not start: {message}")
                log.info("serving process %d (pid %s) answers", i, child.pid)

    def _watch(self, wake: socket.socket) -> None:
        """Until a signal: restart children that die."""
        while not self._stopping:
            now = time.monotonic()
            for i, c in enumerate(self._children):
                if c is None and self._due[i] <= now:
                    child, conn = self._spawn(i)
                    self._restarting[conn] = (i, child, now + self.startup_timeout_s)
                    log.info("serving process %d started again (pid %s)", i, child.pid)
            waits = [self._due[i] - now for i, c in enumerate(self._children) if c is None]
            waits += [by - now for _, _, by in self._restarting.values()]
            sentinels = {c.sentinel: i for i, c in enumerate(self._children) if c is not None}
            timeout = max(0.0, min(waits)) if waits else None
            ready = wait([wake, *sentinels, *self._restarting], timeout)
            if wake in ready:
                wake.recv(64)  # a signal: the handler set _stopping
            for conn in [r for r in ready if r in self._restarting]:
                i, _, _ = self._restarting.pop(conn)
                message = _receive(conn)
                if message == "ready":
                    log.info("serving process %d, started again, answers", i)
                else:  # why it will be tried again: a warning, seen at the operator's level
                    log.warning("serving process %d did not start again: %s", i, message)
                conn.close()
            self._kill_hung(time.monotonic())
            for s in ready:
                if s in sentinels:
                    self._reap(sentinels[s])

    def _kill_hung(self, now: float) -> None:
        """Kill restarted children that have not answered in time (blocked on a database or
        a file that does not answer): otherwise one would hold its place, serving nothing
        and never tried again. Its sentinel then reaps it, and another is started."""
        for conn, (i, child, by) in list(self._restarting.items()):
            if by > now:
                continue
            del self._restarting[conn]
            conn.close()
            log.warning("serving process %d (pid %s) did not answer within %g s of its start: "
                        "killed", i, child.pid, self.startup_timeout_s)
            child.kill()

    def _reap(self, i: int) -> None:
        child = self._children[i]
        assert child is not None
        child.join()
        lived = time.monotonic() - self._started_at[i]
        stable = lived >= _STABLE_S
        self._pause[i] = 0.0 if stable else min(_MAX_PAUSE_S, max(0.5, 2 * self._pause[i]))
        log.warning("serving process %d (pid %s) exited with %s after %.1f s; starting another%s",
                    i, child.pid, _status(child.exitcode), lived,
                    "" if stable else f" in {self._pause[i]:.1f} s")  # fmt: skip
        self._children[i] = None
        self._due[i] = time.monotonic() + self._pause[i]

    def _stop_all(self) -> None:
        live = [c for c in self._children if c is not None and c.is_alive()]
        for c in live:
            c.terminate()  # SIGTERM: each closes its connections and its store
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for c in live:
            c.join(max(0.0, deadline - time.monotonic()))
            if c.is_alive():
                log.warning("serving process pid %s did not stop: killed", c.pid)
                c.kill()
                c.join()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stopping = True


_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_METRICS_PREFIX = "fedge-metrics-"


def _pid_namespace() -> str | None:
    """This process's PID namespace (Linux), so that a pid is only ever compared within it:
    containers sharing a temporary directory each number their processes from 1."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return None


def _metrics_prefix(pid: int) -> str:
    namespace = _pid_namespace()
    return _METRICS_PREFIX if namespace is None else f"{_METRICS_PREFIX}{namespace}.{pid}-"


def _remove_dead_metrics_dirs() -> None:
    """The metrics directories of supervisors that were killed (SIGKILL leaves them behind):
    ours, named after a process of this PID namespace that no longer exists. Without a
    namespace to tell (not Linux) none is removed."""
    namespace = _pid_namespace()
    if namespace is None:
        return
    mine = f"{_METRICS_PREFIX}{namespace}."
    for path in Path(tempfile.gettempdir()).glob(f"{mine}*-*"):
        pid = path.name[len(mine):].split("-", 1)[0]
        if not pid.isdigit() or not path.is_dir() or path.stat().st_uid != os.getuid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _status(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


def _receive(conn: Connection) -> str:
    try:
        return str(conn.recv())
    except EOFError:
        return "it exited (see its log)"


def _die_with(parent: int) -> None:
    """SIGTERM this process when ``parent`` dies (Linux), so that no child serves on after
    its supervisor was killed; elsewhere the check below only covers a death before now."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # died already, before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _child_main(
    cfg: CoordinatorConfig, conn: Connection, parent: int, log_settings: tuple[str, str]
) -> None:
    from coordinator import event_loop
    from fedge.commands.serve import configure_logging, serve

    _die_with(parent)
    configure_logging(*log_settings)

    def ready(port: int) -> None:
        logging.getLogger("fedge.serve").info("pid %d serving on port %d", os.getpid(), port)
        conn.send("ready")
        conn.close()

    try:
        event_loop.run(serve(cfg, print_token=False, ready=ready), cfg.event_loop, cfg.tls)
    except BaseException as e:  # told to the supervisor (when it still listens), then raised
        if not conn.closed:
            conn.send(f"{type(e).__name__}: {e}")
        raise
