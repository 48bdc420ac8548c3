"""Task fields that several replicas write: the state (an operator's pause, a commit that
completes the task) and the count of evaluation rounds asked for. Each replica must write
them from the task as it is under the task's row lock, not from an older read, or it
overwrites what another replica committed meanwhile."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.clock import FakeClock
from coordinator.store import open_store
from edge_sdk.frame import decode_tensor
from tests.coordinator.replicas.fleet import start_task, thread_replicas

PLAN: dict[str, Any] = {"rounds": 100, "buffer_k": 1, "max_concurrency": 4,
                        "round_deadline_s": 600.0, "robust": "none",
                        "eligibility": {"require_charging": False}}  # fmt: skip
# No replica ticks by itself: the test says which one commits, and when.
QUIET = {"tick_interval_s": 3600.0}


def _meanwhile(act: Any) -> threading.Thread:
    """``act`` on another thread, given a second to finish: on PostgreSQL it commits at
    once unless a row lock holds it; on a SQLite file it waits for the writer's lock."""
    t = threading.Thread(target=act)
    t.start()
    t.join(1.0)
    return t


def test_a_pause_made_while_another_replica_commits_stands(
    replica_db: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """Before, the commit wrote the task's state back as it had read it ("running") over
    the pause another replica committed meanwhile: the operator's pause was lost."""
    with thread_replicas(2, replica_db, tmp_path / "blobs", FakeClock(), **QUIET) as reps:
        admin, task_id, [d] = start_task([r.url for r in reps], tiny_bundle, PLAN, 1, "async")
        committer, pauser = reps
        answer = d.to(0).check_in()
        assert answer["action"] == "train", answer
        delta = np.zeros(decode_tensor(d.params(task_id, 0)).size, np.float32)
        versions = committer.service.ctx.versions
        real = versions.commit_next
        paused: list[Any] = []

        def commit_next(*args: Any, **kwargs: Any) -> int:
            paused.append(_meanwhile(lambda: pauser.call(pauser.service.set_paused, task_id, True)))
            return real(*args, **kwargs)

        versions.commit_next = commit_next  # type: ignore[method-assign]
        # The buffer's one update: its batch commits the version.
        status, body = d.to(0).upload(answer["assignment"]["assignment_id"], delta, 5, key="k")
        versions.commit_next = real  # type: ignore[method-assign]
        assert status == 200, body
        paused[0].join(60)
        task = admin.task(task_id)
        assert task["model_version"] == 1, task
        assert task["state"] == "paused", task


def test_evaluations_asked_for_on_two_replicas_at_once_are_both_counted(
    replica_db: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """Before, each replica wrote its read count plus one: two requests, one evaluation."""
    plan = {**PLAN, "goal": 2}
    del plan["buffer_k"], plan["max_concurrency"]
    with thread_replicas(2, replica_db, tmp_path / "blobs", FakeClock(), **QUIET) as reps:
        _, task_id, _ = start_task([r.url for r in reps], tiny_bundle, plan, 0, "sync")
        first, second = reps
        store = first.service.store
        real = store.update_task
        other: list[threading.Thread] = []

        def update_task(tid: str, **fields: Any) -> None:
            if "pending_evaluations" in fields and not other:
                other.append(_meanwhile(
                    lambda: second.call(second.service.schedule_evaluation, task_id, b"{}")))
            real(tid, **fields)

        store.update_task = update_task  # type: ignore[method-assign]
        first.call(first.service.schedule_evaluation, task_id, b"{}")
        store.update_task = real  # type: ignore[method-assign]
        other[0].join(60)
        check = open_store(replica_db)
        try:
            task = check.get_task(task_id)
        finally:
            check.close()
        assert task is not None and task.pending_evaluations == 2, task
