"""The HTTP side of secure aggregation: a device's view of its round's session, and its
message for each stage (docs/protocol.md, "Secure aggregation").

::

    GET  /v1/assignments/{assignment_id}/secagg            the stage, and what to answer it with
    POST /v1/assignments/{assignment_id}/secagg/advertise  {"c_public", "s_public"} (base64)
    POST /v1/assignments/{assignment_id}/secagg/share      {"shares": {"<index>": base64}}
    POST /v1/assignments/{assignment_id}/secagg/mask       the packed ring vector (binary)
    POST /v1/assignments/{assignment_id}/secagg/unmask     {"shares": {"<index>": base64}}

Each handler authenticates, finds the device's assignment and runs the task's
:class:`~coordinator.secagg.rounds.SecAggRounds` on the service's worker thread, inside the
task's isolated step (:meth:`~coordinator.service.Coordinator._task_step`), like every other
device call. A message that completes a stage closes it at once; one that completes the
session commits the round (:meth:`~coordinator.service.Coordinator._advance`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from coordinator.errors import Conflict
from coordinator.rounds.base import IN_FLIGHT
from coordinator.rounds.sync import SyncRounds
from coordinator.secagg.rounds import SecAggRounds
from coordinator.service import Coordinator, DeviceIdentity, parse_json
from coordinator.store import Round, Task
from edge_sdk.protocol import ErrorCode, Route

__all__ = ["SecAggEndpoints", "add_routes"]

Run = Callable[..., Awaitable[Any]]
ReadBody = Callable[[web.Request, int, str], Awaitable[bytes]]


class SecAggEndpoints:
    """The coordinator's secure-aggregation calls (worker thread only, like the service)."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord

    def _session(
        self, who: DeviceIdentity, assignment_id: str, *, in_flight: bool = False
    ) -> tuple[Task, Round, SecAggRounds]:
        """``in_flight``: only for an assignment still in flight; one its device aborted (or
        that expired) takes no more messages, as it would take no plain upload."""
        coord = self.coord
        a = coord._own_assignment(who, assignment_id)
        if in_flight and a.state not in IN_FLIGHT:
            raise Conflict(
                f"the assignment is {a.state}: it takes no more messages", ErrorCode.ROUND_CLOSED
            )
        task = coord._task(a.task_id)
        plan = coord._task_step(task, coord._plan, task)
        policy = coord._policy(task)
        if plan.secagg is None or a.action != "train" or not isinstance(policy, SyncRounds):
            raise Conflict("this assignment does not use secure aggregation")
        if task.state == "failed":
            raise Conflict(f"task {task.task_id} failed: {task.failure}")
        rnd = coord.store.get_round(a.round_id)
        assert rnd is not None
        return task, rnd, policy.secagg

    def state(self, who: DeviceIdentity, assignment_id: str) -> dict[str, Any]:
        now = self.coord._now()
        task, rnd, secagg = self._session(who, assignment_id)
        if not rnd.is_open:
            # The session's outcome is the round's: the device stops polling.
            # With pace steering, like the answer to an upload: when to check in again.
            out: dict[str, Any] = {"stage": "closed", "outcome": rnd.state}
            if rnd.metrics.get("reason"):
                out["reason"] = rnd.metrics["reason"]
            return self.coord._paced(who, task, now, out)
        if rnd.state != "reporting":
            raise Conflict("the round has not selected its devices yet", ErrorCode.SECAGG_STAGE)
        return self.coord._task_step(task, secagg.state, task, rnd, who.device_id, now)

    def message(
        self, who: DeviceIdentity, assignment_id: str, stage: str, body: bytes
    ) -> dict[str, Any]:
        coord = self.coord
        now = coord._now()
        task, rnd, secagg = self._session(who, assignment_id, in_flight=True)
        if rnd.state != "reporting":
            raise Conflict(
                f"round {rnd.number} of task {task.task_id} no longer takes messages",
                ErrorCode.ROUND_CLOSED,
            )
        payload: Any = body if stage == "mask" else parse_json(body)
        answer = coord._task_step(
            task, secagg.receive, task, rnd, who.device_id, stage, payload, now
        )
        coord._advance(task.task_id, now)  # a finished session commits the round
        return answer


def add_routes(app: web.Application, coord: Coordinator, run: Run, read_body: ReadBody) -> None:
    """Register the SecAgg routes on ``app``; ``run`` puts a call on the worker thread,
    ``read_body`` reads a body under a limit (413 past it)."""
    cfg = coord.config
    endpoints = SecAggEndpoints(coord)
    routes = web.RouteTableDef()

    @routes.get(Route.SECAGG_STATE)
    async def state(request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization")
        assignment_id = request.match_info["assignment_id"]
        answer = await run(
            lambda: endpoints.state(coord.authenticate(authorization), assignment_id)
        )
        return web.json_response(answer)

    @routes.post(Route.SECAGG_MESSAGE)
    async def message(request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization")
        m = request.match_info
        stage = m["stage"]
        limit = cfg.max_body_bytes if stage == "mask" else cfg.max_json_bytes
        who = await run(coord.authenticate, authorization)
        data = await read_body(request, limit, f"secagg {stage} message")
        answer = await run(endpoints.message, who, m["assignment_id"], stage, data)
        return web.json_response(answer)

    app.add_routes(routes)
