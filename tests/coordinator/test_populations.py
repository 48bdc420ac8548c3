"""A device sees the tasks of the population it registered in, and nothing else: it cannot
check in to another population's tasks, nor download their parameters or bundles."""

from __future__ import annotations

import json
from pathlib import Path

from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.protocol import Route
from tests.fixtures.coordinator import GOOD_CONDITIONS, DeviceHTTP

PLAN = {"rounds": 1, "goal": 1, "over_selection": 1.0, "selection_window_s": 0.0}


def test_devices_stay_in_their_population(
    clocked_coordinator: EmbeddedCoordinator, tiny_bundle: Path
) -> None:
    admin = clocked_coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    task_id = admin.create_task(bundle_id, PLAN, population="phones")["task_id"]
    phone = DeviceHTTP(clocked_coordinator, population="phones")
    board = DeviceHTTP(clocked_coordinator, population="boards")

    # checking in as another population is refused, and changes nothing
    before = clocked_coordinator.call(clocked_coordinator.service.store.snapshot)
    body = {"population": "phones", "runtimes": ["ort-step"], "conditions": GOOD_CONDITIONS}
    status, _, data = board.raw("POST", Route.CHECKIN, json.dumps(body).encode(),
                                {"Content-Type": "application/json"})  # fmt: skip
    assert (status, json.loads(data)["error"]["code"]) == (403, "forbidden")
    assert clocked_coordinator.call(clocked_coordinator.service.store.snapshot) == before
    assert board.check_in()["reason"] == "no_task"  # its own population has none

    # the task's parameters and bundle do not exist for it
    params = Route.VERSION_PARAMS.format(task_id=task_id, version=0)
    manifest = Route.BUNDLE_MANIFEST.format(bundle_id=bundle_id)
    for path in (params, manifest, f"{manifest}/files/params.f32"):
        status, _, data = board.raw("GET", path)
        assert (status, json.loads(data)["error"]["code"]) == (404, "not_found"), path
        assert phone.raw("GET", path)[0] == 200, path
    assert phone.check_in()["action"] == "train"
