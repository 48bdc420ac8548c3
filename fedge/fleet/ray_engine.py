"""The parts of a fleet as tasks on a Ray cluster: one fleet over several machines.

:class:`RayEngine` is the :class:`~fedge.fleet.processes.Engine` for
:class:`~fedge.fleet.processes.ProcessFleet` when one machine is not enough. Each
:class:`~fedge.fleet.processes.Part` becomes one Ray task (``cpus_per_part`` logical CPUs,
never retried: a part that failed once would register its devices again) running
:func:`~fedge.fleet.processes.run_part`. One small actor, the board, holds what the parts
tell the driver and the one thing the driver tells them: each part reports its running
summary to it and reads its stop flag about twice a second; :meth:`RayEngine.stop` raises
the flag and gathers the tasks' final summaries.

Where Ray comes from: ``RayEngine(address)`` joins a running cluster (``ray start --head`` on
one machine, ``ray start --address HEAD:6379`` on the others, then ``address="HEAD:6379"`` or
``"auto"`` on a cluster node); without an address it starts a private Ray on this machine and
shuts it down again in :meth:`~RayEngine.stop`. In a process where Ray is initialised already,
the engine runs on that Ray (left running), given no address or that cluster's; another
cluster's address is a :class:`ClusterError`. Either way the parts' CPUs must be free on the
cluster when the engine starts (a part waiting for CPUs would run unseen): else a
:class:`ClusterError` naming the CPUs needed and free. Ray is imported only here and only
when an engine starts (``pip install 'fedge[cluster]'``); devices and the rest of fedge
never need it.

What every node needs: this project importable by the Python that runs Ray's workers (the
same ``pip install 'fedge[edge,fleet,cluster]'`` on each machine, or a ``runtime_env``
passed to the engine), the coordinator's URL reachable from it (not ``127.0.0.1``), and any
path the fleet names (``--partitions``, ``--state-dir``) present on it. A fleet without a
state directory gives each part a temporary one on its own node.

Time: parts read one emulated clock from :meth:`SimClock.spec
<fedge.fleet.clock.SimClock.spec>`, whose origin is a reading of the driver host's
``time.monotonic``. That is exact for every part on the driver's host and meaningless on
another (each machine's monotonic clock starts at its own boot). A part on another host
re-derives the origin through the wall clock (:class:`HostClock`), so its emulated time is off
by the two machines' wall-clock offset times the speedup; NTP keeps the offset to
milliseconds at speedup 1, but nothing bounds it in general, and at speedup 100 a 50 ms offset
moves devices 5 emulated seconds against the round deadlines and pace-steering times the
coordinator computes on the same clock. So a fleet whose parts span hosts must run at
speedup 1 (:class:`ClockError` otherwise), checked on the cluster's nodes before any part
starts and again by each part where it lands.

Usage::

    fleet = ProcessFleet(url, DigitsWindows(size=8), devices=50_000, processes=8,
                         engine=RayEngine("head.example:6379"), enrollment_token=token)
    summary = fleet.run(emulated_s=600)
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import math
import os
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedge.fleet.emulator import FleetSummary
from fedge.fleet.processes import Part, parts_failed, run_part

__all__ = ["ClockError", "ClusterError", "HostClock", "RayEngine", "RayUnavailable", "import_ray"]

# The parts exchange only small summaries; Ray's default store would claim 30 % of the RAM.
_LOCAL_OBJECT_STORE_BYTES = 80 * 1024 * 1024
_BOARD_TIMEOUT_S = 10.0
_FREE_CPUS_WAIT_S = 3.0


class RayUnavailable(ImportError):
    """Ray is not installed where the fleet's driver runs."""


class ClusterError(ValueError):
    """The Ray cluster cannot run the fleet as asked (too few CPUs, hosts apart in time)."""


class ClockError(ClusterError):
    """The fleet's clock cannot be read alike on every host its parts run on."""


def import_ray() -> Any:
    """The ``ray`` module, or :class:`RayUnavailable` saying how to get it."""
    try:
        import ray
    except ImportError as e:
        raise RayUnavailable(
            "the Ray engine needs Ray on this machine: pip install 'fedge[cluster]'"
        ) from e
    return ray


@dataclass(frozen=True)
class HostClock:
    """A fleet clock's spec as a part on any host reads it (see the module docstring).

    ``spec`` is valid as it is on ``host``; ``wall_origin`` is the wall-clock time at which
    ``host``'s monotonic clock read the spec's origin.
    """

    spec: tuple[float, float, float]
    host: str
    wall_origin: float

    @classmethod
    def on(cls, spec: tuple[float, float, float], host: str) -> HostClock:
        return cls(spec, host, time.time() - (time.monotonic() - spec[2]))

    def check(self, hosts: Iterable[str]) -> None:
        """:class:`ClockError` if parts on ``hosts`` could not read this clock alike."""
        others = sorted(set(hosts) - {self.host})
        if others and self.spec[0] != 1.0:
            raise ClockError(
                f"the fleet runs at speedup {self.spec[0]:g} but the Ray cluster spans hosts "
                f"{[self.host, *others]}: across machines the emulated clock is only as close "
                "as their wall clocks times the speedup; run such a fleet at speedup 1 "
                "(or its parts on one host)"
            )

    def spec_on(self, host: str) -> tuple[float, float, float]:
        """The spec for a :class:`~fedge.fleet.clock.SimClock` on ``host``."""
        if host == self.host:
            return self.spec
        self.check([host])
        speedup, start, _ = self.spec
        return (speedup, start, time.monotonic() - (time.time() - self.wall_origin))


class _Board:
    """The Ray actor between the driver and the parts: latest summaries and the stop flag."""

    def __init__(self, parts: int) -> None:
        self._latest: list[FleetSummary | None] = [None] * parts
        self._stopping = False

    def report(self, index: int, summary: FleetSummary) -> None:
        self._latest[index] = summary

    def latest(self) -> list[FleetSummary | None]:
        return self._latest

    def stopping(self) -> bool:
        return self._stopping

    def request_stop(self) -> None:
        self._stopping = True


def _part_task(part: Part, position: int, board: Any, clock: HostClock) -> FleetSummary:
    """The body of one part's Ray task, on whichever node Ray placed it."""
    import ray

    part = dataclasses.replace(part, clock=clock.spec_on(ray.util.get_node_ip_address()))
    # Calls from one caller to an actor run in order: reports need no answer.
    return run_part(part, lambda s: board.report.remote(position, s),
                    lambda: bool(ray.get(board.stopping.remote(), timeout=_BOARD_TIMEOUT_S)))


def _check_answers(address: str, timeout_s: float = 5.0) -> None:
    """:class:`ClusterError` unless something listens at a ``HOST:PORT`` (or ``ray://``)
    address: ``ray.init`` retries an address nobody serves for minutes before it gives up."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterError(f"no Ray cluster answers at {address} ({e})") from e


def _same_cluster(address: str, gcs_address: str, node_ip: str) -> bool:
    """Whether an engine's ``address`` names the cluster whose GCS Ray reports at
    ``gcs_address`` (``HOST:PORT``); ``node_ip``: this host's address in the cluster, which
    a loopback name also means."""
    if address == "auto":
        return True  # the cluster of this node, whichever it is
    client = address.startswith("ray://")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    gcs_host, _, gcs_port = gcs_address.rpartition(":")
    # A Ray client's port is its server's, not the GCS's: its host must match.
    if not host or (not client and port != gcs_port):
        return False
    return bool(_host_addresses(host, node_ip) & _host_addresses(gcs_host, node_ip))


def _host_addresses(host: str, node_ip: str) -> set[str]:
    name = host.strip("[]")
    try:
        found = {str(info[4][0]) for info in socket.getaddrinfo(name, None)}
    except OSError:
        return {name}
    if any(ipaddress.ip_address(a.partition("%")[0]).is_loopback for a in found):
        found.add(node_ip)
    return found


def _failure(error: Exception) -> str:
    cause = getattr(error, "cause", None)  # a RayTaskError carries the part's own exception
    return repr(cause if isinstance(cause, BaseException) else error)


class RayEngine:
    """Each part a Ray task (see the module docstring).

    ``address``: a running cluster's (``"HOST:6379"``, ``"auto"``, ``"ray://HOST:10001"``);
    None starts a private local Ray with ``num_cpus`` logical CPUs (default: enough for every
    part). ``cpus_per_part``: the logical CPUs each part's task holds. ``runtime_env``: Ray's
    per-task environment (e.g. ``{"pip": [...]}``) where the nodes do not have fedge
    installed. ``stop_timeout_s``: how long :meth:`stop` waits for the parts' finals.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: int | None = None,
        cpus_per_part: float = 1.0,
        runtime_env: Mapping[str, Any] | None = None,
        stop_timeout_s: float = 120.0,
    ) -> None:
        if not cpus_per_part > 0:
            raise ValueError(f"cpus_per_part must be > 0, got {cpus_per_part}")
        if num_cpus is not None and num_cpus < 1:
            raise ValueError(f"num_cpus must be at least 1, got {num_cpus}")
        self.address = address
        self.num_cpus = num_cpus
        self.cpus_per_part = float(cpus_per_part)
        self.runtime_env = dict(runtime_env) if runtime_env is not None else None
        self.stop_timeout_s = stop_timeout_s
        self._ray: Any = None
        self._owns_ray = False
        self._board: Any = None
        self._refs: list[Any] = []
        self._parts: list[Part] = []
        self._latest: list[FleetSummary | None] = []
        self._finals: dict[int, FleetSummary] | None = None
        self._error: RuntimeError | None = None

    # -- the Engine protocol ----------------------------------------------------------------

    def start(self, parts: Sequence[Part]) -> None:
        if self._parts:
            raise RuntimeError("this engine already ran a fleet")
        if not parts:
            raise ValueError("no parts to run")
        ray = self._connect(len(parts))
        try:
            self._check_cpus(ray, len(parts))
            clock = HostClock.on(parts[0].clock, ray.util.get_node_ip_address())
            clock.check(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
            options: dict[str, Any] = {}
            if self.runtime_env is not None:
                options["runtime_env"] = self.runtime_env
            self._board = ray.remote(_Board).options(num_cpus=0, **options).remote(len(parts))
            task = ray.remote(_part_task)
            self._refs = [
                task.options(name=f"fedge-fleet-part-{p.index}", num_cpus=self.cpus_per_part,
                             max_retries=0, **options).remote(p, k, self._board, clock)
                for k, p in enumerate(parts)
            ]
        except BaseException:
            self._disconnect()
            raise
        self._parts = list(parts)
        self._latest = [None] * len(parts)

    def latest(self) -> list[FleetSummary | None]:
        if self._finals is not None:
            return [self._finals.get(k, s) for k, s in enumerate(self._latest)]
        if self._board is not None:
            # The board gone or slow: keep the last reports (alive() tells why).
            with contextlib.suppress(self._ray.exceptions.RayError):
                self._latest = list(self._ray.get(self._board.latest.remote(),
                                                  timeout=_BOARD_TIMEOUT_S))
        return list(self._latest)

    def alive(self) -> bool:
        """False once any part's task ended (before :meth:`stop`, only a failure ends one)."""
        if self._finals is not None or not self._refs:
            return self._finals is None
        ended, _ = self._ray.wait(self._refs, num_returns=len(self._refs), timeout=0,
                                  fetch_local=False)
        return not ended

    def stop(self) -> list[FleetSummary]:
        if not self._parts:
            return []
        if self._finals is None:
            try:
                self._finals, self._error = self._gather()
            finally:  # a private Ray must not outlive a gather that failed or was interrupted
                self._disconnect()
        if self._error is not None:
            raise self._error
        return [self._finals[k] for k in range(len(self._parts))]

    # -- helpers ----------------------------------------------------------------------------

    def _check_cpus(self, ray: Any, parts: int) -> None:
        """:class:`ClusterError` unless the cluster's free CPUs hold every part at once: a
        part that waits for CPUs busy elsewhere would not run, and nothing would say so
        until :meth:`stop` found it without a summary."""
        need = parts * self.cpus_per_part
        total = float(ray.cluster_resources().get("CPU", 0.0))
        free = float(ray.available_resources().get("CPU", 0.0))
        # Ray's view of the free CPUs follows the nodes' reports by a moment (a node that
        # just joined, a task that just ended): a short wait before refusing.
        deadline = time.monotonic() + _FREE_CPUS_WAIT_S
        while total >= need > free and time.monotonic() < deadline:
            time.sleep(0.1)
            free = float(ray.available_resources().get("CPU", 0.0))
        ask = f"{parts} parts of {self.cpus_per_part:g} CPUs need {need:g} CPUs"
        if need > total:
            raise ClusterError(f"{ask}; the Ray cluster has {total:g}")
        if need > free:
            raise ClusterError(f"{ask}; only {free:g} of the Ray cluster's {total:g} are free "
                               "(the others are held by other work)")

    def _connect(self, parts: int) -> Any:
        ray = self._ray = import_ray()
        if ray.is_initialized():
            # The caller's Ray session (theirs to shut down), if it is the one asked for.
            joined = ray.get_runtime_context().gcs_address
            if self.address is not None and not _same_cluster(
                self.address, joined, ray.util.get_node_ip_address()
            ):
                raise ClusterError(
                    f"Ray is already initialised in this process, on the cluster at {joined}, "
                    f"not at {self.address}: call ray.shutdown() first, or give the engine "
                    "no address to run on that cluster"
                )
            return ray
        if self.address is None:
            # A Ray this engine starts for itself sends no usage reports anywhere.
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            cpus = self.num_cpus or math.ceil(parts * self.cpus_per_part)
            ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                     object_store_memory=_LOCAL_OBJECT_STORE_BYTES, log_to_driver=False,
                     logging_level=logging.WARNING)
        else:
            _check_answers(self.address)
            try:
                ray.init(address=self.address, log_to_driver=False,
                         logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ClusterError(f"cannot join the Ray cluster at {self.address}: {e}") from e
        self._owns_ray = True
        return ray

    def _gather(self) -> tuple[dict[int, FleetSummary], RuntimeError | None]:
        ray = self._ray
        if self._board is not None:
            # No board: the parts cannot see the flag and end on the deadline below, as failures.
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(self._board.request_stop.remote(), timeout=_BOARD_TIMEOUT_S)
        ended, _ = ray.wait(self._refs, num_returns=len(self._refs),
                            timeout=self.stop_timeout_s)
        finals: dict[int, FleetSummary] = {}
        errors: list[str] = []
        missing: list[int] = []
        for k, (part, ref) in enumerate(zip(self._parts, self._refs, strict=True)):
            if ref not in ended:
                ray.cancel(ref, force=True)
                errors.append(f"part {part.index}: no final summary within "
                              f"{self.stop_timeout_s:g} s")
                missing.append(part.index)
                continue
            try:
                finals[k] = ray.get(ref)
            except ray.exceptions.RayError as e:
                errors.append(f"part {part.index}: {_failure(e)}")
                missing.append(part.index)
        return finals, (parts_failed(missing, errors) if missing else None)

    def _disconnect(self) -> None:
        ray = self._ray
        if ray is None:
            return
        if self._board is not None:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.kill(self._board)
            self._board = None
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False
