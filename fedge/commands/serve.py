"""``fedge serve``: run the coordinator service until interrupted (SIGINT/SIGTERM).

Registration needs an enrollment token: the given one, or a random one printed to stderr at
start (``--open-registration`` lets any device register: closed test networks only). With
``--tls-cert``/``--tls-key`` it serves HTTPS only and prints the certificate's public-key pin
for devices that pin it (``fedge device run --pin-sha256``). With ``--processes K`` it runs
K serving processes on one port and one database (:mod:`fedge.supervisor`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from fedge.cli import CommandError

log = logging.getLogger("fedge.serve")
# coordinator.config.EVENT_LOOPS (a test keeps them equal): the parser is built for every
# fedge command, and importing the coordinator's config there would load its store modules.
EVENT_LOOPS = ("asyncio", "auto", "uvloop")
# The most --processes per CPU: past one per core they only share it, and a typo must not
# start interpreters until memory runs out.
PROCESSES_PER_CPU = 4
# The level names logging knows (it takes a name in any case once upper-cased).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL", "NOTSET")


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the coordinator service", description=__doc__)
    p.add_argument(
        "--db",
        required=True,
        help="SQLite file (blobs go in DB.blobs/ beside it), or a postgresql:// URL (then "
        "--blobs is needed; several processes on one database need --replica)",
    )
    p.add_argument(
        "--blobs", default=None, help="blob directory (required with a postgresql:// URL)"
    )
    p.add_argument(
        "--replica",
        action="store_true",
        default=None,
        help="share --db and --blobs with other fedge serve --replica processes behind one "
        "load balancer (PostgreSQL; a SQLite file: processes on this machine only; "
        "docs/deployment.md)",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=None,
        help="serving processes on this node, sharing the port and --db as replicas "
        "(default 1; e.g. the number of cores)",
    )
    p.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default=None,
        help="the serving processes' event loop (default auto: uvloop over TLS where "
        "installed, asyncio over plain HTTP; docs/deployment.md)",
    )
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (0: any free port; default 8080)")
    p.add_argument("--config", default=None,
                   help="TOML (*.toml) or JSON file of config keys (docs/deployment.md, "
                   "\"Configuration file\"); flags win over it")
    p.add_argument(
        "--admin-token",
        default=None,
        help="operator token (default: $FEDGE_ADMIN_TOKEN, else the config's, else a random "
        "one printed to stderr)",
    )
    p.add_argument(
        "--enrollment-token",
        default=None,
        help="devices must send it (header X-Fedge-Enrollment) to register "
        "(default: $FEDGE_ENROLLMENT_TOKEN, else the config's, else a random one printed to "
        "stderr)",
    )
    p.add_argument(
        "--open-registration",
        action="store_true",
        default=None,
        help="let any device register without a token (closed test networks only)",
    )
    p.add_argument("--tls-cert", default=None, help="PEM certificate (chain): serve HTTPS")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--max-body-bytes", type=int, default=None, help="limit for update frames")
    p.add_argument("--max-json-bytes", type=int, default=None, help="limit for JSON bodies")
    p.add_argument(
        "--max-queued-operations",
        type=int,
        default=None,
        help="operations waiting for the worker before requests get 503 + Retry-After",
    )
    p.add_argument(
        "--retain-versions",
        type=int,
        default=None,
        help="model versions kept per task, with their rounds' rows and blobs (default 10; "
        "0: keep everything)",
    )
    p.add_argument(
        "--device-inactivity-s",
        type=float,
        default=None,
        help="delete devices not seen for this many seconds (default: never)",
    )
    # Checked here: logging refuses an unknown name only once configured, with a traceback.
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                   help="default INFO (any case)")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="json: one JSON object a line (ts, level, logger, message, exc)")
    p.set_defaults(func=run)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record, for log shippers: ``ts`` (UTC, ISO 8601), ``level``,
    ``logger``, ``message``, ``exc`` (the traceback, when there is one) and any ``extra``."""

    _STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        import datetime
        import json

        out: dict[str, object] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in self._STANDARD and not key.startswith("_"):
                out[key] = value
        return json.dumps(out, default=str)


def run(args: argparse.Namespace) -> int:
    from coordinator.config import ConfigError, CoordinatorConfig

    try:
        cfg = CoordinatorConfig.from_file(args.config) if args.config else CoordinatorConfig()
    except ConfigError as e:
        raise CommandError(str(e)) from e
    overrides = _store_overrides(args, cfg)
    names = ("host", "port", "max_body_bytes", "max_json_bytes", "max_queued_operations",
             "tls_cert", "tls_key", "open_registration", "retain_versions",
             "device_inactivity_s", "replica", "processes", "event_loop")
    for name in names:
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    token = args.admin_token or os.environ.get("FEDGE_ADMIN_TOKEN") or cfg.admin_token
    if token:
        overrides["admin_token"] = token
    enrollment = args.enrollment_token or os.environ.get("FEDGE_ENROLLMENT_TOKEN")
    if enrollment:
        overrides["enrollment_token"] = enrollment
    try:
        cfg = dataclasses.replace(cfg, **overrides)
    except ConfigError as e:
        raise CommandError(str(e)) from e
    _check_replica_tokens(cfg)
    configure_logging(args.log_level, args.log_format)
    from coordinator import event_loop

    try:  # once, before a supervisor starts K children that would each fail on it
        event_loop.check(cfg.event_loop, cfg.tls)
    except ConfigError as e:  # event_loop = "uvloop" where it is not installed
        raise CommandError(str(e)) from e
    if cfg.processes > (most := PROCESSES_PER_CPU * usable_cpus()):
        raise CommandError(
            f"--processes {cfg.processes}: at most {PROCESSES_PER_CPU} per CPU, {most} on this "
            "machine (each is a whole Python interpreter, and past one per core they share it)"
        )
    if cfg.processes > 1:
        from fedge.supervisor import Supervisor

        return Supervisor(cfg, print_token=not token, log=(args.log_level, args.log_format)).run()
    return event_loop.run(serve(cfg, print_token=not token), cfg.event_loop, cfg.tls)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (a container's cpuset, ``taskset``),
    which may be far fewer than the host's (``os.cpu_count()``); the host's where there is
    no affinity to read (not Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _check_replica_tokens(cfg: Any) -> None:
    """A replica drawing its own random tokens, as a coordinator alone does, would answer
    an operator's or a new device's call or refuse it by which replica the load balancer
    picked: every replica needs the same ones, given."""
    if not cfg.replica:
        return
    missing = [what for what, given in (
        ("admin token (--admin-token, $FEDGE_ADMIN_TOKEN or admin_token)", cfg.admin_token),
        ("enrollment token (--enrollment-token, $FEDGE_ENROLLMENT_TOKEN or enrollment_token; "
         "or --open-registration)", cfg.enrollment_token or cfg.open_registration),
    ) if not given]  # fmt: skip
    if missing:
        raise CommandError(f"--replica needs the {' and the '.join(missing)}, the same on every "
                           "replica: one drawn by each replica would not be")  # fmt: skip


def configure_logging(level: str, fmt: str) -> None:
    """Log records to stderr: text, or one JSON object a line (``fmt`` "json")."""
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    if fmt == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter())


def _store_overrides(args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    """``--db`` names a SQLite file or a PostgreSQL database; the blobs of a database on a
    server need a directory that only the operator can name."""
    from coordinator.store import is_database_url

    out: dict[str, Any] = {}
    if args.blobs is not None:
        out["blob_path"] = args.blobs
    if not is_database_url(args.db):
        # A file on the command line wins over the config file's database_url, as every
        # flag wins over the file (the way back from PostgreSQL keeps the replicas' file).
        return {**out, "db_path": args.db, "database_url": None}
    if args.blobs is None and cfg.blob_path is None:
        raise CommandError("--db postgresql://... needs --blobs DIR")
    return {**out, "database_url": args.db}


def tls_context(cfg: Any, *, print_pin: bool = True) -> Any:
    """The server's TLS context; prints the certificate's public-key pin (stderr)."""
    import ssl

    from coordinator.app import server_tls
    from edge_sdk.tls import pem_pin

    cert, key = cfg.tls_cert, cfg.tls_key
    if cert is None or key is None:
        return None
    try:
        # Each file on its own first: ssl's errors name neither ("[Errno 2] No such file or
        # directory", "[SSL] PEM lib"), and the operator must know which one is wrong.
        with open(cert, encoding="ascii", errors="replace") as f:
            try:
                pin = pem_pin(f.read())
            except ValueError as e:
                raise ValueError(f"{cert}: {e}") from e
        with open(key, "rb") as f:
            if b"PRIVATE KEY-----" not in f.read():
                raise ValueError(f"{key}: no PEM private key found")
        context = server_tls(cfg)
    except (OSError, ValueError, ssl.SSLError) as e:
        raise CommandError(f"cannot use --tls-cert/--tls-key: {e}") from e
    if print_pin:
        print(f"tls public-key pin (sha256 of SPKI): {pin}", file=sys.stderr, flush=True)
    return context


def announce_tokens(cfg: Any, admin_token: str, enrollment_token: str | None,
                    print_token: bool) -> None:  # fmt: skip
    """Print the tokens drawn at start (stderr), or warn that registration is open."""
    if print_token:
        print(f"admin token: {admin_token}", file=sys.stderr, flush=True)
    if cfg.enrollment_token is None and enrollment_token is not None:
        print(f"enrollment token: {enrollment_token}", file=sys.stderr, flush=True)
    elif enrollment_token is None:
        log.warning("registration is open: any device that reaches this port can join")


def listening(cfg: Any, port: int) -> str:
    """The line that says the service answers (whoever starts ``fedge serve`` waits for it);
    its URL is one a client can use: an IPv6 address goes in brackets there (RFC 3986)."""
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return f"fedge coordinator listening on {'https' if cfg.tls else 'http'}://{host}:{port}"


async def serve(
    cfg: Any,
    print_token: bool,
    *,
    ready: Callable[[int], None] | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM. Alone it announces the tokens, the pin and
    :func:`listening` itself; a supervised child (``ready`` given) shares the port with its
    siblings and tells ``ready`` the port instead."""
    from coordinator.app import BindError, build_app, start
    from coordinator.event_loop import loop_kind
    from coordinator.service import Coordinator

    alone = ready is None
    context = tls_context(cfg, print_pin=alone)
    try:
        coord = Coordinator(cfg)
    except Exception as e:  # a database that cannot be opened or migrated
        from coordinator.store import redacted

        where = cfg.store_location
        raise CommandError(redacted(where, f"cannot open {where}: {e}")) from e
    if alone:
        announce_tokens(cfg, coord.admin_token, coord.enrollment_token, print_token)
    try:
        runner, port = await start(
            build_app(coord), cfg.host, cfg.port, ssl_context=context, reuse_port=not alone
        )
    except BindError as e:  # one line, as the supervisor of K processes reports it
        raise CommandError(e.strerror or str(e)) from e
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    kind = loop_kind(loop)
    log.info("pid %d serving with the %s event loop", os.getpid(), kind, extra={"event_loop": kind})
    # Only now: whoever waits for this line may signal at once and expect a clean stop.
    if ready is None:
        print(listening(cfg, port), flush=True)
    else:
        ready(port)
    await stop.wait()
    await runner.cleanup()
    return 0
