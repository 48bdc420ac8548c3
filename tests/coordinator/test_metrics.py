"""``/metrics``: scraped over real HTTP and parsed with prometheus_client's own parser.

Devices speaking bare HTTP drive a synchronous round on a fake clock (check-ins refused for
ineligibility, a malformed upload, two accepted uploads that commit the round, a duplicate).
The scrape must agree with the test's own tallies of what it sent and got, and with the store
read directly.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.codecs import encode_update
from edge_sdk.protocol import Route
from tests.fixtures.coordinator import GOOD_CONDITIONS, DeviceHTTP, sample, scrape

N = 64
UPDATE_ROUTE = Route.ASSIGNMENT_UPDATE


def upload(dev: DeviceHTTP, aid: str, frame: bytes) -> tuple[int, dict[str, Any]]:
    return dev.upload_raw(aid, frame, report={"num_examples": 10, "loss": 0.25})


def test_scrape_agrees_with_the_traffic_and_the_store(
    clocked_coordinator: EmbeddedCoordinator, fake_clock: Any, tiny_bundle: Path
) -> None:
    coord = clocked_coordinator
    admin = coord.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    plan = {"goal": 2, "over_selection": 1.0, "selection_window_s": 5.0,
            "round_deadline_s": 600.0, "rounds": 3, "max_update_norm": 100.0}
    task_id = admin.create_task(bundle_id, plan)["task_id"]

    checkins: Counter[str] = Counter()

    def check_in(dev: DeviceHTTP, conditions: dict[str, Any] | None = None) -> dict[str, Any]:
        answer = dev.check_in(conditions)
        checkins[answer["action"] if answer["action"] != "wait" else answer["reason"]] += 1
        return answer

    a, b, c = (DeviceHTTP(coord) for _ in range(3))
    for _ in range(3):
        check_in(c, {**GOOD_CONDITIONS, "charging": False})
    check_in(a)
    check_in(b)
    fake_clock.advance(6.0)  # the selection window ends
    aid_a = check_in(a)["assignment"]["assignment_id"]
    aid_b = check_in(b)["assignment"]["assignment_id"]

    rng = np.random.default_rng(0)
    frames = [encode_update(rng.normal(0, 0.1, N).astype(np.float32), "fp32")[0] for _ in "ab"]
    garbage = b"not a frame at all"
    sent_bytes = 0
    uploads: Counter[str] = Counter()

    def tally(status: int, body: dict[str, Any], frame: bytes) -> None:
        nonlocal sent_bytes
        sent_bytes += len(frame)
        uploads["accepted" if status == 200 else body["error"]["code"]] += 1

    tally(*upload(a, aid_a, garbage), garbage)
    tally(*upload(a, aid_a, frames[0]), frames[0])
    fake_clock.advance(1.0)
    tally(*upload(b, aid_b, frames[1]), frames[1])  # the goal: the round commits
    tally(*upload(a, aid_a, frames[1]), frames[1])  # a second, different upload
    assert uploads == {"malformed_frame": 1, "accepted": 2, "duplicate_upload": 1}
    # The closed round's payloads are unlinked off the worker: the blob directory's size
    # below is compared after they are gone (on a busy machine they may still be going).
    coord.service.blobs.wait_unlinked()

    got = scrape(coord)

    # events this process counted, against the test's own tallies
    for outcome, n in checkins.items():
        assert sample(got, "fedge_checkins_total", outcome=outcome) == n
    assert sum(
        v for (name, _), v in got.items() if name == "fedge_checkins_total"
    ) == sum(checkins.values())
    for outcome, n in uploads.items():
        assert sample(got, "fedge_uploads_total", outcome=outcome) == n
    assert sample(got, "fedge_http_request_bytes_total", route=UPDATE_ROUTE) == sent_bytes
    assert sample(
        got, "fedge_http_requests_total", method="POST", route=Route.CHECKIN, status="200"
    ) == sum(checkins.values())
    assert sample(got, "fedge_checkin_ineligible_total", reason="not charging") == 3
    assert sample(got, "fedge_commit_duration_seconds_count", mode="sync") == 1
    assert sample(got, "process_resident_memory_bytes") > 0

    # figures read from the store, against the store read directly
    store = coord.service.store
    rounds = coord.call(store.list_rounds, task_id)
    committed = [r for r in rounds if r.state == "committed"]
    assert len(committed) == 1
    assert sample(got, "fedge_devices_registered") == coord.call(store.count_devices) == 3
    assert sample(got, "fedge_updates_accepted_total") == coord.call(store.count_updates) == 2
    assert sample(got, "fedge_update_bytes_total") == len(frames[0]) + len(frames[1])
    assert sample(got, "fedge_rounds", mode="sync", state="committed") == 1
    assert sample(got, "fedge_model_version", task_id=task_id) == 1
    assert sample(got, "fedge_tasks", state="running") == 1
    assert sample(got, "fedge_open_rounds") == len(coord.call(store.open_rounds))
    duration = committed[0].closed_at - committed[0].opened_at
    assert duration == pytest.approx(7.0)
    key = {"mode": "sync", "outcome": "committed"}
    assert sample(got, "fedge_round_duration_seconds_count", **key) == 1
    assert sample(got, "fedge_round_duration_seconds_sum", **key) == pytest.approx(duration)
    assert sample(got, "fedge_round_duration_seconds_bucket", le="5.0", **key) == 0
    assert sample(got, "fedge_round_duration_seconds_bucket", le="10.0", **key) == 1
    blob_root = coord.db_path.with_name(coord.db_path.name + ".blobs")
    on_disk = sum(p.stat().st_size for p in blob_root.rglob("*") if p.is_file())
    assert sample(got, "fedge_blob_bytes") == on_disk > 0
    assert sample(got, "fedge_db_bytes") >= coord.db_path.stat().st_size > 0
    assert sample(got, "fedge_queue_depth") == 0

    # A second scrape takes nothing twice: counters and the histogram stand where they were.
    again = scrape(coord)
    for name, labels in (("fedge_round_duration_seconds_count", key),
                         ("fedge_updates_accepted_total", {}), ("fedge_update_bytes_total", {})):
        assert sample(again, name, **labels) == sample(got, name, **labels)


def test_metrics_need_the_admin_token(coordinator: EmbeddedCoordinator) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", coordinator.port, timeout=10)
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        conn.request("GET", Route.METRICS, headers=headers)
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 401
        assert body["error"]["code"] == "unauthorized"
    conn.close()


def test_each_app_has_its_own_registry(coordinator: EmbeddedCoordinator, tmp_path: Path) -> None:
    DeviceHTTP(coordinator)
    with EmbeddedCoordinator(tmp_path / "second.db") as second:
        first_got, second_got = scrape(coordinator), scrape(second)
    route = Route.REGISTER
    assert sample(first_got, "fedge_http_requests_total", method="POST", route=route,
                  status="201") == 1
    assert sample(second_got, "fedge_http_requests_total", method="POST", route=route,
                  status="201") == 0
    assert sample(first_got, "fedge_devices_registered") == 1
    assert sample(second_got, "fedge_devices_registered") == 0


def test_refused_checkins_count_under_their_error_code(coordinator: EmbeddedCoordinator) -> None:
    """The outcome of a refused check-in is the code its answer carries, whichever layer
    refused it (authentication, the body's JSON, its fields, the body limit)."""
    dev = DeviceHTTP(coordinator)
    wrong = {"Authorization": f"Device {dev.device_id}:wrong"}
    big = b"{" + b" " * (coordinator.config.max_json_bytes + 1) + b"}"
    sent = [("POST", b"{}", wrong), ("POST", b"{not json", None),
            ("POST", b'{"population": "other", "runtimes": ["ort-step"]}', None),
            ("POST", b"{}", None), ("POST", big, None)]  # fmt: skip
    codes: Counter[str] = Counter()
    for method, body, headers in sent:
        status, _, data = dev.raw(method, Route.CHECKIN, body, headers)
        assert status >= 400
        codes[json.loads(data)["error"]["code"]] += 1
    assert codes == {"unauthorized": 1, "malformed_json": 1, "forbidden": 1,
                     "invalid_request": 1, "body_too_large": 1}  # fmt: skip
    got = scrape(coordinator)
    for code, n in codes.items():
        assert sample(got, "fedge_checkins_total", outcome=code) == n
    assert sum(v for (name, _), v in got.items() if name == "fedge_checkins_total") == len(sent)


def test_request_bytes_count_what_arrived_not_what_content_length_claimed(
    coordinator: EmbeddedCoordinator,
) -> None:
    """An unauthenticated client declaring a huge body and sending none must not add a byte
    (the upload is refused before its body is read); a chunked body, which has no
    Content-Length, counts the bytes it carried."""
    dev = DeviceHTTP(coordinator)
    claimed = 10**12
    with socket.create_connection(("127.0.0.1", coordinator.port), timeout=10) as s:
        s.sendall(f"POST /v1/assignments/x/update HTTP/1.1\r\nHost: t\r\n"
                  f"Content-Length: {claimed}\r\nConnection: close\r\n\r\n".encode())
        head = s.recv(4096)
        s.shutdown(socket.SHUT_WR)  # the body never comes: the server stops waiting for it
        while s.recv(4096):
            pass
    assert head.startswith(b"HTTP/1.1 401"), head

    body = json.dumps({"runtimes": dev.runtimes, "conditions": GOOD_CONDITIONS}).encode()
    chunks = [body[:10], body[10:]]
    conn = http.client.HTTPConnection("127.0.0.1", coordinator.port, timeout=10)
    conn.request("POST", Route.CHECKIN, body=iter(chunks), encode_chunked=True,
                 headers=dev.auth)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 200

    got = scrape(coordinator)
    assert sample(got, "fedge_http_request_bytes_total", route=UPDATE_ROUTE) == 0
    assert sample(got, "fedge_http_request_bytes_total", route=Route.CHECKIN) == len(body)


def test_response_bytes_count_no_body_for_a_head_request(coordinator: EmbeddedCoordinator) -> None:
    sent = 0
    conn = http.client.HTTPConnection("127.0.0.1", coordinator.port, timeout=10)
    for method in ("HEAD", "HEAD", "GET"):
        conn.request(method, Route.DASHBOARD)
        resp = conn.getresponse()
        sent += len(resp.read())
        assert resp.status == 200
    conn.close()
    assert sent > 0
    got = scrape(coordinator)
    assert sample(got, "fedge_http_response_bytes_total", route=Route.DASHBOARD) == sent


def test_a_method_no_http_standard_names_is_counted_as_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp's pure-Python parser (no C extension built for the platform, or
    AIOHTTP_NO_EXTENSIONS) takes any token as a method: without a bound, every made-up
    method an unauthenticated client sends would be a new label value kept for good."""
    monkeypatch.setenv("AIOHTTP_NO_EXTENSIONS", "1")
    with EmbeddedCoordinator(tmp_path / "c.db", subprocess=True) as coord:
        made_up = [f"X{i}" for i in range(20)]
        for method in [*made_up, "PROPFIND"]:
            with socket.create_connection(("127.0.0.1", coord.port), timeout=10) as s:
                s.sendall(f"{method} {Route.HEALTH} HTTP/1.1\r\nHost: t\r\n"
                          "Connection: close\r\n\r\n".encode())  # fmt: skip
                assert s.recv(4096).startswith(b"HTTP/1.1 405"), method
        got = scrape(coord)
    methods = Counter({
        labels["method"]: v for (name, key), v in got.items()
        if name == "fedge_http_requests_total" and (labels := dict(key))["route"] == "other"
    })  # fmt: skip
    assert methods == {"other": len(made_up) + 1}
