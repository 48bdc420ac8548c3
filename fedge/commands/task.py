"""``fedge task``: create, list, show, pause and resume tasks through the admin API.

::

    fedge task create --coordinator URL --admin-token T --bundle DIR --name digits \\
        --plan '{"rounds": 20, "goal": 10, "codec": {"name": "int8"}}'
    fedge task list   --coordinator URL --admin-token T
    fedge task show   --coordinator URL --admin-token T TASK_ID [--rounds]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedge.cli import CommandError
from fedge.commands.connection import add_tls_arguments, admin_token, tls_config


def register(sub: Any) -> None:
    p = sub.add_parser(
        "task",
        help="manage federated tasks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--coordinator", required=True, help="URL, e.g. http://127.0.0.1:8080")
        q.add_argument("--admin-token", default=None, help="default: $FEDGE_ADMIN_TOKEN")
        add_tls_arguments(q)

    c = actions.add_parser("create", help="upload a bundle and create a task on it")
    common(c)
    c.add_argument("--bundle", required=True, help="exported bundle directory")
    c.add_argument("--name", default="task")
    c.add_argument("--population", default="default")
    c.add_argument(
        "--mode",
        default="sync",
        choices=("sync", "async"),
        help="synchronous rounds, or async buffered aggregation (FedBuff)",
    )
    c.add_argument("--plan", default=None, help="plan as JSON text, or @FILE with JSON")
    common(actions.add_parser("list", help="list tasks"))
    for name, text in (
        ("show", "show a task"),
        ("pause", "pause a task"),
        ("resume", "resume a task"),
        ("evaluate", "schedule an evaluation round"),
    ):
        q = actions.add_parser(name, help=text)
        common(q)
        q.add_argument("task_id")
        if name == "show":
            q.add_argument("--rounds", action="store_true", help="include the metrics history")
    p.set_defaults(func=run)


def _plan(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        raw = Path(text[1:]).read_text() if text.startswith("@") else text
        plan = json.loads(raw)
    except (OSError, ValueError) as e:
        raise CommandError(f"--plan: {e}") from e
    if not isinstance(plan, dict):
        raise CommandError("--plan must be a JSON object")
    return plan


def run(args: argparse.Namespace) -> int:
    from coordinator.admin import AdminClient, ApiCallError, TransportError

    token = admin_token(args)
    assert token is not None
    try:
        admin = AdminClient(args.coordinator, token, tls=tls_config(args))
    except ValueError as e:  # a malformed URL, or TLS options on an http:// one
        raise CommandError(str(e)) from e
    try:
        if args.action == "create":
            try:
                bundle = admin.upload_bundle(args.bundle)
            except OSError as e:  # reading the bundle directory: the coordinator was not asked
                raise CommandError(f"--bundle {args.bundle}: {e}") from e
            out: Any = admin.create_task(
                bundle["bundle_id"],
                _plan(args.plan),
                name=args.name,
                population=args.population,
                mode=args.mode,
            )
        elif args.action == "list":
            out = admin.tasks()
        elif args.action == "show":
            out = admin.task(args.task_id)
            if args.rounds:
                out["rounds"] = admin.rounds(args.task_id)
        elif args.action == "pause":
            out = admin.pause(args.task_id)
        elif args.action == "resume":
            out = admin.resume(args.task_id)
        else:
            out = admin.evaluate(args.task_id)
    except ApiCallError as e:
        raise CommandError(str(e)) from e
    except TransportError as e:
        raise CommandError(f"cannot reach {args.coordinator}: {e}") from e
    finally:
        admin.close()
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0
