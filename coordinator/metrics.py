"""Prometheus metrics of one coordinator: ``GET /metrics`` (admin token, like every operator call).

Each app gets its own :class:`~prometheus_client.CollectorRegistry` (never the process-global
one), so that several coordinators in one process (tests, the fleet emulator) do not clash.

Two kinds of figures:

* **events counted by this process** (reset at restart, as Prometheus counters are):
  HTTP requests by route and status with their latency, request and response bytes, check-ins
  by outcome, uploads by outcome, coordinator-side ineligibility reasons, commit durations;
  with ``metrics_dir`` (the processes of ``fedge serve --processes K``), summed over every
  process sharing it (:mod:`coordinator.metrics_sharing`), as are refused uploads and the
  figures of the next point;
* **the process's own figures**: the worker queue's depth and the process collectors (CPU,
  memory, file descriptors, GC);
* **figures read from the store at scrape time** (so they agree with it exactly): devices,
  tasks by state, model versions, rounds by state, open rounds, accepted updates and their
  bytes, round durations, database and blob sizes.

A scrape job needs the admin token::

    scrape_configs:
      - job_name: fedge
        authorization: {credentials: <admin token>}
        static_configs: [{targets: ["127.0.0.1:8080"]}]
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections import ChainMap
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from coordinator.metrics_sharing import SharedCounters, SharedRefusals
from coordinator.store import ROUND_DURATION_BOUNDS, RoundDurations
from coordinator.versions import ModelVersions
from edge_sdk.protocol import Route

if TYPE_CHECKING:
    from coordinator.service import Coordinator
    from coordinator.store import Round, Task

__all__ = [
    "METRICS_PATH",
    "OUTCOME",
    "EventReading",
    "ServiceMetrics",
    "StoreFigures",
    "StoreReader",
    "active_devices",
    "checkin_outcome",
]

METRICS_PATH = "/metrics"
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
MAX_REFUSED_KEPT = 100_000
# Upload answers that refuse the update itself (not the caller, not an unknown assignment).
REFUSALS = (400, 409, 413, 422)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A check-in's or an upload's outcome, set where its answer is made (the route, or the error
# middleware: the error code), so that counting it costs no second parse of the answer.
OUTCOME = web.RequestKey("fedge_outcome", str)
_ROUTE = web.RequestKey("fedge_route", str)
# One line per request at DEBUG (``fedge serve --log-level DEBUG``; with ``--log-format json``
# its fields come out as keys). The path, not the query: tokens never travel in queries here.
access_log = logging.getLogger("fedge.access")


@dataclass
class StoreFigures:
    """What a scrape reports from durable state (read on the service's worker thread)."""

    devices: int = 0
    active_devices: int = 0
    tasks_by_state: dict[str, int] = field(default_factory=dict)
    model_versions: dict[str, int] = field(default_factory=dict)  # task_id -> version
    rounds_by_state: dict[tuple[str, str], int] = field(default_factory=dict)  # (mode, state)
    open_rounds: int = 0
    updates: int = 0
    update_bytes: int = 0
    db_bytes: int = 0
    blob_bytes: int = 0
    round_durations: dict[tuple[str, str], RoundDurations] = field(default_factory=dict)


class StoreReader:
    """Reads :class:`StoreFigures` for a scrape; call :meth:`read` on the worker thread.

    Counters and the round-duration histogram must never go down, though retention may
    delete old rounds. Accepted updates, their bytes and the rounds' durations are the
    store's own totals, which count what retention deleted (``tasks.updates_retired``,
    ``update_bytes_retired``, ``retired_round_durations``): every process and replica reads
    the same figures, whatever it saw before (the processes of ``fedge serve --processes K``
    answer the scrapes of one series in turn).
    """

    def __init__(
        self, coord: Coordinator, rounds_of: Callable[[Task], list[Round]] | None = None
    ) -> None:
        self.coord = coord
        # A task's rounds, oldest first: the store's listing, or a cache of it that stays
        # current (the dashboard's, which re-reads a list only when its task moved on).
        self._rounds_of = rounds_of or (lambda task: coord.store.list_rounds(task.task_id))

    def read(self) -> StoreFigures:
        coord, store = self.coord, self.coord.store
        out = StoreFigures(devices=store.count_devices(),
                           active_devices=active_devices(coord, coord.clock.now()))
        for task in store.list_tasks():
            out.tasks_by_state[task.state] = out.tasks_by_state.get(task.state, 0) + 1
            out.model_versions[task.task_id] = task.model_version
            for rnd in self._rounds_of(task):
                key = (task.mode, rnd.state)
                out.rounds_by_state[key] = out.rounds_by_state.get(key, 0) + 1
                if rnd.is_open:
                    out.open_rounds += 1
        out.updates, out.update_bytes = store.accepted_updates()
        out.round_durations = store.round_durations()
        out.db_bytes, out.blob_bytes = storage_bytes(coord)
        return out


def active_devices(coord: Coordinator, now: float) -> int:
    """Devices checking in (what pace steering plans for: among replicas, its estimate of
    the whole population)."""
    return coord.pacing.estimate(now)


def storage_bytes(coord: Coordinator) -> tuple[int, int]:
    """(database as its backend measures it, blob directory) sizes in bytes."""
    db_bytes = coord.store.size_bytes()
    root = coord.blobs.root
    blob_bytes = (
        sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0
    )
    return db_bytes, blob_bytes


class _StoreCollector:
    """Yields the latest :class:`StoreFigures` as metric families."""

    def __init__(self) -> None:
        self.figures = StoreFigures()

    def describe(self) -> list[Metric]:
        return []  # figures change at every scrape: no registration-time description

    def collect(self) -> Iterator[Metric]:
        f = self.figures
        yield _gauge("fedge_devices_registered", "Registered devices", f.devices)
        yield _gauge(
            "fedge_devices_active", "Devices checking in (as paced)", f.active_devices
        )
        tasks = GaugeMetricFamily("fedge_tasks", "Tasks by state", labels=["state"])
        for state, n in sorted(f.tasks_by_state.items()):
            tasks.add_metric([state], n)
        yield tasks
        versions = GaugeMetricFamily(
            "fedge_model_version", "Current model version per task", labels=["task_id"]
        )
        for task_id, v in sorted(f.model_versions.items()):
            versions.add_metric([task_id], v)
        yield versions
        rounds = GaugeMetricFamily(
            "fedge_rounds", "Rounds (async: buffers) by mode and state", labels=["mode", "state"]
        )
        for (mode, state), n in sorted(f.rounds_by_state.items()):
            rounds.add_metric([mode, state], n)
        yield rounds
        yield _gauge("fedge_open_rounds", "Rounds selecting or reporting", f.open_rounds)
        yield CounterMetricFamily(
            "fedge_updates_accepted", "Accepted updates (stored)", value=f.updates
        )
        yield CounterMetricFamily(
            "fedge_update_bytes", "Bytes of accepted update payloads", value=f.update_bytes
        )
        yield _gauge("fedge_db_bytes", "Database file size (with its WAL)", f.db_bytes)
        yield _gauge("fedge_blob_bytes", "Blob directory size", f.blob_bytes)
        yield _round_seconds(f.round_durations)


# Seconds: a round lasts from a few seconds (emulation) to an hour (phones overnight).
_ROUND_LE = [floatToGoString(b) for b in (*ROUND_DURATION_BOUNDS, float("inf"))]


def _round_seconds(durations: Mapping[tuple[str, str], RoundDurations]) -> Metric:
    family = HistogramMetricFamily(
        "fedge_round_duration_seconds",
        "Duration of closed rounds (async: buffers), opening to close, from the store",
        labels=["mode", "outcome"],
    )
    for (mode, outcome), d in sorted(durations.items()):
        family.add_metric(
            [mode, outcome], list(zip(_ROUND_LE, itertools.accumulate(d.counts), strict=True)),
            d.seconds,
        )
    return family


def _ineligible(reasons: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(
        "fedge_checkin_ineligible",
        "Coordinator-side ineligibility of check-ins, by reason",
        labels=["reason"],
    )
    # Counted on the worker thread, read here from others: list() copies it in one C call.
    for reason, n in sorted(list(reasons.items())):
        family.add_metric([reason], n)
    return family


class _Collected:
    """A collector yielding what ``families`` returns at each collection."""

    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self.families = families

    def describe(self) -> list[Metric]:
        return []  # label values change between collections: nothing to declare up front

    def collect(self) -> Iterator[Metric]:
        yield from self.families()


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def route_of(request: web.Request) -> str:
    """The route template (bounded label values), or ``other`` for unmatched paths."""
    known = request.get(_ROUTE)
    if known is not None:
        return known
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None)
    canonical = getattr(resource, "canonical", None)
    return canonical if isinstance(canonical, str) and info.http_exception is None else "other"


class _TimedVersions(ModelVersions):
    """:class:`ModelVersions` that times each commit (server step, blobs, transaction)."""

    def __init__(self, inner: ModelVersions, histogram: Histogram) -> None:
        super().__init__(inner.store, inner.blobs)
        self._histogram = histogram

    def commit_next(self, task: Task, *args: Any, **kwargs: Any) -> int:
        started = time.perf_counter()
        try:
            return super().commit_next(task, *args, **kwargs)
        finally:
            self._histogram.labels(task.mode).observe(time.perf_counter() - started)


_Metric = Counter | Histogram


def checkin_outcome(answer: Mapping[str, Any]) -> str:
    """What a check-in answer counts as: its action, or the reason it is told to wait."""
    return str(answer.get("reason") if answer.get("action") == "wait" else answer.get("action"))


class ServiceMetrics:
    """The registry and instruments of one app; see the module docstring."""

    def __init__(
        self,
        coord: Coordinator,
        queue_depth: Callable[[], int],
        rounds_of: Callable[[Task], list[Round]] | None = None,
    ) -> None:
        self.coord = coord
        # Events counted here (summed over a node's processes where they share a directory);
        # the scrape's registry adds what is read at scrape time.
        self.events = r = CollectorRegistry()
        self.requests = Counter(
            "fedge_http_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "fedge_http_request_duration_seconds",
            "Time to answer a request (handler and queue wait)",
            ["route"],
            registry=r,
        )
        self.bytes_in = Counter(
            "fedge_http_request_bytes", "Request body bytes", ["route"], registry=r
        )
        self.bytes_out = Counter(
            "fedge_http_response_bytes", "Response body bytes", ["route"], registry=r
        )
        self.checkins = Counter(
            "fedge_checkins",
            "Check-ins by outcome: train, evaluate, or the wait reason (or the error code)",
            ["outcome"],
            registry=r,
        )
        self.uploads = Counter(
            "fedge_uploads",
            "Update uploads by outcome: accepted, or the error code",
            ["outcome"],
            registry=r,
        )
        self.commit_seconds = Histogram(
            "fedge_commit_duration_seconds",
            "Time to commit a model version (server optimizer, blobs, transaction)",
            ["mode"],
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        # assignment_id -> error code of its refused upload (the round page's late/refused);
        # bounded: the oldest entries go first.
        self._refused: dict[str, str] = {}
        self._refusals = 0
        # (id of one of the instruments above, label values) -> its child; as bounded as
        # the label values themselves.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r.register(_Collected(lambda: [_ineligible(coord.ineligible_reasons)]))
        self.shared: SharedCounters | None = None
        self.shared_refusals: SharedRefusals | None = None
        if coord.config.metrics_dir is not None:
            shared = Path(coord.config.metrics_dir)
            shared.mkdir(parents=True, exist_ok=True)  # the first of the processes makes it
            self.shared = SharedCounters(shared, self.events)
            self.shared_refusals = SharedRefusals(shared, MAX_REFUSED_KEPT, self._refused)

        self.registry = r = CollectorRegistry()
        # A process's own figures: the node's sum where its processes share a directory
        # (a scrape would otherwise report whichever process answered, and Prometheus read
        # its CPU counter going down as a reset).
        own = self.events if self.shared is not None else r
        ProcessCollector(registry=own)
        GCCollector(registry=own)
        self.queue = _QueueGauge(queue_depth)
        own.register(self.queue)
        PlatformCollector(registry=r)  # the same on every process
        r.register(_Collected(self.event_families))
        self.reader = StoreReader(coord, rounds_of)
        self.store_figures = _StoreCollector()
        r.register(self.store_figures)
        coord.ctx.versions = _TimedVersions(coord.ctx.versions, self.commit_seconds)

    # -- HTTP -------------------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        route = request[_ROUTE] = route_of(request)
        status = 500
        resp: web.StreamResponse | None = None
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            elapsed = time.perf_counter() - started
            # Bounded like the route: aiohttp's pure-Python parser takes any token as a method.
            method = request.method if request.method in hdrs.METH_ALL else "other"
            self._child(self.requests, method, route, str(status)).inc()
            self._child(self.latency, route).observe(elapsed)
            if access_log.isEnabledFor(logging.DEBUG):
                access_log.debug(
                    "%s %s %d %.1f ms", request.method, request.path, status, elapsed * 1000,
                    extra={"method": request.method, "route": route, "status": status,
                           "duration_ms": round(elapsed * 1000, 3)},
                )
            # What arrived, not what Content-Length claimed: a request refused before its
            # body is read (401, 413) adds no bytes, and a chunked one counts its body.
            received = request.content.total_bytes
            if received:
                self._child(self.bytes_in, route).inc(received)
            if resp is not None:
                self._outcomes(request, route, resp)

    def on_response_prepare(self, request: web.Request, resp: web.StreamResponse) -> None:
        """Counts response bytes once headers are final (file responses set them late)."""
        # A HEAD answer announces the body's length and sends none of it.
        if request.method != "HEAD" and resp.content_length:
            self._child(self.bytes_out, route_of(request)).inc(resp.content_length)

    def _outcomes(self, request: web.Request, route: str, resp: web.StreamResponse) -> None:
        if route not in (Route.CHECKIN, Route.ASSIGNMENT_UPDATE):
            return
        outcome = request.get(OUTCOME) or str(resp.status)
        self._child(self.checkins if route == Route.CHECKIN else self.uploads, outcome).inc()
        if route == Route.ASSIGNMENT_UPDATE and resp.status in REFUSALS:
            assignment_id = request.match_info["assignment_id"]
            self._refused[assignment_id] = outcome
            self._refusals += 1
            if self.shared_refusals is not None:
                self.shared_refusals.record(assignment_id, outcome)
            while len(self._refused) > MAX_REFUSED_KEPT:
                del self._refused[next(iter(self._refused))]

    def _child(self, metric: _Metric, *labels: str) -> Any:
        """``metric.labels(*labels)``, memoised: prometheus_client validates and converts the
        values and takes a lock on every call, and every request makes four or five."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def refused_uploads(self) -> Mapping[str, str]:
        """assignment_id -> error code, for uploads refused since this process started (and,
        sharing a directory, by the other processes of the node: read on the worker thread).

        A read-only view, not a copy (it may hold 10^5 entries): look entries up, do not
        iterate it from another thread while requests run."""
        if self.shared_refusals is None:
            return MappingProxyType(self._refused)
        return MappingProxyType(ChainMap(self._refused, self.shared_refusals.theirs()))

    @property
    def refusals(self) -> int:
        """Refused uploads counted so far, as of the last :meth:`refused_uploads` (a change
        tells caches to refresh)."""
        theirs = 0 if self.shared_refusals is None else self.shared_refusals.count
        return self._refusals + theirs

    def publish(self) -> None:
        """With a shared directory: this process's counters and refusals, for the others."""
        if self.shared is not None:
            self.shared.publish()
        if self.shared_refusals is not None:
            self.shared_refusals.flush()

    def close(self) -> None:
        """Publishes for the last time (a clean stop keeps this process's counts)."""
        with contextlib.suppress(OSError):
            self.publish()
        if self.shared_refusals is not None:
            self.shared_refusals.close()

    # -- scrape -----------------------------------------------------------------------------

    def render(self, figures: StoreFigures) -> bytes:
        self.store_figures.figures = figures
        return generate_latest(self.registry)

    def event_families(self) -> list[Metric]:
        """The events counted: by this process, or by every process sharing its directory."""
        return list(self.events.collect()) if self.shared is None else self.shared.families()

    def queue_depth(self) -> float:
        """The worker queue's depth: this process's now, and (sharing a directory) the other
        live processes' as they last published it. ``queue_depth``, the callable given, leaves
        out the operation asking when asked on the worker thread: a view there publishes
        this process's share, which must not count the view itself."""
        own = self.queue.depth()
        if self.shared is None:
            return own
        return own + sum(
            s.value
            for family in self.shared.others()
            for s in family.samples
            if s.name == _QueueGauge.NAME
        )

    def reading(self) -> EventReading:
        """The event counters as of now, read once (with a shared directory a reading
        publishes this process's share and reads every other's: a dashboard view that
        needs several figures takes one)."""
        return EventReading(self.event_families())


@dataclass(frozen=True)
class EventReading:
    """Figures of one reading of the event counters."""

    families: list[Metric]

    def labelled(self, sample: str, label: str) -> dict[str, float]:
        """``{label value: sample value}`` of one of the event counters."""
        return {
            s.labels[label]: s.value
            for family in self.families
            for s in family.samples
            if s.name == sample and label in s.labels
        }

    def request_table(self) -> list[dict[str, Any]]:
        """Per route: requests, errors (status >= 400), mean and p95 latency (from buckets)."""
        rows: dict[str, dict[str, Any]] = {}
        buckets: dict[str, list[tuple[float, float]]] = {}
        for family in self.families:
            for s in family.samples:
                route = s.labels.get("route")
                if route is None:
                    continue
                row = rows.setdefault(route, {"route": route, "requests": 0.0, "errors": 0.0,
                                              "seconds": 0.0})
                if s.name == "fedge_http_requests_total":
                    row["requests"] += s.value
                    if int(s.labels["status"]) >= 400:
                        row["errors"] += s.value
                elif s.name == "fedge_http_request_duration_seconds_sum":
                    row["seconds"] += s.value
                elif s.name == "fedge_http_request_duration_seconds_bucket":
                    buckets.setdefault(route, []).append((float(s.labels["le"]), s.value))
        out = []
        for route, row in sorted(rows.items()):
            n = row["requests"]
            out.append({
                "route": route,
                "requests": int(n),
                "errors": int(row["errors"]),
                "mean_s": row["seconds"] / n if n else None,
                "p95_s": _quantile(sorted(buckets.get(route, [])), 0.95),
            })
        return out


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The upper bound of the first bucket holding the q-quantile (None without samples)."""
    if not buckets or buckets[-1][1] == 0:
        return None
    want = q * buckets[-1][1]
    for le, count in buckets:
        if count >= want:
            return None if le == float("inf") else le
    return None


class _QueueGauge:
    NAME = "fedge_queue_depth"

    def __init__(self, depth: Callable[[], int]) -> None:
        self.depth = depth

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield _gauge(
            self.NAME, "Operations waiting for the service's worker thread", self.depth()
        )


CONTENT_TYPE = CONTENT_TYPE_LATEST
