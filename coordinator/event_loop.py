"""The service's event loop: uvloop where it is installed (the ``coordinator`` extra brings
it on CPython for 64-bit Linux and macOS), asyncio's own otherwise or when the config asks
for it.

uvloop runs the same aiohttp application on libuv's sockets. In ``bench_coordinator`` it
answers steered check-ins, where the event loop's share of the work is largest, at 1.10x the
rate and 0.91x the CPU of asyncio's loop; uploads, whose time goes to the worker's and
installer's threads, neither gain nor lose (``docs/benchmarks.md``, tenth pass). It has no
``sendfile``: aiohttp then streams plain-HTTP downloads through a thread pool (over TLS it
does so on either loop). Owns the choice only; imports nothing of the service.
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
