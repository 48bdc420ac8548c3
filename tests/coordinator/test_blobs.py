"""The blob directory: content addressing, atomic writes, no half-written blobs."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from coordinator.blobs import BlobStore


def test_put_read_is_content_addressed(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "b")
    sha = blobs.put(b"hello")
    assert sha == hashlib.sha256(b"hello").hexdigest()
    assert blobs.read(sha) == b"hello" and blobs.size(sha) == 5
    assert blobs.put(b"hello") == sha  # stored once
    assert blobs.path(sha).relative_to(tmp_path / "b").parts == (sha[:2], sha[2:])
    blobs.delete(sha)
    assert not blobs.exists(sha)


def test_put_file_checks_the_expected_hash_and_leaves_nothing(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "b")
    src = tmp_path / "f"
    src.write_bytes(b"x" * 3_000_000)
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    with pytest.raises(ValueError):
        blobs.put_file(src, sha="0" * 64)
    assert not blobs.exists(good) and list((tmp_path / "b" / "tmp").iterdir()) == []
    assert blobs.put_file(src, sha=good) == good and blobs.read(good) == src.read_bytes()


def test_interrupted_writes_are_swept_and_paths_checked(tmp_path: Path) -> None:
    BlobStore(tmp_path / "b")
    (tmp_path / "b" / "tmp" / "leftover").write_bytes(b"half a blob")
    # a bundle upload killed while unpacking leaves a directory tree
    unpacking = tmp_path / "b" / "tmp" / "tmp-bundle" / "digits"
    unpacking.mkdir(parents=True)
    (unpacking / "manifest.json").write_text("{}")
    blobs = BlobStore(tmp_path / "b")
    assert list((tmp_path / "b" / "tmp").iterdir()) == []
    with pytest.raises(ValueError):
        blobs.path("../../etc/passwd")


def test_collect_deletes_only_unkept_blobs(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "b")
    keep, drop = blobs.put(b"keep me"), blobs.put(b"orphan")
    other = blobs.put(b"orphan two")
    foreign = tmp_path / "b" / "README"  # not a blob: not ours to delete
    foreign.write_text("hi")
    (tmp_path / "b" / "zz").mkdir()
    (tmp_path / "b" / "zz" / "x").write_text("not a blob either")
    assert set(blobs.shas()) == {keep, drop, other}
    got = blobs.collect({keep, "f" * 64})
    assert (got.blobs, got.bytes) == (2, len(b"orphan") + len(b"orphan two"))
    assert list(blobs.shas()) == [keep] and blobs.read(keep) == b"keep me"
    assert foreign.exists() and (tmp_path / "b" / "zz" / "x").exists()
    assert (tmp_path / "b" / "tmp").is_dir()
    assert blobs.collect({keep}).blobs == 0


def test_derived_file_is_made_once_and_goes_with_its_blob(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "b")
    sha = blobs.put(b"parameters")
    calls: list[bytes] = []

    def make(raw: bytes) -> bytes:
        calls.append(raw)
        return raw.upper()

    path = blobs.derived(sha, "frame", make)
    assert path.read_bytes() == b"PARAMETERS" and calls == [b"parameters"]
    assert blobs.derived(sha, "frame", make) == path and len(calls) == 1  # cached on disk
    assert BlobStore(tmp_path / "b").derived(sha, "frame", make) == path and len(calls) == 1
    assert list(blobs.shas()) == [sha]  # a derived file is not a blob
    assert list((tmp_path / "b" / "tmp").iterdir()) == []
    blobs.delete(sha)
    assert not path.exists() and not blobs.exists(sha)
    with pytest.raises(FileNotFoundError):
        blobs.derived(sha, "frame", make)  # nothing to derive from
    with pytest.raises(ValueError):
        blobs.derived(sha, "../x", make)


def test_put_with_derived_syncs_blob_and_derived_file_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import coordinator.blobs as module

    blobs = BlobStore(tmp_path / "b")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        # fsync_dir calls os.fsync too: a directory is recorded by its path
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append("file")
        real_fsync(fd)

    real_dir = module.fsync_dir
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(module, "fsync_dir", lambda p: (synced.append(str(p)), real_dir(p)))
    sha = blobs.put_with_derived(b"parameters", {"frame": b"PARAMETERS"})
    assert sha == hashlib.sha256(b"parameters").hexdigest() and blobs.read(sha) == b"parameters"
    # two files, then their fan-out directory once (made, with the root, when the store opened)
    assert synced == ["file", "file", str(blobs.path(sha).parent)]
    made = blobs.derived(sha, "frame", lambda raw: pytest.fail("made again"))  # type: ignore[arg-type,return-value]
    assert made.read_bytes() == b"PARAMETERS"
    assert list(blobs.shas()) == [sha] and list((tmp_path / "b" / "tmp").iterdir()) == []
    synced.clear()
    assert blobs.put_with_derived(b"parameters", {"frame": b"PARAMETERS"}) == sha
    # both there: nothing written, but the name synced (it may be another process's, unsynced)
    assert synced == [str(blobs.path(sha).parent)]


def test_put_with_derived_failing_to_sync_its_directory_is_synced_by_the_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import coordinator.blobs as module

    blobs = BlobStore(tmp_path / "b")
    real_dir = module.fsync_dir
    synced: list[Path] = []

    def failing(path: Path) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(module, "fsync_dir", failing)
    with pytest.raises(OSError, match="disk gone"):
        blobs.put_with_derived(b"parameters", {"frame": b"PARAMETERS"})
    sha = hashlib.sha256(b"parameters").hexdigest()
    assert list((tmp_path / "b" / "tmp").iterdir()) == []
    monkeypatch.setattr(module, "fsync_dir", lambda p: (synced.append(p), real_dir(p)))
    assert blobs.put_with_derived(b"parameters", {"frame": b"PARAMETERS"}) == sha  # a retry
    assert synced == [blobs.path(sha).parent]  # the name the failed call left, synced now
    assert blobs.derived_path(sha, "frame").read_bytes() == b"PARAMETERS"


def test_derived_file_written_whole_or_not_at_all(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "b")
    sha = blobs.put(b"parameters")

    def broken(raw: bytes) -> bytes:
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError):
        blobs.derived(sha, "frame", broken)
    assert not blobs.derived_path(sha, "frame").exists()
    assert blobs.derived(sha, "frame", lambda raw: raw * 2).read_bytes() == b"parameters" * 2


def test_collect_removes_derived_files_of_unkept_blobs(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "b")
    keep, drop = blobs.put(b"keep me"), blobs.put(b"orphan")
    kept_frame = blobs.derived(keep, "frame", lambda raw: raw + b"!")
    dropped_frame = blobs.derived(drop, "frame", lambda raw: raw + b"!")
    # a frame whose blob a crash already removed
    stray = blobs.derived(blobs.put(b"gone"), "frame", lambda raw: raw)
    blobs.path(hashlib.sha256(b"gone").hexdigest()).unlink()
    got = blobs.collect({keep})
    assert got.blobs == 1 and got.bytes == len(b"orphan") + len(b"orphan!") + len(b"gone")
    assert kept_frame.exists() and not dropped_frame.exists() and not stray.exists()


def test_a_failed_directory_fsync_is_made_good_by_the_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """put() skips a blob that exists: one whose directory sync failed may be there, so a
    retry (or any later put of the same bytes) syncs the name before it returns, or the
    retry would acknowledge bytes a power cut can still lose."""
    import coordinator.blobs as module

    blobs = BlobStore(tmp_path / "b")
    assert {f"{i:02x}" for i in range(256)} <= {p.name for p in blobs.root.iterdir()}
    real = module.fsync_dir
    synced: list[Path] = []
    failed: list[Path] = []

    def fsync_dir(path: Path) -> None:
        if not failed:
            failed.append(path)
            raise OSError(5, "Input/output error")
        real(path)
        synced.append(path)

    monkeypatch.setattr(module, "fsync_dir", fsync_dir)
    sha = hashlib.sha256(b"payload").hexdigest()
    with pytest.raises(OSError):
        blobs.put(b"payload")
    assert failed == [blobs.path(sha).parent]
    assert blobs.put(b"payload") == sha and blobs.read(sha) == b"payload"
    assert synced == [blobs.path(sha).parent]


def test_unlink_later_hides_the_blob_at_once_and_a_rewrite_waits_for_the_unlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = BlobStore(tmp_path / "b", unlink_later=True)
    sha = blobs.put(b"payload")
    other = blobs.put(b"other")
    release, unlinking = threading.Event(), threading.Event()
    real_unlink = blobs._unlink

    def slow_unlink(s: str) -> None:
        unlinking.set()
        assert release.wait(10)
        real_unlink(s)

    monkeypatch.setattr(blobs, "_unlink", slow_unlink)
    blobs.delete(sha)
    assert unlinking.wait(10)
    # gone for every reader at once, though the file is still there
    assert not blobs.exists(sha) and list(blobs.shas()) == [other]
    assert blobs.path(sha).is_file()
    # the same bytes written again: not skipped as present, and not lost to the unlink
    rewrite = threading.Thread(target=blobs.put, args=(b"payload",))
    rewrite.start()
    rewrite.join(0.2)
    assert rewrite.is_alive(), "the rewrite did not wait for the pending unlink"
    release.set()
    rewrite.join(10)
    assert blobs.exists(sha) and blobs.read(sha) == b"payload"
    blobs.delete(other)
    blobs.close()  # waits for the unlink
    assert not blobs.path(other).exists() and sorted(blobs.shas()) == [sha]
    blobs.delete(sha)  # closed: unlinked at once
    assert not blobs.path(sha).exists()


def test_a_shared_directory_keeps_the_others_temporary_files(
    tmp_path: Path,
) -> None:
    """Replicas write one blob directory: a process (re)starting must not take away the
    temporary files of uploads the others are staging; every fan-out directory is there
    (made when a store opens: none is made while others write)."""
    BlobStore(tmp_path / "b")
    tmp = tmp_path / "b" / "tmp"
    (tmp / "in-use").write_bytes(b"being staged by another replica")
    (tmp / "crashed").write_bytes(b"left by a crash an hour ago")
    old = time.time() - 7200
    os.utime(tmp / "crashed", (old, old))
    fanouts = {f"{i:02x}" for i in range(256)}

    blobs = BlobStore(tmp_path / "b", shared_after_s=3600)

    assert sorted(p.name for p in tmp.iterdir()) == ["in-use"]
    assert fanouts <= {p.name for p in (tmp_path / "b").iterdir() if p.is_dir()}
    sha = blobs.put(b"payload")
    assert blobs.read(sha) == b"payload"
    BlobStore(tmp_path / "b")  # alone again: every leftover goes
    assert list(tmp.iterdir()) == []


def test_writing_bytes_already_there_refreshes_their_age(tmp_path: Path) -> None:
    """The replicas' orphan sweep goes by age: bytes written again (an identical version, an
    identical payload) must not look like an old orphan between the write and the row."""
    blobs = BlobStore(tmp_path / "b")
    old = time.time() - 7200
    a, b = blobs.put(b"a version"), blobs.put(b"a payload")
    for sha in (a, b):
        os.utime(blobs.path(sha), (old, old))
    assert blobs.put(b"a version") == a
    blobs.install([blobs.stage(b"a payload")])
    for sha in (a, b):
        assert blobs.path(sha).stat().st_mtime > time.time() - 60


def test_names_are_synced_once_per_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch among replicas syncs its payloads' names together: each directory holding one
    once, however many of them it holds."""
    import coordinator.blobs as module

    blobs = BlobStore(tmp_path / "b")
    shas = [blobs.put(f"payload {i}".encode()) for i in range(40)]  # some share a fan-out
    synced: list[Path] = []
    real = module.fsync_dir
    monkeypatch.setattr(module, "fsync_dir", lambda p: (synced.append(p), real(p)))
    blobs.sync_names(shas + shas)
    assert sorted(synced) == sorted({blobs.path(sha).parent for sha in shas})
    assert len(synced) < len(shas)


def test_background_deletes_use_a_store_of_their_own_and_outlive_a_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from coordinator.blobs import BackgroundDeletes
    from coordinator.store import open_store

    blobs = BlobStore(tmp_path / "blobs")
    shas = [blobs.put(b"one"), blobs.put(b"two")]
    opened: list[threading.Thread] = []

    def opener() -> object:
        opened.append(threading.current_thread())
        if len(opened) == 1:
            raise OSError("database unreachable")
        return open_store(tmp_path / "fedge.db")

    deletes = BackgroundDeletes(blobs, opener)  # type: ignore[arg-type]
    deletes.submit(shas)
    deletes.wait()
    assert all(blobs.exists(s) for s in shas)  # nothing deleted, nothing raised
    assert "2 payloads not deleted" in caplog.text and "database unreachable" in caplog.text
    deletes.submit(shas)  # no row names them: both go
    deletes.wait()
    assert not any(blobs.exists(s) or blobs.path(s).exists() for s in shas)
    assert len(opened) == 2 and threading.current_thread() not in opened
    deletes.close()
