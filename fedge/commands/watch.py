"""``fedge watch``: follow a running task in the terminal, one line per round as it closes.

Polls the dashboard's task endpoint (admin token) every ``--interval`` seconds; on a terminal
the open round's progress is shown on a line that updates in place. Ends when the task
completes (exit 0), when it fails (exit 1, with the reason), at ``--timeout`` (exit 1) or on
Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any, TextIO

from fedge.cli import CommandError
from fedge.commands.connection import add_tls_arguments, admin_token, answered, tls_config

# (header, key in a round's JSON, width); numbers are right-aligned.
COLUMNS = (
    ("round", "round", 5), ("kind", "kind", 8), ("state", "state", 9),
    ("version", "model_version", 7), ("selected", "selected", 8), ("reported", "reported", 8),
    ("aborted", "aborted", 7), ("dropped", "dropped", 7), ("late", "late", 4),
    ("loss", "loss", 8), ("uploaded", "bytes_in", 11), ("seconds", "duration_s", 7),
)


def register(sub: Any) -> None:
    p = sub.add_parser("watch", help="follow a running task live", description=__doc__)
    p.add_argument("task_id", nargs="?", default=None,
                   help="the task (default: the newest running task)")
    p.add_argument("--coordinator", required=True, help="URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--admin-token", default=None, help="default: $FEDGE_ADMIN_TOKEN")
    add_tls_arguments(p)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from edge_sdk.protocol import Route
    from edge_sdk.transport import RetryPolicy, Transport

    stream = out or sys.stdout
    token = admin_token(args)
    # Written "not ... > 0": NaN fails too (argparse's float takes it). A NaN or infinite
    # interval made the first sleep raise; a NaN timeout never came.
    if not (math.isfinite(args.interval) and args.interval > 0):
        raise CommandError("--interval must be a finite number of seconds > 0")
    if args.timeout is not None and not args.timeout >= 0:
        raise CommandError("--timeout must be a number of seconds >= 0")
    headers = {"Authorization": f"Bearer {token}"}
    try:
        transport = Transport(args.coordinator, timeout=30, retry=RetryPolicy(max_attempts=1),
                              tls=tls_config(args))
    except ValueError as e:
        raise CommandError(str(e)) from e

    def get(path: str) -> Any:
        with answered(args.coordinator):
            return transport.call("GET", path, headers=headers)

    try:
        task_id = args.task_id or _newest_running(get(Route.ADMIN_DASHBOARD_OVERVIEW))
        follower = _Follower(stream, live=stream.isatty())
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        while True:
            detail = get(Route.path(Route.ADMIN_DASHBOARD_TASK, task_id=task_id))
            follower.show(detail)
            if detail["task"]["state"] == "completed":
                follower.done(detail)
                return 0
            if detail["task"]["state"] == "failed":  # for good: it will never complete
                follower.clear()
                failure = get(Route.path(Route.ADMIN_TASK, task_id=task_id)).get("failure")
                print(f"fedge watch: task {task_id} failed: {failure}", file=sys.stderr)
                return 1
            if deadline is not None and time.monotonic() >= deadline:
                follower.clear()
                print(f"fedge watch: task {task_id} still {detail['task']['state']} after "
                      f"{args.timeout} s", file=sys.stderr)
                return 1
            time.sleep(args.interval)
    finally:
        transport.close()


def _newest_running(overview: dict[str, Any]) -> str:
    running = [t for t in overview["tasks"] if t["state"] in ("running", "paused")]
    if not running:
        raise CommandError("no running task to watch (name one: fedge watch TASK_ID)")
    return str(running[-1]["task_id"])


class _Follower:
    """Prints each round once it has closed, in order; the open one on a live line."""

    def __init__(self, stream: TextIO, live: bool) -> None:
        self.stream = stream
        self.live = live
        # Numbers of the rounds printed. Not a count of them: the task view lists the last
        # 300 rounds and retention deletes old ones, so its list of closed rounds stops
        # growing, or shrinks, while rounds go on closing.
        self.printed: set[int] = set()
        self.status = ""
        self.started = False

    def show(self, detail: dict[str, Any]) -> None:
        if not self.started:
            self.started = True
            t = detail["task"]
            self._print(f"watching {t['name']} ({t['task_id']}, {t['mode']}, "
                        f"{t['rounds_planned']} rounds planned); Ctrl-C to stop")
            self._print(_row({key: head for head, key, _ in COLUMNS}, header=True))
        rounds = detail["rounds"]
        closed = [r for r in rounds if r["closed_at"] is not None]
        for r in closed:  # in order of their number
            if r["round"] not in self.printed:
                self._print(_row(r))
                self.printed.add(r["round"])
        current = next((r for r in rounds if r["closed_at"] is None), None)
        if self.live:
            line = "" if current is None else (
                f"  round {current['round']} {current['state']}: {current['reported']} of "
                f"{current['goal']} reported, {current['selected']} selected, "
                f"{current['duration_s']:.0f} s"
            )
            self.clear()
            self.stream.write(line)
            self.stream.flush()
            self.status = line or " "

    def done(self, detail: dict[str, Any]) -> None:
        t = detail["task"]
        self._print(f"task {t['task_id']} completed: version {t['model_version']}, "
                    f"{t['rounds_completed']} rounds")

    def clear(self) -> None:
        if self.live and self.status:
            self.stream.write("\r" + " " * len(self.status) + "\r")
            self.status = ""

    def _print(self, line: str) -> None:
        self.clear()
        print(line, file=self.stream, flush=True)


def _row(r: dict[str, Any], header: bool = False) -> str:
    from fedge.commands.status import format_cell

    cells = []
    for _, key, width in COLUMNS:
        value = r.get(key)
        if header:
            text, right = str(value), key not in ("kind", "state")
        elif key == "bytes_in":
            text, right = _bytes(value), True
        elif key == "duration_s":
            text, right = ("-" if value is None else f"{value:.1f}"), True
        else:
            text, right = format_cell(value), isinstance(value, int | float)
        cells.append(text.rjust(width) if right else text.ljust(width))
    return "  ".join(cells).rstrip()


def _bytes(n: Any) -> str:
    if not isinstance(n, int):
        return "-"
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            break
        value /= 1024
    return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
