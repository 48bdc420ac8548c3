"""The service's event loop: asyncio's own by default, or uvloop (``auto``: where it is
installed, which the ``coordinator`` extra does on CPython for 64-bit Linux and macOS;
``uvloop``: refusing to start without it).

uvloop runs the same aiohttp application on libuv's sockets. In ``bench_coordinator`` it
answers steered check-ins at 1.10x the rate and 0.91x the CPU of asyncio's loop and uploads
alike; but it has no ``sendfile``, so aiohttp streams plain-HTTP downloads through a thread
pool, and ``bench_downloads`` measures a model frame's download at 0.73x the rate and 1.42x
the CPU (``docs/benchmarks.md``, tenth pass). A device downloads once a round and checks in
a few times, so asyncio's loop stays the default. Owns the choice only; imports nothing of
the service.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from types import ModuleType
from typing import Any, TypeVar

from coordinator.config import EVENT_LOOPS, ConfigError

__all__ = ["check", "loop_kind", "new_loop", "run"]

T = TypeVar("T")


def _uvloop(choice: str) -> ModuleType | None:
    """uvloop's module when ``choice`` (one of ``EVENT_LOOPS``) means it and it is
    importable; None for asyncio's loop."""
    if choice not in EVENT_LOOPS:  # CoordinatorConfig refuses it; a caller passed its own
        raise ValueError(f"no event loop called {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                "event_loop = 'uvloop' but uvloop is not installed (the coordinator extra "
                "installs it on CPython for 64-bit Linux and macOS)"
            ) from None
        return None
    return uvloop


def check(choice: str) -> None:
    """Raise the :class:`ConfigError` that :func:`run` would, before anything starts."""
    _uvloop(choice)


def new_loop(choice: str) -> asyncio.AbstractEventLoop:
    uv = _uvloop(choice)
    loop: asyncio.AbstractEventLoop = uv.new_event_loop() if uv else asyncio.new_event_loop()
    return loop


def run(main: Coroutine[Any, Any, T], choice: str) -> T:
    """``asyncio.run(main)`` on the chosen loop (``asyncio.run`` has no loop factory before
    Python 3.12; ``uvloop.run`` has one on every version)."""
    try:
        uv = _uvloop(choice)
    except ConfigError:
        main.close()  # never to run: closed, so that Python does not warn it was not awaited
        raise
    if uv is None:
        return asyncio.run(main)
    result: T = uv.run(main)
    return result


def loop_kind(loop: asyncio.AbstractEventLoop) -> str:
    """``"uvloop"`` or ``"asyncio"``: what a running service reports in its log."""
    return "uvloop" if type(loop).__module__.split(".")[0] == "uvloop" else "asyncio"
