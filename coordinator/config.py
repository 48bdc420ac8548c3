"""Service configuration: one small value object, loadable from a JSON or TOML file.

::

    >>> cfg = CoordinatorConfig.from_file("coordinator.toml")   # keys as the fields below
    >>> cfg = dataclasses.replace(cfg, port=8081)                 # command-line overrides

Pace steering has its own nested table (``[pacing]``): see :mod:`coordinator.pacing`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "CoordinatorConfig", "PacingConfig"]


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


@dataclass(frozen=True)
class CoordinatorConfig:
    db_path: str = "fedge.db"
    host: str = "127.0.0.1"
    port: int = 8080
    admin_token: str | None = None
    # When set, registering a device needs it (header X-Fedge-Enrollment); None: open.
    enrollment_token: str | None = None
    # Device requests (JSON and update frames); admin bundle uploads have their own limit.
    max_body_bytes: int = 16 << 20
    max_bundle_bytes: int = 512 << 20
    tick_interval_s: float = 0.5  # how often deadlines are checked without any request
    retain_updates: bool = False  # keep update payload blobs after their round committed
    seed: int | None = None  # RNG seed for selection and jitter (tests); None: OS entropy
    pacing: PacingConfig = field(default_factory=PacingConfig)

    @property
    def blob_dir(self) -> Path:
        """Content-addressed blobs live beside the database file."""
        p = Path(self.db_path)
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
        try:
            if p.suffix == ".toml":
                import tomllib

                raw = tomllib.loads(text)
            else:
                raw = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"config {p} does not parse: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config {p} must hold a table/object")
        return cls.from_dict(raw)


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
