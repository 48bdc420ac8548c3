"""``fedge serve``: run the coordinator service until interrupted (SIGINT/SIGTERM)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from typing import Any

from fedge.cli import CommandError


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the coordinator service", description=__doc__)
    p.add_argument("--db", required=True, help="SQLite file (blobs go in DB.blobs/ beside it)")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (0: any free port; default 8080)")
    p.add_argument("--config", default=None, help="JSON or TOML file of CoordinatorConfig keys")
    p.add_argument(
        "--admin-token",
        default=None,
        help="operator token (default: $FEDGE_ADMIN_TOKEN, else a random one printed to stderr)",
    )
    p.add_argument(
        "--enrollment-token",
        default=None,
        help="devices must send it (header X-Fedge-Enrollment) to register "
        "(default: $FEDGE_ENROLLMENT_TOKEN, else the config's; none: registration is open)",
    )
    p.add_argument("--max-body-bytes", type=int, default=None, help="limit for device requests")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from coordinator.config import ConfigError, CoordinatorConfig

    try:
        cfg = CoordinatorConfig.from_file(args.config) if args.config else CoordinatorConfig()
    except ConfigError as e:
        raise CommandError(str(e)) from e
    overrides: dict[str, Any] = {"db_path": args.db}
    for name in ("host", "port", "max_body_bytes"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    token = args.admin_token or os.environ.get("FEDGE_ADMIN_TOKEN") or cfg.admin_token
    if token:
        overrides["admin_token"] = token
    enrollment = args.enrollment_token or os.environ.get("FEDGE_ENROLLMENT_TOKEN")
    if enrollment:
        overrides["enrollment_token"] = enrollment
    cfg = dataclasses.replace(cfg, **overrides)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    return asyncio.run(_serve(cfg, print_token=not token))


async def _serve(cfg: Any, print_token: bool) -> int:
    from coordinator.app import build_app, start
    from coordinator.service import Coordinator

    try:
        coord = Coordinator(cfg)
    except Exception as e:  # a database that cannot be opened or migrated
        raise CommandError(f"cannot open {cfg.db_path}: {e}") from e
    if print_token:
        print(f"admin token: {coord.admin_token}", file=sys.stderr, flush=True)
    runner, port = await start(build_app(coord), cfg.host, cfg.port)
    print(f"fedge coordinator listening on http://{cfg.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    return 0
