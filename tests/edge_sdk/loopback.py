"""A tiny scripted HTTP/1.1 server on 127.0.0.1 for tests about the client's HTTP handling.

Real sockets, real ``http.client`` on the other side; only the answers are scripted. A handler
gets a :class:`Seen` request and returns a :class:`Reply`; ``cut_after`` sends the full
``Content-Length`` but only that many body bytes, then drops the connection.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing.Self is 3.11's; the project runs on 3.10 too
    from typing_extensions import Self


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    client_port: int


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    cut_after: int | None = None  # send this many body bytes, then close the connection
    close: bool = False  # close the connection after answering, without saying so


Handler = Callable[[Seen], Reply]


class Loopback:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.seen: list[Seen] = []
        outer = self

        class _Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                seen = Seen(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                    self.client_address[1],
                )
                outer.seen.append(seen)
                reply = outer.handler(seen)
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                if reply.cut_after is not None:
                    self.wfile.write(reply.body[: reply.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(reply.body)
                if reply.close:
                    self.close_connection = True

            do_GET = do_POST = do_PUT = _any

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def connections(self) -> int:
        """Distinct client connections seen so far (by client port)."""
        return len({s.client_port for s in self.seen})

    def __enter__(self) -> Loopback:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class ScriptedServer:
    """A scripted coordinator on a :class:`Loopback`: subclasses answer in :meth:`handle`."""

    def __init__(self) -> None:
        self.loopback = Loopback(self.handle)

    def handle(self, seen: Seen) -> Reply:
        raise NotImplementedError

    def calls(self, suffix: str) -> list[Seen]:
        """The requests seen so far whose path ends with ``suffix``."""
        return [s for s in self.loopback.seen if s.path.endswith(suffix)]

    def __enter__(self) -> Self:
        self.loopback.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.loopback.__exit__(*exc)


def json_error(status: int, code: str, message: str = "scripted") -> Reply:
    import json

    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return Reply(status, body, {"Content-Type": "application/json"})


def ranged(data: bytes, seen: Seen, *, honour_range: bool = True) -> Reply:
    """A file answer that honours ``Range: bytes=N-`` with 206 like the coordinator."""
    value = seen.headers.get("range")
    if honour_range and value and value.startswith("bytes="):
        start = int(value[len("bytes=") :].split("-")[0])
        headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        return Reply(206, data[start:], headers)
    return Reply(200, data)


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 in front of a real server that breaks one request on purpose.

    The first ``cuts`` requests whose request line contains ``match`` are broken by ``mode``:

    * ``"request"``: the proxy forwards the headers and half of the body, then closes both
      sides (the server never gets a whole request; the client's send or read fails);
    * ``"response"``: the whole request goes through, the server answers, and the proxy drops
      the answer and closes the client's connection (the server did the work; the client
      cannot know).

    Everything else passes through untouched (HTTP/1.1 with ``Content-Length`` bodies, which
    is what ``http.client`` sends). ``request_lines`` records every request the client sent and
    ``request_sizes`` its size on the wire (request line, headers and body). With ``match=None``
    nothing is broken: a byte-counting relay.
    """

    def __init__(
        self, upstream_port: int, match: bytes | None, mode: str = "request", cuts: int = 1
    ) -> None:
        if mode not in ("request", "response"):
            raise ValueError(mode)
        self.upstream_port = upstream_port
        self.match = match
        self.mode = mode
        self.cuts_left = cuts
        self.request_lines: list[bytes] = []
        self.request_sizes: list[int] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._closing = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> CuttingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            state = {"swallow": False}
            threading.Thread(
                target=self._downstream, args=(upstream, client, state), daemon=True
            ).start()
            threading.Thread(
                target=self._upstream, args=(client, upstream, state), daemon=True
            ).start()

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _downstream(self, upstream: socket.socket, client: socket.socket, state: dict) -> None:
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                if state["swallow"]:
                    break  # the server answered the broken request: drop it, hang up
                client.sendall(data)
        except OSError:
            pass
        self._close(client, upstream)

    def _upstream(self, client: socket.socket, upstream: socket.socket, state: dict) -> None:
        buf = b""
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                buf += data
                while True:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    head = buf[: end + 4]
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value.strip())
                    if len(buf) < end + 4 + length:
                        break
                    request, buf = buf[: end + 4 + length], buf[end + 4 + length :]
                    first = head.split(b"\r\n", 1)[0]
                    with self._lock:
                        self.request_lines.append(first)
                        self.request_sizes.append(len(request))
                        cut = self.cuts_left > 0 and self.match is not None and self.match in first
                        self.cuts_left -= cut
                    if cut and self.mode == "request":
                        upstream.sendall(request[: end + 4 + length // 2])
                        self._close(client, upstream)
                        return
                    if cut:
                        state["swallow"] = True
                    upstream.sendall(request)
        except OSError:
            pass
        self._close(client, upstream)
