"""Event counters summed over the serving processes of one node (``fedge serve --processes K``).

Owns the files in which each process publishes the counters and histograms it keeps in
memory, and their sum. The kernel hands each connection to one of the K processes, so a
scrape reaches one of them: without the sum, each scrape would report a different process's
counts and Prometheus would read every change of process as a counter reset.

Each process writes its snapshot to a file of its own in a directory the processes share
(the supervisor makes one per run and removes it at the end): at every scrape of it, and
every ``interval_s`` from a task on its event loop (unless nothing changed). A scrape of any
process publishes its own snapshot, then sums every file: a sibling's figures are at most
``interval_s`` old. Each file only ever grows, and a process that died keeps its file (its
replacement writes a new one), so the sum never goes down between two scrapes, whichever
processes answer them.

Imports prometheus_client and the standard library only; nothing of the service.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

__all__ = ["INTERVAL_S", "SharedCounters"]

log = logging.getLogger("fedge.metrics")

# Prometheus scrapes every 15 s or so, the dashboard polls every 2 s: a sibling's share this
# old is current enough, and a process's snapshot of a few hundred series costs milliseconds.
INTERVAL_S = 2.0
_SUFFIX = ".json"
# A creation time is when the first process created the series, not a sum.
_CREATED = "_created"

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
        with self._lock:  # the event loop and the worker thread both publish
            families = [
                [f.name, f.type, f.documentation, [[s.name, s.labels, s.value] for s in f.samples]]
                for f in self.local.collect()
            ]
            text = json.dumps(families)
            if text == self._last:  # an idle process rewrites nothing
                return
            temp = self.path.with_suffix(".tmp")
            temp.write_text(text)
            os.replace(temp, self.path)
            self._last = text

    def families(self) -> list[Metric]:
        """Publish, then the sum of every process's snapshot, as metric families."""
        self.publish()
        return _merge(self._snapshots())

    def _snapshots(self) -> Iterable[list[Any]]:
        paths = sorted(self.directory.glob(f"*{_SUFFIX}"), key=lambda p: p != self.path)
        for path in paths:
            try:
                snapshot = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                # Not ours (our writes are atomic) or gone meanwhile: skipped, not a failed scrape.
                log.warning("metrics snapshot %s skipped: %s", path.name, e)
                continue
            if isinstance(snapshot, list):
                yield snapshot


def _merge(snapshots: Iterable[list[Any]]) -> list[Metric]:
    heads: dict[str, tuple[str, str]] = {}
    values: dict[str, dict[_Key, float]] = {}
    for snapshot in snapshots:
        for name, typ, doc, samples in snapshot:
            heads.setdefault(name, (typ, doc))
            into = values.setdefault(name, {})
            for sample, labels, value in samples:
                key = (sample, tuple(sorted(labels.items())))
                old = into.get(key)
                if old is None:
                    into[key] = value
                elif sample.endswith(_CREATED):
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
