"""HTTP to the coordinator on the stdlib: one keep-alive connection, retries, typed errors.

A device cannot afford ``requests`` or ``aiohttp``, so this is ``http.client`` with what the
protocol needs on top:

* JSON calls (:meth:`Transport.call`), raw bodies such as frame uploads (:meth:`Transport.request`)
  and streamed, resumable downloads into a file (:meth:`Transport.download`);
* error bodies mapped to the classes of :mod:`edge_sdk.errors`;
* retries with exponential backoff and jitter for connection failures and 5xx answers (and
  a rate limiter's 429), never for other 4xx: those are the same answer next time. A 3xx is
  no answer at all (a proxy's, a captive portal's): it raises
  :class:`~edge_sdk.errors.TransportError` and is not followed. A keep-alive connection the
  server closed while idle is reopened once at once, without counting as an attempt. A
  ``Retry-After`` (an overloaded coordinator's 503, a 429) sets the wait, plus jitter so that
  the devices it turned away together do not return together; all the waits of one request
  stay within ``RetryPolicy.max_total_wait_s``;
* HTTPS with verified certificates, a custom CA bundle and public-key pinning
  (:class:`~edge_sdk.tls.TlsConfig`); a certificate that fails raises
  :class:`~edge_sdk.errors.TlsError` and is not retried;
* byte counters (``bytes_sent`` / ``bytes_received``: bodies, not headers) for the client's report.

Usage::

    t = Transport("http://127.0.0.1:8080", sleep=time.sleep)
    t.credentials = ("d-1", "secret")
    answer = t.call("POST", Route.CHECKIN, {"runtimes": ["ort-step"]})

A transport is not thread-safe: one per client.
"""

from __future__ import annotations

import datetime
import email.utils
import http.client
import io
import json
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from edge_sdk.errors import ApiError, Overloaded, TlsError, TransportError, api_error
from edge_sdk.protocol import device_auth_header
from edge_sdk.tls import PinnedHTTPSConnection, TlsConfig

__all__ = ["Response", "RetryPolicy", "Transport"]

_CHUNK = 64 * 1024
# Answers we hold in memory (JSON, parameter frames); files stream through download().
_MAX_BODY = 256 * 1024 * 1024
_USER_AGENT = "fedge-edge/1"


def doubling_backoff(first_s: float, n: int, cap_s: float) -> float:
    """The ``n``-th wait (1-based) of a backoff that doubles from ``first_s`` up to ``cap_s``.

    The exponent is bounded first: ``2.0 ** n`` raises OverflowError past n = 1023 (a long
    retry policy, weeks of failed passes), and 2 ** 64 times any sensible first wait is far
    past any cap."""
    return min(cap_s, first_s * 2.0 ** min(n - 1, 64))


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt ``n`` waits ``base * 2**(n-1)`` (capped) times a
    random factor in ``[1 - jitter, 1]``, so that devices cut off together do not come back
    together. A server's ``Retry-After`` replaces that wait, times ``[1, 1 + jitter]``. One
    request never waits more than ``max_total_wait_s`` in all: past it the last error is
    raised and the device's own loop decides when to come back."""

    max_attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    jitter: float = 0.5
    max_total_wait_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be in [0, 1]")
        if self.max_total_wait_s < 0:
            raise ValueError("max_total_wait_s must be >= 0")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based)."""
        cap = doubling_backoff(self.base_delay_s, attempt, self.max_delay_s)
        return cap * (1.0 - self.jitter * rng.random())

    def server_delay(self, asked: float, rng: random.Random) -> float:
        """Seconds to wait when the server asked for ``asked`` (Retry-After)."""
        return min(self.max_delay_s, asked) * (1.0 + self.jitter * rng.random())


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        """The decoded body (None if empty); ValueError if it is not JSON, including JSON
        nested deeper than the decoder recurses (which raises RecursionError, a
        RuntimeError that no caller of an HTTP answer expects)."""
        try:
            return json.loads(self.body) if self.body else None
        except RecursionError as e:
            raise ValueError(f"JSON nested too deeply: {e}") from None


class _Failed(Exception):
    """One attempt's connection failure; ``reused`` says the connection had served before."""

    def __init__(self, cause: BaseException, reused: bool) -> None:
        super().__init__(repr(cause))
        self.cause = cause
        self.reused = reused


class Transport:
    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        max_answer_bytes: int = _MAX_BODY,
        tls: TlsConfig | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"coordinator URL must be http(s)://host[:port], got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._https = parts.scheme == "https"
        if tls is not None and tls != TlsConfig() and not self._https:
            # A CA or a pin on a plain-HTTP URL would protect nothing: say so, do not ignore.
            raise ValueError(f"TLS options (CA bundle, pin) need an https:// URL, got {base_url!r}")
        self.tls = tls or TlsConfig()
        self._ssl_context: ssl.SSLContext | None = None
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.max_answer_bytes = max_answer_bytes
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._conn: http.client.HTTPConnection | None = None
        self._served = 0  # requests completed on the current connection
        self.credentials: tuple[str, str] | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.connections_opened = 0

    # -- public calls -------------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """A JSON request (``payload`` may be None for no body); returns the decoded answer."""
        body = b"" if payload is None else json.dumps(payload).encode()
        hdrs = {"Content-Type": "application/json", "Accept": "application/json"}
        hdrs.update(headers or {})
        response = self.request(method, path, body=body, headers=hdrs)
        try:
            return response.json()
        except (ValueError, UnicodeDecodeError) as e:
            raise TransportError(f"{method} {path}: answer is not JSON: {e}") from e

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send ``body`` (the same bytes on every retry) and return the 2xx answer, or raise."""
        hdrs = dict(headers or {})

        def attempt() -> Response:
            return self._exchange(method, path, body, hdrs, sink=None, limit=self.max_answer_bytes)

        return self._retrying(method, path, attempt)

    def download(self, path: str, sink: BinaryIO, *, limit: int) -> Response:
        """Stream ``GET path`` into ``sink`` (opened for appending), resuming from its current
        size with ``Range`` on every attempt; stops after ``limit`` bytes in the file.

        A server that ignores ``Range`` (answers 200) makes the file start over.
        """

        def attempt() -> Response:
            offset = sink.seek(0, 2)
            hdrs = {"Range": f"bytes={offset}-"} if offset else {}
            return self._exchange("GET", path, b"", hdrs, sink=sink, limit=limit)

        return self._retrying("GET", path, attempt)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._served = 0

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- machinery ----------------------------------------------------------------------------

    def _retrying(self, method: str, path: str, attempt: Callable[[], Response]) -> Response:
        n = 0  # attempts that count against the policy
        tries = 0  # requests sent, a free reopen included
        reopened = False
        waited = 0.0

        def wait(seconds: float) -> bool:
            """Sleep unless that would pass the request's total wait budget."""
            nonlocal waited
            if waited + seconds > self.retry.max_total_wait_s:
                return False
            waited += seconds
            self._sleep(seconds)
            return True

        while True:
            n += 1
            tries += 1
            try:
                response = attempt()
            except _Failed as failure:
                if failure.reused and not reopened:
                    # The server closed an idle keep-alive connection: not the network's fault.
                    reopened = True
                    n -= 1
                    continue
                if n >= self.retry.max_attempts or not wait(self.retry.delay(n, self._rng)):
                    raise TransportError(
                        f"{method} {path}: {failure.cause!r} after {n} attempts", attempts=n
                    ) from failure.cause
                continue
            if response.status < 300:
                return response
            if response.status < 400:
                # Not the coordinator's answer (a proxy, a captive portal), and never followed:
                # the device's credential would go to whatever host it names. Taking it for a
                # 2xx would settle an upload that was never counted.
                location = response.headers.get("location", "")
                raise TransportError(
                    f"{method} {path}: redirected ({response.status}) to {location!r}, "
                    "not followed", attempts=n,
                )
            error = self._error(method, path, response)
            error.attempt = tries
            if (
                error.transient
                and n < self.retry.max_attempts
                and wait(self._server_delay(n, response))
            ):
                continue
            raise error

    def _server_delay(self, n: int, response: Response) -> float:
        asked = _retry_after(response)
        if asked is None:
            return self.retry.delay(n, self._rng)
        return self.retry.server_delay(asked, self._rng)

    def _error(self, method: str, path: str, response: Response) -> ApiError:
        code: str | None = None
        message = response.body[:200].decode("utf-8", "replace")
        try:
            err = response.json()["error"]
            code = str(err["code"])
            message = str(err.get("message", ""))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            pass
        error = api_error(response.status, code, message, method=method, path=path)
        if isinstance(error, Overloaded):
            error.retry_after_s = _retry_after(response)
        return error

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if not self._https:
                self._conn = http.client.HTTPConnection(self._host, self._port,
                                                        timeout=self.timeout)
            else:
                if self._ssl_context is None:
                    self._ssl_context = self.tls.context()
                pin = self.tls.pin
                self._conn = (
                    http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                                context=self._ssl_context)
                    if pin is None
                    else PinnedHTTPSConnection(self._host, self._port, pin=pin,
                                               timeout=self.timeout, context=self._ssl_context)
                )
            self._served = 0
            self.connections_opened += 1
        return self._conn

    def _exchange(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: dict[str, str],
        *,
        sink: BinaryIO | None,
        limit: int,
    ) -> Response:
        conn = self._connection()
        reused = self._served > 0
        hdrs = {"User-Agent": _USER_AGENT, **headers}
        if self.credentials is not None:
            hdrs["Authorization"] = device_auth_header(*self.credentials)
        try:
            conn.request(method, self._prefix + path, body=body, headers=hdrs)
            self.bytes_sent += len(body)
            raw = conn.getresponse()
            status = raw.status
            resp_headers = {k.lower(): v for k, v in raw.getheaders()}
            complete = True
            if sink is not None and status in (200, 206):
                data = b""
                if status == 200:
                    sink.seek(0)
                    sink.truncate()
                else:
                    self._check_range(resp_headers, sink)
                complete = self._stream(raw, sink, limit)
            else:
                # Chunked reads: read(n) would allocate n bytes up front, whatever the body.
                held = io.BytesIO()
                if not self._stream(raw, held, limit):
                    self.close()
                    raise TransportError(f"{method} {path}: answer larger than {limit} B")
                data = held.getvalue()
        except TlsError:
            self.close()
            raise
        except ssl.SSLError as e:
            self.close()
            if isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
                raise _Failed(e, reused) from e  # the link was cut: that may pass
            raise TlsError(f"{method} {self.base_url}: TLS handshake failed: {e}") from e
        except (OSError, http.client.HTTPException) as e:
            self.close()
            raise _Failed(e, reused) from e
        if not complete or raw.will_close:
            self.close()
        else:
            self._served += 1
        return Response(status, resp_headers, data)

    def _stream(self, raw: http.client.HTTPResponse, sink: BinaryIO, limit: int) -> bool:
        """Copy the body into ``sink`` up to ``limit`` bytes in the file; False if cut short."""
        while True:
            room = limit - sink.tell()
            if room <= 0:
                # More than the manifest promised: stop here, the caller's hash check decides.
                return raw.read(1) == b""
            chunk = raw.read(min(_CHUNK, room))
            if not chunk:
                self._check_complete(raw)
                return True
            sink.write(chunk)
            self.bytes_received += len(chunk)

    @staticmethod
    def _check_complete(raw: http.client.HTTPResponse) -> None:
        # read(n) returns short, not an error, when the peer closes before Content-Length.
        if raw.length:
            raise http.client.IncompleteRead(b"", raw.length)

    @staticmethod
    def _check_range(headers: Mapping[str, str], sink: BinaryIO) -> None:
        # "bytes START-END/TOTAL": a server resuming from elsewhere would corrupt the file.
        # Asking for the same range again would get the same answer, so (protocol.md) the file
        # starts over: emptied here, the next attempt asks for all of it without Range.
        offset = sink.seek(0, 2)
        value = headers.get("content-range", "")
        try:
            start = int(value.split()[1].split("-")[0])
        except (IndexError, ValueError):
            start = None
        if start != offset:
            sink.seek(0)
            sink.truncate()
            got = f"from {start}" if start is not None else f"Content-Range {value!r}"
            raise http.client.HTTPException(f"asked for bytes from {offset}, got {got}")


def _retry_after(response: Response) -> float | None:
    """A ``Retry-After`` in seconds, given as seconds or (RFC 9110, a proxy's or a load
    balancer's) as an HTTP-date; None without a usable one."""
    value = response.headers.get("retry-after", "").strip()
    asked: float | None
    try:
        asked = float(value)
    except ValueError:
        asked = _seconds_until(value, response.headers.get("date"))
    return asked if asked is not None and 0.0 <= asked < float("inf") else None


def _seconds_until(http_date: str, server_date: str | None) -> float | None:
    """Seconds from the answer's ``Date`` to ``http_date``, or None if it is not a date.

    Measured against the server's own ``Date`` when it sent one: the device's clock may be
    far off the server's (the protocol never compares them), and both dates here are the
    server's. A date already past is no wait at all."""
    until = _http_date(http_date)
    if until is None:
        return None
    now = _http_date(server_date or "")
    return max(0.0, until - (time.time() if now is None else now))


def _http_date(value: str) -> float | None:
    """An HTTP-date as Unix seconds, or None."""
    try:
        when = email.utils.parsedate_to_datetime(value)
        # RFC 9110: an HTTP-date is always UTC, even in the obsolete forms that do not say so.
        return when.replace(tzinfo=when.tzinfo or datetime.timezone.utc).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
