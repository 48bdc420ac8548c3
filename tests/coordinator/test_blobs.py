"""The blob directory: content addressing, atomic writes, no half-written blobs."""

from __future__ import annotations

import hashlib
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
