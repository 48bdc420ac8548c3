"""The client's side of the protocol against a scripted coordinator on loopback: what it sends,
how it paces itself, and what it does with each kind of answer. The bundle, the parameters and
the training are real (digits bundle, ORT); only the coordinator's answers are scripted."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk.client import (
    ABORTED,
    EVALUATED,
    FAILED,
    INELIGIBLE,
    REJECTED,
    TRAINED,
    WAIT,
    Client,
    ClientConfig,
)
from edge_sdk.codecs import CODECS, encode_update
from edge_sdk.conditions import DeviceConditions, EligibilityPolicy, ScriptedConditions
from edge_sdk.transport import RetryPolicy, Transport
from tests.edge_sdk.loopback import Reply, ScriptedServer, Seen, json_error, ranged

GOOD = DeviceConditions(charging=True, battery=0.9, idle=True, unmetered=True)
TASK = "t-scripted"
ASSIGNMENT = "a-scripted"


class ScriptedCoordinator(ScriptedServer):
    """Answers like a coordinator would; ``checkin`` and ``update`` replies are the script."""

    def __init__(self, bundle: Path, plan: dict[str, Any] | None = None) -> None:
        self.bundle = bundle
        self.manifest = json.loads((bundle / "manifest.json").read_text())
        params = np.fromfile(bundle / "params.f32", dtype="<f4")
        self.params_frame, _ = encode_update(params, "fp32")
        self.plan = {"epochs": 1, "steps": None, "batch_size": 32, "lr": 0.05, "lr_decay": 1.0,
                     "prox_mu": 0.0, "codec": {"name": "fp32"}, "recheck_every_steps": 5,
                     **(plan or {})}
        self.checkin: Callable[[Seen], Reply] = lambda s: self.wait(42.0)
        self.update: Callable[[Seen], Reply] = lambda s: Reply(
            200, json.dumps({"accepted": True, "round": 1, "model_version": 0}).encode())
        self.abort: Callable[[Seen], Reply] = lambda s: Reply(200, b'{"aborted": true}')
        self.metrics: Callable[[Seen], Reply] = lambda s: Reply(200, b'{"accepted": true}')
        super().__init__()

    @staticmethod
    def wait(seconds: float, reason: str = "no_task") -> Reply:
        body = {"action": "wait", "retry_after_s": seconds, "reason": reason}
        return Reply(200, json.dumps(body).encode())

    def train(self, action: str = "train") -> Reply:
        body = {"action": action, "assignment": {
            "assignment_id": ASSIGNMENT, "task_id": TASK, "round": 1, "model_version": 0,
            "bundle_id": self.manifest["bundle_id"],
            "params_url": f"/v1/tasks/{TASK}/versions/0/params", "deadline_in_s": 60.0,
            "plan": self.plan}}
        return Reply(200, json.dumps(body).encode())

    def handle(self, seen: Seen) -> Reply:
        path = seen.path
        bundle_prefix = f"/v1/bundles/{self.manifest['bundle_id']}"
        if path == "/v1/devices":
            return Reply(201, json.dumps({"device_id": "d-1", "secret": "s"}).encode())
        if path == "/v1/checkin":
            return self.checkin(seen)
        if path == bundle_prefix:
            return Reply(200, json.dumps(self.manifest).encode())
        if path.startswith(bundle_prefix + "/files/"):
            return ranged((self.bundle / path[len(bundle_prefix + "/files/") :]).read_bytes(), seen)
        if path.endswith("/params"):
            return Reply(200, self.params_frame)
        if path.endswith("/update"):
            return self.update(seen)
        if path.endswith("/abort"):
            return self.abort(seen)
        if path.endswith("/metrics"):
            return self.metrics(seen)
        return json_error(404, "not_found")


class LapseAfterFirstRead(ScriptedConditions):
    """Good for the check-in's read, ``lapsed`` at every read after it (the training's)."""

    def __init__(self, lapsed: DeviceConditions) -> None:
        super().__init__(GOOD)
        self.lapsed = lapsed

    def read(self) -> DeviceConditions:
        good = super().read()  # counts the read
        return good if self.reads == 1 else self.lapsed


@pytest.fixture
def digits_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((96, 64), dtype=np.float32), rng.integers(0, 10, 96)


def _client(url: str, tmp_path: Path, data: Any, sleeps: list[float] | None = None,
            conditions: Any = None, **config: Any) -> Client:
    return Client(url, state_dir=tmp_path / "dev", data=data,
                  conditions=conditions or ScriptedConditions(GOOD),
                  sleep=(sleeps if sleeps is not None else []).append,
                  config=ClientConfig(seed=0, retry=RetryPolicy(max_attempts=2), **config))


def test_ineligible_device_does_not_touch_the_network(
    digits_bundle: Path, digits_data: Any, tmp_path: Path
) -> None:
    with ScriptedCoordinator(digits_bundle) as coord:
        client = _client(coord.loopback.url, tmp_path, digits_data,
                         conditions=ScriptedConditions(GOOD.replace(charging=False, idle=False)))
        outcome = client.run_once()
    assert outcome.action == INELIGIBLE
    assert set(outcome.reasons) == {"not charging", "not idle"}
    assert 300.0 <= outcome.next_run_in_s <= 330.0
    assert coord.loopback.seen == []


def test_local_policy_is_configurable(
    digits_bundle: Path, digits_data: Any, tmp_path: Path
) -> None:
    with ScriptedCoordinator(digits_bundle) as coord:
        client = Client(coord.loopback.url, state_dir=tmp_path / "dev", data=digits_data,
                        conditions=ScriptedConditions(GOOD.replace(charging=False)),
                        policy=EligibilityPolicy(require_charging=False))
        assert client.run_once().action == WAIT


def test_check_in_reports_conditions_and_honours_retry_after_with_jitter(
    digits_bundle: Path, digits_data: Any, tmp_path: Path
) -> None:
    sleeps: list[float] = []
    with ScriptedCoordinator(digits_bundle) as coord:
        client = _client(coord.loopback.url, tmp_path, digits_data, sleeps)
        runs = client.run_forever(max_runs=50)
    assert runs == 50
    (register,) = coord.calls("/v1/devices")
    checkins = coord.calls("/v1/checkin")
    assert len(checkins) == 50
    body = json.loads(checkins[0].body)
    assert body["conditions"] == {"charging": True, "battery": 0.9, "idle": True,
                                  "unmetered": True}
    assert body["capabilities"] == {"codecs": list(CODECS)}
    assert body["runtimes"] and json.loads(register.body)["runtimes"] == body["runtimes"]
    assert all(c.headers["authorization"] == "Device d-1:s" for c in checkins)
    # 49 waits between 50 runs, each retry_after_s plus up to 10 %, and not all the same
    assert len(sleeps) == 49 and all(42.0 <= s <= 46.2 for s in sleeps)
    assert np.std(sleeps) > 0.5


def test_refused_upload_leaves_the_error_feedback_residual_alone(
    digits_bundle: Path, digits_data: Any, tmp_path: Path
) -> None:
    with ScriptedCoordinator(digits_bundle, {"codec": {"name": "topk", "k": 50}}) as coord:
        coord.checkin = lambda s: coord.train()
        coord.update = lambda s: json_error(409, "round_closed", "too late")
        client = _client(coord.loopback.url, tmp_path, digits_data)
        store = client.state.error_feedback(TASK)
        before = np.full(2410, 0.01, np.float32)
        store.save(before)
        outcome = client.run_once()
        assert outcome.action == REJECTED and outcome.error == "round_closed"
        np.testing.assert_array_equal(store.load(2410), before)

        coord.update = lambda s: Reply(200, b'{"accepted": true}')
        assert client.run_once().action == TRAINED
        after = store.load(2410)
        assert after is not None and not np.array_equal(after, before)
    first, _ = coord.calls("/update")
    assert first.headers["content-type"] == "application/x-fedge-frame"
    report = json.loads(first.headers["x-fedge-report"])
    assert report["num_examples"] == 96 and report["steps"] == 3
    assert report["bytes_down"] > 0 and report["wall_time_s"] >= 0
    assert 1 <= len(first.headers["idempotency-key"]) <= 128


def test_fedprox_plan_trains_on_the_real_runtime_and_uses_one_connection_per_pass(
    digits_bundle: Path, digits_data: Any, tmp_path: Path
) -> None:
    with ScriptedCoordinator(digits_bundle, {"prox_mu": 0.5, "steps": 4}) as coord:
        coord.checkin = lambda s: coord.train()
        client = _client(coord.loopback.url, tmp_path, digits_data)
        first = client.run_once()
        second = client.run_once()
    assert first.action == second.action == TRAINED
    assert first.metrics["steps"] == 4
    # every pass: one keep-alive connection for all its calls, closed when the pass ends
    assert coord.loopback.connections == 2


def test_the_next_wait_after_a_report_or_abort_is_the_coordinators(
    digits_bundle: Path, digits_data: Any, tmp_path: Path
) -> None:
    """Pace steering in the answer to an upload / abort replaces the local default."""
    with ScriptedCoordinator(digits_bundle, {"steps": 2, "recheck_every_steps": 1}) as coord:
        coord.checkin = lambda s: coord.train()
        coord.update = lambda s: Reply(200, json.dumps(
            {"accepted": True, "round": 1, "model_version": 0, "retry_after_s": 77.0}).encode())
        sleeps: list[float] = []
        client = _client(coord.loopback.url, tmp_path, digits_data, sleeps)
        client.run_forever(max_runs=6)
        # an answer without the field (an older coordinator): the local default stands in
        coord.update = lambda s: Reply(
            200, json.dumps({"accepted": True, "round": 1, "model_version": 0}).encode())
        plain = client.run_once()
        coord.abort = lambda s: Reply(200, b'{"aborted": true, "retry_after_s": 12.5}')
        lapsing = _client(coord.loopback.url, tmp_path, digits_data,
                          conditions=LapseAfterFirstRead(GOOD.replace(charging=False)))
        aborted = lapsing.run_once()
    assert len(coord.calls("/update")) == 7
    assert len(sleeps) == 5 and all(77.0 <= s <= 77.0 * 1.1 for s in sleeps)
    assert np.std(sleeps) > 0.1  # with the client's own jitter on top
    assert plain.action == TRAINED and 1.0 <= plain.next_run_in_s <= 1.1
    assert aborted.action == ABORTED and 12.5 <= aborted.next_run_in_s <= 12.5 * 1.1


def test_duplicate_on_a_first_attempt_is_a_rejection(
    digits_bundle: Path, digits_data: Any, tmp_path: Path
) -> None:
    with ScriptedCoordinator(digits_bundle) as coord:
        coord.checkin = lambda s: coord.train()
        coord.update = lambda s: json_error(409, "duplicate_upload")
        outcome = _client(coord.loopback.url, tmp_path, digits_data).run_once()
    assert outcome.action == REJECTED and outcome.error == "duplicate_upload"


def test_duplicate_after_a_cut_off_try_means_the_first_try_counted(
    digits_bundle: Path, digits_data: Any, tmp_path: Path
) -> None:
    answers = [Reply(200, b'{"accepted": true}', cut_after=3),
               json_error(409, "duplicate_upload")]
    with ScriptedCoordinator(digits_bundle, {"codec": {"name": "topk", "k": 10}}) as coord:
        coord.checkin = lambda s: coord.train()
        coord.update = lambda s: answers.pop(0)
        client = _client(coord.loopback.url, tmp_path, digits_data)
        outcome = client.run_once()
    assert outcome.action == TRAINED
    first, second = coord.calls("/update")
    assert first.body == second.body
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
    assert client.state.error_feedback(TASK).load(2410) is not None  # the residual moved on


@pytest.mark.parametrize(("cut", "action"), [(True, EVALUATED), (False, FAILED)])
def test_duplicate_metrics_after_a_cut_off_try_mean_they_were_delivered(
    digits_bundle: Path, digits_data: Any, tmp_path: Path, cut: bool, action: str
) -> None:
    first = Reply(200, b'{"accepted": true}', cut_after=3) if cut else None
    answers = [a for a in (first, json_error(409, "duplicate_upload")) if a is not None]
    with ScriptedCoordinator(digits_bundle) as coord:
        coord.checkin = lambda s: coord.train("evaluate")
        coord.metrics = lambda s: answers.pop(0)
        outcome = _client(coord.loopback.url, tmp_path, digits_data).run_once()
    assert outcome.action == action
    assert len(coord.calls("/metrics")) == (2 if cut else 1)


def test_unreachable_coordinator_backs_off_exponentially_then_recovers(
    digits_bundle: Path, digits_data: Any, tmp_path: Path
) -> None:
    down = {"on": True}
    with ScriptedCoordinator(digits_bundle) as coord:
        inner = coord.handle
        coord.loopback.handler = lambda s: Reply(503, b"") if down["on"] else inner(s)
        client = _client(coord.loopback.url, tmp_path, digits_data)
        waits = [client.run_once() for _ in range(4)]
        down["on"] = False
        recovered = client.run_once()
        down["on"] = True
        again = client.run_once()
    assert [o.action for o in waits] == [FAILED] * 4
    for n, o in enumerate(waits):
        assert 30.0 * 2**n <= o.next_run_in_s <= 30.0 * 2**n * 1.1
    assert recovered.action == WAIT
    assert 30.0 <= again.next_run_in_s <= 33.0  # the backoff restarts after a success


def test_a_plan_the_device_cannot_run_is_aborted_with_a_reason(
    digits_bundle: Path, digits_data: Any, tmp_path: Path
) -> None:
    with ScriptedCoordinator(digits_bundle, {"batch_size": 0}) as coord:
        coord.checkin = lambda s: coord.train()
        outcome = _client(coord.loopback.url, tmp_path, digits_data).run_once()
    assert outcome.action == FAILED and "batch_size" in (outcome.error or "")
    (abort,) = coord.calls("/abort")
    assert json.loads(abort.body)["reason"] == "error"
    assert coord.calls("/update") == []


def test_conditions_lapsing_mid_training_abort_before_the_next_step(
    digits_bundle: Path, digits_data: Any, tmp_path: Path
) -> None:
    with ScriptedCoordinator(digits_bundle, {"recheck_every_steps": 1}) as coord:
        coord.checkin = lambda s: coord.train()
        client = _client(coord.loopback.url, tmp_path, digits_data,
                         conditions=LapseAfterFirstRead(GOOD.replace(unmetered=False)))
        outcome = client.run_once()
    assert outcome.action == ABORTED and outcome.reasons == ("network metered",)
    (abort,) = coord.calls("/abort")
    body = json.loads(abort.body)
    # Enumerated phase and code only: no free text leaves the device.
    assert body == {"reason": "conditions_lapsed", "phase": "conditions_lapsed",
                    "code": "conditions"}
    assert coord.calls("/update") == []


def test_an_abort_after_the_round_closed_is_still_an_abort_and_no_alarm(
    digits_bundle: Path, digits_data: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with ScriptedCoordinator(digits_bundle, {"recheck_every_steps": 1}) as coord:
        coord.checkin = lambda s: coord.train()
        # the coordinator's answer when the round reached its goal during our training
        coord.abort = lambda s: json_error(409, "round_closed", "the assignment's round has closed")
        client = _client(coord.loopback.url, tmp_path, digits_data,
                         conditions=LapseAfterFirstRead(GOOD.replace(charging=False)))
        with caplog.at_level("INFO", logger="edge_sdk.client"):
            outcome = client.run_once()
    assert outcome.action == ABORTED and outcome.reasons == ("not charging",)
    assert 300.0 <= outcome.next_run_in_s <= 330.0  # no pace steering in an error: the default
    assert len(coord.calls("/abort")) == 1  # a 409 is final: not retried
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "after its round closed" in caplog.records[0].getMessage()


def test_run_forever_stops_on_an_event(
    digits_bundle: Path, digits_data: Any, tmp_path: Path
) -> None:
    stop = threading.Event()
    with ScriptedCoordinator(digits_bundle) as coord:
        client = Client(coord.loopback.url, state_dir=tmp_path / "dev", data=digits_data,
                        conditions=ScriptedConditions(GOOD))
        thread = threading.Thread(target=client.run_forever, args=(stop,))
        thread.start()
        while not coord.calls("/v1/checkin"):
            stop.wait(0.01)
        stop.set()  # ends the 42 s wait at once
        thread.join(timeout=5)
    assert not thread.is_alive()


def _corrupt_params(coord: ScriptedCoordinator) -> None:
    frame = bytearray(coord.params_frame)
    frame[-8] ^= 0xFF  # a payload byte: the CRC no longer matches
    coord.params_frame = bytes(frame)
    coord.checkin = lambda s: coord.train()


def _foreign_params_url(coord: ScriptedCoordinator) -> None:
    def checkin(seen: Seen) -> Reply:
        body = json.loads(coord.train().body)
        body["assignment"]["params_url"] = "http://elsewhere.example/params"
        return Reply(200, json.dumps(body).encode())

    coord.checkin = checkin


def _huge_round(coord: ScriptedCoordinator) -> None:
    def checkin(seen: Seen) -> Reply:
        body = json.loads(coord.train().body)
        body["assignment"]["round"] = "ROUND"
        return Reply(200, json.dumps(body).replace('"ROUND"', "1e400").encode())

    coord.checkin = checkin


@pytest.mark.parametrize(
    "script",
    [
        lambda c: setattr(c, "checkin", lambda s: Reply(200, b"<html>portal</html>")),
        lambda c: setattr(c, "checkin", lambda s: Reply(200, b'{"action": "dance"}')),
        lambda c: setattr(c, "checkin", lambda s: Reply(200, b'{"action": "train"}')),
        lambda c: setattr(c, "checkin", lambda s: Reply(200, b'{"action": "wait", '
                                                             b'"retry_after_s": "soon"}')),
        lambda c: setattr(c, "checkin", lambda s: Reply(200, b'{"action": "wait", '
                                                             b'"retry_after_s": Infinity}')),
        lambda c: setattr(c, "checkin", lambda s: Reply(200, b'{"action": "wait", '
                                                             b'"retry_after_s": -30}')),
        # deeper than the json module recurses: RecursionError, not a ValueError
        lambda c: setattr(c, "checkin", lambda s: Reply(200, b"[" * 100_000 + b"]" * 100_000)),
        # numbers past a float: OverflowError from float() and int(), not a ValueError
        lambda c: setattr(c, "checkin", lambda s: Reply(200, b'{"action": "wait", '
                                                             b'"retry_after_s": 1' + b"0" * 400
                                                             + b"}")),
        _huge_round,
        _corrupt_params,
        _foreign_params_url,
    ],
    ids=["not-json", "unknown-action", "no-assignment", "bad-retry-after", "endless-retry-after",
         "negative-retry-after", "deep-json", "huge-retry-after", "huge-round", "corrupt-params",
         "foreign-params-url"],
)
def test_malformed_answers_fail_the_pass_without_uploading(
    digits_bundle: Path, digits_data: Any, tmp_path: Path, script: Callable[[Any], None]
) -> None:
    with ScriptedCoordinator(digits_bundle) as coord:
        script(coord)
        client = _client(coord.loopback.url, tmp_path, digits_data)
        outcome = client.run_once()
    assert outcome.action == FAILED and outcome.error
    assert 30.0 <= outcome.next_run_in_s <= 33.0
    assert coord.calls("/update") == []
    assert not any(s.path.startswith("http") for s in coord.loopback.seen)


def test_an_injected_transport_carries_every_call(
    digits_bundle: Path, digits_data: Any, tmp_path: Path
) -> None:
    calls: list[str] = []

    class Counting(Transport):
        def request(self, method: str, path: str, **kw: Any) -> Any:
            calls.append(path)
            return super().request(method, path, **kw)

    with ScriptedCoordinator(digits_bundle) as coord:
        coord.checkin = lambda s: coord.train()
        transport = Counting(coord.loopback.url, sleep=lambda s: None)
        client = Client(coord.loopback.url, state_dir=tmp_path / "dev", data=digits_data,
                        conditions=ScriptedConditions(GOOD), transport=transport)
        assert client.run_once().action == TRAINED
    assert client.transport is transport
    assert [p.rsplit("/", 1)[-1] for p in calls] == [
        "devices", "checkin", coord.manifest["bundle_id"], "params", "update"]


@pytest.mark.parametrize(("resend", "settled"), [
    (lambda s: json_error(409, "round_closed", "too late"), "refused"),
    # the coordinator forgot the assignment: it may have counted the first send (see
    # edge_sdk.client._fate_unknown), so the old residual is never sent again
    (lambda s: json_error(404, "not_found"), "unknown"),
    (lambda s: json_error(500, "internal"), "pending"),
    (lambda s: Reply(200, b'{"accepted": true}'), "acknowledged"),
])
def test_an_upload_without_an_answer_is_settled_before_the_next_check_in(
    digits_bundle: Path, digits_data: Any, tmp_path: Path, resend: Any, settled: str
) -> None:
    """The first pass's upload gets no answer (the connection drops every time); the next pass
    resends it, same bytes and key, before it checks in, and settles it by the answer."""
    with ScriptedCoordinator(digits_bundle, {"codec": {"name": "topk", "k": 50}}) as coord:
        coord.checkin = lambda s: coord.train()
        coord.update = lambda s: Reply(200, b'{"accepted": true}', cut_after=0)
        client = _client(coord.loopback.url, tmp_path, digits_data)
        store = client.state.error_feedback(TASK)
        before = np.full(2410, 0.01, np.float32)
        store.save(before)
        assert client.run_once().action == FAILED
        pending = client.state.load_pending()
        assert pending is not None
        np.testing.assert_array_equal(store.load(2410), before)  # not moved on yet

        coord.update = resend
        coord.checkin = lambda s: coord.wait(5.0)
        second = client.run_once()
        calls = [s.path for s in coord.loopback.seen]
    resent = coord.calls("/update")[-1]
    assert resent.body == pending.frame
    assert resent.headers["idempotency-key"] == pending.key
    # the resend came before the check-in of that pass
    assert calls[-1] == "/v1/checkin" if settled != "pending" else calls[-1].endswith("/update")
    if settled == "pending":  # still no answer: kept for the pass after, nothing checked in
        assert second.action == FAILED and client.state.load_pending() is not None
        np.testing.assert_array_equal(store.load(2410), before)
        return
    assert second.action == WAIT and client.state.load_pending() is None
    if settled == "refused":  # never counted: the residual stays what it was
        np.testing.assert_array_equal(store.load(2410), before)
    else:  # counted, or perhaps counted: the residual is the one the frame left
        np.testing.assert_array_equal(store.load(2410), pending.residual)


def test_a_redirected_upload_is_not_taken_for_an_acknowledgement(
    digits_bundle: Path, digits_data: Any, tmp_path: Path
) -> None:
    """A 3xx is no answer from the coordinator (a proxy or a captive portal sends it, and the
    client follows no redirect: its credential would go to the other host). The upload stays
    pending and the error-feedback residual stays where it was."""
    with ScriptedCoordinator(digits_bundle, {"codec": {"name": "topk", "k": 50}}) as coord:
        coord.checkin = lambda s: coord.train()
        coord.update = lambda s: Reply(307, b"", {"Location": "http://elsewhere.example/up"})
        client = _client(coord.loopback.url, tmp_path, digits_data)
        store = client.state.error_feedback(TASK)
        before = np.full(2410, 0.01, np.float32)
        store.save(before)
        outcome = client.run_once()
    assert outcome.action == FAILED and "307" in (outcome.error or "")
    assert client.state.load_pending() is not None
    np.testing.assert_array_equal(store.load(2410), before)
    assert not any(s.path.startswith("http") for s in coord.loopback.seen)


def test_the_failure_backoff_stays_at_its_cap_however_long_the_outage(
    digits_data: Any, tmp_path: Path
) -> None:
    """Weeks of an unreachable coordinator (hourly passes at the cap): the pass still fails
    quietly with the capped wait instead of raising out of run_once."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    client = _client(url, tmp_path, digits_data)
    outcomes = [client.run_once() for _ in range(1100)]
    assert {o.action for o in outcomes} == {FAILED}
    assert 3600.0 <= outcomes[-1].next_run_in_s <= 3600.0 * 1.1


def test_an_overloaded_coordinator_is_not_asked_again_before_its_retry_after(
    digits_bundle: Path, digits_data: Any, tmp_path: Path
) -> None:
    """A 503 whose Retry-After is past what one request may wait (max_delay_s, the request's
    budget) fails the pass; the next pass comes no sooner than the coordinator asked."""
    busy = json_error(503, "overloaded", "queue full")
    busy.headers["Retry-After"] = "600"
    with ScriptedCoordinator(digits_bundle) as coord:
        coord.checkin = lambda s: busy
        sleeps: list[float] = []
        outcome = _client(coord.loopback.url, tmp_path, digits_data, sleeps).run_once()
    assert outcome.action == FAILED and outcome.error == "overloaded"
    assert 600.0 <= outcome.next_run_in_s <= 600.0 * 1.1


@pytest.mark.parametrize("where", ["checkin", "update"])
def test_an_absurd_wait_from_the_coordinator_is_capped_at_a_day(
    digits_bundle: Path, digits_data: Any, tmp_path: Path, where: str
) -> None:
    """retry_after_s = 1e10 (finite; a wrong unit, a broken coordinator): sleeping it is
    beyond threading.Event.wait and time.sleep (OverflowError, which would end run_forever)
    and would lose the device to the fleet; it comes back within a day instead."""
    with ScriptedCoordinator(digits_bundle, {"steps": 1}) as coord:
        if where == "checkin":
            coord.checkin = lambda s: coord.wait(1e10)
        else:
            coord.checkin = lambda s: coord.train()
            coord.update = lambda s: Reply(200, json.dumps(
                {"accepted": True, "round": 1, "model_version": 0, "retry_after_s": 1e10}
            ).encode())
        outcome = _client(coord.loopback.url, tmp_path, digits_data).run_once()
    assert outcome.action == (WAIT if where == "checkin" else TRAINED)
    assert 86400.0 <= outcome.next_run_in_s <= 86400.0 * 1.1


def test_a_rate_limiting_proxy_429_keeps_the_upload_for_later(
    digits_bundle: Path, digits_data: Any, tmp_path: Path
) -> None:
    """A load balancer's 429 (RFC 6585: nothing was done; come back after Retry-After) is an
    overload, not the coordinator refusing the update: the upload stays pending, the
    assignment is not aborted, the device comes back no sooner than asked and resends it."""
    limited = Reply(429, b"<html>Too Many Requests</html>", {"Retry-After": "120"})
    with ScriptedCoordinator(digits_bundle, {"codec": {"name": "topk", "k": 50}}) as coord:
        coord.checkin = lambda s: coord.train()
        coord.update = lambda s: limited
        client = _client(coord.loopback.url, tmp_path, digits_data)
        first = client.run_once()
        pending = client.state.load_pending()
        coord.update = lambda s: Reply(200, b'{"accepted": true}')
        coord.checkin = lambda s: coord.wait(5.0)
        second = client.run_once()
    assert first.action == FAILED and 120.0 <= first.next_run_in_s <= 132.0
    assert len(coord.calls("/update")) == 3  # retried within the pass, then on the next one
    assert coord.calls("/abort") == []
    assert pending is not None and coord.calls("/update")[-1].body == pending.frame
    assert second.action == WAIT and client.acknowledged_on_resend == 1
    np.testing.assert_array_equal(client.state.error_feedback(TASK).load(2410), pending.residual)


def test_an_assignment_id_that_cannot_be_a_url_path_is_refused_before_training(
    digits_bundle: Path, digits_data: Any, tmp_path: Path
) -> None:
    """http.client refuses a path with a space or a control character before sending it, so
    an upload to such an assignment could never be delivered: kept pending, it would be
    resent, and fail, at the start of every pass, and the device would never check in
    again."""
    with ScriptedCoordinator(digits_bundle, {"steps": 1}) as coord:
        def checkin(seen: Seen) -> Reply:
            body = json.loads(coord.train().body)
            body["assignment"]["assignment_id"] = "a 1"
            return Reply(200, json.dumps(body).encode())

        coord.checkin = checkin
        client = _client(coord.loopback.url, tmp_path, digits_data)
        first = client.run_once()
        coord.checkin = lambda s: coord.wait(5.0)
        second = client.run_once()
    assert first.action == FAILED and client.state.load_pending() is None
    assert second.action == WAIT


@pytest.mark.parametrize("status", [200, 500])
def test_an_answer_too_deeply_nested_for_json_is_no_crash(
    digits_bundle: Path, digits_data: Any, tmp_path: Path, status: int
) -> None:
    """An upload's answer that json cannot decode for its depth: a 2xx still acknowledges
    the upload, a 5xx is still no answer (the upload stays pending); neither escapes
    run_once, which promises never to raise for coordinator trouble."""
    deep = b"[" * 100_000 + b"]" * 100_000
    with ScriptedCoordinator(digits_bundle, {"steps": 1}) as coord:
        coord.checkin = lambda s: coord.train()
        coord.update = lambda s: Reply(status, deep)
        client = _client(coord.loopback.url, tmp_path, digits_data)
        outcome = client.run_once()
    assert outcome.action == (TRAINED if status == 200 else FAILED)
    assert (client.state.load_pending() is None) == (status == 200)
    assert coord.calls("/abort") == []  # an upload is never aborted for want of an answer


def test_a_pacing_hint_past_a_float_on_an_accepted_upload_is_ignored(
    digits_bundle: Path, digits_data: Any, tmp_path: Path
) -> None:
    """_paced is lenient: an accepted report stays 'trained' whatever its retry_after_s,
    here an integer no float holds (like Infinity, the local default stands in)."""
    with ScriptedCoordinator(digits_bundle, {"steps": 1}) as coord:
        coord.checkin = lambda s: coord.train()
        coord.update = lambda s: Reply(
            200, b'{"accepted": true, "retry_after_s": 1' + b"0" * 400 + b"}")
        outcome = _client(coord.loopback.url, tmp_path, digits_data).run_once()
    assert outcome.action == TRAINED and 1.0 <= outcome.next_run_in_s <= 1.1


def test_a_credential_that_cannot_be_sent_in_a_header_is_not_kept(
    digits_bundle: Path, digits_data: Any, tmp_path: Path
) -> None:
    """http.client refuses a header value with a line break before sending: a secret like
    that, once stored, would fail every later pass on the device, without a 401 that would
    make it register again."""
    answers = [{"device_id": "d-1", "secret": "s\r\nX-Injected: 1"},
               {"device_id": "d-2", "secret": "fine"}]
    with ScriptedCoordinator(digits_bundle) as coord:
        inner = coord.handle
        coord.loopback.handler = lambda s: (Reply(201, json.dumps(answers.pop(0)).encode())
                                            if s.path == "/v1/devices" else inner(s))
        client = _client(coord.loopback.url, tmp_path, digits_data)
        first = client.run_once()
        second = client.run_once()
    assert first.action == FAILED and second.action == WAIT
    assert client.device_id == "d-2"
    assert coord.calls("/v1/checkin")[-1].headers["authorization"] == "Device d-2:fine"


def test_a_401_that_is_not_the_coordinators_keeps_the_device_identity(
    digits_bundle: Path, digits_data: Any, tmp_path: Path
) -> None:
    """Only the coordinator's ``401 unauthorized`` says it no longer knows the device; a
    gateway's 401 page in front of it says nothing about the credential. Registering anew on
    it would make the device a stranger to the coordinator for good."""
    with ScriptedCoordinator(digits_bundle) as coord:
        client = _client(coord.loopback.url, tmp_path, digits_data)
        first = client.run_once()
        stored = client.state.credentials_path.read_bytes()
        coord.checkin = lambda s: Reply(401, b"<html>401 Authorization Required</html>")
        second = client.run_once()
        coord.checkin = lambda s: coord.wait(5.0)
        third = client.run_once()
    assert (first.action, second.action, third.action) == (WAIT, FAILED, WAIT)
    assert len(coord.calls("/v1/devices")) == 1
    assert client.state.credentials_path.read_bytes() == stored
    assert [s.headers["authorization"] for s in coord.calls("/v1/checkin")] == ["Device d-1:s"] * 3
