"""A layer-7 round-robin load balancer on loopback for tests: each request (not each
connection) goes to the next live replica, its answer relayed unchanged, so that a device
on one keep-alive connection still reaches every replica in turn. A replica taken out of
the rotation (:meth:`Balancer.drop`, what a health check does) gets nothing more; a request
that finds a replica's port closed is answered 502, which devices retry.

::

    with Balancer([r.url for r in replicas]) as lb:
        transport = Transport(lb.url)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp import web

__all__ = ["Balancer"]

# Per-connection headers a proxy does not forward (RFC 9110, 7.6.1), and the body's length,
# which the relayed body sets again.
_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "upgrade",
                  "proxy-connection", "host", "content-length"})  # fmt: skip


class Balancer:
    def __init__(self, backends: Sequence[str]) -> None:
        self.backends = [b.rstrip("/") for b in backends]
        self.live = list(range(len(self.backends)))
        self.served: list[tuple[int, int]] = []  # (replica, status) of each relayed request
        self.url = ""
        self._turn = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def __enter__(self) -> Balancer:
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()

    def drop(self, replica: int) -> None:
        """Take a replica out of the rotation."""
        self._loop.call_soon_threadsafe(self.live.remove, replica)

    async def _start(self) -> str:
        # Compressed answers stay compressed: the device decodes what the replica sent.
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._relay)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        replica = self.live[self._turn % len(self.live)]
        self._turn += 1
        body = await request.read()
        headers = _forwarded(request.headers)
        try:
            async with self._session.request(
                request.method, self.backends[replica] + request.path_qs, data=body,
                headers=headers, allow_redirects=False,
            ) as answer:  # fmt: skip
                data = await answer.read()
                status, out = answer.status, _forwarded(answer.headers)
        except aiohttp.ClientConnectionError:
            self.served.append((replica, 502))
            return web.json_response(
                {"error": {"code": "bad_gateway", "message": f"replica {replica} is down"}},
                status=502,
            )
        self.served.append((replica, status))
        return web.Response(status=status, body=data, headers=out)


def _forwarded(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _HOP}
