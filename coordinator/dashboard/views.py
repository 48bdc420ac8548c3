"""What the dashboard's JSON endpoints answer, read from the store (and the metrics registry).

Every function runs on the service's worker thread (the store is not thread-safe) and returns
plain JSON-able dicts. Figures come from durable records wherever the store has them:
assignments (selected, delivered, reported, aborted with the device's phase and code,
expired), accepted updates (bytes, examples, loss, async staleness), closed rounds' metrics.
What only this process saw (check-in outcomes, refused uploads, request rates) comes from
:class:`~coordinator.metrics.ServiceMetrics` and says so (``since_start``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from coordinator.dashboard.funnel import LATE_CODES, FunnelCounts, parse_abort_reason
from coordinator.dashboard.history import Facts, RoundFacts
from coordinator.errors import NotFound, TaskFailure
from coordinator.metrics import active_devices, storage_bytes

if TYPE_CHECKING:
    from coordinator.metrics import ServiceMetrics
    from coordinator.service import Coordinator
    from coordinator.store import Assignment, Round, Task

__all__ = [
    "PARTICIPATION",
    "overview",
    "participation",
    "population",
    "round_detail",
    "service",
    "task_detail",
]

# Rounds the task view lists in full (charts and table); older ones count in its totals.
DEFAULT_LAST_ROUNDS = 300


def _epsilon(coord: Coordinator, task: Task) -> float | None:
    """The privacy spent by a DP task: ``epsilon`` in the metrics of the round that made the
    current version; before its first commit, its plan's budget (``dp.epsilon`` or
    ``dp.budget``). None for a task without ``dp`` in its plan."""
    dp = task.plan.get("dp")
    if not isinstance(dp, dict):
        return None
    version = coord.store.get_version(task.task_id, task.model_version)
    rnd = None if version is None or version.round_id is None else coord.store.get_round(
        version.round_id
    )
    for eps in (rnd.metrics.get("epsilon") if rnd else None, dp.get("epsilon"), dp.get("budget")):
        if isinstance(eps, int | float) and not isinstance(eps, bool):
            return float(eps)
    return None


def _task_row(coord: Coordinator, task: Task) -> dict[str, Any]:
    rnd = coord.store.open_round(task.task_id)
    return {
        "task_id": task.task_id,
        "name": task.name,
        "mode": task.mode,
        "state": task.state,
        "population": task.population,
        "model_version": task.model_version,
        "rounds_completed": task.rounds_completed,
        "rounds_planned": int(task.plan.get("rounds") or 0),
        "epsilon": _epsilon(coord, task),
        "current_round": None if rnd is None else {"round": rnd.number, "state": rnd.state},
    }


def overview(coord: Coordinator) -> dict[str, Any]:
    tasks = [_task_row(coord, t) for t in coord.store.list_tasks()]
    return {
        "now": coord.clock.now(),
        "tasks": tasks,
        "dp": any(t["epsilon"] is not None for t in tasks),
        "devices_registered": coord.store.count_devices(),
        "updates_accepted": coord.store.count_accepted_updates(),
    }


def _task(coord: Coordinator, task_id: str) -> Task:
    task = coord.store.get_task(task_id)
    if task is None:
        raise NotFound(f"no task {task_id!r}")
    return task


def participation(assignment: Assignment, refused: Mapping[str, str]) -> str:
    """What became of one assignment, as one of :data:`PARTICIPATION` (disjoint)."""
    code = refused.get(assignment.assignment_id)
    if assignment.state == "reported":
        return "reported"
    if code is not None and code not in LATE_CODES:
        return "refused"  # the device was told so and aborted (phase upload), or went quiet
    if assignment.state == "aborted":
        return "aborted"
    if assignment.state == "expired":
        return "late" if code is not None else "dropped"
    return "in_flight"


# reported; refused (a bad update); aborted (the device gave up and said why); late (its
# upload came after the round closed); dropped (expired without a word: cut off when the goal
# was reached, or gone); in_flight (still training).
PARTICIPATION = ("reported", "refused", "aborted", "late", "dropped", "in_flight")


def _participants(
    assignments: list[Assignment], refused: Mapping[str, str]
) -> dict[str, Any]:
    kinds = Counter(participation(a, refused) for a in assignments)
    why: Counter[str] = Counter()
    for a in assignments:
        if a.state == "aborted":
            reason, phase, code = parse_abort_reason(a.abort_reason)
            why[phase or reason if code is None else f"{phase or reason}/{code}"] += 1
    return {
        "selected": len(assignments),
        "delivered": sum(1 for a in assignments if a.delivered_at is not None),
        **{k: kinds.get(k, 0) for k in PARTICIPATION},
        "abort_reasons": dict(sorted(why.items())),
    }


def _private(task: Task) -> bool:
    """A DP task's device-reported loss and accuracy carry no noise: the guarantee covers
    what leaves the service, and these pages are served out of it, so they are withheld."""
    return "dp" in task.plan


def _round_row(
    coord: Coordinator, rnd: Round, facts: Facts, num_parameters: int,
    refused: Mapping[str, str], private: bool = False,
) -> dict[str, Any]:
    store = coord.store
    m = rnd.metrics
    end = rnd.closed_at if rnd.closed_at is not None else coord.clock.now()
    part = _participants(facts.assignments, refused)
    if rnd.is_open:
        totals = store.update_totals(rnd.round_id)
        updates, bytes_in = totals.count, totals.payload_bytes
        loss, accuracy = totals.loss, totals.accuracy
    else:
        updates, bytes_in = int(m.get("reported") or 0), int(m.get("bytes_in") or 0)
        loss, accuracy = m.get("loss"), m.get("accuracy")
    if private:
        loss = accuracy = None
    return {
        "round": rnd.number,
        "kind": rnd.kind,
        "state": rnd.state,
        "base_version": rnd.base_version,
        "model_version": m.get("model_version"),
        "goal": rnd.goal,
        "target": rnd.target,
        "candidates": facts.candidates,
        **part,
        # Updates folded into this round (async: also from assignments of earlier buffers).
        "updates": updates if rnd.kind == "train" else 0,
        "loss": loss,
        "accuracy": accuracy,
        "bytes_in": bytes_in,
        "bytes_out": int(m.get("bytes_out") or 0),
        # What the same reports would have cost as raw float32 vectors.
        "fp32_bytes": updates * num_parameters * 4 if rnd.kind == "train" else 0,
        "duration_s": end - rnd.opened_at,
        "mean_staleness": m.get("mean_staleness"),
        "robust": _robust_figures(m.get("robust")),
        "reason": m.get("reason"),
        "opened_at": rnd.opened_at,
        "closed_at": rnd.closed_at,
    }


ROBUST_FIGURES = (
    "aggregator", "updates", "capped", "example_cap", "clip_bound", "clipped", "norm_median",
    "norm_max",
)


def _defended(coord: Coordinator, task: Task) -> bool:
    """Whether the task's commits record update norms (its plan's ``robust`` is not
    "none"; DP and secure aggregation make it so)."""
    try:
        return not coord._plan(task).robust.undefended
    except TaskFailure:  # a stored plan that no longer parses: the task failed on it
        return False


def _robust_figures(robust: Any) -> dict[str, Any] | None:
    """What robust aggregation recorded at a round's commit (None: plain FedAvg, or open)."""
    if not isinstance(robust, Mapping):
        return None
    return {k: robust.get(k) for k in ROBUST_FIGURES}


def task_detail(
    coord: Coordinator,
    metrics: ServiceMetrics,
    cache: RoundFacts,
    task_id: str,
    last: int = DEFAULT_LAST_ROUNDS,
) -> dict[str, Any]:
    """The task view: rows for its ``last`` rounds; versions, staleness and the funnel over
    all of them."""
    task = _task(coord, task_id)
    n = coord.ctx.num_parameters(task)
    refused = metrics.refused_uploads()
    history = cache.history(task, refused, metrics.refusals)

    def build(rnd: Round, facts: Facts) -> dict[str, Any]:
        return _round_row(coord, rnd, facts, n, refused, _private(task))

    rounds = [cache.row(r, metrics.refusals, build) for r in history.rounds[-last:]]
    plan = task.plan
    return {
        "task": {**_task_row(coord, task), "num_parameters": n, "codec": plan.get("codec")},
        "rounds_total": len(history.rounds),
        "rounds": rounds,
        "versions": [history.versions[k] for k in sorted(history.versions)],
        "staleness": [{"staleness": k, "updates": history.staleness[k]}
                      for k in sorted(history.staleness)],
        # Per committed round: update norms against the clipping bound, clipped and capped
        # counts; None for a task without robust defences (its commits record the
        # aggregator only), from its plan: a defended task has none before its first commit.
        "norms": [{"round": r["round"], **r["robust"]} for r in rounds if r.get("robust")]
        if _defended(coord, task)
        else None,
        "max_update_norm": plan.get("max_update_norm"),
        "funnel": history.funnel.to_json(),
    }


def round_detail(
    coord: Coordinator, metrics: ServiceMetrics, task_id: str, number: str
) -> dict[str, Any]:
    task = _task(coord, task_id)
    rnd = next(
        (r for r in coord.store.list_rounds(task_id) if str(r.number) == number), None
    )
    if rnd is None:
        raise NotFound(f"task {task_id} has no round {number!r}")
    refused = metrics.refused_uploads()
    updates = {u.assignment_id: u for u in coord.store.round_updates(rnd.round_id)}
    reports = {r.assignment_id: r for r in coord.store.round_eval_reports(rnd.round_id)}
    rows = []
    for a in coord.store.round_assignments(rnd.round_id):
        reason, phase, code = parse_abort_reason(a.abort_reason) if a.abort_reason else (
            None, None, None
        )
        u = updates.get(a.assignment_id)
        e = reports.get(a.assignment_id)
        rows.append({
            "device_id": a.device_id,
            "state": a.state,
            "created_at": a.created_at,
            "delivered_at": a.delivered_at,
            "closed_at": a.closed_at,
            "abort_reason": reason,
            "abort_phase": phase,
            "abort_code": code,
            "upload_refused": refused.get(a.assignment_id),
            "num_examples": u.num_examples if u else (e.num_examples if e else None),
            "loss": u.loss if u else (e.loss if e else None),
            "accuracy": e.accuracy if e else (u.report.get("accuracy") if u else None),
            "bytes": u.payload_bytes if u else None,
            "staleness": u.report.get("staleness") if u else None,
            "wall_time_s": u.report.get("wall_time_s") if u else None,
        })
    # Updates folded into an async buffer may come from assignments of earlier rounds.
    for u in updates.values():
        if not any(r["device_id"] == u.device_id and r["bytes"] for r in rows):
            rows.append({
                "device_id": u.device_id, "state": "reported", "created_at": None,
                "delivered_at": None, "closed_at": u.accepted_at, "abort_reason": None,
                "abort_phase": None, "abort_code": None, "upload_refused": None,
                "num_examples": u.num_examples, "loss": u.loss,
                "accuracy": u.report.get("accuracy"), "bytes": u.payload_bytes,
                "staleness": u.report.get("staleness"),
                "wall_time_s": u.report.get("wall_time_s"),
            })
    if _private(task):
        for row in rows:
            row.update(loss=None, accuracy=None)
    n = coord.ctx.num_parameters(task)
    return {
        "task": _task_row(coord, task),
        "round": _round_row(coord, rnd, RoundFacts(coord.store).get(rnd), n, refused,
                            _private(task)),
        "metrics": rnd.metrics,
        "assignments": rows,
    }


def population(coord: Coordinator, metrics: ServiceMetrics, cache: RoundFacts) -> dict[str, Any]:
    refused = metrics.refused_uploads()
    platforms: Counter[str] = Counter()
    runtimes: Counter[str] = Counter()
    for platform, arch, runtimes_json, count in _device_groups(coord):
        platforms[f"{platform}/{arch}"] += count
        for r in json.loads(runtimes_json or "[]"):
            runtimes[r] += count
    backends: Counter[str] = Counter()
    for task in coord.store.list_tasks():
        manifest = coord.ctx.manifest(task.bundle_id) or {}
        for name, info in (manifest.get("backends") or {}).items():
            if isinstance(info, dict) and info.get("supported"):
                backends[name] += 1
    funnel = FunnelCounts()
    for task in coord.store.list_tasks():
        funnel.merge(cache.history(task, refused, metrics.refusals).funnel)
    events = metrics.reading()
    checkins = events.labelled("fedge_checkins_total", "outcome")
    ineligible = events.labelled("fedge_checkin_ineligible_total", "reason")
    return {
        "devices_registered": coord.store.count_devices(),
        "devices_active": active_devices(coord, coord.clock.now()),
        "platforms": dict(platforms.most_common()),
        "runtimes": dict(runtimes.most_common()),
        "task_backends": dict(backends.most_common()),
        "checkins": {
            "since_start": True,
            "total": sum(checkins.values()),
            "outcomes": checkins,
            "ineligible_reasons": {reason: int(n) for reason, n in ineligible.items()},
        },
        "funnel": funnel.to_json(),
    }


def _device_groups(coord: Coordinator) -> list[tuple[str, str, str, int]]:
    """Devices per (platform, arch, runtimes JSON). The Store interface has no device listing;
    both SQL backends (SQLite, PostgreSQL) answer this one grouped query through their common
    query method. A backend without it: the population view shows counts only."""
    query = getattr(coord.store, "_query", None)
    if query is None:
        return []
    rows = query(
        "select platform, arch, runtimes, count(*) as n from devices "
        "group by platform, arch, runtimes"
    )
    return [(str(r["platform"]), str(r["arch"]), str(r["runtimes"]), int(r["n"])) for r in rows]


def service(coord: Coordinator, metrics: ServiceMetrics) -> dict[str, Any]:
    db_bytes, blob_bytes = storage_bytes(coord)
    events = metrics.reading()
    return {
        "now": coord.clock.now(),
        "since_start": True,
        "requests": events.request_table(),
        "uploads": events.labelled("fedge_uploads_total", "outcome"),
        "open_rounds": len(coord.store.open_rounds()),
        "db_bytes": db_bytes,
        "blob_bytes": blob_bytes,
        "updates_accepted": coord.store.count_updates(),
    }
