"""``fedge status``: a coordinator's counters (model version, rounds, updates, devices)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fedge.cli import CommandError


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="show a coordinator's status", description=__doc__)
    p.add_argument("--coordinator", required=True, help="URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edge_sdk.errors import ClientError
    from edge_sdk.protocol import Route
    from edge_sdk.transport import RetryPolicy, Transport

    try:
        with Transport(args.coordinator, timeout=30, retry=RetryPolicy(max_attempts=1)) as t:
            status = t.call("GET", Route.STATUS)
    except (ClientError, ValueError) as e:
        raise CommandError(f"cannot reach {args.coordinator}: {e}") from e
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    for key in ("model_version", "rounds_completed", "updates_accepted", "devices_registered"):
        print(f"{key:20} {status[key]}")
    for t in status.get("tasks", []):
        print(
            f"task {t['task_id']} {t['name']!r}: {t['state']}, version {t['model_version']}, "
            f"{t['rounds_completed']} rounds"
        )
    return 0
