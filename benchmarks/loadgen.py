"""A light HTTP load generator for the coordinator benchmarks, and the CPU and memory of the
server process tree it loads.

At a thousand 100 KB uploads or several thousand check-ins per second, a client built on
``http.client`` spends about as much CPU as the coordinator it measures, on the same two
shared cores. Here every request is built once, before the clock starts (head and body
bytes: device authorization, idempotency key, report), and sent on raw sockets by
``connections`` threads with one ``sendmsg`` each; of each answer only the status line,
``Content-Length`` and (for the checks that need it) a byte pattern of the body are read.

Two ways to connect: a new connection per request (``Connection: close``, like a phone that
wakes up, uploads and goes away) or keep-alive (like a load balancer's pooled connections to
a backend).

The server's CPU is summed over its process and all its descendants (``fedge serve
--processes K`` runs K children): ``utime + stime`` of each live process, plus
``cutime + cstime`` (children already exited and reaped), so the sum only grows while
processes come and go. Read it before stopping the server: a process that exits unreaped
takes its CPU with it.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import socket
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.protocol import (
    FRAME_CONTENT_TYPE,
    HEADER_IDEMPOTENCY_KEY,
    HEADER_REPORT,
    Route,
    device_auth_header,
)

__all__ = [
    "Expect",
    "LoadResult",
    "Request",
    "check_event_loop",
    "checkin_request",
    "download_request",
    "expect_status",
    "expect_steered",
    "run",
    "run_parts",
    "tree_cpu",
    "tree_cpu_s",
    "tree_kib",
    "tree_pids",
    "upload_request",
]

_RECV_TIMEOUT_S = 120.0  # a server that stops answering fails the run instead of hanging it
# (status, body) -> whether the answer is the one expected
Expect = Callable[[int, bytes], bool]


@dataclass(frozen=True)
class Request:
    """One HTTP/1.1 request as bytes; ``close``: sent with ``Connection: close`` (the
    connection ends with the answer)."""

    head: bytes
    body: bytes
    close: bool


def _request(
    method: str, path: str, port: int, headers: dict[str, str], body: bytes, close: bool
) -> Request:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return Request(("\r\n".join(lines) + "\r\n\r\n").encode(), body, close)


def upload_request(
    port: int,
    device: tuple[str, str],
    assignment_id: str,
    frame: bytes,
    report: dict[str, Any],
    close: bool,
) -> Request:
    """An update upload of ``device`` (id, secret), with an idempotency key of its own."""
    headers = {
        "Authorization": device_auth_header(*device),
        HEADER_IDEMPOTENCY_KEY: uuid.uuid4().hex,
        HEADER_REPORT: json.dumps(report),
        "Content-Type": FRAME_CONTENT_TYPE,
    }
    path = Route.ASSIGNMENT_UPDATE.format(assignment_id=assignment_id)
    return _request("POST", path, port, headers, frame, close)


def checkin_request(
    port: int, device: tuple[str, str], checkin: dict[str, Any], close: bool
) -> Request:
    headers = {"Authorization": device_auth_header(*device), "Content-Type": "application/json"}
    return _request("POST", Route.CHECKIN, port, headers, json.dumps(checkin).encode(), close)


def download_request(port: int, device: tuple[str, str], path: str, close: bool) -> Request:
    """A GET of ``path`` (a model version's frame, a bundle file) as ``device``."""
    return _request("GET", path, port, {"Authorization": device_auth_header(*device)}, b"", close)


def check_event_loop(db: Path, event_loop: str) -> None:
    """Raise unless the coordinator serving ``db`` (``EmbeddedCoordinator`` in a subprocess,
    which logs to ``<db>.log``) said it serves on ``event_loop``."""
    log = db.with_name(db.name + ".log").read_text()
    if f"serving with the {event_loop} event loop" not in log:
        raise AssertionError(f"the server did not run the {event_loop} loop: {log[-500:]!r}")


def expect_status(code: int) -> Expect:
    return lambda status, _body: status == code


def expect_steered(status: int, body: bytes) -> bool:
    """A check-in answered with pace steering because the round is full (``window_full``):
    the one reason string is enough, the JSON is not parsed."""
    return status == 200 and b'"window_full"' in body


@dataclass(frozen=True)
class LoadResult:
    requests: int
    connections: int
    keep_alive: bool
    wall_s: float
    per_s: float
    # latency of each request, from its first byte sent to its answer's last byte read
    # (with a new connection per request, the connect included)
    latency_ms: dict[str, float]
    # CPU of this process (all its threads) per request over the run, and the part of it in
    # the kernel (on loopback, sending runs much of the receiving side's TCP work too)
    client_cpu_ms: float
    client_sys_ms: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _handshake(tls: ssl.SSLContext, sock: socket.socket) -> socket.socket:
    # An SSL socket retries a read that SO_RCVTIMEO cut short: it needs settimeout()'s
    # deadline (and the poll() it adds to every read; the decryption costs far more).
    sock.settimeout(_RECV_TIMEOUT_S)
    try:
        return tls.wrap_socket(sock, server_hostname="127.0.0.1")
    except TimeoutError as e:
        sock.close()
        raise TimeoutError(f"no TLS handshake with the server within {_RECV_TIMEOUT_S} s") from e


class _Connection:
    """One client socket and what it has read past the last answer."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        # Not socket.create_connection: its name lookup would be paid on every connection.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.connect(("127.0.0.1", port))
        # A kernel timeout, not settimeout(), which would add a poll() before every recv.
        timeout = struct.pack("ll", int(_RECV_TIMEOUT_S), round(_RECV_TIMEOUT_S % 1 * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.tls = tls is not None
        self.sock = sock if tls is None else _handshake(tls, sock)

    def exchange(self, request: Request) -> tuple[int, bytes, bool]:
        """Send ``request``, read its answer: (status, body, server closes)."""
        if self.tls:  # an SSL socket has no sendmsg
            self.sock.sendall(request.head + request.body)
        else:
            sent = self.sock.sendmsg([request.head, request.body])
            if sent < len(request.head) + len(request.body):  # cut short (a signal): the rest
                self.sock.sendall((request.head + request.body)[sent:])
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        while end < 0:
            buf += self._recv()
            end = buf.find(b"\r\n\r\n")
        head = buf[:end].lower()
        start = head.find(b"\r\ncontent-length:")
        if start < 0:
            raise AssertionError(f"answer without Content-Length: {buf[:end]!r}")
        stop = head.find(b"\r\n", start + 2)
        length = int(head[start + 17 : None if stop < 0 else stop])
        need = end + 4 + length
        while len(buf) < need:
            buf += self._recv()
        self.buf = buf[need:]
        closes = b"\r\nconnection: close" in head
        return int(buf[9:12]), buf[end + 4 : need], closes

    def _recv(self) -> bytes:
        try:
            chunk = self.sock.recv(65536)
        except (BlockingIOError, TimeoutError) as e:  # SO_RCVTIMEO or settimeout() ran out
            raise TimeoutError(f"no answer from the server within {_RECV_TIMEOUT_S} s") from e
        if not chunk:
            raise ConnectionError("the server closed the connection before answering")
        return chunk

    def close(self) -> None:
        self.sock.close()


def run(
    port: int,
    requests: Sequence[Request],
    connections: int,
    expect: Expect,
    on_progress: Callable[[int], None] | None = None,
    every_s: float = 0.05,
    tls: ssl.SSLContext | None = None,
) -> LoadResult:
    """Send ``requests`` to 127.0.0.1:``port`` from ``connections`` threads (each takes the
    next request not yet sent), checking every answer with ``expect``; raises on the first
    unexpected answer. ``on_progress(answers checked so far)`` is called every ``every_s``
    seconds from a thread of its own, and once at the end (e.g. to sample the server's RSS).
    With ``tls`` every connection is HTTPS, its handshake made with that context."""
    return run_parts([(port, requests)], connections, expect, on_progress, every_s, tls)


def run_parts(
    parts: Sequence[tuple[int, Sequence[Request]]],
    connections: int,
    expect: Expect,
    on_progress: Callable[[int], None] | None = None,
    every_s: float = 0.05,
    tls: ssl.SSLContext | None = None,
) -> LoadResult:
    """:func:`run` over several servers at once, ``(port, requests)`` each: connection ``k``
    serves part ``k % len(parts)`` only, so that every server sees its share of the
    connections and a request reaches only the server it was built for."""
    requests = [r for _, part in parts for r in part]
    closing = {r.close for r in requests}
    if len(closing) != 1:
        raise ValueError("requests must all be keep-alive or all close their connection")
    if len(parts) > connections:
        raise ValueError(f"{connections} connections cannot serve {len(parts)} servers")
    # one C call each: atomic under the GIL
    next_of = [itertools.count().__next__ for _ in parts]
    counts = [0] * connections  # answers checked, one counter per worker: no lock
    latencies: list[list[float]] = [[] for _ in range(connections)]
    failures: list[BaseException] = []
    stop = threading.Event()

    def worker(k: int) -> None:
        conn: _Connection | None = None
        lat = latencies[k]
        clock = time.perf_counter
        port, mine = parts[k % len(parts)]
        next_index = next_of[k % len(parts)]
        try:
            while not stop.is_set():
                i = next_index()
                if i >= len(mine):
                    break
                request = mine[i]
                t0 = clock()
                if conn is None:
                    conn = _Connection(port, tls)
                status, body, closes = conn.exchange(request)
                lat.append(clock() - t0)
                if not expect(status, body):
                    raise AssertionError(f"request {i}: unexpected answer {status} {body[:300]!r}")
                counts[k] += 1
                if request.close or closes:
                    conn.close()
                    conn = None
        except BaseException as e:  # reported by run(), not lost with the thread
            failures.append(e)
            stop.set()
        finally:
            if conn is not None:
                conn.close()

    done = threading.Event()

    def sampler() -> None:
        assert on_progress is not None
        while not done.wait(every_s):
            on_progress(sum(counts))

    threads = [threading.Thread(target=worker, args=(k,), name=f"loadgen-{k}")
               for k in range(connections)]  # fmt: skip
    if on_progress is not None:
        threads.append(threading.Thread(target=sampler, name="loadgen-progress"))
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads[:connections]:
        t.join()
    wall, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    done.set()
    for t in threads[connections:]:
        t.join()
    if on_progress is not None:
        on_progress(sum(counts))
    if failures:
        raise failures[0]
    n = len(requests)
    ms = np.concatenate([np.asarray(x) for x in latencies]) * 1e3
    pct = dict(zip(("p50", "p90", "p99"), np.percentile(ms, (50, 90, 99)).tolist(), strict=True))
    return LoadResult(
        requests=n,
        connections=connections,
        keep_alive=not closing.pop(),
        wall_s=wall,
        per_s=n / wall,
        latency_ms={**pct, "max": float(ms.max())},
        client_cpu_ms=(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / n * 1e3,
        client_sys_ms=(cpu1.ru_stime - cpu0.ru_stime) / n * 1e3,
    )


# -- the server's process tree ---------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return kids
    for task in tasks:
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended, or a kernel without the file
            continue
    return kids


def tree_pids(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += _children(pid)
    return pids


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds (user + system) used so far by ``root`` and each live descendant, each
    with the descendants it has reaped."""
    out = {}
    for pid in tree_pids(root):
        fields = _stat(pid)
        if fields is not None:
            out[pid] = sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return out


def tree_cpu_s(root: int) -> float:
    """CPU seconds used so far by the whole tree of ``root`` (see :func:`tree_cpu`)."""
    return sum(tree_cpu(root).values())


def tree_kib(root: int, field: str) -> int:
    """A ``/proc/PID/status`` memory field (``VmRSS``, ``VmHWM``) summed over the tree: for
    ``VmHWM`` an upper bound of the tree's peak (each process's own peak, not simultaneous)."""
    total = 0
    for pid in tree_pids(root):
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            if line.startswith(field + ":"):
                total += int(line.split()[1])
                break
    return total
