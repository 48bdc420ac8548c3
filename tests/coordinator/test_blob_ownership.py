"""A blob directory belongs to one database (``store.json``, :meth:`BlobStore.claim`): a
coordinator alone on a database deletes, as it starts, every blob its records do not name,
so one started on the wrong database (a mistyped or fresh ``--db``, or a database migrated
away from and served again) must be refused before it deletes another deployment's models.
Real SQLite files, a real PostgreSQL server for the migration, the service's own start-up
sweep (``collect_garbage``)."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from pathlib import Path

import pytest

from coordinator.admin import tar_directory
from coordinator.blobs import OWNER_FILE, BlobStore, WrongBlobDirectory
from coordinator.config import CoordinatorConfig
from coordinator.service import Coordinator
from coordinator.store import SQLiteStore
from coordinator.store.base import StoreIdentity
from coordinator.store.postgres import PostgresStore


def _files(root: Path) -> dict[str, bytes]:
    """Every file but the owner file (a start rewrites it with the database's generation)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and p.name != OWNER_FILE}  # fmt: skip


def _started(db: str, blobs: Path) -> Coordinator:
    """A coordinator as ``fedge serve`` starts one alone: open, then the start-up sweep."""
    cfg = CoordinatorConfig(blob_path=str(blobs))
    url = db.startswith("postgresql://")
    cfg = dataclasses.replace(cfg, database_url=db) if url else dataclasses.replace(cfg, db_path=db)
    coord = Coordinator(cfg)
    coord.collect_garbage()
    return coord


def _open_files(path: Path) -> list[str]:
    """This process's open descriptors on ``path`` (a SQLite database, its WAL or journal)."""
    fds = Path("/proc/self/fd")
    named = []
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # the directory's own descriptor, closed since the listing
            continue
        if target.startswith(str(path)):
            named.append(target)
    return named


def _in_use(tmp_path: Path, tiny_bundle: Path) -> tuple[Path, dict[str, bytes]]:
    blobs = tmp_path / "blobs"
    a = _started(str(tmp_path / "a.db"), blobs)
    a.add_bundle(tar_directory(tiny_bundle))
    a.close()
    files = _files(blobs)
    assert files and (blobs / OWNER_FILE).is_file()
    return blobs, files


def test_a_new_database_on_a_directory_in_use_is_refused_and_deletes_nothing(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    """Before, the new database's start-up sweep deleted the bundle: no record names it."""
    blobs, files = _in_use(tmp_path, tiny_bundle)
    with pytest.raises(WrongBlobDirectory, match=r"belongs to database \w+, not to this one"):
        _started(str(tmp_path / "mistyped.db"), blobs)
    assert _files(blobs) == files
    assert _open_files(tmp_path / "mistyped.db") == []  # the refused start closed what it opened
    _started(str(tmp_path / "a.db"), blobs).close()  # its own database still serves it
    assert _files(blobs) == files


def test_the_directory_passes_to_the_migrated_database_and_not_back(
    tmp_path: Path, tiny_bundle: Path, postgres_url: str
) -> None:
    """deployment.md's move to PostgreSQL on the old directory: the copy takes it over; the
    SQLite file served on it again would delete what PostgreSQL's coordinator wrote."""
    blobs, _ = _in_use(tmp_path, tiny_bundle)
    source, target = SQLiteStore(tmp_path / "a.db"), PostgresStore(postgres_url)
    target.copy_from(source)
    assert target.identity().predecessor == source.identity().store_id
    assert target.identity().predecessor_generation == source.identity().generation == 1
    assert target.identity().store_id != source.identity().store_id
    source.close()
    target.close()
    b = _started(postgres_url, blobs)
    b.blobs.put(b"written after the move")  # what the old database's sweep would delete
    b.close()
    files = _files(blobs)
    with pytest.raises(WrongBlobDirectory, match="migrated from this one"):
        _started(str(tmp_path / "a.db"), blobs)
    assert _files(blobs) == files
    _started(postgres_url, blobs).close()


def test_a_database_with_tasks_on_a_new_directory_is_refused(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    """The way back from PostgreSQL without ``--blobs``: the file's blobs were looked for in
    an empty ``NEW.db.blobs``, and the coordinator took uploads for rounds it could never
    commit (its versions not found)."""
    a = _started(str(tmp_path / "a.db"), tmp_path / "blobs")
    bundle_id = a.add_bundle(tar_directory(tiny_bundle))["bundle_id"]
    task = a.create_task(json.dumps({"bundle_id": bundle_id, "plan": {"goal": 2}}).encode())
    a.close()
    with pytest.raises(WrongBlobDirectory,
                       match=f"does not hold task {task['task_id']}'s version 0"):  # fmt: skip
        _started(str(tmp_path / "a.db"), tmp_path / "empty")
    assert not (tmp_path / "empty" / OWNER_FILE).exists()  # nor taken by it
    _started(str(tmp_path / "a.db"), tmp_path / "blobs").close()


def test_a_copy_whose_source_served_since_does_not_take_the_directory(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    """The file copied, then served again on the shared directory before the copy first
    started: the copy's records lack what the file wrote since, and before, its start-up
    sweep deleted it (then the file was refused there). Now the copy is refused."""
    blobs, _ = _in_use(tmp_path, tiny_bundle)
    source, target = SQLiteStore(tmp_path / "a.db"), SQLiteStore(tmp_path / "b.db")
    target.copy_from(source)
    source.close()
    target.close()
    a = _started(str(tmp_path / "a.db"), blobs)
    a.blobs.put(b"written by the file after the copy")
    a.close()
    files = _files(blobs)
    with pytest.raises(WrongBlobDirectory, match="has served from it since the copy"):
        _started(str(tmp_path / "b.db"), blobs)
    assert _files(blobs) == files
    _started(str(tmp_path / "a.db"), blobs).close()  # still the file's


def _identity(store_id: str, generation: int = 1, predecessor: str | None = None,
              at_copy: int | None = None) -> StoreIdentity:  # fmt: skip
    return StoreIdentity(store_id, generation, predecessor, at_copy)


def test_claim_takes_a_free_directory_and_hands_it_over_once(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "b")
    blobs.claim(_identity("s-1"))
    blobs.claim(_identity("s-1", 2))  # its next start
    assert json.loads((tmp_path / "b" / OWNER_FILE).read_text()) == {
        "store_id": "s-1", "generation": 2, "predecessor": None}  # fmt: skip
    with pytest.raises(WrongBlobDirectory, match="belongs to database s-1, not to this one "
                       r"\(s-2, migrated from s-9\)"):  # fmt: skip
        blobs.claim(_identity("s-2", 1, "s-9", 2))
    with pytest.raises(WrongBlobDirectory, match="served from it since the copy"):
        blobs.claim(_identity("s-2", 1, "s-1", 1))  # copied at s-1's first start
    blobs.claim(_identity("s-2", 1, "s-1", 2))
    with pytest.raises(WrongBlobDirectory, match=r"s-2, migrated from this one \(s-1\)"):
        blobs.claim(_identity("s-1", 3))
    (tmp_path / "b" / OWNER_FILE).write_text("{not json")
    with pytest.raises(WrongBlobDirectory, match="not the file fedge wrote"):
        blobs.claim(_identity("s-2", 2, "s-1", 2))
    assert list((tmp_path / "b" / "tmp").iterdir()) == []


def test_a_refused_database_leaves_the_directory_s_writes_under_way(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    """The directory's temporary files are its coordinator's writes under way (an upload
    staged for the next group commit, a bundle being unpacked). Before, the refused
    coordinator's blob store dropped them as leftovers of a crash before the directory was
    checked, and the serving coordinator's install then failed: nothing of another
    deployment's may be deleted before the claim."""
    blobs, _ = _in_use(tmp_path, tiny_bundle)
    serving = BlobStore(blobs)
    staged = serving.stage(b"an upload of the serving coordinator")
    with pytest.raises(WrongBlobDirectory, match="not to this one"):
        _started(str(tmp_path / "mistyped.db"), blobs)
    assert staged.tmp.exists()
    serving.install([staged])
    assert serving.read(staged.sha) == b"an upload of the serving coordinator"
    (blobs / "tmp" / "leftover").write_bytes(b"half a blob")  # a crash's, on its own database
    _started(str(tmp_path / "a.db"), blobs).close()
    assert list((blobs / "tmp").iterdir()) == []


@pytest.mark.parametrize("step", ["link", "replace"])
def test_a_claim_that_fails_to_write_leaves_the_directory_as_it_was(
    tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """The claim's one durable step, the owner file put in place (``link`` for a directory
    no database owns, ``replace`` for a hand-over), failing on a full disk: the start fails,
    the directory still names whom it named, nothing is left in ``tmp/``, and the next start
    claims it."""
    blobs = tmp_path / "blobs"
    db = str(tmp_path / "a.db")
    if step == "replace":  # a hand-over: the copy's first start on its source's directory
        _in_use(tmp_path, tiny_bundle)
        source, target = SQLiteStore(tmp_path / "a.db"), SQLiteStore(tmp_path / "b.db")
        target.copy_from(source)
        source.close()
        target.close()
        db = str(tmp_path / "b.db")
    before = (blobs / OWNER_FILE).read_bytes() if step == "replace" else None

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, step, full)
        with pytest.raises(OSError, match="No space left"):
            _started(db, blobs)
    owner = blobs / OWNER_FILE
    assert (owner.read_bytes() if owner.exists() else None) == before
    assert list((blobs / "tmp").iterdir()) == []
    _started(db, blobs).close()
    assert json.loads(owner.read_bytes())["store_id"] == SQLiteStore(db).identity().store_id
