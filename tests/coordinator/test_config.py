"""Configuration files: JSON or TOML, unknown or mistyped keys refused."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import pytest

from coordinator.config import ConfigError, CoordinatorConfig, PacingConfig, toml_loads


def test_json_and_toml(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text('{"port": 9000, "pacing": {"jitter": 0.2}}')
    cfg = CoordinatorConfig.from_file(tmp_path / "c.json")
    assert cfg.port == 9000 and cfg.pacing.jitter == 0.2 and cfg.pacing.headroom == 1.5
    (tmp_path / "c.toml").write_text("max_body_bytes = 1024\nseed = 3\n[pacing]\nmin_retry_s = 2\n")
    cfg = CoordinatorConfig.from_file(tmp_path / "c.toml")
    assert (cfg.max_body_bytes, cfg.seed, cfg.pacing.min_retry_s) == (1024, 3, 2)
    assert CoordinatorConfig(db_path="/x/fedge.db").blob_dir == Path("/x/fedge.db.blobs")


@pytest.mark.parametrize("location", ["sqlite:/x/fedge.db", "sqlite:///x/fedge.db"])
def test_blobs_beside_a_file_written_as_sqlite_url(location: str) -> None:
    """``fedge serve --db sqlite:/x/fedge.db`` (the form the error for a file named like a
    URL asks for) served the file /x/fedge.db but put its blobs in a directory literally
    named ``sqlite:/x/fedge.db.blobs``, under the working directory: not beside the file,
    and another one for every directory the service was started from."""
    assert CoordinatorConfig(db_path=location).blob_dir == Path("/x/fedge.db.blobs")
    assert CoordinatorConfig(db_path="sqlite:f.db").blob_dir == Path("f.db.blobs")


@pytest.mark.parametrize(
    "text",
    [
        '{"prot": 1}',
        '{"port": "80"}',
        '{"pacing": {"jiter": 1}}',
        "[1]",
        "{",
        '{"retain_updates": 1}',
        '{"tls_cert": "c.pem"}',  # without its key
        '{"open_registration": true, "enrollment_token": "t"}',  # which one?
        '{"max_json_bytes": 0}',
        '{"max_queued_operations": 0}',
        '{"open_registration": "yes"}',
        '{"pacing": {"replicas": 0}}',
        # The deadline ticker slept 0 s between ticks: an idle coordinator spun a core.
        '{"tick_interval_s": 0}',
        '{"tick_interval_s": -1}',
        '{"tick_interval_s": NaN}',
        # Infinity: the ticker never ticked again, so no round closed at its deadline, the
        # coordinator stayed "ready" for ever, and a storage error's Retry-After (ceil() of
        # max(1, tick_interval_s)) raised: a bare 500 instead of 503.
        '{"tick_interval_s": Infinity}',
        # Retry-After is ceil() of it: NaN or infinity raised there, and every request refused
        # as overloaded was answered a bare 500 instead of 503.
        '{"overload_retry_after_s": NaN}',
        '{"overload_retry_after_s": Infinity}',
        # Pace steering's numbers: each reaches every device's retry_after_s (NaN in a JSON
        # answer, a negative wait, a jitter that makes intervals negative).
        '{"pacing": {"min_retry_s": NaN}}',
        '{"pacing": {"max_retry_s": -1}}',
        '{"pacing": {"min_retry_s": 10, "max_retry_s": 5}}',
        '{"pacing": {"jitter": 1.5}}',
        '{"pacing": {"headroom": 0}}',
        '{"pacing": {"horizon_s": NaN}}',
        '{"pacing": {"no_task_retry_s": Infinity}}',
        '{"pacing": {"selection_return_spread_s": -2}}',
        '{"upload_body_timeout_s": 0}',
        # An empty enrollment token: the service drew a random one (as for none) but printed
        # it only when the key was unset, so no device could ever register; both tokens
        # are refused empty (unset draws one).
        '{"enrollment_token": ""}',
        '{"admin_token": ""}',
    ],
)
def test_refused(tmp_path: Path, text: str) -> None:
    (tmp_path / "c.json").write_text(text)
    with pytest.raises(ConfigError):
        CoordinatorConfig.from_file(tmp_path / "c.json")
    with pytest.raises(ConfigError):
        CoordinatorConfig.from_file(tmp_path / "missing.json")


def test_secure_defaults() -> None:
    cfg = CoordinatorConfig()
    assert not cfg.open_registration and cfg.enrollment_token is None  # the service draws one
    assert not cfg.tls and cfg.max_json_bytes < cfg.max_body_bytes
    assert CoordinatorConfig(tls_cert="c.pem", tls_key="k.pem").tls


def test_toml_without_tomllib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.10 has no ``tomllib``: the same config reads through ``tomli``, a file that
    does not parse is refused the same way, and without either the error says what to
    install."""
    (tmp_path / "c.toml").write_text("seed = 5\n[pacing]\nmin_retry_s = 4\n")
    (tmp_path / "bad.toml").write_text("seed = \n")
    # TOML 1.1 (a trailing comma in an inline table): 3.11's tomllib reads TOML 1.0 only, so
    # 3.10 must refuse it too, or a config would stop working on the way to 3.11.
    (tmp_path / "newer.toml").write_text("pacing = { min_retry_s = 4, }\n")
    for hidden in (None, "tomllib"):
        if hidden is not None:
            monkeypatch.setitem(sys.modules, hidden, None)  # import tomllib now raises
        cfg = CoordinatorConfig.from_file(tmp_path / "c.toml")
        assert (cfg.seed, cfg.pacing.min_retry_s) == (5, 4)
        for bad in ("bad.toml", "newer.toml"):
            with pytest.raises(ConfigError, match="does not parse"):
                CoordinatorConfig.from_file(tmp_path / bad)
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(ConfigError, match=r"^a TOML config needs .*pip install tomli"):
        CoordinatorConfig.from_file(tmp_path / "c.toml")
    # JSON never needed either.
    (tmp_path / "c.json").write_text('{"seed": 6}')
    assert CoordinatorConfig.from_file(tmp_path / "c.json").seed == 6


DEPLOYMENT = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"


def test_every_key_is_documented_with_its_default_and_flag() -> None:
    """docs/deployment.md named a config file (``--config coordinator.toml``) but listed
    its keys nowhere: ``admin_token``, ``tls_cert``, ``device_inactivity_s``,
    ``overload_retry_after_s``, most of ``[pacing]`` and others were found only in the code.
    Its table ("Configuration file") has a row per key, with the default and the flag of
    ``fedge serve`` as the code has them, and its example parses."""
    from fedge.cli import build_parser

    text = DEPLOYMENT.read_text()
    section = text.split("\n## Configuration file\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and (key := re.fullmatch(r"`([a-z_.]+)`", cells[0])):
            rows[key.group(1)] = cells[1], cells[2]
    fields = {f.name: f for f in dataclasses.fields(CoordinatorConfig) if f.name != "pacing"}
    fields |= {f"pacing.{f.name}": f for f in dataclasses.fields(PacingConfig)}
    assert sorted(rows) == sorted(fields)
    defaults, pacing = CoordinatorConfig(), PacingConfig()
    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction))  # fmt: skip
    serve = commands.choices["serve"]
    flags = {o for a in serve._actions for o in a.option_strings}
    for key, (default, flag) in rows.items():
        name = key.removeprefix("pacing.")
        want = getattr(pacing if key.startswith("pacing.") else defaults, name)
        if want is None:
            assert default == "unset", key
        else:
            assert toml_loads(f"v = {default.strip('`')}")["v"] == want, key
        assert flag == "" or flag.strip("`") in flags, key
    example = section.split("```\n", 2)[1]
    assert CoordinatorConfig.from_dict(toml_loads(example)).pacing.replicas == 2
