"""``fedge status``: a coordinator's counters and tasks, as a table (``--json``: the raw answer).

They are the operator's: the admin token is needed (``/v1/health`` alone is public).
:func:`render_table` is the plain-text table ``fedge watch`` uses too."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from fedge.commands.connection import add_tls_arguments, admin_token, answered, tls_config


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="show a coordinator's status", description=__doc__)
    p.add_argument("--coordinator", required=True, help="URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--admin-token", default=None, help="default: $FEDGE_ADMIN_TOKEN")
    add_tls_arguments(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from coordinator.admin import AdminClient
    from edge_sdk.protocol import Route

    token = admin_token(args)
    assert token is not None
    with answered(args.coordinator):
        admin = AdminClient(args.coordinator, token, timeout=30, tls=tls_config(args))
        try:
            status = admin.status()
        finally:
            admin.close()
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    print(f"devices registered  {status['devices_registered']:>8,}")
    print(f"updates accepted    {status['updates_accepted']:>8,}")
    tasks = status.get("tasks", [])
    if tasks:
        print()
        print(render_table(
            ["task", "id", "mode", "state", "version", "rounds"],
            [[t["name"], t["task_id"], t["mode"], t["state"], t["model_version"],
              t["rounds_completed"]] for t in tasks],
        ))
    else:
        print("no tasks")
    print(f"\ndashboard: {args.coordinator.rstrip('/')}{Route.DASHBOARD} (admin token); "
          f"follow a task: fedge watch --coordinator {args.coordinator}")
    return 0


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    cells = [[format_cell(v) for v in row] for row in rows]
    numeric = [all(isinstance(row[i], int | float) for row in rows) and bool(rows)
               for i in range(len(headers))]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), rule, *(line(r) for r in cells)])


def format_cell(value: Any) -> str:
    """A table cell: thousands separators, four decimals, "-" for missing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
