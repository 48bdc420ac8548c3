"""Loaded trainers kept for reuse, shareable between clients of one process.

Loading a bundle into a runtime costs tens of milliseconds and megabytes; the fleet emulator
runs thousands of clients of one bundle in a process. A :class:`TrainerPool` keeps one trainer
per ``(bundle_id, backend)`` (the few most recently used) and lends it to one client at a time:
:func:`edge_sdk.local_training.train` sets parameters, optimizer state and the proximal term at
the start of every round, so nothing carries over between the clients that share it.

Usage::

    pool = TrainerPool(backend="ort-step")
    clients = [Client(url, state_dir=d, data=..., trainers=pool, cache=cache) for d in dirs]
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

from edge_sdk.bundle import Manifest
from edge_sdk.trainers.base import Trainer

__all__ = ["TrainerPool", "TrainerSource"]

Loader = Callable[[Path, str | None], Trainer]


class TrainerSource(Protocol):
    """What a client takes as ``trainers=``: a :class:`TrainerPool`, or anything that lends a
    trainer for a bundle the same way (the fleet emulator wraps the pool in emulated devices)."""

    def lease(self, bundle_dir: Path, manifest: Manifest) -> AbstractContextManager[Trainer]: ...


def _load(bundle_dir: Path, backend: str | None) -> Trainer:
    # Imported here: the trainers package imports its runtime lazily, and so do we.
    from edge_sdk.trainers import load_trainer

    return load_trainer(bundle_dir, backend=backend)


class TrainerPool:
    def __init__(
        self, backend: str | None = None, *, max_trainers: int = 2, loader: Loader = _load
    ) -> None:
        self.backend = backend
        self.max_trainers = max_trainers
        self._loader = loader
        self._lock = threading.Lock()
        self._trainers: OrderedDict[str, tuple[Trainer, threading.Lock]] = OrderedDict()
        self.loads = 0

    @contextmanager
    def lease(self, bundle_dir: Path, manifest: Manifest) -> Iterator[Trainer]:
        """The bundle's trainer, held exclusively until the ``with`` block ends."""
        key = manifest.bundle_id
        with self._lock:
            entry = self._trainers.get(key)
            if entry is None:
                entry = (self._loader(bundle_dir, self.backend), threading.Lock())
                self.loads += 1
                self._trainers[key] = entry
                while len(self._trainers) > self.max_trainers:
                    self._trainers.popitem(last=False)
            self._trainers.move_to_end(key)
        trainer, busy = entry
        with busy:
            yield trainer
