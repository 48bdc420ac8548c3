"""Event counters summed over the serving processes of one node (``fedge serve --processes K``).

Owns the files in which each process publishes the counters and histograms it keeps in
memory, and their sum. The kernel hands each connection to one of the K processes, so a
scrape reaches one of them: without the sum, each scrape would report a different process's
counts and Prometheus would read every change of process as a counter reset.

Each process writes its snapshot to a file of its own in a directory the processes share
(the supervisor makes one per run and removes it at the end): at every scrape of it, and
every ``interval_s`` from a task on its event loop (an unchanged one is only touched). A
scrape of any process publishes its own snapshot, then sums every file: a sibling's figures
are at most ``interval_s`` old. The counts in a file only ever grow, a process that died
keeps its file (its replacement writes a new one), so the sum never goes down between two
scrapes, whichever processes answer them.

Gauges (a process's memory, open files, the worker queue's depth) are summed over the live
processes only: those whose file was written or touched within ``STALE_AFTER`` intervals.
A start time, like a series' creation time, is the earliest; a limit (``process_max_fds``)
the smallest.

The dashboard's refused uploads (assignment id -> error code, which its funnel and round
pages read) are shared too, as one append-only log per process (:class:`SharedRefusals`):
a map of up to 10^5 entries is too large to rewrite every few seconds.

Imports prometheus_client and the standard library only; nothing of the service.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

__all__ = ["INTERVAL_S", "STALE_AFTER", "SharedCounters", "SharedRefusals"]

log = logging.getLogger("fedge.metrics")

# Prometheus scrapes every 15 s or so, the dashboard polls every 2 s: a sibling's share this
# old is current enough, and a process's snapshot of a few hundred series costs milliseconds.
INTERVAL_S = 2.0
# A file not written or touched for this many intervals is a dead process's: its gauges are
# no longer the node's (its counts still are).
STALE_AFTER = 3
_SUFFIX = ".json"
_REFUSALS = ".refused"
# A creation or start time is when the first process made the series or started, not a sum.
_CREATED = "_created"
_EARLIEST = frozenset({"process_start_time_seconds"})
# The node can open as many files as its tightest process.
_SMALLEST = frozenset({"process_max_fds"})

_Key = tuple[str, tuple[tuple[str, str], ...]]


class SharedCounters:
    """This process's snapshot file in ``directory``, and the sum over every process's."""

    def __init__(
        self, directory: Path, local: CollectorRegistry, interval_s: float = INTERVAL_S
    ) -> None:
        if not interval_s > 0:
            raise ValueError("interval_s must be > 0")
        self.directory = directory
        self.local = local
        self.interval_s = interval_s
        # Two coordinators in one process (tests) must not share a file: pid and a nonce.
        self.path = directory / f"{os.getpid()}-{secrets.token_hex(4)}{_SUFFIX}"
        self._lock = threading.Lock()
        self._last = ""

    def publish(self) -> None:
        """Replace this process's file with its current counters (atomically: a reader sees
        the old snapshot or the new one, never part of one)."""
        with self._lock:
            self._write(self._snapshot())

    def families(self) -> list[Metric]:
        """Publish, then the sum of this process's counters and every other process's
        snapshot, as metric families. A snapshot that cannot be written (the directory
        removed under a running node, a full disk) is logged: the scrape still answers."""
        with self._lock:
            own = self._snapshot()
            try:
                self._write(own)
            except OSError as e:
                log.warning("metrics snapshot %s not written: %s", self.path.name, e)
        return _merge([(own, True), *self._snapshots()])

    def others(self) -> list[Metric]:
        """The sum over the other processes' snapshots only (nothing published)."""
        return _merge(self._snapshots())

    def _snapshot(self) -> list[Any]:
        return [
            [f.name, f.type, f.documentation, [[s.name, s.labels, s.value] for s in f.samples]]
            for f in self.local.collect()
        ]

    def _write(self, snapshot: list[Any]) -> None:
        """With the lock held since ``snapshot`` was taken: the event loop and the worker
        thread both publish, and an earlier snapshot written after a later one would take
        back counts a scrape already reported (the node's sum would go down)."""
        text = json.dumps(snapshot)
        if text == self._last:  # an idle process rewrites nothing, but shows it is alive
            try:
                os.utime(self.path)
                return
            except FileNotFoundError:  # removed meanwhile: written again below
                pass
        # made again if removed meanwhile (a temporary directory cleaner, an operator)
        self.directory.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_suffix(".tmp")
        temp.write_text(text)
        os.replace(temp, self.path)
        self._last = text

    def _snapshots(self) -> Iterable[tuple[list[Any], bool]]:
        """The other processes' snapshots, each with whether its process is alive."""
        stale = time.time() - STALE_AFTER * self.interval_s
        for path in self.directory.glob(f"*{_SUFFIX}"):
            if path == self.path:
                continue
            try:
                written = path.stat().st_mtime
                snapshot = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                # Not ours (our writes are atomic) or gone meanwhile: skipped, not a failed scrape.
                log.warning("metrics snapshot %s skipped: %s", path.name, e)
                continue
            if isinstance(snapshot, list):
                yield snapshot, written >= stale


def _merge(snapshots: Iterable[tuple[list[Any], bool]]) -> list[Metric]:
    """The node's families from ``(snapshot, its process is alive)`` pairs."""
    heads: dict[str, tuple[str, str]] = {}
    values: dict[str, dict[_Key, float]] = {}
    for snapshot, live in snapshots:
        for name, typ, doc, samples in snapshot:
            heads.setdefault(name, (typ, doc))
            into = values.setdefault(name, {})
            for sample, labels, value in samples:
                earliest = sample.endswith(_CREATED) or sample in _EARLIEST
                if typ == "gauge" and not live and not earliest:
                    continue
                key = (sample, tuple(sorted(labels.items())))
                old = into.get(key)
                if old is None:
                    into[key] = value
                elif earliest or sample in _SMALLEST:
                    into[key] = min(old, value)
                else:
                    into[key] = old + value
    out = []
    for name, (typ, doc) in heads.items():
        family = Metric(name, doc, typ)
        for (sample, labels), value in values[name].items():
            family.add_sample(sample, dict(labels), value)
        out.append(family)
    return out


class SharedRefusals:
    """Refused uploads of the other processes sharing ``directory``, read from their logs,
    and this process's log for them.

    One JSON line ``[assignment id, code]`` per refusal, appended by :meth:`record` and
    flushed by :meth:`flush` (with the counters' publish); a reader takes complete lines only,
    from where it stopped. A log stops growing at ``limit`` lines (a device sending oversized
    bodies to made-up assignment ids must not fill the disk): refusals past that are seen by
    their own process only, as without sharing."""

    def __init__(self, directory: Path, limit: int, own: Mapping[str, str] | None = None) -> None:
        """``own``: this process's refusals as it keeps them (assignment id -> code, the
        latest last), written again if its log is removed (:meth:`flush`)."""
        self.directory = directory
        self.limit = limit
        self._own: Mapping[str, str] = {} if own is None else own
        self.path = self._new_path()
        self._log = self.path.open("a", encoding="utf-8")
        self._written = 0
        self._lock = threading.Lock()
        self._theirs: dict[str, str] = {}
        self._offsets: dict[Path, int] = {}
        self.count = 0  # refusals read from the others' logs

    def _new_path(self) -> Path:
        return self.directory / f"{os.getpid()}-{secrets.token_hex(4)}{_REFUSALS}"

    def record(self, assignment_id: str, code: str) -> None:
        if self._written >= self.limit:
            if self._written == self.limit:
                log.warning("refused uploads: %s is full (%d); further refusals are seen by "
                            "this process only", self.path.name, self.limit)  # fmt: skip
                self._written += 1
            return
        with self._lock:
            if self._log.closed:  # a request answered while the app shuts down
                return
            self._write(assignment_id, code)

    def _write(self, assignment_id: str, code: str) -> None:
        # JSON: an assignment id comes from the request's path (any character).
        self._log.write(json.dumps([assignment_id, code]) + "\n")
        self._written += 1

    def flush(self) -> None:
        """Make what :meth:`record` wrote readable by the others. If the log was removed
        meanwhile (with the directory, by a temporary-file cleaner or an operator), its
        lines would go on into a file no one can open: a new log is started instead, under
        a new name (the others read it from its start), holding this process's refusals
        again (``own``), which the lost file held."""
        with self._lock:
            if self._log.closed:
                return
            self._log.flush()
            if os.fstat(self._log.fileno()).st_nlink > 0:
                return
            path = self._new_path()
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                fresh = path.open("a", encoding="utf-8")
            except OSError as e:  # tried again at the next flush
                log.warning("refused uploads: %s was removed and cannot be made again: %s",
                            self.path.name, e)  # fmt: skip
                return
            log.warning("refused uploads: %s was removed; %s holds this process's %d again",
                        self.path.name, path.name, len(self._own))  # fmt: skip
            self._log.close()
            self._log, self.path, self._written = fresh, path, 0
            for assignment_id, code in list(self._own.items())[-self.limit :]:
                self._write(assignment_id, code)
            self._log.flush()

    def close(self) -> None:
        with self._lock:
            self._log.close()

    def theirs(self) -> dict[str, str]:
        """The other processes' refusals (the latest code per assignment), read up to now;
        call from one thread at a time."""
        logs = [path for path in self.directory.glob(f"*{_REFUSALS}") if path != self.path]
        for path in logs:
            self._read(path)
        for gone in self._offsets.keys() - set(logs):  # removed logs (their lines are kept)
            del self._offsets[gone]
        while len(self._theirs) > self.limit:
            del self._theirs[next(iter(self._theirs))]
        return self._theirs

    def _read(self, path: Path) -> None:
        start = self._offsets.get(path, 0)
        try:
            with path.open("rb") as f:
                f.seek(start)
                data = f.read()
        except OSError as e:
            log.warning("refused uploads %s skipped: %s", path.name, e)
            return
        complete = data.rfind(b"\n") + 1  # a line being written is read next time
        for line in data[:complete].splitlines():
            try:
                assignment_id, code = json.loads(line)
            except (ValueError, TypeError):
                log.warning("refused uploads %s: a malformed line skipped", path.name)
                continue
            key = str(assignment_id)
            self._theirs.pop(key, None)  # the latest goes last (the newest kept)
            self._theirs[key] = str(code)
            self.count += 1
        self._offsets[path] = start + complete
