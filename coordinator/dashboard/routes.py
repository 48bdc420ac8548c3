"""aiohttp routes of the dashboard, its JSON endpoints and ``/metrics``.

Store reads run on the service's worker thread through the app's ``run`` (they never
interleave with device operations); the admin token is checked before any of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from coordinator.dashboard import views
from coordinator.dashboard.history import RoundFacts
from coordinator.errors import NotFound
from coordinator.metrics import CONTENT_TYPE, ServiceMetrics
from coordinator.service import Coordinator
from edge_sdk.protocol import Route

__all__ = ["METRICS_KEY", "STATIC_DIR", "add_routes"]

T = TypeVar("T")
log = logging.getLogger("fedge.metrics")
Run = Callable[..., Awaitable[Any]]
STATIC_DIR = Path(__file__).with_name("static")
METRICS_KEY = web.AppKey("metrics", ServiceMetrics)
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
          ".md": "text/plain"}
# Assets are looked up in this set, never joined from the request path.
_ASSETS = {
    p.relative_to(STATIC_DIR).as_posix(): p
    for p in STATIC_DIR.rglob("*")
    if p.is_file() and p.suffix in _TYPES
}
# The page and scripts change with the package only, but an operator upgrading mid-session
# should not keep stale scripts for long.
_CACHE = {"Cache-Control": "no-cache"}


def add_routes(
    app: web.Application, coord: Coordinator, run: Run, queue_depth: Callable[[], int]
) -> ServiceMetrics:
    """Install the metrics middleware and every dashboard route on ``app``."""
    facts = RoundFacts(coord.store)
    metrics = ServiceMetrics(coord, queue_depth, lambda task: facts.history(task).rounds)
    app[METRICS_KEY] = metrics
    # Outermost, so that it sees the status the error middleware settled on.
    app.middlewares.insert(0, metrics.middleware)
    app.on_response_prepare.append(_prepared(metrics))

    def admin(request: web.Request) -> None:
        coord.check_admin(request.headers.get("Authorization"))

    async def read(request: web.Request, fn: Callable[..., Any], *args: Any) -> web.Response:
        admin(request)
        return web.json_response(await run(functools.partial(fn, coord, *args)))

    routes = web.RouteTableDef()

    @routes.get(Route.DASHBOARD)
    async def page(request: web.Request) -> web.Response:
        return _asset("index.html")

    @routes.get(Route.DASHBOARD_STATIC)
    async def static(request: web.Request) -> web.Response:
        return _asset(request.match_info["name"])

    @routes.get(Route.ADMIN_DASHBOARD_OVERVIEW)
    async def overview(request: web.Request) -> web.Response:
        return await read(request, views.overview)

    @routes.get(Route.ADMIN_DASHBOARD_TASK)
    async def task(request: web.Request) -> web.Response:
        task_id = request.match_info["task_id"]
        return await read(request, views.task_detail, metrics, facts, task_id)

    @routes.get(Route.ADMIN_DASHBOARD_ROUND)
    async def round_page(request: web.Request) -> web.Response:
        m = request.match_info
        return await read(request, views.round_detail, metrics, m["task_id"], m["number"])

    @routes.get(Route.ADMIN_DASHBOARD_POPULATION)
    async def population(request: web.Request) -> web.Response:
        return await read(request, views.population, metrics, facts)

    @routes.get(Route.ADMIN_DASHBOARD_SERVICE)
    async def service(request: web.Request) -> web.Response:
        admin(request)
        answer = await run(functools.partial(views.service, coord, metrics))
        answer["queue_depth"] = metrics.queue_depth()  # as of now, the view done
        return web.json_response(answer)

    @routes.get(Route.METRICS)
    async def scrape(request: web.Request) -> web.Response:
        admin(request)
        figures = await run(metrics.reader.read)
        body = metrics.render(figures)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    app.add_routes(routes)
    if metrics.shared is not None:
        _publish_periodically(app, metrics, metrics.shared.interval_s)
    return metrics


def _publish_periodically(app: web.Application, metrics: ServiceMetrics, every_s: float) -> None:
    """Keeps this process's share of the node's counters and refusals current between its
    own scrapes (the scrapes of its siblings read it), and leaves its last counts at a clean
    stop."""

    async def publish() -> None:
        while True:
            try:
                metrics.publish()
            except OSError:
                log.exception("cannot publish this process's metrics")
            await asyncio.sleep(every_s)

    async def publishing(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(publish())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        metrics.close()

    app.cleanup_ctx.append(publishing)


def _asset(name: str) -> web.Response:
    path = _ASSETS.get(name)
    if path is None:
        raise NotFound(f"no dashboard asset {name!r}")
    return web.Response(
        body=path.read_bytes(), content_type=_TYPES[path.suffix], charset="utf-8", headers=_CACHE
    )


def _prepared(
    metrics: ServiceMetrics,
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    async def on_prepare(request: web.Request, resp: web.StreamResponse) -> None:
        metrics.on_response_prepare(request, resp)

    return on_prepare
