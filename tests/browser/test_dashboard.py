"""The dashboard in a real browser against a coordinator running an emulated fleet.

One coordinator and one fleet (real SDK clients over HTTP, real ORT steps on digits, some
devices dropping out or unplugged mid-training) serve the module: a synchronous task with a
federated evaluation and an asynchronous (FedBuff) task. The browser signs in with the admin
token and must show what the JSON API reports; the live view must advance when a round
commits; without the token the page shows the sign-in form and the data stays refused.
Screenshots go to ``out/screenshots/``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.admin import AdminClient
from coordinator.config import PacingConfig
from coordinator.dashboard.views import PARTICIPATION
from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.protocol import Route
from fedge.fleet.clock import SimClock
from fedge.fleet.datasets import load_digits
from fedge.fleet.emulator import Fleet
from fedge.fleet.heterogeneity import Heterogeneity
from fedge.fleet.partition import partition

pytestmark = pytest.mark.slow

SPEEDUP = 5.0
PACING = PacingConfig(min_retry_s=1.0, max_retry_s=20.0, no_task_retry_s=5.0)
POLL_MS = 500


class StoppableFleet(Fleet):
    """A fleet that the module's tests may stop early (once figures should hold still)."""

    _halted = False

    def halt(self) -> None:
        if not self._halted:
            self._halted = True
            self.stop()


@dataclass
class Live:
    coord: EmbeddedCoordinator
    admin: AdminClient
    fleet: StoppableFleet
    sync_task: str
    async_task: str

    def api(self, route: str, token: str | None = "admin") -> Any:
        headers = {} if token is None else {
            "Authorization": f"Bearer {self.coord.admin_token if token == 'admin' else token}"
        }
        req = urllib.request.Request(self.coord.url + route, headers=headers)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def version(self, task_id: str) -> int:
        return int(self.admin.task(task_id)["model_version"])


@pytest.fixture(scope="module")
def live(digits_bundle: Path) -> Iterator[Live]:
    clock = SimClock(speedup=SPEEDUP)
    with EmbeddedCoordinator(clock=clock.unix(), pacing=PACING, seed=0) as coord:
        admin = coord.admin()
        bundle_id = admin.upload_bundle(digits_bundle)["bundle_id"]
        base = {"selection_window_s": 3.0, "round_deadline_s": 60.0, "epochs": 1,
                "batch_size": 16, "lr": 0.2, "codec": {"name": "int8"}}
        sync_task = admin.create_task(
            bundle_id, {**base, "rounds": 10, "goal": 4, "over_selection": 1.5},
            name="digits-sync",
        )["task_id"]
        admin.pause(sync_task)  # until the live view is watching
        async_task = admin.create_task(
            bundle_id,
            {**base, "rounds": 6, "buffer_k": 3, "max_concurrency": 6, "codec": "fp32"},
            name="digits-async", mode="async",
        )["task_id"]
        train, _ = load_digits(seed=0)
        idx = partition(train.y, 16, "dirichlet:1.0", np.random.default_rng(0))
        fleet = StoppableFleet(coord.url, [train.subset(i) for i in idx], seed=3, clock=clock,
                      enrollment_token=coord.enrollment_token, rejoin_s=20.0,
                      heterogeneity=Heterogeneity(dropout_prob=0.1, lapse_prob=0.1))
        fleet.start()
        try:
            yield Live(coord, admin, fleet, sync_task, async_task)
        finally:
            fleet.halt()
            fleet.close()


def sign_in(page: Any, live: Live, hash_: str = "") -> None:
    page.goto(f"{live.coord.url}{Route.DASHBOARD}?poll_ms={POLL_MS}#{hash_}")
    page.wait_for_selector("#login-form", state="visible")
    page.fill("#token", live.coord.admin_token)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#view", state="visible")


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def field(page: Any, name: str) -> str:
    return str(page.inner_text(f'[data-field="{name}"]'))


def chart_data(page: Any, canvas_id: str) -> dict[str, Any]:
    data: dict[str, Any] = page.evaluate(
        """(id) => {
            const c = Chart.getChart(document.getElementById(id));
            return c ? {labels: c.data.labels,
                        datasets: c.data.datasets.map(d => ({label: d.label, data: d.data}))}
                     : null;
        }""",
        canvas_id,
    )
    assert data is not None, f"no chart on #{canvas_id}"
    return data


def series(data: dict[str, Any], label: str) -> list[Any]:
    (ds,) = [d for d in data["datasets"] if d["label"] == label]
    return list(ds["data"])


def test_without_the_token_the_page_asks_and_the_data_is_refused(
    live: Live, browser_page: Any, screenshots: Path
) -> None:
    page = browser_page
    page.goto(f"{live.coord.url}{Route.DASHBOARD}")
    page.wait_for_selector("#login-form", state="visible")
    assert page.is_hidden("#view")
    # What the page would fetch, fetched from the page without a token and with a wrong one.
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        status = page.evaluate(
            "async ([url, h]) => (await fetch(url, {headers: h})).status",
            [Route.ADMIN_DASHBOARD_OVERVIEW, headers],
        )
        assert status == 401
    page.fill("#token", "not-the-token")
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#login-error", state="visible")
    assert "refused" in page.inner_text("#login-error")
    assert page.is_hidden("#view")
    assert page.evaluate("sessionStorage.getItem('fedge-admin-token')") is None
    page.screenshot(path=str(screenshots / "dashboard-login-refused.png"))
    with pytest.raises(urllib.error.HTTPError) as refused:
        live.api(Route.ADMIN_DASHBOARD_OVERVIEW, token=None)
    assert refused.value.code == 401


def test_the_live_view_advances_when_a_round_commits(
    live: Live, browser_page: Any, screenshots: Path
) -> None:
    page = browser_page
    sign_in(page, live, f"/task/{live.sync_task}")
    page.wait_for_selector('[data-field="model_version"]')
    shown = int(field(page, "model_version"))
    assert shown == live.version(live.sync_task) == 0
    assert field(page, "state") == "paused"
    # A federated evaluation of version 0 first, then training.
    live.admin.evaluate(live.sync_task)
    live.admin.resume(live.sync_task)
    wait_until(lambda: field(page, "state") == "running", 10, "the page to show it running")
    wait_until(lambda: live.version(live.sync_task) > shown, 180, "a round to commit")
    committed = live.version(live.sync_task)
    wait_until(lambda: int(field(page, "model_version")) >= committed, 10,
               "the page to show the new version")
    updates = int(page.evaluate("document.body.dataset.updates"))
    assert updates >= 2  # it polled, not reloaded
    rounds = page.locator("#rounds tbody tr").count()
    api_rounds = live.api(Route.ADMIN_DASHBOARD_TASK.format(task_id=live.sync_task))["rounds"]
    assert rounds >= len([r for r in api_rounds if r["closed_at"] is not None])
    page.screenshot(path=str(screenshots / "dashboard-task-live.png"), full_page=True)


def _finished(live: Live) -> bool:
    tasks = {t["task_id"]: t for t in live.admin.tasks()}
    return all(
        tasks[t]["state"] == "completed" and tasks[t]["pending_evaluations"] == 0
        for t in (live.sync_task, live.async_task)
    )


@pytest.fixture(scope="module")
def settled(live: Live) -> Live:
    """The fleet done with both tasks: figures no longer move under the comparison."""
    if live.admin.task(live.sync_task)["state"] == "paused":  # the live test did not run
        live.admin.evaluate(live.sync_task)
        live.admin.resume(live.sync_task)
    wait_until(lambda: _finished(live), 300, "both tasks to complete")
    live.admin.evaluate(live.sync_task)  # and the final version, for the accuracy curve
    wait_until(lambda: _finished(live), 120, "the final evaluation")
    live.fleet.halt()
    return live


def test_overview_shows_what_the_api_reports(
    settled: Live, browser_page: Any, screenshots: Path
) -> None:
    live, page = settled, browser_page
    sign_in(page, live)
    page.wait_for_selector("#tasks tbody tr")
    overview = live.api(Route.ADMIN_DASHBOARD_OVERVIEW)
    population = live.api(Route.ADMIN_DASHBOARD_POPULATION)
    rows = page.locator("#tasks tbody tr")
    assert rows.count() == len(overview["tasks"]) == 2
    for i, task in enumerate(overview["tasks"]):
        cells = [c.strip() for c in rows.nth(i).locator("td").all_inner_texts()]
        assert cells[:6] == [
            task["name"], task["task_id"], task["mode"], task["state"],
            str(task["model_version"]), f"{task['rounds_completed']} / {task['rounds_planned']}",
        ]
    assert field(page, "devices_registered") == str(population["devices_registered"]) == "16"
    assert field(page, "updates_accepted") == f"{overview['updates_accepted']:,}"
    funnel = chart_data(page, "c-funnel")
    assert series(funnel, "devices") == [s["devices"] for s in population["funnel"]["stages"]]
    assert funnel["labels"][0] == "delivered" and funnel["labels"][-1] == "accepted"
    outcomes = chart_data(page, "c-checkins")
    shown = dict(zip(outcomes["labels"], series(outcomes, "check-ins"), strict=True))
    assert set(shown) == set(population["checkins"]["outcomes"])
    assert shown["train"] > 0
    runtimes = page.locator("#runtimes tbody tr td").all_inner_texts()
    assert runtimes[:2] == [next(iter(population["runtimes"])),
                            str(next(iter(population["runtimes"].values())))]
    polls = int(page.evaluate("document.body.dataset.updates"))
    wait_until(lambda: int(page.evaluate("document.body.dataset.updates")) >= polls + 3, 10,
               "three more polls (the request-rate chart needs samples)")
    page.screenshot(path=str(screenshots / "dashboard-overview.png"), full_page=True)


def test_task_charts_and_rounds_show_what_the_api_reports(
    settled: Live, browser_page: Any, screenshots: Path
) -> None:
    live, page = settled, browser_page
    sign_in(page, live, f"/task/{live.sync_task}")
    page.wait_for_selector("#rounds tbody tr")
    d = live.api(Route.ADMIN_DASHBOARD_TASK.format(task_id=live.sync_task))
    rounds = d["rounds"]
    assert page.locator("#rounds tbody tr").count() == len(rounds)
    participants = chart_data(page, "c-participants")
    assert participants["labels"] == [str(r["round"]) for r in rounds]
    for key in PARTICIPATION:
        assert series(participants, key.replace("_", " ")) == [r[key] for r in rounds]
    assert all(sum(r[k] for k in PARTICIPATION) == r["selected"] for r in rounds)
    train = [r for r in rounds if r["kind"] == "train"]
    bytes_chart = chart_data(page, "c-bytes")
    assert series(bytes_chart, "uploaded") == [r["bytes_in"] for r in train]
    assert series(bytes_chart, "as float32") == [r["fp32_bytes"] for r in train]
    assert all(r["fp32_bytes"] == r["updates"] * d["task"]["num_parameters"] * 4 for r in train)
    # int8 updates: about a quarter of float32 (plus each frame's header and scale)
    committed = [r for r in train if r["state"] == "committed"]
    assert all(r["bytes_in"] < 0.4 * r["fp32_bytes"] for r in committed)
    quality = chart_data(page, "c-quality")
    assert quality["labels"] == [f"v{v['version']}" for v in d["versions"]]
    assert series(quality, "training loss") == [v.get("train_loss") for v in d["versions"]]
    evaluated = [v for v in d["versions"] if v.get("eval_accuracy") is not None]
    assert [v["version"] for v in evaluated] == [0, d["task"]["model_version"]]
    assert evaluated[-1]["eval_accuracy"] > evaluated[0]["eval_accuracy"] + 0.2  # it learned
    assert series(quality, "evaluation accuracy") == [v.get("eval_accuracy")
                                                      for v in d["versions"]]
    assert series(chart_data(page, "c-duration"), "seconds") == pytest.approx(
        [r["duration_s"] for r in rounds])
    assert field(page, "model_version") == str(d["task"]["model_version"])
    page.screenshot(path=str(screenshots / "dashboard-task-sync.png"), full_page=True)

    # A round's page: every participant the API lists, in its state.
    last = committed[-1]
    page.click(f'#rounds a[href$="/round/{last["round"]}"]')
    page.wait_for_selector("#assignments tbody tr")
    detail = live.api(Route.ADMIN_DASHBOARD_ROUND.format(task_id=live.sync_task,
                                                       number=last["round"]))
    shown_rows = page.locator("#assignments tbody tr")
    assert shown_rows.count() == len(detail["assignments"])
    shown_states = sorted(
        shown_rows.nth(i).locator("td").nth(1).inner_text().strip()
        for i in range(shown_rows.count())
    )
    assert shown_states == sorted(a["state"] for a in detail["assignments"])
    assert field(page, "reported") == str(detail["round"]["reported"])
    page.screenshot(path=str(screenshots / "dashboard-round.png"), full_page=True)


def test_async_task_shows_its_staleness(
    settled: Live, browser_page: Any, screenshots: Path
) -> None:
    live, page = settled, browser_page
    sign_in(page, live, f"/task/{live.async_task}")
    page.wait_for_selector("#c-staleness")
    d = live.api(Route.ADMIN_DASHBOARD_TASK.format(task_id=live.async_task))
    stale = chart_data(page, "c-staleness")
    assert stale["labels"] == [str(s["staleness"]) for s in d["staleness"]]
    assert series(stale, "updates") == [s["updates"] for s in d["staleness"]]
    assert sum(s["updates"] for s in d["staleness"]) == sum(
        r["reported"] for r in d["rounds"] if r["state"] == "committed")
    page.screenshot(path=str(screenshots / "dashboard-task-async.png"), full_page=True)


def test_the_request_rate_never_goes_negative_when_the_counts_restart(
    browser_page: Any, tmp_path: Path
) -> None:
    """The counts are since start: after a restart (or another replica behind a balancer
    answering) the total is lower than the page's last sample. That is a reset, counted from
    zero as Prometheus's rate() counts it, not a negative rate. Here the service view is
    answered by a second, fresh coordinator from some poll on, as a balancer would."""
    token = "rate-reset-token"
    with EmbeddedCoordinator(tmp_path / "a.db", admin_token=token) as a, \
            EmbeddedCoordinator(tmp_path / "b.db", admin_token=token) as b:  # fmt: skip
        for _ in range(200):
            urllib.request.urlopen(a.url + Route.HEALTH, timeout=10).read()
        page = browser_page
        answering = {"url": a.url}

        def balance(route: Any) -> None:
            path = route.request.url.split("/", 3)[3]
            route.fulfill(response=route.fetch(url=f"{answering['url']}/{path}"))

        page.route(f"**{Route.ADMIN_DASHBOARD_SERVICE}", balance)
        page.goto(f"{a.url}{Route.DASHBOARD}?poll_ms={POLL_MS}")
        page.fill("#token", token)
        page.click("#login-form button[type=submit]")
        page.wait_for_selector("#view", state="visible")

        def polls() -> int:
            return int(page.evaluate("document.body.dataset.updates || 0"))

        wait_until(lambda: polls() >= 3, 20, "three polls of the first coordinator")
        answering["url"] = b.url
        seen = polls()
        wait_until(lambda: polls() >= seen + 3, 20, "three polls of the second")
        rates = series(chart_data(page, "c-rate"), "requests/s")
        assert len(rates) >= 5
        assert min(rates) >= 0, rates
