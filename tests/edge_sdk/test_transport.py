"""The stdlib transport against a real HTTP server on loopback with scripted answers."""

from __future__ import annotations

import email.utils
import io
import json
import random
import socket
import time

import pytest

from edge_sdk import errors
from edge_sdk.protocol import ErrorCode
from edge_sdk.transport import RetryPolicy, Transport
from tests.edge_sdk.loopback import Handler, Loopback, Reply, Seen, json_error, ranged


def _ok(seen: Seen) -> Reply:
    return Reply(200, json.dumps({"echo": seen.body.decode() or None}).encode())


def _then_ok(replies: list[Reply]) -> Handler:
    """A handler that answers with ``replies`` in turn, then like :func:`_ok`."""
    return lambda seen: replies.pop(0) if replies else _ok(seen)


def _transport(url: str, sleeps: list[float], **kw: object) -> Transport:
    policy = RetryPolicy(max_attempts=4, base_delay_s=0.5, max_delay_s=3.0, jitter=0.5)
    return Transport(url, retry=policy, sleep=sleeps.append, rng=random.Random(1), **kw)  # type: ignore[arg-type]


def test_json_call_credentials_keep_alive_and_byte_counts() -> None:
    with Loopback(_ok) as server:
        sleeps: list[float] = []
        t = _transport(server.url, sleeps)
        t.credentials = ("d-1", "s3cret")
        answers = [t.call("POST", "/v1/checkin", {"n": i}) for i in range(3)]
        t.close()
    assert answers == [{"echo": json.dumps({"n": i})} for i in range(3)]
    assert [s.headers["authorization"] for s in server.seen] == ["Device d-1:s3cret"] * 3
    assert server.connections == 1 and t.connections_opened == 1  # one keep-alive socket
    assert t.bytes_sent == sum(len(s.body) for s in server.seen)
    assert sleeps == []


def test_5xx_is_retried_with_growing_jittered_backoff() -> None:
    replies = [Reply(503, b"busy"), json_error(500, "internal"), Reply(502, b"<html>")]
    with Loopback(_then_ok(replies)) as server:
        sleeps: list[float] = []
        assert _transport(server.url, sleeps).call("POST", "/v1/x", {"a": 1}) == {
            "echo": '{"a": 1}'
        }
    assert len(server.seen) == 4
    # attempt n waits base * 2**(n-1), capped at 3 s, times a factor in [0.5, 1]
    for n, delay in enumerate(sleeps, start=1):
        cap = min(3.0, 0.5 * 2 ** (n - 1))
        assert cap * 0.5 <= delay <= cap
    assert len(sleeps) == 3


def test_retry_after_header_of_503_is_honoured_up_to_the_cap_with_jitter() -> None:
    replies = [Reply(503, b"", {"Retry-After": "2"}), Reply(503, b"", {"Retry-After": "999"})]
    with Loopback(_then_ok(replies)) as server:
        sleeps: list[float] = []
        _transport(server.url, sleeps).call("GET", "/v1/x")
    # the asked wait (capped at max_delay_s = 3) times a factor in [1, 1 + jitter]: never
    # sooner than asked, and devices turned away together spread out
    assert len(sleeps) == 2
    assert 2.0 <= sleeps[0] <= 3.0 and 3.0 <= sleeps[1] <= 4.5
    assert len({round(x, 6) for x in sleeps}) == 2


def test_retry_after_as_an_http_date_is_honoured() -> None:
    # RFC 9110 lets Retry-After be a date (proxies and load balancers send one). The wait is
    # that date less the answer's Date (one-second resolution on both: 9 to 11 s), times
    # [1, 1.5]; a date already past is no wait; a header that is neither falls back to backoff.
    ahead = email.utils.formatdate(time.time() + 10, usegmt=True)
    replies = [Reply(503, b"", {"Retry-After": ahead}),
               Reply(503, b"", {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),
               Reply(503, b"", {"Retry-After": "soon"})]
    with Loopback(_then_ok(replies)) as server:
        sleeps: list[float] = []
        policy = RetryPolicy(max_attempts=4, base_delay_s=0.5, max_delay_s=60.0, jitter=0.5)
        Transport(server.url, retry=policy, sleep=sleeps.append, rng=random.Random(1)).call(
            "GET", "/v1/x")
    assert len(sleeps) == 3
    assert 9.0 <= sleeps[0] <= 11.0 * 1.5
    assert sleeps[1] == 0.0
    assert 1.0 <= sleeps[2] <= 2.0  # attempt 3's backoff: 0.5 * 2**2, times [0.5, 1]


def test_overloaded_waits_stay_within_the_total_budget() -> None:
    busy = json_error(503, "overloaded", "queue full")
    busy.headers["Retry-After"] = "2"
    with Loopback(lambda s: busy) as server:
        sleeps: list[float] = []
        policy = RetryPolicy(max_attempts=10, max_delay_s=30.0, jitter=0.5,
                             max_total_wait_s=5.0)
        t = Transport(server.url, retry=policy, sleep=sleeps.append, rng=random.Random(3))
        with pytest.raises(errors.Overloaded) as info:
            t.call("POST", "/v1/checkin", {})
    # 2 s a wait at least: two fit in 5 s, a third would not, so it gives up after 3 requests
    assert len(sleeps) == 2 and sum(sleeps) <= 5.0 and all(x >= 2.0 for x in sleeps)
    assert len(server.seen) == 3
    assert info.value.retry_after_s == 2.0 and info.value.status == 503
    assert isinstance(info.value, errors.ServerError)


def test_5xx_gives_up_after_max_attempts_with_a_server_error() -> None:
    with Loopback(lambda s: json_error(500, "internal", "boom")) as server:
        sleeps: list[float] = []
        with pytest.raises(errors.ServerError) as info:
            _transport(server.url, sleeps).call("GET", "/v1/x")
    assert info.value.code == "internal" and info.value.message == "boom"
    assert info.value.attempt == 4 and len(server.seen) == 4 and len(sleeps) == 3


# status, code -> class: the protocol's table (docs/protocol.md), written out independently.
EXPECTED = [
    (400, ErrorCode.MALFORMED_JSON, errors.BadRequest),
    (400, ErrorCode.INVALID_REQUEST, errors.BadRequest),
    (400, ErrorCode.MALFORMED_FRAME, errors.BadRequest),
    (413, ErrorCode.BODY_TOO_LARGE, errors.BodyTooLarge),
    (401, ErrorCode.UNAUTHORIZED, errors.Unauthorized),
    (403, ErrorCode.FORBIDDEN, errors.Forbidden),
    (404, ErrorCode.NOT_FOUND, errors.NotFound),
    (410, ErrorCode.VERSION_PRUNED, errors.Gone),
    (409, ErrorCode.ROUND_CLOSED, errors.RoundClosed),
    (409, ErrorCode.DUPLICATE_UPLOAD, errors.DuplicateUpload),
    (409, ErrorCode.TOO_STALE, errors.TooStale),
    (409, ErrorCode.CONFLICT, errors.Conflict),
    (422, ErrorCode.BAD_UPDATE, errors.Unprocessable),
    (422, ErrorCode.BUNDLE_INVALID, errors.Unprocessable),
    (400, ErrorCode.SECAGG_INVALID, errors.BadRequest),
    (403, ErrorCode.SECAGG_EXCLUDED, errors.Forbidden),
    (409, ErrorCode.SECAGG_STAGE, errors.Conflict),
    (409, ErrorCode.SECAGG_REPLAY, errors.Conflict),
]


def test_every_error_code_has_a_class() -> None:
    server_side = {ErrorCode.INTERNAL, ErrorCode.OVERLOADED}  # 5xx: tested above
    assert {code for _, code, _ in EXPECTED} | server_side == set(ErrorCode)


@pytest.mark.parametrize(("status", "code", "cls"), EXPECTED)
def test_4xx_maps_to_its_class_and_is_never_retried(
    status: int, code: ErrorCode, cls: type[errors.ApiError]
) -> None:
    with Loopback(lambda s: json_error(status, code.value, "nope")) as server:
        sleeps: list[float] = []
        with pytest.raises(cls) as info:
            _transport(server.url, sleeps).call("POST", "/v1/checkin", {})
    assert type(info.value) is cls
    assert (info.value.status, info.value.code, info.value.message) == (status, code.value, "nope")
    assert len(server.seen) == 1 and sleeps == []


def test_error_without_a_json_body_falls_back_to_the_status() -> None:
    with (
        Loopback(lambda s: Reply(404, b"<html>not here</html>")) as server,
        pytest.raises(errors.NotFound) as info,
    ):
        _transport(server.url, []).call("GET", "/v1/nothing")
    assert info.value.code is None and "not here" in info.value.message
    assert len(server.seen) == 1


def test_connection_refused_raises_transport_error_after_all_attempts() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps: list[float] = []
    with pytest.raises(errors.TransportError) as info:
        _transport(f"http://127.0.0.1:{port}", sleeps).call("GET", "/v1/health")
    assert info.value.attempts == 4 and len(sleeps) == 3


def test_answer_cut_mid_body_is_retried() -> None:
    cuts = [1]

    def handler(seen: Seen) -> Reply:
        reply = _ok(seen)
        if cuts:
            cuts.pop()
            reply.cut_after = 5
        return reply

    with Loopback(handler) as server:
        sleeps: list[float] = []
        t = _transport(server.url, sleeps)
        assert t.call("POST", "/v1/x", {"k": 1}) == {"echo": '{"k": 1}'}
    assert len(server.seen) == 2 and server.seen[0].body == server.seen[1].body
    assert len(sleeps) == 1 and server.connections == 2


def test_idle_connection_closed_by_the_server_is_reopened_without_backoff() -> None:
    def handler(seen: Seen) -> Reply:
        reply = _ok(seen)
        reply.close = True  # close after answering, without "Connection: close"
        return reply

    with Loopback(handler) as server:
        sleeps: list[float] = []
        t = _transport(server.url, sleeps)
        for _ in range(3):
            t.call("GET", "/v1/x")
    assert len(server.seen) == 3 and sleeps == []


def test_invalid_base_url_is_rejected() -> None:
    with pytest.raises(ValueError, match="http"):
        Transport("ftp://example")


def test_non_json_answer_is_a_transport_error() -> None:
    with (
        Loopback(lambda s: Reply(200, b"\xff not json")) as server,
        pytest.raises(errors.TransportError, match="not JSON"),
    ):
        _transport(server.url, []).call("GET", "/v1/x")


DATA = bytes(range(256)) * 1000  # 256,000 bytes


def test_download_resumes_with_range_after_a_cut() -> None:
    cuts = [100_000]

    def handler(seen: Seen) -> Reply:
        reply = ranged(DATA, seen)
        if cuts:
            reply.cut_after = cuts.pop()
        return reply

    with Loopback(handler) as server:
        sink = io.BytesIO()
        t = _transport(server.url, [])
        t.download("/v1/file", sink, limit=len(DATA))
    assert sink.getvalue() == DATA
    assert "range" not in server.seen[0].headers
    assert server.seen[1].headers["range"] == "bytes=100000-"
    assert t.bytes_received == len(DATA)  # the cut part was not fetched twice


def test_download_starts_over_when_the_server_ignores_range() -> None:
    with Loopback(lambda s: ranged(DATA, s, honour_range=False)) as server:
        sink = io.BytesIO(b"stale partial bytes")
        sink.seek(0, 2)
        _transport(server.url, []).download("/v1/file", sink, limit=len(DATA))
    assert server.seen[0].headers["range"] == f"bytes={len(b'stale partial bytes')}-"
    assert sink.getvalue() == DATA


def test_download_stops_at_the_limit() -> None:
    with Loopback(lambda s: ranged(DATA, s)) as server:
        sink = io.BytesIO()
        _transport(server.url, []).download("/v1/file", sink, limit=1000)
    assert sink.getvalue() == DATA[:1000]


def test_answer_beyond_the_limit_is_refused_not_buffered() -> None:
    with Loopback(lambda s: Reply(200, b"[" + b"0," * 5000 + b"0]")) as server:
        t = Transport(server.url, max_answer_bytes=1000, sleep=lambda s: None)
        with pytest.raises(errors.TransportError, match="larger than 1000"):
            t.call("GET", "/v1/x")
        assert t.bytes_received <= 1000
    assert len(server.seen) == 1  # not retried: the same answer would come again


def test_retry_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(jitter=1.5)


def test_download_starts_over_when_a_206_resumes_from_elsewhere() -> None:
    """protocol.md: a client appends only when a 206's START is the size it has; anything
    else starts the file over (here a server that always answers from byte 0)."""

    def handler(seen: Seen) -> Reply:
        if "range" in seen.headers:
            return Reply(206, DATA, {"Content-Range": f"bytes 0-{len(DATA) - 1}/{len(DATA)}"})
        return Reply(200, DATA)

    with Loopback(handler) as server:
        sink = io.BytesIO(b"partial")
        sink.seek(0, 2)
        _transport(server.url, []).download("/v1/file", sink, limit=len(DATA))
    assert sink.getvalue() == DATA
    assert "range" not in server.seen[-1].headers


def test_a_long_retry_policy_keeps_its_backoff_at_the_cap() -> None:
    """An operator's 'retry for a long time' policy: past 1024 attempts the backoff is still
    the capped delay, not an OverflowError that no caller expects."""
    policy = RetryPolicy(max_attempts=5000, base_delay_s=0.5, max_delay_s=30.0,
                         max_total_wait_s=1e9)
    assert 15.0 <= policy.delay(2000, random.Random(0)) <= 30.0
