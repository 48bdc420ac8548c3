"""Coordinator throughput and memory on loopback: check-ins/s, uploads/s, peak RSS, with one
and with several server processes.

The coordinator runs as its own process (``fedge serve`` through ``EmbeddedCoordinator``,
real SQLite file with fsync, real HTTP), or as K processes on one SQLite file sharing the
port (``fedge serve --processes K``, SO_REUSEPORT). The model is a synthetic
100,000-parameter bundle; updates are int8 frames (block 256), every upload a payload of its
own (identical payloads would share one content-addressed blob and skip its fsync).

Devices are set up (registration, candidate check-ins, selection) with ``http.client``
(``DeviceHTTP``, 4 threads); the timed upload and steered check-in phases use the light load
generator of ``benchmarks/loadgen.py`` (requests built before the clock starts, raw sockets),
so that the client's CPU, which shares the machine's two cores, stays a small part of each
request's cost.

Measured, in rounds of one coordinator (tree) each:

* registrations/s and *candidate* check-ins/s (admitted to a selection window: one
  database write), with ``DeviceHTTP``;
* *steered* check-ins/s (round full: answered with pace steering, no write), keep-alive,
  ``STEER_CONNECTIONS`` connections;
* uploads/s: acknowledged int8 updates (decode, NaN/norm checks, blob fsync, SQLite commit,
  fold), ``UPLOAD_CONNECTIONS`` in flight (and, once per repeat, ``DEEP_CONNECTIONS``: just
  under the 64 operations the service queues by default, ``max_queued_operations``; whether
  one process is bound by its pipeline's latency or by its work), either a new connection
  per upload (like phones)
  or keep-alive (like a load balancer's pooled connections to its backend); each round is
  then checked, or gives no figure: committed, every upload counted, and the new version
  equal to version 0 plus the example-weighted mean of the deltas sent;
* the server's CPU milliseconds per upload and per steered check-in: user + system time of
  the server process and all its descendants over the timed interval (``/proc``), which,
  unlike a rate, is not diluted by what else runs on the shared cores, and how it fell on the
  processes; the client's (and its kernel part: on loopback the sender's system time
  includes much of the receiver's TCP work);
* latency percentiles of both (send to last byte of the answer);
* peak server RSS (``VmHWM``, summed over the processes) for a round of ``UPDATES`` updates
  versus one of 10, each in a fresh process: streaming aggregation must keep it flat; RSS
  sampled during the uploads (plotted);
* configurations alternating in each repeat, so that the shared cores' changing load falls on
  all: 1 and 2 processes (when ``CoordinatorConfig`` has ``processes``), each with new and
  keep-alive connections; group commit off (one process); and the tree of commit
  ``BASELINE`` as ``--processes 2`` with keep-alive (``git archive`` into a temporary
  directory, the server processes import from there; ``FEDGE_BENCH_BASELINE=""`` skips it);
  and two coordinators that share nothing
  (each its own database file, blob directory and half of the round), loaded at once:
  what two processes could answer on these cores if they never waited for one another,
  the bound of ``--processes 2``. Rounds at group commit off acknowledge a few hundred
  uploads/s at most, so they are ``SLOW_UPDATES`` long;
* the durable path in-process (no HTTP): one by one versus batches of 32, the thread's wall
  time split into CPU, waiting for a CPU and blocked on the disk; and the int8 decode's CPU;
* the platform's floor, after the rounds: the same uploads and connections against
  ``upload_floor.py`` (aiohttp reading each body and making it durable with the coordinator's
  blob store, nothing else), new connections and keep-alive in each repeat.

The implied capacity of one core is 1,000 / (server CPU ms per request).

Run: ``./dev bench bench_coordinator`` (about 10 min on a quiet 2-core machine). Writes
``benchmarks/results/bench_coordinator.json`` and ``bench_coordinator.png``.
``.venv/bin/python benchmarks/bench_coordinator.py quick`` (or ``FEDGE_BENCH_QUICK=1``): small
rounds, one repeat, results in the temporary directory (the committed ones stay).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os
import platform
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import cli, loadgen  # noqa: E402
from coordinator import embedded  # noqa: E402
from coordinator.admin import tar_directory  # noqa: E402
from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.embedded import EmbeddedCoordinator  # noqa: E402
from coordinator.service import Coordinator  # noqa: E402
from edge_sdk.codecs import decode_update, encode_update  # noqa: E402
from edge_sdk.frame import decode_tensor  # noqa: E402
from edge_sdk.protocol import device_auth_header  # noqa: E402
from tests.fixtures.coordinator import (  # noqa: E402
    GOOD_CONDITIONS,
    DeviceHTTP,
    make_synthetic_bundle,
)
from tests.fixtures.pki import Pki, make_pki  # noqa: E402

QUICK = "quick" in sys.argv[1:] or os.environ.get("FEDGE_BENCH_QUICK", "") not in ("", "0")
RESULTS = Path(tempfile.gettempdir()) if QUICK else Path(__file__).parent / "results"
NUM_PARAMETERS = 100_000
CODEC = {"name": "int8", "bits": 8, "block": 256}
THREADS = 4  # DeviceHTTP threads of the setup (registrations, candidate check-ins)
UPLOAD_CONNECTIONS = 32  # uploads in flight: group commit batches what arrives together
DEEP_CONNECTIONS = 60
STEER_CONNECTIONS = 8
# Updates per timed round: at 1,000 uploads/s a round of 1,000 lasts one second, too short
# to time; group commit off and the baseline acknowledge about 150/s.
UPDATES = 300 if QUICK else 3000
SLOW_UPDATES = 100 if QUICK else 1000
SMALL = 10  # the RSS reference round
STEERED = 2000 if QUICK else 20_000  # steered check-ins timed per round
REPEATS = 1 if QUICK else 2
DURABLE_UPDATES = 64 if QUICK else 320  # uploads of the in-process durable-path comparison
# The tree this pass of the one-node work started from, run as `--processes 2` (earlier
# passes: 3d0f832 before the thread work, 4d5d502 before the decode, query layer, worker
# hand-off and check-in commit work, 494181e before partial sums every N uploads; 3757a0f
# serves on asyncio's loop); FEDGE_BENCH_BASELINE names another commit, "" skips it.
BASELINE = os.environ.get("FEDGE_BENCH_BASELINE", "3757a0f")
# `fedge serve --processes K`: measured at 2 when this tree's configuration has the field.
MULTI_PROCESS = "processes" in {f.name for f in dataclasses.fields(CoordinatorConfig)}


@dataclasses.dataclass(frozen=True)
class Config:
    """One kind of timed round."""

    code: str = "after"  # "before": the server runs the BASELINE tree
    group_commit: bool = True
    processes: int = 1
    keep_alive: bool = False  # uploads on pooled connections, else one connection each
    updates: int = UPDATES
    steered: int = STEERED
    connections: int = UPLOAD_CONNECTIONS  # uploads in flight
    # Coordinators sharing nothing, loaded at once (run_separate); 1: the one coordinator.
    separate: int = 1
    tls: bool = False  # HTTPS (a certificate from a CA made for the run), else plain HTTP
    event_loop: str | None = None  # CoordinatorConfig.event_loop; None: its default

    @property
    def label(self) -> str:
        parts = [self.code, f"{self.processes} proc" + ("s" if self.processes > 1 else "")]
        if self.separate > 1:
            parts[1] = f"{self.separate} separate 1-proc coordinators"
        if self.tls:
            parts.append("https")
        if self.event_loop is not None:
            parts.append(f"event_loop {self.event_loop}")
        parts.append("keep-alive" if self.keep_alive else "new conn")
        if not self.group_commit:
            parts.append("group commit off")
        if self.connections != UPLOAD_CONNECTIONS:
            parts.append(f"{self.connections} in flight")
        return ", ".join(parts)


def baseline_tree(workdir: Path) -> Path | None:
    """The source tree of commit ``BASELINE`` (read from git, nothing in the work tree
    changes), or None without one."""
    if not BASELINE:
        return None
    out = subprocess.run(["git", "-C", str(ROOT), "archive", BASELINE],
                         capture_output=True, check=False)  # fmt: skip
    if out.returncode != 0:
        print(f"[bench_coordinator] no baseline {BASELINE}: {out.stderr.decode().strip()}",
              file=sys.stderr)  # fmt: skip
        return None
    dest = workdir / "baseline"
    with tarfile.open(fileobj=io.BytesIO(out.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


# on_disk, proc_kib, cpu_s and timed serve bench_replicas too.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


def filesystem(path: Path) -> str:
    """The type of the filesystem ``path`` is on: that of the last mount (the one on top) of
    the deepest mount point above it in ``/proc/self/mountinfo``."""
    path = path.resolve()
    deepest, kind = Path("/"), ""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        # a mount point's spaces and the like are octal escapes (\040)
        point = Path(fields[4].encode().decode("unicode_escape"))
        if (point == path or point in path.parents) and len(point.parts) >= len(deepest.parts):
            deepest, kind = point, fields[fields.index("-") + 1]
    return kind


def on_disk(path: Path) -> Path:
    """``path``, once known not to be on a memory filesystem: the figures are those of
    acknowledged-means-durable uploads, and on tmpfs (``/tmp`` on many systems) an fsync
    costs nothing. Exits otherwise."""
    kind = filesystem(path)
    if kind in MEMORY_FILESYSTEMS:
        raise SystemExit(f"{path} is on {kind}, where fsync costs nothing: set TMPDIR to a "
                         "directory on a disk")  # fmt: skip
    return path


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_s(pid: int) -> float:
    """CPU time (user + system) a process has used so far: what a figure costs whatever
    else the shared cores are doing."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(n: int, fn: Callable[[int], Any], threads: int = THREADS) -> tuple[float, list[Any]]:
    """Run fn(0..n-1) on a thread pool; returns (items per second, results)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        out = list(pool.map(fn, range(n)))
    return n / (time.perf_counter() - t0), out


@contextlib.contextmanager
def _served_from(source: Path | None) -> Iterator[None]:
    """Start a coordinator process from ``source`` (None: this tree): ``python -m`` puts its
    working directory first on the module path; the config file it is given holds only the
    keys that tree's ``CoordinatorConfig`` (and ``PacingConfig``) knows (newer ones keep
    their defaults there)."""
    if source is None:
        yield
        return
    probe = ("import dataclasses, json, coordinator.config as c; "
             "print(json.dumps([[f.name for f in dataclasses.fields(k)] "
             "for k in (c.CoordinatorConfig, c.PacingConfig)]))")
    known, known_pacing = (set(names) for names in json.loads(subprocess.run(
        [sys.executable, "-c", probe], cwd=source, check=True, capture_output=True, text=True
    ).stdout))  # fmt: skip

    def asdict(config: Any) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(config).items() if k in known}
        if isinstance(out.get("pacing"), dict):  # a nested table: its keys too
            out["pacing"] = {k: v for k, v in out["pacing"].items() if k in known_pacing}
        return out

    shim = types.SimpleNamespace(asdict=asdict, replace=dataclasses.replace)
    with contextlib.chdir(source), mock.patch.object(embedded, "dataclasses", shim):
        yield


def _plan(updates: int) -> dict[str, Any]:
    # over_selection 1: exactly `updates` devices are selected, later ones are steered away
    return {
        "rounds": 1,
        "goal": updates,
        "over_selection": 1.0,
        "selection_window_s": 0.0,
        "round_deadline_s": 3600.0,
        "codec": CODEC,
        "max_update_norm": None,
        # Plain FedAvg: the running sum is folded as uploads arrive. The robust defaults
        # (adaptive clipping) read every payload back at the commit, which is not the
        # upload path measured here.
        "robust": "none",
    }


def _measured(
    pids: Sequence[int], parts: Sequence[tuple[int, list[loadgen.Request]]], connections: int,
    expect: loadgen.Expect, on_progress: Callable[[int], None] | None = None,
    tls: ssl.SSLContext | None = None,
) -> tuple[loadgen.LoadResult, dict[str, Any]]:
    """``loadgen.run_parts`` and the CPU ms per request of the server trees (``pids``: their
    roots) and of this client; ``server_shares``: how the servers' CPU fell on their
    processes (largest first; with SO_REUSEPORT the kernel spreads connections, not
    requests, over them)."""

    def cpu() -> dict[int, float]:
        return {p: c for root in pids for p, c in loadgen.tree_cpu(root).items()}

    before = cpu()
    result = loadgen.run_parts(parts, connections, expect, on_progress, tls=tls)
    after = cpu()
    spent = sum(after.values()) - sum(before.values())
    each = [after[p] - before.get(p, 0.0) for p in after]
    figures = {
        "server": spent / result.requests * 1e3,
        "client": result.client_cpu_ms,
        "client_sys": result.client_sys_ms,
        "server_shares": sorted((round(c / spent, 3) for c in each if c > 0), reverse=True)
        if spent > 0 else [],
    }  # fmt: skip
    return result, figures


@dataclasses.dataclass
class _Served:
    """A coordinator serving one task whose round has selected ``len(devices)`` devices."""

    coord: EmbeddedCoordinator
    pid: int
    port: int
    task_id: str
    devices: list[DeviceHTTP]
    assignments: list[str]
    registrations_per_s: float
    checkins_candidate_per_s: float
    rss_idle_kib: int
    tls: ssl.SSLContext | None  # the client's, when the coordinator serves HTTPS
    base: np.ndarray  # the task's version 0, read before the uploads

    def uploads(self, frames: list[bytes], keep_alive: bool) -> list[loadgen.Request]:
        return [
            loadgen.upload_request(self.port, (d.device_id, d.secret), self.assignments[i],
                                   frames[i], {"num_examples": upload_weight(i)},
                                   close=not keep_alive)
            for i, d in enumerate(self.devices)
        ]  # fmt: skip

    def check_committed(self, frames: Sequence[bytes]) -> dict[str, Any]:
        """The round's record, once it committed with every upload of ``frames`` (those
        :meth:`uploads` sent) counted, into the model they make."""
        admin = self.coord.admin()
        rounds = admin.rounds(self.task_id)
        assert rounds[0]["state"] == "committed", rounds
        status = admin.status()
        assert status["updates_accepted"] == len(frames) and status["model_version"] == 1
        check_model(self.devices[0], self.task_id, self.base, frames)
        return dict(rounds[0])


@functools.cache
def _pki(workdir: Path) -> Pki:
    """The run's CA and coordinator certificate (made once per work directory)."""
    (workdir / "pki").mkdir()
    return make_pki(workdir / "pki")


def register(coord: EmbeddedCoordinator) -> DeviceHTTP:
    dev = DeviceHTTP(coord)
    dev.close()  # like a phone: connect, ask, go away (no idle keep-alive socket)
    return dev


@contextlib.contextmanager
def _served(
    bundle: Path, config: Config, updates: int, workdir: Path, source: Path | None
) -> Iterator[_Served]:
    """A coordinator (tree of processes; with ``source`` that source tree) on a database of
    its own, its task's round of ``updates`` selected (registrations and candidate check-ins
    timed on the way), stopped at the end."""
    db = on_disk(Path(tempfile.mkdtemp(dir=workdir))) / "fedge.db"
    extra: dict[str, Any] = {"processes": config.processes} if config.processes > 1 else {}
    if config.event_loop is not None:
        extra["event_loop"] = config.event_loop
    if config.tls:
        extra |= _pki(workdir).coordinator_tls()
    coord = EmbeddedCoordinator(db, subprocess=True, group_commit=config.group_commit, **extra)
    with _served_from(source):
        coord.start()
    assert coord.process is not None
    try:
        if config.event_loop in ("asyncio", "uvloop"):  # chosen outright: what the log says ran
            loadgen.check_event_loop(db, config.event_loop)
        admin = coord.admin()
        plan = _plan(updates)
        task_id = admin.create_task(admin.upload_bundle(bundle)["bundle_id"], plan)["task_id"]
        rss_idle = loadgen.tree_kib(coord.process.pid, "VmRSS")

        def check_in(i: int) -> dict[str, Any]:
            try:
                return devices[i].check_in()
            finally:
                devices[i].close()

        reg_rate, devices = timed(updates, lambda _: register(coord))
        cand_rate, first = timed(updates, check_in)
        _, second = timed(updates, check_in)
        aids = [(s if s["action"] == "train" else f)["assignment"]["assignment_id"]
                for f, s in zip(first, second, strict=True)]  # fmt: skip
        tls = coord.client_tls.context() if config.tls else None
        base = decode_tensor(devices[0].params(task_id, 0))
        devices[0].close()
        yield _Served(coord, coord.process.pid, coord.port, task_id, devices, aids, reg_rate,
                      cand_rate, rss_idle, tls, base)  # fmt: skip
    finally:
        coord.stop()


def run_round(
    bundle: Path, config: Config, frames: list[bytes], workdir: Path, source: Path | None = None
) -> dict[str, Any]:
    """One coordinator (tree of processes), one round of ``config.updates`` reports; returns
    figures. With ``source`` the server runs that source tree. ``config.separate`` > 1: that
    many coordinators instead, each its own round of an equal share of the updates, loaded
    at once (uploads only)."""
    if config.separate > 1:
        return run_separate(bundle, config, frames, workdir)
    started = time.perf_counter()
    with _served(bundle, config, config.updates, workdir, source) as served:
        pid, port = served.pid, served.port
        figures: dict[str, Any] = {}
        if config.steered:
            # Devices outside the round, which is full: every check-in is steered away.
            outside = [register(served.coord) for _ in range(STEER_CONNECTIONS)]
            body = {"population": "default", "runtimes": ["ort-step"],
                    "conditions": GOOD_CONDITIONS}  # fmt: skip
            checkins = [loadgen.checkin_request(port, (d.device_id, d.secret), body, close=False)
                        for d in outside]  # fmt: skip
            requests = [checkins[i % len(checkins)] for i in range(config.steered)]
            steer, steer_cpu = _measured([pid], [(port, requests)], STEER_CONNECTIONS,
                                         loadgen.expect_steered, tls=served.tls)  # fmt: skip
            figures |= {
                "checkins_steered_per_s": steer.per_s,
                "checkin_steered_cpu_ms": steer_cpu,
                "checkin_steered_latency_ms": steer.latency_ms,
            }
        rss_reporting = loadgen.tree_kib(pid, "VmRSS")
        samples: list[tuple[int, int]] = [(0, rss_reporting)]

        def sample(done: int) -> None:
            if done > samples[-1][0]:
                samples.append((done, loadgen.tree_kib(pid, "VmRSS")))

        uploads = served.uploads(frames, config.keep_alive)
        up, up_cpu = _measured([pid], [(port, uploads)], config.connections,
                               loadgen.expect_status(200), sample, served.tls)  # fmt: skip
        rss_peak = loadgen.tree_kib(pid, "VmHWM")
        committed = served.check_committed(frames[: config.updates])
        return {
            **_figures(config, up, up_cpu, frames),
            "registrations_per_s": served.registrations_per_s,
            "checkins_candidate_per_s": served.checkins_candidate_per_s,
            **figures,
            "rss_idle_mib": served.rss_idle_kib / 1024,
            "rss_before_uploads_mib": rss_reporting / 1024,
            "rss_peak_mib": rss_peak / 1024,
            "rss_samples_mib": [(n, kib / 1024) for n, kib in samples],
            "round_duration_s": committed["metrics"]["duration_s"],
            "wall_s": time.perf_counter() - started,  # all of it, the setup included
        }


def _figures(
    config: Config, up: loadgen.LoadResult, up_cpu: dict[str, Any], frames: list[bytes]
) -> dict[str, Any]:
    return {
        **dataclasses.asdict(config),
        "label": config.label,
        "checkins_steered_per_s": None,
        "checkin_steered_cpu_ms": None,
        "checkin_steered_latency_ms": None,
        "uploads_per_s": up.per_s,
        "upload_cpu_ms": up_cpu,
        "upload_latency_ms": up.latency_ms,
        "upload_bytes": len(frames[0]),
    }


def run_separate(
    bundle: Path, config: Config, frames: list[bytes], workdir: Path
) -> dict[str, Any]:
    """``config.separate`` coordinators that share nothing (each its own database file,
    blob directory and round of ``updates // separate``), their uploads sent at once on
    ``config.connections`` in all: what that many processes of the service could answer
    on these cores if they never waited for one another, the bound of ``--processes``."""
    started = time.perf_counter()
    share = config.updates // config.separate
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(_served(bundle, config, share, workdir, None))
                   for _ in range(config.separate)]  # fmt: skip
        parts = [(s.port, s.uploads(frames[k * share : (k + 1) * share], config.keep_alive))
                 for k, s in enumerate(servers)]  # fmt: skip
        up, up_cpu = _measured([s.pid for s in servers], parts, config.connections,
                               loadgen.expect_status(200), tls=servers[0].tls)  # fmt: skip
        rss_peak = sum(loadgen.tree_kib(s.pid, "VmHWM") for s in servers)
        for k, s in enumerate(servers):
            s.check_committed(frames[k * share : (k + 1) * share])
        return {
            **_figures(config, up, up_cpu, frames),
            "registrations_per_s": float(np.mean([s.registrations_per_s for s in servers])),
            "checkins_candidate_per_s": float(
                np.mean([s.checkins_candidate_per_s for s in servers])
            ),
            "rss_idle_mib": sum(s.rss_idle_kib for s in servers) / 1024,
            "rss_peak_mib": rss_peak / 1024,
            "rss_samples_mib": [],
            "wall_s": time.perf_counter() - started,
        }


def upload_floor(frames: list[bytes], workdir: Path, keep_alive: bool) -> dict[str, Any]:
    """The same uploads, load and connections against ``upload_floor.py`` (aiohttp and one
    durable payload per upload, nothing else): what this machine allows before the
    coordinator's own work."""
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("upload_floor.py")),
         str(on_disk(Path(tempfile.mkdtemp(dir=workdir))))],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        uploads = [loadgen.upload_request(port, ("d-floor", "s"), f"a-{i}", frame,
                                          {"num_examples": 20}, close=not keep_alive)
                   for i, frame in enumerate(frames)]  # fmt: skip
        up, cpu = _measured([server.pid], [(port, uploads)], UPLOAD_CONNECTIONS,
                            loadgen.expect_status(200))  # fmt: skip
        return {"keep_alive": keep_alive, "uploads_per_s": up.per_s,
                "server_cpu_ms": cpu["server"], "latency_ms": up.latency_ms}  # fmt: skip
    finally:
        server.terminate()
        server.wait(30)


def schedstat() -> tuple[float, float]:
    """Seconds this thread has run on a CPU and waited for one (runnable, not running):
    the rest of its wall time it was blocked (here: on the disk)."""
    tid = threading.get_native_id()
    run_ns, wait_ns, _ = Path(f"/proc/self/task/{tid}/schedstat").read_text().split()
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


def durable_path(
    bundle: Path, updates: int, frames: list[bytes], workdir: Path, batch: int, rep: int
) -> dict[str, Any]:
    """The service without HTTP (one thread, real SQLite file and blob directory on the
    disk): ``updates`` uploads made durable one by one (``batch`` 1: ``Coordinator.upload``,
    three fsyncs each) or in batches (the group-commit steps, as the service runs them). The
    thread's wall time split into CPU, waiting for a CPU (the shared cores' load) and blocked
    (the fsyncs)."""
    root = workdir / f"durable-{batch}-{rep}"
    root.mkdir(parents=True, exist_ok=True)
    on_disk(root)
    plan = _plan(updates)
    coord = Coordinator(CoordinatorConfig(db_path=str(root / "fedge.db"), open_registration=True))
    try:
        bundle_id = coord.add_bundle(tar_directory(bundle))["bundle_id"]
        body = json.dumps({"bundle_id": bundle_id, "plan": plan}).encode()
        coord.create_task(body)
        checkin = json.dumps({"runtimes": ["ort-step"], "conditions": GOOD_CONDITIONS}).encode()
        devices = []
        for _ in range(updates):
            reg = coord.register(json.dumps({"runtimes": ["ort-step"]}).encode())
            devices.append(coord.authenticate(device_auth_header(reg["device_id"], reg["secret"])))
        for who in devices:
            coord.checkin(who, checkin)
        work = [(who, coord.checkin(who, checkin)["assignment"]["assignment_id"])
                for who in devices]  # fmt: skip
        report = json.dumps({"num_examples": 20})
        t0, (c0, q0) = time.perf_counter(), schedstat()
        if batch == 1:
            for i, (who, aid) in enumerate(work):
                coord.upload(who, aid, f"k{i}", report, frames[i % len(frames)])
        else:
            for start in range(0, updates, batch):
                staged = [
                    coord.stage_upload(coord.admit_upload(who, aid, f"k{i}", report),
                                       frames[i % len(frames)])
                    for i, (who, aid) in enumerate(work[start : start + batch], start)
                ]  # fmt: skip
                coord.install_uploads(staged)
                assert all(isinstance(a, dict) for a in coord.accept_uploads(staged))
        wall, (c1, q1) = time.perf_counter() - t0, schedstat()
        cpu, queued = c1 - c0, q1 - q0
        assert coord.store.list_tasks()[0].model_version == 1  # the round committed
        per = 1e3 / updates
        return {"batch": batch, "updates": updates, "uploads_per_s": updates / wall,
                "cpu_ms_per_upload": cpu * per, "runqueue_ms_per_upload": queued * per,
                "blocked_ms_per_upload": (wall - cpu - queued) * per}  # fmt: skip
    finally:
        coord.close()


def decode_cpu_ms(frame: bytes, baseline: Path | None) -> dict[str, float]:
    """CPU ms to decode one int8 payload of the model, median of 5 x 200, with this tree's
    codec and (``before``) the baseline tree's ``quantize.py`` loaded beside it; both must
    decode to the same vector."""
    import importlib.util

    from edge_sdk.codecs.quantize import QuantizedCodec
    from edge_sdk.frame import decode_frame

    payload = decode_frame(frame).payload
    codecs = {"after": QuantizedCodec()}
    if baseline is not None:
        spec = importlib.util.spec_from_file_location(
            "baseline_quantize", baseline / "edge_sdk" / "codecs" / "quantize.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        codecs["before"] = module.QuantizedCodec()
        before = codecs["before"].decode(payload, NUM_PARAMETERS)
        assert np.array_equal(before, codecs["after"].decode(payload, NUM_PARAMETERS))
    times: dict[str, list[float]] = {name: [] for name in codecs}
    for _ in range(5):
        for name, codec in codecs.items():
            t0 = time.process_time()
            for _ in range(200):
                codec.decode(payload, NUM_PARAMETERS)
            times[name].append((time.process_time() - t0) / 200 * 1e3)
    return {name: float(np.median(ts)) for name, ts in times.items()}


# Two coordinators sharing nothing, keep-alive: what two processes could answer on these
# cores if they never waited for one another (the 2-process rows' bound).
SEPARATE = Config(keep_alive=True, separate=2, steered=0)
# The baseline tree as `--processes 2` (or alone, if it has no such field), keep-alive; its
# steered check-ins too (the event loop's part is largest there).
BEFORE = Config(code="before", processes=2 if MULTI_PROCESS else 1, keep_alive=True)


def schedule(baseline: bool) -> list[Config]:
    """The RSS reference round, then the timed rounds of each repeat: process counts and
    connection kinds interleaved, then group commit off and the baseline."""
    counts = (1, 2) if MULTI_PROCESS else (1,)
    repeat = [Config(processes=k, keep_alive=keep) for keep in (False, True) for k in counts]
    repeat.append(Config(keep_alive=True, connections=DEEP_CONNECTIONS, steered=0))
    repeat.append(SEPARATE)
    repeat.append(Config(group_commit=False, updates=SLOW_UPDATES, steered=0))
    if baseline:
        repeat.append(BEFORE)
    return [Config(updates=SMALL, steered=0), *repeat * REPEATS]


def _mean(runs: list[dict[str, Any]], key: str, inner: str | None = None) -> float:
    """Mean of ``run[key]`` (or ``run[key][inner]``) over ``runs``."""
    return float(np.mean([r[key] if inner is None else r[key][inner] for r in runs]))


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Means over the repeats of each configuration (label); capacity: what one core of
    server CPU would answer, 1,000 / server CPU ms."""
    out: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        rs = [r for r in runs if r["label"] == label]
        keys = ("code", "group_commit", "processes", "keep_alive", "updates")
        e: dict[str, Any] = {key: rs[0][key] for key in keys}
        e["repeats"] = len(rs)
        for key in ("registrations_per_s", "checkins_candidate_per_s", "rss_peak_mib"):
            e[key] = _mean(rs, key)
        for name, rate, cpu, lat in (
            ("uploads", "uploads_per_s", "upload_cpu_ms", "upload_latency_ms"),
            ("steered", "checkins_steered_per_s", "checkin_steered_cpu_ms",
             "checkin_steered_latency_ms"),
        ):  # fmt: skip
            if rs[0][rate] is None:
                continue
            e[f"{name}_per_s"] = _mean(rs, rate)
            for side in ("server", "client"):
                e[f"{name}_{side}_cpu_ms"] = _mean(rs, cpu, side)
            for p in ("p50", "p99"):
                e[f"{name}_{p}_ms"] = _mean(rs, lat, p)
            # the busiest server process's share of the server CPU (1 with one process)
            e[f"{name}_busiest_share"] = float(np.mean([r[cpu]["server_shares"][0] for r in rs]))
            e[f"{name}_capacity_per_core"] = 1e3 / e[f"{name}_server_cpu_ms"]
        out[label] = e
    return out


def _ratio(summary: dict[str, dict[str, Any]], a: str, b: str, key: str) -> float | None:
    if a in summary and b in summary and key in summary[a] and key in summary[b]:
        return float(summary[a][key] / summary[b][key])
    return None


def ratios(summary: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    one, two = Config(), Config(processes=2)
    one_ka, two_ka = Config(keep_alive=True), Config(processes=2, keep_alive=True)
    deep_ka = Config(keep_alive=True, connections=DEEP_CONNECTIONS, steered=0)
    pairs = {
        "uploads_2_vs_1_processes_new_conn": (two, one, "uploads_per_s"),
        "uploads_2_vs_1_processes_keep_alive": (two_ka, one_ka, "uploads_per_s"),
        "upload_server_cpu_2_vs_1_processes": (two, one, "uploads_server_cpu_ms"),
        "steered_2_vs_1_processes": (two, one, "steered_per_s"),
        "steered_server_cpu_2_vs_1_processes": (two, one, "steered_server_cpu_ms"),
        "uploads_keep_alive_vs_new_conn": (one_ka, one, "uploads_per_s"),
        "uploads_2_separate_vs_1_process": (SEPARATE, one_ka, "uploads_per_s"),
        "uploads_2_processes_vs_2_separate": (two_ka, SEPARATE, "uploads_per_s"),
        "upload_server_cpu_2_separate_vs_1_process": (SEPARATE, one_ka, "uploads_server_cpu_ms"),
        "uploads_60_vs_32_in_flight": (deep_ka, one_ka, "uploads_per_s"),
        "upload_server_cpu_60_vs_32_in_flight": (deep_ka, one_ka, "uploads_server_cpu_ms"),
        "uploads_group_commit_on_vs_off": (one, Config(group_commit=False), "uploads_per_s"),
        "uploads_after_vs_before": (two_ka if MULTI_PROCESS else one_ka, BEFORE, "uploads_per_s"),
        "upload_server_cpu_after_vs_before": (two_ka if MULTI_PROCESS else one_ka, BEFORE,
                                              "uploads_server_cpu_ms"),
        "steered_after_vs_before": (two_ka if MULTI_PROCESS else one_ka, BEFORE,
                                    "steered_per_s"),
        "steered_server_cpu_after_vs_before": (two_ka if MULTI_PROCESS else one_ka, BEFORE,
                                               "steered_server_cpu_ms"),
    }  # fmt: skip
    return {name: _ratio(summary, a.label, b.label, key) for name, (a, b, key) in pairs.items()}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rss, uploads, steered) = plt.subplots(1, 3, figsize=(16, 4.6))
    shown: set[str] = set()
    for run in results["runs"]:
        label = f"{run['updates']} updates, {run['label']}"
        if label in shown or not run["rss_samples_mib"]:  # first repeat of each configuration
            continue
        shown.add(label)
        xs, ys = zip(*run["rss_samples_mib"], strict=True)
        rss.plot(xs, ys, marker="o", ms=2, label=label)
    rss.set_xlabel("updates accepted in the round")
    rss.set_ylabel("coordinator RSS, all processes (MiB)")
    rss.set_ylim(bottom=0)
    rss.set_title("Coordinator RSS, 100k-param int8 updates")
    rss.legend(fontsize=6, loc="center right")
    summary = results["summary"]
    for ax, name, title, target in ((uploads, "uploads", "acknowledged int8 uploads/s", 1000),
                                    (steered, "steered", "steered check-ins/s", 5000)):  # fmt: skip
        ax.axhline(target, color="tab:red", ls="--", lw=1, label="issue 15 target, one node")
        if name == "uploads" and results.get("upload_floor"):
            floor = np.mean([f["uploads_per_s"] for f in results["upload_floor"]])
            ax.axhline(floor, color="tab:gray", ls=":", lw=1,
                       label="aiohttp + durable payload only (upload_floor.py)")
        labels = [k for k, e in summary.items() if f"{name}_per_s" in e and e["updates"] > SMALL]
        at = np.arange(len(labels))
        ax.bar(at, [summary[k][f"{name}_per_s"] for k in labels], 0.6, color="tab:blue")
        rate = "uploads_per_s" if name == "uploads" else "checkins_steered_per_s"
        for x, k in zip(at, labels, strict=True):
            each = [r[rate] for r in results["runs"] if r["label"] == k and r["updates"] > SMALL]
            ax.plot([x] * len(each), each, "k.", ms=4)  # each repeat
            e = summary[k]
            ax.annotate(f"{e[f'{name}_server_cpu_ms']:.3f} ms\nserver CPU", (x, max(each)),
                        ha="center", va="bottom", fontsize=7)  # fmt: skip
        ax.set_xticks(at, labels, rotation=25, ha="right", fontsize=7)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.2)
        ax.set_title(f"{title} (dots: repeats)")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_table(summary: dict[str, dict[str, Any]]) -> None:
    cols = [
        ("updates", "updates", "{:,}"),
        ("reg/s", "registrations_per_s", "{:.0f}"),
        ("cand. ci/s", "checkins_candidate_per_s", "{:.0f}"),
        ("steered/s", "steered_per_s", "{:.0f}"),
        ("srv ms", "steered_server_cpu_ms", "{:.3f}"),
        ("cli ms", "steered_client_cpu_ms", "{:.3f}"),
        ("p99 ms", "steered_p99_ms", "{:.1f}"),
        ("uploads/s", "uploads_per_s", "{:.0f}"),
        ("srv ms", "uploads_server_cpu_ms", "{:.2f}"),
        ("cli ms", "uploads_client_cpu_ms", "{:.3f}"),
        ("p50 ms", "uploads_p50_ms", "{:.1f}"),
        ("p99 ms", "uploads_p99_ms", "{:.1f}"),
        ("RSS MiB", "rss_peak_mib", "{:.1f}"),
    ]
    print("\nmeans over the repeats (steered check-ins: keep-alive, "
          f"{STEER_CONNECTIONS} connections; uploads: {UPLOAD_CONNECTIONS} in flight; "
          "ms: CPU per request)")  # fmt: skip
    w = max(len("configuration"), *map(len, summary))
    print(f"| {'configuration':{w}} | " + " | ".join(f"{h:>10}" for h, _, _ in cols) + " |")
    print(f"|{'-' * (w + 2)}|" + "|".join("-" * 11 + ":" for _ in cols) + "|")
    for label, e in summary.items():
        cells = [fmt.format(e[key]) if key in e else "-" for _, key, fmt in cols]
        print(f"| {label:{w}} | " + " | ".join(f"{c:>10}" for c in cells) + " |")


def upload_weight(i: int) -> int:
    """The ``num_examples`` upload ``i`` of a round reports: its weight in the mean."""
    return 20 + i % 7


def check_model(
    device: DeviceHTTP, task_id: str, base: np.ndarray, frames: Sequence[bytes]
) -> None:
    """Raise unless the task's version 1 is ``base`` (version 0) plus the example-weighted
    mean of the deltas of ``frames`` (upload ``i`` weighing :func:`upload_weight`): plain
    FedAvg, server learning rate 1. The counts adding up is not enough: a run that folded a
    payload other than the one sent, or lost a partial sum, must not give a figure."""
    total = np.zeros(base.size)
    for i, frame in enumerate(frames):
        total += upload_weight(i) * decode_update(frame, expected_length=base.size)
    want = base.astype(np.float64) + total / sum(map(upload_weight, range(len(frames))))
    got = decode_tensor(device.params(task_id, 1))
    device.close()
    # The version is float32: its rounding (1.5e-8 at most here) is all that may differ; one
    # upload of 3,000 swapped for another moves elements by about 5e-6.
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def int8_frames(n: int) -> list[bytes]:
    """``n`` distinct int8 update frames of the synthetic model (seeded: the same every run)."""
    rng = np.random.default_rng(0)
    return [
        encode_update(rng.normal(0, 0.01, NUM_PARAMETERS).astype(np.float32), CODEC, rng=rng)[0]
        for _ in range(n)
    ]


def main() -> None:
    cli.words(__doc__)
    print(f"[bench_coordinator] encoding {UPDATES} distinct updates", file=sys.stderr, flush=True)
    frames = int8_frames(UPDATES)
    if not MULTI_PROCESS:
        print("[bench_coordinator] CoordinatorConfig has no `processes`: only 1 process",
              file=sys.stderr)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-coordinator-") as tmp:
        work = Path(tmp)
        bundle = make_synthetic_bundle(work / "bundle", NUM_PARAMETERS)
        baseline = baseline_tree(work)
        runs, failures = [], []
        start = time.perf_counter()
        for config in schedule(baseline is not None):
            print(f"[bench_coordinator] {time.perf_counter() - start:4.0f} s: "
                  f"{config.updates} updates, {config.label}",
                  file=sys.stderr, flush=True)  # fmt: skip
            source = baseline if config.code == "before" else None
            try:
                runs.append(run_round(bundle, config, frames, work, source))
            except Exception as e:
                # A wrong answer fails the run, but the other configurations still run and
                # their figures are written (the failure with them, and the exit status).
                print(f"[bench_coordinator] FAILED: {e!r}", file=sys.stderr, flush=True)
                failures.append({**dataclasses.asdict(config), "label": config.label,
                                 "error": repr(e)})  # fmt: skip
        print("[bench_coordinator] the platform's floor (upload_floor.py)", file=sys.stderr,
              flush=True)  # fmt: skip
        floor = [upload_floor(frames, work, keep) for _ in range(REPEATS) for keep in (False, True)]
        decode = decode_cpu_ms(frames[0], baseline)
        print("[bench_coordinator] durable path in-process", file=sys.stderr, flush=True)
        durable = [durable_path(bundle, DURABLE_UPDATES, frames, work, b, rep)
                   for rep in range(REPEATS) for b in (1, 32)]  # fmt: skip
    small = [r["rss_peak_mib"] for r in runs if r["updates"] == SMALL]
    timed_runs = [r for r in runs if r["updates"] != SMALL]
    summary = summarize(timed_runs)
    ratio = ratios(summary)
    large = [r["rss_peak_mib"] for r in timed_runs if r["label"] == Config().label]
    results = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "quick": QUICK,
        "baseline": BASELINE if baseline is not None else None,
        "multi_process": MULTI_PROCESS,
        "num_parameters": NUM_PARAMETERS,
        "codec": CODEC,
        "setup_threads": THREADS,
        "upload_connections": UPLOAD_CONNECTIONS,
        "steer_connections": STEER_CONNECTIONS,
        "runs": runs,
        "failures": failures,
        "summary": summary,
        "ratios": ratio,
        "durable_path": durable,
        "upload_floor": floor,
        "decode_cpu_ms": decode,
        "rss_peak_ratio_vs_10": max(large) / small[0] if large and small else None,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("bench_coordinator-quick.json" if QUICK else "bench_coordinator.json")
    out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out.with_suffix(".png"))
    print_table(summary)
    for label, entry in summary.items():
        if entry["processes"] > 1:
            shares = [
                f"{name} {entry[f'{name}_busiest_share']:.2f}"
                for name in ("uploads", "steered")
                if f"{name}_busiest_share" in entry
            ]
            print(f"{label}: busiest process's share of the server CPU: {', '.join(shares)}")
    print("\nratios (means):")
    for name, value in ratio.items():
        if value is not None:
            print(f"  {name}: {value:.2f}x")
    print("\nthe platform's floor (aiohttp + one durable payload per upload, no database):")
    for f in floor:
        print(f"  {'keep-alive' if f['keep_alive'] else 'new conn  '}: "
              f"{f['uploads_per_s']:6.0f} uploads/s, {f['server_cpu_ms']:.2f} ms server CPU")
    print("\nint8 decode of one update, CPU ms: "
          + ", ".join(f"{k} {v:.3f}" for k, v in decode.items()))
    print("\nin-process, no HTTP (durable path):")
    for d in durable:
        print(f"  batch {d['batch']:>2}: {d['uploads_per_s']:6.1f} uploads/s; per upload "
              f"{d['cpu_ms_per_upload']:.2f} ms CPU, {d['runqueue_ms_per_upload']:.2f} ms "
              f"waiting for a CPU, {d['blocked_ms_per_upload']:.2f} ms blocked")  # fmt: skip
    if results["rss_peak_ratio_vs_10"] is not None:
        print(f"\npeak RSS ratio, {UPDATES:,} vs {SMALL} updates (1 process): "
              f"{results['rss_peak_ratio_vs_10']:.3f}")  # fmt: skip
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"wrote {out} and {out.with_suffix('.png').name}")
    for failure in failures:
        print(f"FAILED: {failure['updates']} updates, {failure['label']}: {failure['error']}")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
