"""The service's event loop: asyncio's own or uvloop. ``auto`` (the default) runs uvloop
where it is installed (the ``coordinator`` extra installs it on CPython for 64-bit Linux and
macOS) and the service serves HTTPS, and asyncio's loop for plain HTTP; ``asyncio`` and
``uvloop`` (refusing to start without it) choose one outright.

Why by transport (``docs/benchmarks.md``, tenth and eleventh passes): uvloop has no
``sendfile``, so over plain HTTP aiohttp streams a download through a thread pool where
asyncio's loop hands the file to the kernel (``bench_downloads``: uvloop 0.73x the downloads
at 1.42x the CPU in one run, 0.98x at 1.04x in another). Over TLS neither loop can hand a
file to the kernel, and uvloop serves a download at 2.97x the rate and 0.34x the CPU, and
check-ins and uploads at no more CPU (``bench_downloads``, ``bench_tls``). Owns the choice
only; imports nothing of the service.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from types import ModuleType
from typing import Any, TypeVar

from coordinator.config import EVENT_LOOPS, ConfigError

__all__ = ["check", "loop_kind", "new_loop", "run"]

T = TypeVar("T")


def _uvloop(choice: str, tls: bool) -> ModuleType | None:
    """uvloop's module when ``choice`` (one of ``EVENT_LOOPS``) means it for a service that
    serves HTTPS (``tls``) or not, and it is importable; None for asyncio's loop."""
    if choice not in EVENT_LOOPS:  # CoordinatorConfig refuses it; a caller passed its own
        raise ValueError(f"no event loop called {choice!r}")
    if choice == "asyncio" or (choice == "auto" and not tls):
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


def check(choice: str, tls: bool = False) -> None:
    """Raise the :class:`ConfigError` that :func:`run` would, before anything starts."""
    _uvloop(choice, tls)


def new_loop(choice: str, tls: bool = False) -> asyncio.AbstractEventLoop:
    """A new loop of the kind ``choice`` means for a service serving HTTPS (``tls``) or not."""
    uv = _uvloop(choice, tls)
    loop: asyncio.AbstractEventLoop = uv.new_event_loop() if uv else asyncio.new_event_loop()
    return loop


def run(main: Coroutine[Any, Any, T], choice: str, tls: bool = False) -> T:
    """``asyncio.run(main)`` on the loop :func:`new_loop` would make (``asyncio.run`` has no
    loop factory before Python 3.12; ``uvloop.run`` has one on every version)."""
    try:
        uv = _uvloop(choice, tls)
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
