"""The dashboard's routes without a browser: the admin token, the assets, the OpenAPI entries,
and the figures of its JSON endpoints against the store and against what the test sent.

The browser tests (``tests/browser``, slow) check that the page shows these same figures.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.app import OPENAPI_PATH
from coordinator.dashboard import history
from coordinator.dashboard.funnel import parse_abort_reason
from coordinator.dashboard.routes import STATIC_DIR
from coordinator.dashboard.views import PARTICIPATION
from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.codecs import decode_update, encode_update
from edge_sdk.protocol import Route
from tests.fixtures.coordinator import DeviceHTTP, admin_get, sample, scrape

N = 64
DATA_ROUTES = (
    Route.ADMIN_DASHBOARD_OVERVIEW,
    Route.ADMIN_DASHBOARD_POPULATION,
    Route.ADMIN_DASHBOARD_SERVICE,
    Route.ADMIN_DASHBOARD_TASK.format(task_id="t-x"),
    Route.ADMIN_DASHBOARD_ROUND.format(task_id="t-x", number="1"),
    Route.METRICS,
)


def test_data_needs_the_admin_token_and_the_page_does_not(
    coordinator: EmbeddedCoordinator,
) -> None:
    for path in DATA_ROUTES:
        for token in (None, "wrong", coordinator.admin_token[:-1]):
            status, body = admin_get(coordinator, path, token)
            assert status == 401, path
            assert body["error"]["code"] == "unauthorized"
    status, page = admin_get(coordinator, Route.DASHBOARD)
    assert status == 200 and b'id="login-form"' in page
    # The page holds no data: nothing of the coordinator's state is in it.
    assert coordinator.admin_token.encode() not in page


def test_every_asset_the_page_names_is_served_from_the_package(
    coordinator: EmbeddedCoordinator,
) -> None:
    _, page = admin_get(coordinator, Route.DASHBOARD)
    named = re.findall(rb'(?:src|href)="(/dashboard/static/[^"]+)"', page)
    assert len(named) == 3
    for path in named:
        status, body = admin_get(coordinator, path.decode())
        assert status == 200
        assert body == (STATIC_DIR / path.decode().rsplit("/", 1)[1]).read_bytes()
    # No external URL anywhere: the dashboard works without the internet.
    for asset in STATIC_DIR.iterdir():
        if asset.suffix in (".html", ".js", ".css") and asset.name != "chart.umd.min.js":
            assert not re.search(rb"https?://", asset.read_bytes()), asset.name
    chart = (STATIC_DIR / "chart.umd.min.js").read_bytes()
    assert chart.startswith(b"/*!\n * Chart.js v4")
    assert b"MIT License" in (STATIC_DIR / "chart.js.LICENSE.md").read_bytes()


@pytest.mark.parametrize(
    "path", ["app.js/../index.html", "..%2Fviews.py", "views.py", "%2e%2e%2fapp.py", "nope.js"]
)
def test_unknown_assets_are_404(coordinator: EmbeddedCoordinator, path: str) -> None:
    status, body = admin_get(coordinator, "/dashboard/static/" + path)
    assert status == 404
    assert body["error"]["code"] == "not_found"


def test_dashboard_routes_are_documented_and_vice_versa(
    coordinator: EmbeddedCoordinator,
) -> None:
    doc = json.loads(OPENAPI_PATH.read_text())
    mine = ("/dashboard", "/metrics", "/v1/admin/dashboard")
    documented = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops
                  if p.startswith(mine)}
    registered = {
        (re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", r.resource.canonical), r.method)
        for r in coordinator._runner.app.router.routes()
        if r.method != "HEAD" and r.resource is not None and r.resource.canonical.startswith(mine)
    }
    assert registered == documented
    assert len(registered) == 8
    abort = doc["paths"][Route.ASSIGNMENT_ABORT]["post"]["requestBody"]["content"]
    props = abort["application/json"]["schema"]["properties"]
    assert set(props["phase"]["enum"]) == {"download", "runtime_load", "training",
                                          "conditions_lapsed", "upload"}


def _upload(dev: DeviceHTTP, aid: str, frame: bytes, examples: int, loss: float) -> int:
    return dev.upload_raw(aid, frame, report={"num_examples": examples, "loss": loss})[0]


def test_task_and_round_figures_agree_with_what_was_sent(
    clocked_coordinator: EmbeddedCoordinator, fake_clock: Any, tiny_bundle: Path
) -> None:
    coord = clocked_coordinator
    admin = coord.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    plan = {"goal": 2, "over_selection": 2.0, "selection_window_s": 5.0, "rounds": 5,
            "round_deadline_s": 600.0, "max_update_norm": 100.0, "codec": {"name": "int8"}}
    task_id = admin.create_task(bundle_id, plan, name="figures")["task_id"]
    devs = [DeviceHTTP(coord) for _ in range(4)]
    for d in devs:
        assert d.check_in()["reason"] == "selecting"
    fake_clock.advance(6.0)
    aids = [d.check_in()["assignment"]["assignment_id"] for d in devs]
    rng = np.random.default_rng(1)
    frames = [encode_update(rng.normal(0, 0.1, N).astype(np.float32), "int8")[0]
              for _ in range(2)]
    # devs[0]: a bad frame (refused), then gives up; devs[1] aborts at runtime load;
    # devs[2] and devs[3] report: the goal, the round commits.
    assert _upload(devs[0], aids[0], b"\x00" * 40, 10, 0.5) == 400
    status, _ = devs[0].post_json(Route.ASSIGNMENT_ABORT.format(assignment_id=aids[0]),
                                  {"reason": "error", "phase": "upload", "code": "refused"})
    assert status == 200
    status, _ = devs[1].post_json(Route.ASSIGNMENT_ABORT.format(assignment_id=aids[1]),
                                  {"reason": "error", "phase": "runtime_load",
                                   "code": "unsupported"})
    assert status == 200
    fake_clock.advance(2.0)
    assert _upload(devs[2], aids[2], frames[0], 30, 0.75) == 200
    assert _upload(devs[3], aids[3], frames[1], 10, 0.25) == 200

    status, d = admin_get(coord, Route.ADMIN_DASHBOARD_TASK.format(task_id=task_id),
                          coord.admin_token)
    assert status == 200
    (rnd,) = d["rounds"]
    assert rnd["state"] == "committed" and rnd["model_version"] == 1
    assert {k: rnd[k] for k in PARTICIPATION} == {
        "reported": 2, "refused": 1, "aborted": 1, "late": 0, "dropped": 0, "in_flight": 0}
    assert rnd["selected"] == 4 and rnd["candidates"] == 4
    assert rnd["abort_reasons"] == {"runtime_load/unsupported": 1, "upload/refused": 1}
    assert rnd["bytes_in"] == len(frames[0]) + len(frames[1])
    assert rnd["fp32_bytes"] == 2 * N * 4
    # example-weighted, each update counting at most the median declared count (20), as the
    # default robust plan weighed it in the commit
    assert rnd["loss"] == pytest.approx((20 * 0.75 + 10 * 0.25) / 30)
    assert rnd["duration_s"] == pytest.approx(8.0)
    assert d["versions"] == [{"version": 1, "train_loss": rnd["loss"]}]
    # The default defences read the updates back: their norms as the server decoded them.
    norms = [float(np.linalg.norm(decode_update(f, expected_length=N))) for f in frames]
    (shown,) = d["norms"]
    assert shown["round"] == 1 and shown["updates"] == 2 and shown["aggregator"] == "fedavg"
    assert shown["norm_median"] == pytest.approx(np.median(norms))
    assert shown["norm_max"] == pytest.approx(max(norms))
    # A task's first bound is the target quantile (0.5 by default) of its first updates' norms.
    assert shown["clip_bound"] == pytest.approx(float(np.quantile(norms, 0.5)))
    assert shown["clipped"] == 1
    stored = coord.call(coord.service.store.list_rounds, task_id)
    assert rnd["duration_s"] == pytest.approx(stored[0].closed_at - stored[0].opened_at)

    round_page = Route.ADMIN_DASHBOARD_ROUND.format(task_id=task_id, number=1)
    status, page = admin_get(coord, round_page, coord.admin_token)
    rows = {r["device_id"]: r for r in page["assignments"]}
    assert rows[devs[0].device_id]["upload_refused"] == "malformed_frame"
    assert rows[devs[0].device_id]["abort_phase"] == "upload"
    assert rows[devs[1].device_id]["abort_code"] == "unsupported"
    assert [rows[x.device_id]["bytes"] for x in devs[2:]] == [len(f) for f in frames]
    assert [rows[x.device_id]["num_examples"] for x in devs[2:]] == [30, 10]

    for path in (Route.ADMIN_DASHBOARD_TASK.format(task_id="t-nope"),
                 Route.ADMIN_DASHBOARD_ROUND.format(task_id=task_id, number="99"),
                 Route.ADMIN_DASHBOARD_ROUND.format(task_id=task_id, number="x")):
        status, body = admin_get(coord, path, coord.admin_token)
        assert status == 404 and body["error"]["code"] == "not_found"

    status, overview = admin_get(coord, Route.ADMIN_DASHBOARD_OVERVIEW, coord.admin_token)
    (task,) = overview["tasks"]
    assert (task["name"], task["model_version"], task["rounds_completed"],
            task["rounds_planned"], task["epsilon"]) == ("figures", 1, 1, 5, None)
    assert overview["dp"] is False
    assert overview["updates_accepted"] == coord.call(coord.service.store.count_updates) == 2

    status, pop = admin_get(coord, Route.ADMIN_DASHBOARD_POPULATION, coord.admin_token)
    assert pop["devices_registered"] == 4 and pop["devices_active"] == 4
    assert pop["runtimes"] == {"ort-step": 4} and pop["platforms"] == {"linux/x86_64": 4}
    assert pop["checkins"]["outcomes"] == {"selecting": 4, "train": 4}
    status, svc = admin_get(coord, Route.ADMIN_DASHBOARD_SERVICE, coord.admin_token)
    checkin = next(r for r in svc["requests"] if r["route"] == Route.CHECKIN)
    assert checkin["requests"] == 8 and checkin["errors"] == 0
    update = next(r for r in svc["requests"] if r["route"] == Route.ASSIGNMENT_UPDATE)
    assert (update["requests"], update["errors"]) == (3, 1)
    assert svc["uploads"] == {"accepted": 2, "malformed_frame": 1}
    assert svc["queue_depth"] == 0


def test_bytes_out_counts_the_parameter_bytes_sent(
    coordinator: EmbeddedCoordinator, tiny_bundle: Path
) -> None:
    """A round's ``bytes_out`` is what its devices were sent: a conditional download answered
    ``304`` sends no frame, a resumed one (``Range``) only the rest of it."""
    admin = coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    plan = {"goal": 1, "over_selection": 1.0, "selection_window_s": 0.0, "rounds": 2}
    task_id = admin.create_task(bundle_id, plan)["task_id"]
    device = DeviceHTTP(coordinator)
    aid = device.check_in()["assignment"]["assignment_id"]
    path = Route.VERSION_PARAMS.format(task_id=task_id, version=0)
    status, headers, frame = device.raw("GET", path)
    assert status == 200
    for _ in range(3):
        status, _, body = device.raw("GET", path, headers={"If-None-Match": headers["etag"]})
        assert (status, body) == (304, b"")
    status, _, tail = device.raw("GET", path, headers={"Range": f"bytes={len(frame) - 10}-"})
    assert (status, tail) == (206, frame[-10:])
    assert device.upload(aid, np.zeros(N))[0] == 200
    (rnd,) = admin.rounds(task_id)
    assert rnd["state"] == "committed"
    assert rnd["metrics"]["bytes_out"] == len(frame) + len(tail)
    device.close()


def test_a_first_come_round_shows_the_devices_it_took_as_candidates(
    clocked_coordinator: EmbeddedCoordinator, tiny_bundle: Path
) -> None:
    coord = clocked_coordinator
    admin = coord.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    plan = {"goal": 2, "over_selection": 1.5, "first_come": True, "rounds": 5,
            "round_deadline_s": 600.0}  # fmt: skip
    task_id = admin.create_task(bundle_id, plan, name="first come")["task_id"]
    answers = [DeviceHTTP(coord).check_in() for _ in range(5)]
    assert [a["action"] for a in answers] == ["train"] * 3 + ["wait"] * 2
    status, d = admin_get(coord, Route.ADMIN_DASHBOARD_TASK.format(task_id=task_id),
                          coord.admin_token)  # fmt: skip
    assert status == 200
    (rnd,) = d["rounds"]
    assert rnd["state"] == "reporting" and (rnd["candidates"], rnd["selected"]) == (3, 3)


@pytest.mark.parametrize(
    ("note", "parsed"),
    [
        ("error [download/network]", ("error", "download", "network")),
        ("conditions_lapsed [conditions_lapsed/conditions]",
         ("conditions_lapsed", "conditions_lapsed", "conditions")),
        ("conditions_lapsed: not charging", ("conditions_lapsed", "conditions_lapsed", None)),
        ("error: ValueError: bad", ("error", None, None)),
        ("user", ("user", None, None)),
        (None, ("error", None, None)),
    ],
)
def test_abort_notes_parse_old_and_new_forms(note: str | None, parsed: tuple[Any, ...]) -> None:
    assert parse_abort_reason(note) == parsed


def test_rounds_retention_deleted_leave_the_views_but_not_the_counters(
    coordinator: EmbeddedCoordinator, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    admin = coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    plan = {"goal": 1, "over_selection": 1.0, "selection_window_s": 0.0, "rounds": 5}
    task_id = admin.create_task(bundle_id, plan)["task_id"]
    dev = DeviceHTTP(coordinator)
    for _ in range(2):
        answer = dev.check_in()
        if answer["action"] == "wait":
            answer = dev.check_in()
        assert dev.upload(answer["assignment"]["assignment_id"], np.full(N, 0.01))[0] == 200
    path = Route.ADMIN_DASHBOARD_TASK.format(task_id=task_id)
    before = admin_get(coordinator, path, coordinator.admin_token)[1]
    assert [r["round"] for r in before["rounds"]] == [1, 2]
    scraped = scrape(coordinator)
    store = coordinator.service.store
    first = coordinator.call(store.list_rounds, task_id)[0]
    coordinator.call(store.delete_rounds, [first.round_id])  # what retention does

    # Within RELIST_S the kept list still shows it; the next listing drops it.
    kept = admin_get(coordinator, path, coordinator.admin_token)[1]
    assert [r["round"] for r in kept["rounds"]] == [1, 2]
    monkeypatch.setattr(history, "RELIST_S", 0.0)
    after = admin_get(coordinator, path, coordinator.admin_token)[1]
    assert [r["round"] for r in after["rounds"]] == [2]
    assert after["funnel"]["stages"][-1]["devices"] == 1  # the deleted round's report is gone
    rescraped = scrape(coordinator)
    assert sample(rescraped, "fedge_updates_accepted_total") == 2
    for name in ("fedge_updates_accepted_total", "fedge_update_bytes_total"):
        assert sample(rescraped, name) == sample(scraped, name) > 0
    key = {"mode": "sync", "outcome": "committed"}
    assert sample(rescraped, "fedge_round_duration_seconds_count", **key) == 2
    assert coordinator.call(store.count_updates) == 1  # the store itself went down
    overview = admin_get(coordinator, Route.ADMIN_DASHBOARD_OVERVIEW, coordinator.admin_token)[1]
    assert overview["updates_accepted"] == 2  # as /v1/status: every update accepted


def test_epsilon_column_shows_the_spent_privacy_of_dp_tasks_only(
    coordinator: EmbeddedCoordinator, tiny_bundle: Path
) -> None:
    from coordinator.store import Round, Task, Version

    admin = coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    admin.create_task(bundle_id, {"rounds": 3}, name="plain")
    store = coordinator.service.store
    # A DP task as the privacy engineer's plans store it: a budget, then spent epsilon per
    # committed round in the round's metrics.
    task = Task("t-dp", "private", bundle_id, "sync", "default", {"rounds": 3, "dp": {
        "epsilon": 8.0}}, "running", 0, 0, 0, 0.0)
    coordinator.call(store.add_task, task)
    coordinator.call(store.add_version, Version("t-dp", 0, "0" * 64, None, None, 0.0))

    def epsilons() -> dict[str, Any]:
        status, body = admin_get(
            coordinator, Route.ADMIN_DASHBOARD_OVERVIEW, coordinator.admin_token
        )
        assert status == 200 and body["dp"] is True
        return {t["name"]: t["epsilon"] for t in body["tasks"]}

    assert epsilons() == {"plain": None, "private": 8.0}  # before any round: the budget
    rnd = coordinator.call(store.add_round, Round(0, "t-dp", 1, "train", "reporting", 0, 1, 1,
                                                  1, 0.0, 0.0))
    coordinator.call(lambda: store.update_round(rnd.round_id, state="committed", closed_at=1.0,
                                                metrics={"epsilon": 1.25, "model_version": 1}))
    coordinator.call(store.add_version, Version("t-dp", 1, "0" * 64, None, rnd.round_id, 1.0))
    coordinator.call(lambda: store.update_task("t-dp", model_version=1, rounds_completed=1))
    assert epsilons() == {"plain": None, "private": 1.25}


def test_kept_history_equals_a_fresh_read_as_an_async_task_moves_on(
    coordinator: EmbeddedCoordinator, tiny_bundle: Path
) -> None:
    """The app's long-lived cache against a cold read of the store, after every step."""
    from coordinator.dashboard.history import RoundFacts
    from coordinator.dashboard.routes import METRICS_KEY
    from coordinator.dashboard.views import task_detail

    admin = coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    plan = {"rounds": 4, "buffer_k": 1, "max_concurrency": 4, "max_staleness": 3}
    task_id = admin.create_task(bundle_id, plan, mode="async")["task_id"]
    metrics = coordinator._runner.app[METRICS_KEY]
    service = coordinator.service
    path = Route.ADMIN_DASHBOARD_TASK.format(task_id=task_id)

    def same_as_fresh() -> dict[str, Any]:
        kept = admin_get(coordinator, path, coordinator.admin_token)[1]
        fresh = coordinator.call(
            lambda: task_detail(service, metrics, RoundFacts(service.store), task_id))
        fresh = json.loads(json.dumps(fresh))
        for answer in (fresh, kept):  # an open round's duration is "until now"
            for row in answer["rounds"]:
                if row["closed_at"] is None:
                    row.pop("duration_s")
        assert fresh == kept
        return kept

    a, b, c = (DeviceHTTP(coordinator) for _ in range(3))
    aid_a = a.check_in()["assignment"]["assignment_id"]
    aid_b = b.check_in()["assignment"]["assignment_id"]
    same_as_fresh()
    assert a.upload(aid_a, np.full(N, 0.01))[0] == 200  # v1: round 1 closes, b still out
    d = same_as_fresh()
    assert d["rounds"][0]["state"] == "committed" and d["rounds"][0]["in_flight"] == 1
    aid_c = c.check_in()["assignment"]["assignment_id"]
    assert b.upload(aid_b, np.full(N, 0.02))[0] == 200  # staleness 1, folded into round 2
    d = same_as_fresh()
    assert d["staleness"] == [{"staleness": 0, "updates": 1}, {"staleness": 1, "updates": 1}]
    assert d["rounds"][0]["in_flight"] == 0 and d["rounds"][0]["reported"] == 2
    status, _ = c.post_json(Route.ASSIGNMENT_ABORT.format(assignment_id=aid_c),
                            {"reason": "error", "phase": "training", "code": "non_finite"})
    assert status == 200
    d = same_as_fresh()
    lost = {s["stage"]: s["lost"] for s in d["funnel"]["stages"]}
    assert lost["runtime_loaded"] == {"training/non_finite": 1}
    assert [s["devices"] for s in d["funnel"]["stages"]] == [3, 3, 3, 2, 2, 2]


def test_a_late_upload_moves_its_device_up_the_funnel(
    clocked_coordinator: EmbeddedCoordinator, fake_clock: Any, tiny_bundle: Path
) -> None:
    coord = clocked_coordinator
    admin = coord.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    plan = {"goal": 1, "over_selection": 3.0, "selection_window_s": 5.0, "rounds": 3}
    task_id = admin.create_task(bundle_id, plan)["task_id"]
    devs = [DeviceHTTP(coord) for _ in range(3)]
    for d in devs:
        assert d.check_in()["reason"] == "selecting"
    fake_clock.advance(6.0)
    aids = [d.check_in()["assignment"]["assignment_id"] for d in devs]
    path = Route.ADMIN_DASHBOARD_TASK.format(task_id=task_id)
    assert devs[0].upload(aids[0], np.full(N, 0.01))[0] == 200  # the goal: the round commits
    before = admin_get(coord, path, coord.admin_token)[1]  # cached: two expired, no word from them
    lost = {s["stage"]: s["lost"] for s in before["funnel"]["stages"]}
    assert lost["delivered"] == {"dropped": 2} and before["funnel"]["dropped"] == 2
    status, body = devs[1].upload(aids[1], np.full(N, 0.02))
    assert status == 409 and body["error"]["code"] == "round_closed"

    d = admin_get(coord, path, coord.admin_token)[1]
    reached = [s["devices"] for s in d["funnel"]["stages"]]
    assert reached == [3, 2, 2, 2, 2, 1]  # the late one trained and sent; one said nothing
    lost = {s["stage"]: s["lost"] for s in d["funnel"]["stages"]}
    assert lost["delivered"] == {"dropped": 1} and lost["uploaded"] == {"late": 1}
    assert d["funnel"]["dropped"] == 1
    (rnd,) = d["rounds"]
    assert (rnd["reported"], rnd["late"], rnd["dropped"]) == (1, 1, 1)
    population = admin_get(coord, Route.ADMIN_DASHBOARD_POPULATION, coord.admin_token)[1]
    assert population["funnel"] == d["funnel"]


def test_without_group_commit_another_devices_oversized_upload_marks_nothing_refused(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    """Group commit off: a device posting an oversized body to an assignment it does not
    hold is refused as not its own (before any body is read), and the round page does not
    show the holder's assignment as refused."""
    with EmbeddedCoordinator(tmp_path / "c.db", group_commit=False,
                             max_body_bytes=4096) as coord:  # fmt: skip
        admin = coord.admin()
        plan = {"goal": 1, "over_selection": 1.0, "selection_window_s": 0.0, "rounds": 1,
                "round_deadline_s": 600.0}  # fmt: skip
        task_id = admin.create_task(admin.upload_bundle(tiny_bundle)["bundle_id"], plan)["task_id"]
        holder, other = DeviceHTTP(coord), DeviceHTTP(coord)
        answer = holder.check_in()
        if answer["action"] == "wait":
            answer = holder.check_in()
        aid = answer["assignment"]["assignment_id"]
        status, body = other.upload_raw(aid, b"\0" * 5000, report={"num_examples": 1})
        assert (status, body["error"]["code"]) == (403, "forbidden")
        page = Route.ADMIN_DASHBOARD_ROUND.format(task_id=task_id, number=1)
        status, detail = admin_get(coord, page, coord.admin_token)
        assert status == 200
        (row,) = detail["assignments"]
        assert row["device_id"] == holder.device_id and row["upload_refused"] is None
        assert (detail["round"]["refused"], detail["round"]["in_flight"]) == (0, 1)
        # the holder's own upload goes through the same path
        assert holder.upload(aid, np.full(N, 0.01))[0] == 200


@pytest.mark.parametrize("robust", ["default", "none"])
def test_the_norms_are_shown_exactly_for_a_task_with_robust_defences(
    coordinator: EmbeddedCoordinator, tiny_bundle: Path, robust: str
) -> None:
    """``norms`` is None (the page: "aggregates without robust defences") for a task with
    ``"robust": "none"`` only, before and after its first commit; a defended task's list
    is empty until then."""
    admin = coordinator.admin()
    plan: dict[str, Any] = {"goal": 1, "over_selection": 1.0, "selection_window_s": 0.0,
                            "rounds": 2, "round_deadline_s": 600.0}  # fmt: skip
    if robust == "none":
        plan["robust"] = "none"
    task_id = admin.create_task(admin.upload_bundle(tiny_bundle)["bundle_id"], plan)["task_id"]
    path = Route.ADMIN_DASHBOARD_TASK.format(task_id=task_id)

    def norms() -> Any:
        status, detail = admin_get(coordinator, path, coordinator.admin_token)
        assert status == 200, detail
        return detail["norms"]

    assert norms() == (None if robust == "none" else [])
    dev = DeviceHTTP(coordinator)
    answer = dev.check_in()
    if answer["action"] == "wait":
        answer = dev.check_in()
    delta = np.full(N, 0.01)
    assert dev.upload(answer["assignment"]["assignment_id"], delta)[0] == 200
    if robust == "none":
        assert norms() is None
    else:
        (shown,) = norms()
        assert shown["round"] == 1
        assert shown["norm_max"] == pytest.approx(float(np.linalg.norm(delta)), rel=1e-3)
