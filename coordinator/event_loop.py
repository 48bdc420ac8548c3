"""The service's event loop: uvloop where it is installed (the ``coordinator`` extra brings
it on Linux and macOS), asyncio's own otherwise or when the config asks for it.

uvloop runs the same aiohttp application on libuv's sockets: in ``bench_coordinator`` it
cuts the server's CPU per upload enough to matter on a small node. Owns the choice only;
imports nothing of the service.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from types import ModuleType
from typing import Any, TypeVar

from coordinator.config import ConfigError

__all__ = ["loop_kind", "new_loop", "run"]

T = TypeVar("T")


def _uvloop(choice: str) -> ModuleType | None:
    """uvloop's module when ``choice`` (a validated ``CoordinatorConfig.event_loop``)
    means it and it is importable; None for asyncio's loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                "event_loop = 'uvloop' but uvloop is not installed "
                "(pip install 'fedge[coordinator]'; not on Windows)"
            ) from None
        return None
    return uvloop


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
