"""Plan ``first_come`` among three replicas (thread mode, real HTTP, one PostgreSQL schema
or SQLite file): check-ins racing on every replica at once. The round's lock bounds the
fills: exactly ``goal x over_selection`` assignments, each device at most once, every
device turned away steered (told when to come back), and none turned away from a free slot
(a fill waits for the lock rather than skip the round); each device taken recorded as the
round's candidate, in the transaction of its assignment."""

from __future__ import annotations

import copy
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from coordinator.clock import FakeClock
from coordinator.store import open_store
from tests.coordinator.replicas.fleet import Spread, start_task, thread_replicas

PLAN = {"rounds": 1, "goal": 4, "over_selection": 1.5, "first_come": True,
        "round_deadline_s": 600.0, "robust": "none",
        "eligibility": {"require_charging": False}}  # fmt: skip
TARGET = math.ceil(PLAN["goal"] * PLAN["over_selection"])  # type: ignore[operator]


@pytest.mark.parametrize(
    ("devices", "twice"),
    [(15, True), (TARGET, False)],  # True: each device on two replicas, racing itself too
    ids=["crowd", "one-each-slot"],
)
def test_racing_check_ins_fill_exactly_the_free_slots_once(
    replica_db: str, tmp_path: Path, tiny_bundle: Path, devices: int, twice: bool
) -> None:
    clock = FakeClock(1_700_000_000.0)
    with thread_replicas(3, replica_db, tmp_path / "blobs", clock) as reps:
        _, task_id, fleet = start_task([r.url for r in reps], tiny_bundle, PLAN, devices)
        callers = [(k, d.to(k % 3)) for k, d in enumerate(fleet)]
        if twice:
            callers += [(k, copy.copy(d).to((k + 1) % 3)) for k, d in enumerate(fleet)]
        start = threading.Barrier(len(callers))

        def check_in(caller: Spread) -> dict[str, Any]:
            start.wait(30)
            return caller.check_in()

        with ThreadPoolExecutor(len(callers)) as pool:
            answers = list(pool.map(check_in, [c for _, c in callers]))
        store = open_store(replica_db)
        try:
            [rnd] = store.list_rounds(task_id)  # opened once
            rows = store.round_assignments(rnd.round_id)
            candidates = store.candidates(rnd.round_id)
        finally:
            store.close()
    assigned = {a.device_id: a.assignment_id for a in rows}
    assert len(rows) == len(assigned) == TARGET  # never more, each device at most once
    # the round's candidates: the devices it took (a lost race records none)
    assert sorted(candidates) == sorted(assigned)
    given: dict[str, set[str]] = {}
    for (k, _), answer in zip(callers, answers, strict=True):
        if answer["action"] == "train":
            given.setdefault(fleet[k].device_id, set()).add(answer["assignment"]["assignment_id"])
        else:  # turned away: told when to come back
            assert answer["action"] == "wait" and answer["reason"] == "window_full", answer
            assert answer["retry_after_s"] > 0
    # Every assignment made was handed out, to its device only, and no other.
    assert given == {d: {a} for d, a in assigned.items()}
