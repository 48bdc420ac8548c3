"""One fleet split over several processes (or, through an engine, over machines).

A single process runs a few thousand devices before its one core and its GIL are the limit
(docs/benchmarks.md, "Fleet"); :class:`ProcessFleet` cuts devices ``0..N-1`` into contiguous
parts and runs each part as an ordinary :class:`~fedge.fleet.emulator.Fleet` with
``first_index`` set, so device ``i`` has the same heterogeneity profile, seed, data and fates
as in a one-process fleet. Parts share nothing but the coordinator's URL, the fleet clock (by
its :meth:`~fedge.fleet.clock.SimClock.spec`) and the state root if one is given (device
``i``'s state in ``device-i`` there, as in one process, whatever the split; each part its own
bundle cache, ``bundles-part-k``: bundle caches lock per process; without a root, each part
makes and removes a temporary directory on the host it runs on). Each part reports its running
:class:`~fedge.fleet.emulator.FleetSummary` about twice a second; the fleet's summary adds
them up.

Where the parts run is an :class:`Engine` (start, latest, alive, stop), with :func:`run_part`
as every engine's worker body. :class:`ProcessEngine` starts one spawned process per part on
this machine (spawned, not forked: a fresh interpreter that imports no torch and inherits no
threads). :class:`~fedge.fleet.ray_engine.RayEngine` runs each part as a Ray task on a
cluster of machines, reports and the stop flag passing through one actor. Any engine must
give each part a clock reading the same emulated time: the clock's spec is exact between
processes of one host; across hosts ``time.monotonic`` origins differ, which the Ray engine
handles by re-deriving the origin from the wall clock, at speedup 1 only (see
:mod:`fedge.fleet.ray_engine`).

Usage::

    fleet = ProcessFleet(url, DigitsWindows(size=8), devices=50_000, processes=4,
                         heterogeneity=Heterogeneity.realistic(start_hour=14),
                         enrollment_token=token)
    summary = fleet.run(emulated_s=600)
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import multiprocessing
import multiprocessing.connection
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_sdk.client import ClientConfig
from edge_sdk.tls import TlsConfig
from fedge.fleet.clock import SimClock
from fedge.fleet.emulator import Fleet, FleetSummary
from fedge.fleet.heterogeneity import Heterogeneity
from fedge.fleet.running import FleetRun
from fedge.fleet.runtime import TORCH_FREE_BACKENDS, import_ort_without_training
from fedge.fleet.sources import DataSource

__all__ = [
    "Engine", "Part", "PartsFailed", "ProcessEngine", "ProcessFleet", "merge_summaries",
    "parts_failed",
    "run_part",
]

_REPORT_EVERY_S = 0.5


@dataclass(frozen=True)
class Part:
    """What one part of a fleet needs to run anywhere (picklable): devices
    ``first..first+count-1`` from ``data``, and the fleet's settings as keyword arguments of
    :class:`~fedge.fleet.emulator.Fleet` (``clock`` as a :meth:`SimClock.spec`)."""

    index: int
    first: int
    count: int
    data: DataSource
    coordinator: str
    clock: tuple[float, float, float]
    options: dict[str, Any]


def run_part(part: Part, report: Callable[[FleetSummary], None],
             stop: Callable[[], bool]) -> FleetSummary:
    """Run one part until ``stop()`` holds, calling ``report`` with its summary meanwhile;
    returns the final summary. The body of every engine's worker."""
    backend = part.options.get("client_config", ClientConfig()).backend
    if backend in TORCH_FREE_BACKENDS:
        import_ort_without_training()  # before the data source imports anything heavier
    fleet = Fleet(part.coordinator, part.data(part.first, part.count), clock=SimClock(*part.clock),
                  first_index=part.first, **part.options)
    try:
        fleet.start()
        while not stop() and fleet.alive():
            report(fleet.summary())
            time.sleep(_REPORT_EVERY_S)
    except BaseException:
        # A part that fails (its engine's report or stop call raising, an interrupt) stops
        # its devices too: an engine's worker process may outlive the part (Ray reuses its
        # workers), and they would go on checking in.
        with contextlib.suppress(Exception):
            fleet.stop()
        raise
    else:
        return fleet.stop()
    finally:
        fleet.close()


class Engine(Protocol):
    """Runs the parts of a fleet somewhere (see the module docstring)."""

    def start(self, parts: Sequence[Part]) -> None: ...

    def latest(self) -> list[FleetSummary | None]:
        """Each part's most recent summary (None before its first report)."""
        ...

    def alive(self) -> bool:
        """False when a part ended on its own (it failed)."""
        ...

    def stop(self) -> list[FleetSummary]:
        """Stop every part and return their final summaries."""
        ...


class PartsFailed(RuntimeError):
    """Parts of a fleet ended without a final summary (each one's reason in the message)."""


def parts_failed(missing: Sequence[int], errors: Sequence[str]) -> PartsFailed:
    """What an engine's ``stop`` raises when parts gave no final summary: its own class, so
    that the command can report it as a user-facing error rather than a bug's traceback."""
    return PartsFailed(f"fleet parts {list(missing)} failed: {'; '.join(errors)}")


def _process_main(part: Part, conn: multiprocessing.connection.Connection) -> None:
    # Ctrl-C in a terminal interrupts the whole process group, the parts too: the driver
    # owns the stop (it sends one, or its end of the pipe closes), so a part ignores SIGINT
    # rather than dying of it without its final summary.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        final = run_part(part, lambda s: conn.send(("progress", s)), conn.poll)
    except BaseException as e:
        conn.send(("error", f"part {part.index}: {e!r}"))
        raise
    conn.send(("final", final))


class ProcessEngine:
    """One spawned process per part, on this machine."""

    def __init__(self) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: list[Any] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        self._latest: list[FleetSummary | None] = []
        self._finals: dict[int, FleetSummary] = {}
        self._errors: dict[int, str] = {}  # by part: what the part said before it ended

    def start(self, parts: Sequence[Part]) -> None:
        for part in parts:
            ours, theirs = self._ctx.Pipe()
            proc = self._ctx.Process(target=_process_main, args=(part, theirs),
                                     name=f"fedge-fleet-part-{part.index}", daemon=True)
            proc.start()
            theirs.close()
            self._procs.append(proc)
            self._conns.append(ours)
            self._latest.append(None)

    def _drain(self, i: int, timeout_s: float = 0.0) -> None:
        conn = self._conns[i]
        try:
            while i not in self._finals and conn.poll(timeout_s):
                kind, value = conn.recv()
                if kind == "progress":
                    self._latest[i] = value
                elif kind == "final":
                    self._finals[i] = self._latest[i] = value
                else:
                    self._errors[i] = value
                    return
        except (EOFError, OSError):
            return  # the process is gone: alive() and stop() report it

    def latest(self) -> list[FleetSummary | None]:
        for i in range(len(self._conns)):
            self._drain(i)
        return list(self._latest)

    def alive(self) -> bool:
        return not self._errors and all(p.is_alive() for p in self._procs)

    def stop(self) -> list[FleetSummary]:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send("stop")
        deadline = time.monotonic() + 120.0
        for i, proc in enumerate(self._procs):
            while i not in self._finals and proc.is_alive() and time.monotonic() < deadline:
                self._drain(i, timeout_s=0.5)
            self._drain(i)
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
            self._conns[i].close()
        missing = [i for i in range(len(self._procs)) if i not in self._finals]
        for i in missing:
            # A process that died without a word (SIGKILL, the OOM killer) said nothing: its
            # exit is the only reason there is.
            self._errors.setdefault(i, f"part {i}: its process ended without a final summary "
                                       f"({_exit(self._procs[i].exitcode)})")
        if missing or self._errors:
            raise parts_failed(missing, [self._errors[i] for i in sorted(self._errors)])
        return [self._finals[i] for i in range(len(self._procs))]


def _exit(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def merge_summaries(parts: Sequence[FleetSummary]) -> FleetSummary:
    """One summary for the whole fleet: counts add up; times are the longest part's; the lag
    percentiles are the worst part's (an upper bound on the fleet's)."""
    if not parts:
        raise ValueError("no summaries to merge")
    merged: dict[str, Any] = {}
    for f in dataclasses.fields(FleetSummary):
        values = [getattr(s, f.name) for s in parts]
        if f.name in ("emulated_s", "wall_s", "lag_p50_s", "lag_p95_s"):
            merged[f.name] = max(values)
        elif f.name == "speedup":
            merged[f.name] = values[0]
        else:
            merged[f.name] = int(np.sum(values))
    return FleetSummary(**merged)


class ProcessFleet(FleetRun):
    """Devices ``0..devices-1`` of ``data`` in ``processes`` parts (see the module docstring;
    no more parts than devices).

    Takes :class:`~fedge.fleet.emulator.Fleet`'s keyword arguments (but ``progress`` and
    ``attacks``); ``devices`` defaults to the data source's size; ``engine`` defaults to a
    :class:`ProcessEngine`.
    """

    def __init__(
        self,
        coordinator: str,
        data: DataSource,
        *,
        devices: int | None = None,
        processes: int = 2,
        engine: Engine | None = None,
        heterogeneity: Heterogeneity | None = None,
        seed: int = 0,
        clock: SimClock | None = None,
        state_root: Path | str | None = None,
        backend: str | None = "ort-step",
        step_time_s: float | None = None,
        workers: int | None = None,
        start_spread_s: float = 5.0,
        rejoin_s: float = 300.0,
        client_config: ClientConfig | None = None,
        enrollment_token: str | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        n = data.devices if devices is None else devices
        if n is None:
            raise ValueError("this data source holds any number of devices: give devices=")
        if n < 1 or processes < 1:
            raise ValueError("a fleet needs at least one device and one process")
        if data.devices is not None and n > data.devices:
            raise ValueError(f"the data source holds {data.devices} devices, not {n}")
        self.clock = clock or SimClock()
        config = client_config or ClientConfig(backend=backend)
        if config.backend is None and backend is not None:
            config = dataclasses.replace(config, backend=backend)
        options: dict[str, Any] = {
            "heterogeneity": heterogeneity, "seed": seed, "step_time_s": step_time_s,
            "workers": workers, "start_spread_s": start_spread_s, "rejoin_s": rejoin_s,
            "client_config": config, "enrollment_token": enrollment_token, "tls": tls,
        }
        bounds = np.linspace(0, n, min(processes, n) + 1).astype(int)
        # Without a root each part's Fleet makes (and removes) a temporary one where it runs:
        # a path made here would not exist on another machine, nor be cleaned up there. With
        # one, every part keeps its devices in it (device-INDEX, by global index: where one
        # fleet, or a split into any number of parts, finds them again) and its bundle cache
        # apart (a cache serves one process).
        root = None if state_root is None else Path(state_root)
        self.parts = [
            Part(k, int(a), int(b - a), data, coordinator, self.clock.spec(),
                 {**options, "state_root": root,
                  "cache_root": None if root is None else root / f"bundles-part-{k:03d}"})
            for k, (a, b) in enumerate(itertools.pairwise(bounds))
        ]
        self.devices = n
        self.engine: Engine = engine or ProcessEngine()
        self._started = False
        self._final: FleetSummary | None = None

    def start(self) -> None:
        if self._started:
            raise RuntimeError("the fleet is already running")
        self._started = True
        self.engine.start(self.parts)

    def alive(self) -> bool:
        return self.engine.alive()

    def ready(self) -> bool:
        return all(s is not None for s in self.engine.latest())

    def stop(self) -> FleetSummary:
        if self._final is None:
            self._final = merge_summaries(self.engine.stop())
        return self._final

    def summary(self) -> FleetSummary:
        """The sum of the parts' latest reports (parts not yet reporting count as zero)."""
        if self._final is not None:
            return self._final
        reports = [s for s in self.engine.latest() if s is not None]
        if not reports:
            return dataclasses.replace(_EMPTY, devices=self.devices, speedup=self.clock.speedup)
        merged = merge_summaries(reports)
        return dataclasses.replace(merged, devices=self.devices)

    def close(self) -> None:
        """Nothing to remove: each part removes its own temporary state where it ran."""

    def __enter__(self) -> ProcessFleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_EMPTY = FleetSummary(**{f.name: 0 for f in dataclasses.fields(FleetSummary)})

