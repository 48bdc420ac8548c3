"""The HTTP layer: aiohttp routes for every path in :class:`edge_sdk.protocol.Route`.

Handlers read bodies themselves under the configured limits (``413 body_too_large`` before
reading more than the limit: update frames, JSON control messages and bundle uploads each have
their own), then run the matching :class:`~coordinator.service.Coordinator` method on the
service's single worker thread, so SQLite work never blocks the event loop and operations never
interleave. That thread's queue is bounded (:class:`WorkQueue`): past the bound a request is
answered ``503 overloaded`` with ``Retry-After`` at once (an update frame before its body is
read; a JSON control message, at most ``max_json_bytes``, once read). Uploads are
group-committed (``group_commit``, :class:`_GroupedUploads`): admitted on the worker thread,
decoded on the event loop (large frames on a pool), made durable in batches. Every failure
leaves as the JSON error shape; a transient error of the store (a lost database connection, a
lock not granted in time) is answered ``503 overloaded`` with ``Retry-After`` wherever it comes
from; any other unexpected exception is logged and answered ``500 internal``.

::

    app = build_app(Coordinator(config))
    runner, port = await start(app, "127.0.0.1", 0, ssl_context=server_tls(config))
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import ssl
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter

from coordinator import dashboard
from coordinator.config import CoordinatorConfig
from coordinator.errors import ApiError, BodyTooLarge, Overloaded
from coordinator.group_commit import GroupCommit
from coordinator.metrics import OUTCOME, checkin_outcome
from coordinator.plan import calibrate_ahead
from coordinator.readiness import Readiness, stale_after
from coordinator.secagg import routes as secagg_routes
from coordinator.service import AdmittedUpload, Coordinator, DeviceIdentity, StagedUpload
from edge_sdk.protocol import (
    FRAME_CONTENT_TYPE,
    HEADER_ENROLLMENT,
    HEADER_IDEMPOTENCY_KEY,
    HEADER_REPORT,
    ErrorCode,
    Route,
)

__all__ = ["COORDINATOR_KEY", "BindError", "WorkQueue", "build_app", "server_tls", "start"]

log = logging.getLogger("fedge.coordinator")
T = TypeVar("T")
OPENAPI_PATH = Path(__file__).with_name("openapi.json")
COORDINATOR_KEY = web.AppKey("coordinator", Coordinator)
_EXECUTOR_KEY = web.AppKey("executor", ThreadPoolExecutor)
# An update frame up to this size is decoded, checked and staged on the event loop (about
# 0.2 ms for 100k int8 parameters): a trip to a thread and back costs more CPU than that.
# A larger one goes to a pool rather than stall every other request on the loop.
INLINE_FRAME_BYTES = 1 << 20
_TICKER_KEY = web.AppKey("ticker", asyncio.Task)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: ErrorCode, message: str) -> web.Response:
    return web.json_response({"error": {"code": code.value, "message": message}}, status=status)


_HTTP_CODES = {
    404: ErrorCode.NOT_FOUND,
    413: ErrorCode.BODY_TOO_LARGE,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
}


def _retry_later(request: web.Request, e: Overloaded) -> web.Response:
    request[OUTCOME] = e.code.value
    # Whole seconds, as HTTP wants them; clients add their own jitter on top.
    wait = str(max(1, math.ceil(e.retry_after_s)))
    return web.json_response(e.body(), status=e.status, headers={"Retry-After": wait})


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Overloaded as e:
        return _retry_later(request, e)
    except ApiError as e:
        request[OUTCOME] = e.code.value
        return web.json_response(e.body(), status=e.status)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, ErrorCode.INVALID_REQUEST)
        request[OUTCOME] = code.value
        answer = _error(e.status, code, e.reason or "request refused")
        if hdrs.ALLOW in e.headers:  # a 405 must say which methods the resource takes
            answer.headers[hdrs.ALLOW] = e.headers[hdrs.ALLOW]
        return answer
    except ConnectionResetError:
        # The client went away mid-request (a timeout, a lost link): nobody to answer, no bug.
        log.info("client left during %s %s", request.method, request.path)
        raise
    except Exception as e:
        # A store read outside any task's step (a device's authentication, a registration,
        # an operator's listing) meets a lost connection like a step does: nothing was done,
        # and the next call connects again. Not a bug to answer 500.
        coord = request.app[COORDINATOR_KEY]
        if isinstance(e, coord.store.transient_errors):
            return _retry_later(request, coord.storage_unavailable(e))
        log.exception("unhandled error on %s %s", request.method, request.path)
        request[OUTCOME] = ErrorCode.INTERNAL.value
        return _error(500, ErrorCode.INTERNAL, "internal error (logged on the coordinator)")


async def _read_body(request: web.Request, limit: int, what: str = "body") -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"{what} of {request.content_length} bytes exceeds the {limit} allowed")
    chunks, size = [], 0
    while True:
        chunk = await request.content.read(1 << 16)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"{what} exceeds the {limit} bytes allowed")
        chunks.append(chunk)
    return b"".join(chunks)


class WorkQueue:
    """The service's one worker thread with a bounded queue.

    ``bound`` counts operations submitted and not yet finished (the running one included).
    A request's operation past the bound raises :class:`~coordinator.errors.Overloaded` at
    once: a client told to come back later costs nothing, one left waiting minutes in a queue
    times out, retries, and adds to the queue it is stuck in. Internal work (deadline ticks,
    start-up and shutdown) is never refused. Counted on the worker side, so an operation whose
    client went away still counts until it has run.

    Operations run in submission order, in batches: whatever was submitted while the worker
    was busy runs in one executor job. Each answer goes out as soon as its operation ends,
    never behind later work (any operation may be slow: a check-in running a due tick, an
    fsync); answers ready before the event loop got round to them go back together, on one
    wake-up. Under load that saves most of the cost of handing a check-in to the worker (a
    job submission, a future chained to the loop and a wake-up each, and the GIL handed
    back and forth). An operation whose caller was cancelled before it started is skipped.
    """

    def __init__(self, bound: int, retry_after_s: float) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="fedge-coordinator")
        self.bound = bound
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self.pending = 0
        self.refused = 0
        self._worker: int | None = None  # the worker thread's ident, once it ran
        # Submitted, not yet taken by the worker (the call, its future, internal or not); a
        # drain job is queued or running while _draining is set.
        self._queued: list[tuple[Callable[[], Any], asyncio.Future[Any], bool]] = []
        self._draining = False
        # Answers the event loop has not taken yet; a wake-up is scheduled while non-empty.
        self._ready: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []

    def _finished(self) -> None:
        with self._lock:
            self.pending -= 1

    def depth(self) -> int:
        """Operations submitted and not finished: on the worker thread, without the one
        asking (a dashboard view publishing its process's queue depth for the others)."""
        return self.pending - (threading.get_ident() == self._worker)

    async def run(self, fn: Callable[..., T], *args: Any, internal: bool = False) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if not internal and self.pending >= self.bound:
                self.refused += 1
                raise Overloaded(
                    f"the coordinator is busy ({self.pending} operations queued); "
                    "retry after the time in Retry-After",
                    self.retry_after_s,
                )
            self.pending += 1
            self._queued.append(((lambda: fn(*args)) if args else fn, future, internal))
            start, self._draining = not self._draining, True
        if start:
            try:
                self.executor.submit(self._drain, loop)
            except BaseException:  # shut down: nothing will run what was queued
                self._drain_refused()
                raise
        return await future

    def _drain_refused(self) -> None:
        with self._lock:
            queued, self._queued, self._draining = self._queued, [], False
            self.pending -= len(queued)
        for _, future, _ in queued:
            if not future.done():
                future.cancel()

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the worker thread: run what is queued, batch after batch, until nothing is."""
        self._worker = threading.get_ident()
        while True:
            with self._lock:
                batch, self._queued = self._queued, []
                if not batch:
                    self._draining = False
                    return
            for fn, future, _ in batch:
                if future.cancelled():  # a benign race: at worst it runs anyway
                    self._finished()
                    continue
                result: Any = None
                error: BaseException | None = None
                try:
                    result = fn()
                except BaseException as e:  # the caller's to handle, as if it ran fn itself
                    error = e
                finally:
                    self._finished()
                with self._lock:
                    self._ready.append((future, result, error))
                    wake = len(self._ready) == 1
                if wake:
                    loop.call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        """On the event loop: hand out every answer ready now."""
        with self._lock:
            answers, self._ready = self._ready, []
        for future, result, error in answers:
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)


_QUEUE_KEY = web.AppKey("work_queue", WorkQueue)


class _CountedFile(web.FileResponse):
    """A file response that, once it has sent its body, calls ``sent(n)`` with the bytes of
    the file it sent: aiohttp decides in :meth:`prepare` whether that is the whole file, a
    range of it (``206``) or nothing (``304``, ``HEAD``)."""

    def __init__(self, path: Path, sent: Callable[[int], None], headers: dict[str, str]) -> None:
        super().__init__(path, headers=headers)
        self._sent = sent

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        writer = await super().prepare(request)
        if request.method == "GET" and self.status in (200, 206) and self.content_length:
            self._sent(self.content_length)
        return writer


class _GroupedUploads:
    """The upload route with group commit: admission on the worker thread, frames decoded
    and payloads staged where they were read (large ones on a pool), then batches made
    durable together (:class:`~coordinator.group_commit.GroupCommit`): fsyncs on a thread
    of their own while the worker serves other requests, rows in one transaction on the
    worker. A batch's fsyncs overlap the previous batch's transaction.

    Few threads on purpose: every thread that wants the GIL while another holds it turns
    each release (a numpy loop, a hash, a write, an SQLite statement) into a hand-off and
    two context switches. A decoding pool and a thread per fsync cost one process more CPU
    per upload than they overlapped (``docs/benchmarks.md``, "One node, eighth pass")."""

    def __init__(self, coord: Coordinator, work: WorkQueue) -> None:
        cfg = coord.config
        self.coord, self.work = coord, work
        self._reading: set[str] = set()  # assignments whose update's body is being read
        self.decoders = ThreadPoolExecutor(
            max(2, os.cpu_count() or 2), thread_name_prefix="fedge-decode"
        )
        # Runs each batch's install (one at a time), waiting for the disk. It overlaps the
        # previous batch's transaction on the worker (GroupCommit's two stages).
        self.installer = ThreadPoolExecutor(1, thread_name_prefix="fedge-install")
        self.commits: GroupCommit[StagedUpload, dict[str, Any]] = GroupCommit(
            self._accept,
            prepare=self._install,
            max_batch=cfg.group_commit_max_batch,
            max_pending=max(cfg.max_queued_operations, cfg.group_commit_max_batch),
            retry_after_s=cfg.overload_retry_after_s,
        )

    async def upload(
        self, authorization: str | None, assignment_id: str, key: str | None,
        report: str | None, frame: Callable[[], Awaitable[bytes]],
    ) -> dict[str, Any]:  # fmt: skip
        """Authenticated and admitted in one trip to the worker thread, before the frame is
        read: a refused upload (or a replay) costs no body read."""
        coord = self.coord
        self.commits.reserve()
        try:
            admitted = await self.work.run(
                lambda: coord.admit_upload(
                    coord.authenticate(authorization), assignment_id, key, report
                )
            )
            if admitted.replay is not None:
                self.commits.release()
                return admitted.replay
            # One body read per assignment: a device cannot take every slot with uploads of
            # its own assignment that never finish (the read's timeout frees each in time).
            if assignment_id in self._reading:
                raise Overloaded(
                    "an upload of this assignment is in progress; retry once it has ended",
                    coord.config.overload_retry_after_s,
                )
            self._reading.add(assignment_id)
            try:
                data = await frame()
            finally:
                self._reading.discard(assignment_id)
        except BaseException:
            self.commits.release()
            raise
        # Shielded: once staged, an upload finishes (durable, or its payload dropped) even if
        # its client leaves.
        return await asyncio.shield(self._stage_and_commit(admitted, data))

    async def _stage_and_commit(self, admitted: AdmittedUpload, data: bytes) -> dict[str, Any]:
        try:
            if len(data) <= INLINE_FRAME_BYTES:
                staged = self.coord.stage_upload(admitted, data)
            else:
                staged = await asyncio.get_running_loop().run_in_executor(
                    self.decoders, self.coord.stage_upload, admitted, data
                )
            return await self.commits.submit(staged)
        finally:
            self.commits.release()

    async def _install(self, batch: Sequence[StagedUpload]) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.installer, self.coord.install_uploads, batch)

    async def _accept(self, batch: Sequence[StagedUpload]) -> list[dict[str, Any] | ApiError]:
        # Safe while the next batch installs: the transaction checks everything again, and a
        # payload this one deletes (refused, or its round's) answers that batch's upload 503.
        return await self.work.run(self.coord.accept_uploads, batch, internal=True)

    async def close(self) -> None:
        await self.commits.close()
        for pool in (self.decoders, self.installer):
            pool.shutdown(wait=True)


class BindError(OSError):
    """:func:`start` could not bind its address (taken by another program, not this host's)."""


def server_tls(config: CoordinatorConfig) -> ssl.SSLContext | None:
    """The server's TLS context from ``tls_cert``/``tls_key`` (PEM), or None for plain HTTP.

    TLS 1.2 at least; an unreadable or mismatched pair fails here, at start, not on the first
    connection. So does an encrypted key (``ValueError``): there is no passphrase to give."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    key = config.tls_key

    def no_passphrase() -> str:
        # Without a callback OpenSSL asks for the passphrase on the terminal (each child of
        # --processes again), and fails with "Invalid argument" where there is none.
        raise ValueError(
            f"the private key in {key} is encrypted; the coordinator takes an unencrypted "
            "key (decrypt a copy only the service's user can read: openssl pkey -in KEY)"
        )

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, key, password=no_passphrase)
    return context


def build_app(coord: Coordinator) -> web.Application:
    cfg = coord.config
    work = WorkQueue(cfg.max_queued_operations, cfg.overload_retry_after_s)
    executor = work.executor
    # Our own reader enforces the limits; aiohttp's must not fire first with its own shape.
    app = web.Application(middlewares=[_errors], client_max_size=cfg.max_bundle_bytes + 1)
    app[COORDINATOR_KEY] = coord
    app[_EXECUTOR_KEY] = executor
    app[_QUEUE_KEY] = work
    run = work.run

    async def internal(fn: Callable[..., T]) -> T:
        return await work.run(fn, internal=True)

    def device(request: web.Request) -> Awaitable[DeviceIdentity]:
        return run(coord.authenticate, request.headers.get("Authorization"))

    def admin(request: web.Request) -> None:
        coord.check_admin(request.headers.get("Authorization"))

    async def body(request: web.Request) -> bytes:
        """A JSON control message: small, whatever the limit for update frames."""
        return await _read_body(request, cfg.max_json_bytes, "JSON body")

    def ok(data: Any, status: int = 200) -> web.Response:
        return web.json_response(data, status=status)

    routes = web.RouteTableDef()
    readiness = Readiness(stale_after(cfg.tick_interval_s))

    @routes.get(Route.OPENAPI)
    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=OPENAPI_PATH.read_bytes(), content_type="application/json")

    @routes.get(Route.HEALTH)
    async def health(request: web.Request) -> web.Response:
        return ok({"ok": True})

    @routes.get(Route.READY)
    async def ready(request: web.Request) -> web.Response:
        problem = readiness.problem()
        if problem is not None:
            return web.json_response({"ready": False, "reason": problem}, status=503)
        return ok({"ready": True})

    @routes.get(Route.STATUS)
    async def status(request: web.Request) -> web.Response:
        admin(request)  # tasks and device counts are the operator's business; health is public
        return ok(await run(coord.status))

    @routes.post(Route.REGISTER)
    async def register(request: web.Request) -> web.Response:
        coord.check_enrollment(request.headers.get(HEADER_ENROLLMENT))  # before reading a body
        return ok(await run(coord.register, await body(request)), 201)

    @routes.post(Route.CHECKIN)
    async def checkin(request: web.Request) -> web.Response:
        # The most frequent call: authentication and check-in in one trip to the worker
        # thread (the body, 64 KiB at most, is read first).
        authorization, data = request.headers.get("Authorization"), await body(request)
        answer = await run(lambda: coord.checkin(coord.authenticate(authorization), data))
        request[OUTCOME] = checkin_outcome(answer)
        return ok(answer)

    @routes.get(Route.BUNDLE_MANIFEST)
    async def manifest(request: web.Request) -> web.Response:
        who = await device(request)
        return ok(await run(coord.manifest, who, request.match_info["bundle_id"]))

    @routes.get(Route.BUNDLE_FILE)
    async def bundle_file(request: web.Request) -> web.StreamResponse:
        who = await device(request)
        m = request.match_info
        path = await run(coord.bundle_file, who, m["bundle_id"], m["name"])
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})

    @routes.get(Route.VERSION_PARAMS)
    async def params(request: web.Request) -> web.StreamResponse:
        who = await device(request)
        m = request.match_info
        task_id = m["task_id"]
        path = await run(coord.version_params_file, who, task_id, m["version"])
        # Streamed from the frame file encoded once per version; aiohttp answers If-None-Match,
        # If-Modified-Since and Range. A numbered version never changes, 'current' does.
        cache = "no-cache" if m["version"] == "current" else "private, max-age=86400, immutable"
        # The round's bytes_out counts what was sent, once aiohttp has answered.
        return _CountedFile(
            path,
            lambda n: coord.parameters_sent(task_id, n),  # a counter: no worker hop
            {"Content-Type": FRAME_CONTENT_TYPE, "Cache-Control": cache},
        )

    @routes.post(Route.ASSIGNMENT_UPDATE)
    async def update(request: web.Request) -> web.Response:
        args = (
            request.match_info["assignment_id"],
            request.headers.get(HEADER_IDEMPOTENCY_KEY),
            request.headers.get(HEADER_REPORT),
        )

        async def frame() -> bytes:
            try:
                async with asyncio.timeout(cfg.upload_body_timeout_s):
                    return await _read_body(request, cfg.max_body_bytes, "update frame")
            except TimeoutError as e:
                raise Overloaded(
                    f"the update frame did not arrive within {cfg.upload_body_timeout_s:g} s; "
                    "upload it again", cfg.overload_retry_after_s,
                ) from e

        if uploads is not None:
            answer = await uploads.upload(request.headers.get("Authorization"), *args, frame)
        else:
            # Admitted before the frame is read, as with group commit: an upload to another
            # device's assignment is refused as such, not as too large for a limit its body
            # broke (which the dashboard would show as that assignment's refused upload).
            who = await device(request)
            admitted = await run(coord.admit_upload, who, *args)
            answer = await run(coord.complete_upload, admitted, await frame())
        request[OUTCOME] = "accepted"
        return ok(answer)

    @routes.post(Route.ASSIGNMENT_METRICS)
    async def metrics(request: web.Request) -> web.Response:
        who = await device(request)
        data = await body(request)
        return ok(await run(coord.report_metrics, who, request.match_info["assignment_id"], data))

    @routes.post(Route.ASSIGNMENT_ABORT)
    async def abort(request: web.Request) -> web.Response:
        who = await device(request)
        data = await body(request)
        return ok(await run(coord.abort, who, request.match_info["assignment_id"], data))

    @routes.post(Route.ADMIN_BUNDLES)
    async def add_bundle(request: web.Request) -> web.Response:
        admin(request)
        data = await _read_body(request, cfg.max_bundle_bytes)
        return ok(await run(coord.add_bundle, data), 201)

    @routes.post(Route.ADMIN_TASKS)
    async def create_task(request: web.Request) -> web.Response:
        admin(request)
        data = await body(request)
        # An epsilon target's noise calibration runs here, on a spare thread, and not on the
        # worker that device requests queue behind (the worker then finds it cached).
        await asyncio.to_thread(calibrate_ahead, data)
        return ok(await run(coord.create_task, data), 201)

    @routes.get(Route.ADMIN_TASKS)
    async def list_tasks(request: web.Request) -> web.Response:
        admin(request)
        return ok(await run(coord.list_tasks))

    @routes.get(Route.ADMIN_TASK)
    async def get_task(request: web.Request) -> web.Response:
        admin(request)
        return ok(await run(coord.get_task, request.match_info["task_id"]))

    @routes.post(Route.ADMIN_TASK_PAUSE)
    async def pause(request: web.Request) -> web.Response:
        admin(request)
        return ok(await run(coord.set_paused, request.match_info["task_id"], True))

    @routes.post(Route.ADMIN_TASK_RESUME)
    async def resume(request: web.Request) -> web.Response:
        admin(request)
        return ok(await run(coord.set_paused, request.match_info["task_id"], False))

    @routes.get(Route.ADMIN_TASK_ROUNDS)
    async def rounds(request: web.Request) -> web.Response:
        admin(request)
        return ok(await run(coord.rounds, request.match_info["task_id"]))

    @routes.post(Route.ADMIN_TASK_EVALUATE)
    async def evaluate(request: web.Request) -> web.Response:
        admin(request)
        data = await body(request)
        return ok(await run(coord.schedule_evaluation, request.match_info["task_id"], data), 202)

    @routes.get(Route.ADMIN_TASK_BUNDLE)
    async def task_bundle(request: web.Request) -> web.Response:
        admin(request)
        data = await run(coord.task_bundle, request.match_info["task_id"])
        return web.Response(body=data, content_type="application/x-tar")

    app.add_routes(routes)
    uploads = _GroupedUploads(coord, work) if cfg.group_commit else None
    dashboard.add_routes(app, coord, run, work.depth)
    secagg_routes.add_routes(app, coord, run, _read_body)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(cfg.tick_interval_s)
            try:
                await internal(coord.tick)
            except Exception as e:
                readiness.failed(e)
                log.exception("tick failed")
            else:
                readiness.succeeded()

    async def on_startup(app: web.Application) -> None:
        await internal(coord.tick)  # recover: apply deadlines that passed while we were down
        readiness.succeeded()
        # then drop what a crash left unreferenced, before any request can write new blobs
        collected = await internal(coord.collect_garbage)
        if collected.blobs:
            log.info("removed %d orphaned blobs (%d bytes)", collected.blobs, collected.bytes)
        app[_TICKER_KEY] = asyncio.create_task(ticker())

    async def on_cleanup(app: web.Application) -> None:
        task = app.get(_TICKER_KEY)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if uploads is not None:
            await uploads.close()
        await internal(coord.close)
        executor.shutdown(wait=True)

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


async def start(
    app: web.Application,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host:port`` (0: a free port), over TLS with ``ssl_context``; returns
    the runner and the bound port. ``reuse_port``: share the port with other processes
    (SO_REUSEPORT; the kernel spreads connections over them). Raises :class:`BindError`
    (the app cleaned up) when the address cannot be bound."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port)
    try:
        await site.start()
    except OSError as e:
        # Started up (its tick, its ticker, its store) but never served: closed as at a stop.
        await runner.cleanup()
        raise BindError(e.errno, f"cannot bind {host}:{port}: {e.strerror or e}") from e
    server = site._server
    assert server is not None
    bound = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    return runner, int(bound)
