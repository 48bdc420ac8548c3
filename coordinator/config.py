"""Service configuration: one small value object, loadable from a JSON or TOML file.

::

    >>> cfg = CoordinatorConfig.from_file("coordinator.toml")   # keys as the fields below
    >>> cfg = dataclasses.replace(cfg, port=8081)                 # command-line overrides

Pace steering has its own nested table (``[pacing]``): see :mod:`coordinator.pacing`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.store import is_database_url, sqlite_path

__all__ = ["EVENT_LOOPS", "ConfigError", "CoordinatorConfig", "PacingConfig"]

# coordinator/event_loop.py: "auto" is uvloop for HTTPS where it is installed, else asyncio's.
EVENT_LOOPS = ("asyncio", "auto", "uvloop")


class ConfigError(ValueError):
    """A configuration file that cannot be read or names unknown or mistyped settings."""


@dataclass(frozen=True)
class PacingConfig:
    min_retry_s: float = 5.0  # never tell a device to come back sooner
    max_retry_s: float = 3600.0  # nor later
    jitter: float = 0.5  # retry = interval * U(1 - jitter, 1 + jitter)
    headroom: float = 1.5  # ask for this many times the check-ins a round strictly needs
    horizon_s: float = 120.0  # a device overdue by more than this leaves the population
    selection_return_spread_s: float = 2.0  # candidates return within this after the window
    no_task_retry_s: float = 60.0  # mean retry when there is nothing to do
    # Coordinators whose devices come back to any of them (replicas behind one address):
    # each sees 1/K of the check-ins. `fedge serve --processes K` multiplies it by K.
    replicas: int = 1

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError("pacing.replicas must be at least 1")
        # Each reaches every device's retry_after_s: finite, and (written "not ... >=" so
        # that NaN fails too) in range.
        numbers = ("min_retry_s", "max_retry_s", "horizon_s", "selection_return_spread_s",
                   "no_task_retry_s", "headroom")  # fmt: skip
        for name in numbers:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"pacing.{name} must be a finite number >= 0")
        if not self.max_retry_s >= self.min_retry_s:
            raise ConfigError("pacing.max_retry_s must be at least pacing.min_retry_s")
        if not 0 <= self.jitter < 1:
            raise ConfigError("pacing.jitter must be in [0, 1)")
        if not (self.headroom > 0 and self.horizon_s > 0):
            raise ConfigError("pacing.headroom and pacing.horizon_s must be > 0")


@dataclass(frozen=True)
class CoordinatorConfig:
    db_path: str = "fedge.db"
    # PostgreSQL (postgresql://...): the records live there instead of the SQLite file
    # db_path; several coordinators may share it. Blobs stay in blob_dir.
    database_url: str | None = None
    blob_path: str | None = None  # blob directory; None: beside db_path (fedge.db.blobs)
    # One of several coordinators sharing the database (a PostgreSQL database_url, or the
    # SQLite db_path on one machine) and blob_dir (coordinator/replicas.py).
    replica: bool = False
    # Serving processes on this node, sharing host:port (SO_REUSEPORT) and the database as
    # replicas (fedge/supervisor.py); 1: this process serves alone.
    processes: int = 1
    # Among replicas a payload is installed moments before the row that names it commits, on
    # another process: only blobs no row names and older than this are collected (and only
    # temporary files older than this are dropped at start: the others' are in use).
    replica_orphan_age_s: float = 3600.0
    # A replica writes its partial sums (a model's float64 sum each) every this many
    # uploads, not with every batch; a commit folds the updates stored since from their
    # payloads: at most this many per replica to read then (coordinator/replicas.py).
    replica_partial_every: int = 64
    # A directory shared by the serving processes of one node, in which each publishes its
    # event counters so that a scrape of any of them reports their sum
    # (coordinator/metrics_sharing.py). `fedge serve --processes K` makes one per run.
    # None: /metrics reports this process's own events.
    metrics_dir: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    admin_token: str | None = None
    # Registering a device needs this token (header X-Fedge-Enrollment). None: the service
    # draws one at start (like the admin token) unless ``open_registration`` is set, so that
    # a coordinator never accepts strangers by accident.
    enrollment_token: str | None = None
    open_registration: bool = False  # anyone may register: for closed test networks only
    # Update frames; admin bundle uploads and JSON bodies have their own limits. JSON bodies
    # are small control messages: a tight limit keeps a parser busy for microseconds only.
    max_body_bytes: int = 16 << 20
    max_json_bytes: int = 64 << 10
    max_bundle_bytes: int = 512 << 20
    # An update frame's body must arrive within this once its upload is admitted: it holds
    # one of the max_queued_operations slots meanwhile, and a phone gone silent mid-upload
    # would hold it until TCP gives up, hours later.
    upload_body_timeout_s: float = 300.0
    # Operations waiting for the worker thread; past this a request is answered 503 at once
    # (with Retry-After) instead of queueing behind minutes of work.
    max_queued_operations: int = 64
    overload_retry_after_s: float = 2.0
    # Group commit (coordinator/group_commit.py): concurrent uploads are made durable together,
    # at most this many per batch (one round of fsyncs, one transaction). Off: each upload
    # is made durable on its own, on the worker thread.
    group_commit: bool = True
    group_commit_max_batch: int = 32
    # The serving processes' event loop, one of EVENT_LOOPS (coordinator/event_loop.py):
    # by default uvloop over TLS (its TLS costs far less CPU), asyncio's over plain HTTP
    # (which streams downloads with sendfile, which uvloop lacks).
    event_loop: str = "auto"
    # PEM files: with both set the service speaks HTTPS only.
    tls_cert: str | None = None
    tls_key: str | None = None
    tick_interval_s: float = 0.5  # how often deadlines are checked without any request
    retain_updates: bool = False  # keep update payload blobs after their round committed
    # Retention (coordinator/retention.py): each task keeps its last ``retain_versions``
    # versions, with their rounds' rows, plus whatever open work still needs; older ones are
    # deleted every ``retention_interval_s``. 0 keeps everything.
    retain_versions: int = 10
    retention_interval_s: float = 60.0
    # ... but a closed round's rows (its receipts for replayed uploads) stay this long at least.
    retain_receipts_s: float = 86400.0
    # Delete devices not seen at a check-in for this long. None: never (a device row is the
    # device's credential; see coordinator/retention.py).
    device_inactivity_s: float | None = None
    seed: int | None = None  # RNG seed for selection and jitter (tests); None: OS entropy
    pacing: PacingConfig = field(default_factory=PacingConfig)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together: give both or neither")
        # An empty token is no token: the service would draw one, and (the key being set)
        # not print it, so that no device could register.
        for name in ("admin_token", "enrollment_token"):
            if getattr(self, name) == "":
                raise ConfigError(f"{name} must not be empty (leave it unset to draw one)")
        if self.open_registration and self.enrollment_token is not None:
            raise ConfigError("open_registration contradicts an enrollment_token: choose one")
        for name in ("max_body_bytes", "max_json_bytes", "max_bundle_bytes",
                     "max_queued_operations", "group_commit_max_batch", "replica_partial_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        # "not >= 0", each on its own: NaN is neither < 0 nor >= 0 (min() may skip it), and a
        # NaN interval or receipt window would silently run every tick or keep every round.
        retention = (self.retain_versions, self.retention_interval_s, self.retain_receipts_s)
        if any(not value >= 0 for value in retention):
            raise ConfigError(
                "retain_versions, retention_interval_s and retain_receipts_s must be >= 0"
            )
        if not (math.isfinite(self.upload_body_timeout_s) and self.upload_body_timeout_s > 0):
            raise ConfigError("upload_body_timeout_s must be a number of seconds > 0")
        if not self.replica_orphan_age_s > 0:
            raise ConfigError("replica_orphan_age_s must be > 0")
        # The deadline ticker sleeps this long between ticks: 0 or less (or NaN) has each
        # serving process tick without pause, a core busy on an idle coordinator; infinity
        # never ticks (no round closes at its deadline) and has no Retry-After (its ceil()).
        if not (math.isfinite(self.tick_interval_s) and self.tick_interval_s > 0):
            raise ConfigError("tick_interval_s must be a finite number of seconds > 0")
        # An overloaded request's Retry-After is its ceil(): NaN or infinity has no integer.
        if not 0 <= self.overload_retry_after_s < math.inf:
            raise ConfigError("overload_retry_after_s must be a finite number >= 0")
        if self.device_inactivity_s is not None and not self.device_inactivity_s > 0:
            raise ConfigError("device_inactivity_s must be > 0 (or unset: keep every device)")
        if self.database_url is not None and not is_database_url(self.database_url):
            raise ConfigError("database_url must be a postgresql:// URL")
        if self.processes < 1:
            raise ConfigError("processes must be at least 1")
        # Checked here, not left to bind(): that raises OverflowError (no OSError) after the
        # database was made and the tokens printed.
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0-65535 (0: any free port), not {self.port}")
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(
                f"event_loop must be one of {', '.join(EVENT_LOOPS)}, not {self.event_loop!r}"
            )
        if self.shared and self.database_url is None and self.db_path == ":memory:":
            raise ConfigError("replica and processes > 1 need a database file, not :memory:")
        if self.processes > 1 and self.metrics_dir is not None:
            raise ConfigError("processes > 1 makes its own metrics_dir: leave it unset")
        if self.shared and self.database_url is not None and self.blob_path is None:
            raise ConfigError(
                "replica and processes > 1 with a database_url need a shared blob_path"
            )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def shared(self) -> bool:
        """Whether other processes serve from the same database (replica mode)."""
        return self.replica or self.processes > 1

    @property
    def store_location(self) -> str:
        """What :func:`~coordinator.store.open_store` opens: the URL, else the SQLite file."""
        return self.database_url or self.db_path

    @property
    def blob_dir(self) -> Path:
        """Content-addressed blobs: ``blob_path``, else beside the database file."""
        if self.blob_path is not None:
            return Path(self.blob_path)
        p = Path(sqlite_path(self.db_path))  # the file, also when written sqlite:PATH
        return p.with_name(p.name + ".blobs")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CoordinatorConfig:
        raw = dict(raw)
        pacing = raw.pop("pacing", {})
        _check_keys(PacingConfig, pacing, "pacing")
        _check_keys(cls, raw, "")
        try:
            return cls(**raw, pacing=PacingConfig(**pacing))
        except TypeError as e:
            raise ConfigError(str(e)) from e

    @classmethod
    def from_file(cls, path: str | Path) -> CoordinatorConfig:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {p}: {e}") from e
        loads = toml_loads if p.suffix == ".toml" else json.loads
        try:
            raw = loads(text)
        except ConfigError:  # no TOML parser at all: not the file's fault
            raise
        except ValueError as e:
            raise ConfigError(f"config {p} does not parse: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config {p} must hold a table/object")
        return cls.from_dict(raw)


def toml_loads(text: str) -> dict[str, Any]:
    """Parse TOML 1.0 with Python 3.11's ``tomllib`` or, on 3.10, ``tomli`` below 2.4 (the
    package tomllib was taken from, before it read TOML 1.1; its errors are ValueErrors too;
    the coordinator extra installs it there)."""
    try:
        import tomllib as parser
    except ModuleNotFoundError:
        try:
            import tomli as parser  # type: ignore[no-redef]
        except ModuleNotFoundError as e:
            raise ConfigError(
                "a TOML config needs Python 3.11 or the tomli package (pip install tomli)"
            ) from e
    return parser.loads(text)


def _check_keys(cls: type, raw: Any, where: str) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section {where or 'top level'} must be a table/object")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - known
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config keys: {', '.join(prefix + k for k in sorted(unknown))}")
    for f in dataclasses.fields(cls):
        if f.name in raw and f.name != "pacing":
            value = raw[f.name]
            expected = {"float": (int, float), "int": (int,), "str": (str,), "bool": (bool,)}
            base = str(f.type).split(" |")[0]
            types = expected.get(base)
            ok = types is None or (
                isinstance(value, types) and not (base != "bool" and isinstance(value, bool))
            )
            if value is None and "None" in str(f.type):
                ok = True
            if not ok:
                raise ConfigError(
                    f"config {where}{'.' if where else ''}{f.name}: bad value {value!r}"
                )
