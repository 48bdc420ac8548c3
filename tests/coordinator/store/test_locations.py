"""Where a store is: a SQLite file or a ``postgresql://`` URL, and nothing taken for the other
(a libpq keyword string or a ``postgresql+psycopg://`` URL became an empty SQLite file of
that name, and ``fedge db migrate`` reported the copy done); passwords never in a message,
however the location carries them."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import pytest

from coordinator.store import (
    Device,
    SQLiteStore,
    StoreError,
    check_location,
    is_database_url,
    redacted,
)
from fedge.cli import main

SECRET = "S3cr/et@x"  # a "/" and an "@" in it, as generated passwords have


@pytest.mark.parametrize("location", [
    "fedge.db", "/var/lib/fedge/fedge.db", "sqlite:host=x.db", "sqlite:///tmp/a.db",
    "postgresql://fedge@db/fedge", "postgres://fedge:pw@db:5432/fedge",
])  # fmt: skip
def test_files_and_postgresql_urls_are_locations(location: str) -> None:
    check_location(location)


@pytest.mark.parametrize("location", [
    "host=db port=5432 user=fedge password=pw dbname=fedge", " dbname = fedge",
    "postgresql+psycopg://fedge:pw@db/fedge", "mysql://fedge@db/fedge",
    "POSTGRESQL://fedge@db/fedge",  # libpq reads the scheme in lower case only
])  # fmt: skip
def test_what_is_meant_for_a_server_but_not_a_postgresql_url_is_refused(location: str) -> None:
    with pytest.raises(StoreError, match="postgresql://USER:PASSWORD@HOST"):
        check_location(location)
    assert not is_database_url(location)


@pytest.mark.parametrize(("location", "password"), [
    (f"postgresql://fedge:{SECRET}@127.0.0.1:5432/fedge", SECRET),
    (f"postgresql://fedge@127.0.0.1/fedge?sslmode=require&password={SECRET}", SECRET),
    (f"postgresql://fedge:{quote(SECRET, safe='')}@127.0.0.1/fedge", SECRET),
    (f"host=db password={SECRET} dbname=fedge", SECRET),
    (f"host=db password='{SECRET} too' dbname=fedge", f"{SECRET} too"),
])  # fmt: skip
def test_a_password_is_redacted_however_it_is_written(location: str, password: str) -> None:
    shown = redacted(location)
    assert "S3cr" not in shown and "***" in shown
    # also where a driver's message quotes it, raw or percent-escaped
    message = f"cannot open {location}: bad token {password!r} ({quote(password, safe='')})"
    assert "S3cr" not in redacted(location, message)
    assert redacted("postgresql://fedge@db/fedge") == "postgresql://fedge@db/fedge"


def test_migrate_refuses_a_keyword_string_before_writing_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source = SQLiteStore(tmp_path / "fedge.db")
    source.add_device(Device("d-1", "00" * 16, "ab" * 32, "linux", "x86_64", ("ort-step",),
                             "default", 1.0))  # fmt: skip
    source.close()
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    target = f"host=127.0.0.1 port=5432 user=fedge password={SECRET} dbname=fedge"
    assert main(["db", "migrate", "--from", str(tmp_path / "fedge.db"), "--to", target]) == 2
    out, err = capsys.readouterr()
    assert "neither a SQLite file nor a postgresql:// URL" in err and "copied" not in out
    assert "S3cr" not in out + err
    assert os.listdir(work) == []  # no SQLite file named after the string
    assert main(["serve", "--db", target, "--port", "0"]) == 2  # the same for the service
    out, err = capsys.readouterr()
    assert "neither a SQLite file" in err and "S3cr" not in out + err
    assert os.listdir(work) == []
