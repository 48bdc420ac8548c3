"""The bundle cache against a real HTTP server on loopback that serves a bundle like the
coordinator does (manifest, files, ``Range``), and misbehaves where a test says so."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_sdk.bundle import bundle_id_of
from edge_sdk.cache import BundleCache
from edge_sdk.errors import CacheError
from edge_sdk.transport import RetryPolicy, Transport
from tests.edge_sdk.loopback import Loopback, Reply, ScriptedServer, Seen, json_error, ranged

FILES = {
    "step.onnx": random.Random(1).randbytes(300_000),
    "params.f32": random.Random(2).randbytes(9_640),
    "ort/eval_model.onnx": random.Random(3).randbytes(5_000),
}


def _manifest(files: dict[str, bytes]) -> dict:
    raw = {
        "format": "fedge-bundle",
        "format_version": 1,
        "task": "classification",
        "loss": "cross_entropy",
        "parameters": [{"name": "w", "shape": [2410], "offset": 0}],
        "num_parameters": 2410,
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            for name, data in files.items()
        },
    }
    raw["bundle_id"] = bundle_id_of(raw)
    return raw


MANIFEST = _manifest(FILES)
BUNDLE_ID = MANIFEST["bundle_id"]


class BundleServer(ScriptedServer):
    """Serves MANIFEST and FILES; ``tamper(name, seen)`` may replace a file's bytes."""

    def __init__(self, tamper: Callable[[str, Seen], bytes | None] | None = None) -> None:
        self.tamper = tamper
        super().__init__()

    def handle(self, seen: Seen) -> Reply:
        prefix = f"/v1/bundles/{BUNDLE_ID}"
        if seen.path == prefix:
            return Reply(200, json.dumps(MANIFEST).encode())
        if seen.path.startswith(prefix + "/files/"):
            name = seen.path[len(prefix + "/files/") :]
            if name not in FILES:
                return json_error(404, "not_found")
            data = (self.tamper and self.tamper(name, seen)) or FILES[name]
            return ranged(data, seen)
        return json_error(404, "not_found")

    def file_gets(self, name: str) -> list[Seen]:
        return self.calls("/files/" + name)


def _transport(url: str) -> Transport:
    return Transport(url, retry=RetryPolicy(max_attempts=3), sleep=lambda s: None)


def _assert_bundle(directory: Path) -> None:
    for name, data in FILES.items():
        assert (directory / name).read_bytes() == data
    assert json.loads((directory / "manifest.json").read_text()) == MANIFEST


def test_fetch_downloads_and_verifies_every_file(tmp_path: Path) -> None:
    with BundleServer() as server:
        t = _transport(server.loopback.url)
        directory, manifest = BundleCache(tmp_path).fetch(t, BUNDLE_ID)
    assert manifest.bundle_id == BUNDLE_ID and directory == tmp_path / BUNDLE_ID
    _assert_bundle(directory)
    assert t.bytes_received >= sum(len(d) for d in FILES.values())


def test_second_fetch_uses_the_cache(tmp_path: Path) -> None:
    with BundleServer() as server:
        t = _transport(server.loopback.url)
        BundleCache(tmp_path).fetch(t, BUNDLE_ID)
        before = len(server.loopback.seen)
        BundleCache(tmp_path).fetch(t, BUNDLE_ID)  # a new process: re-hashes, downloads nothing
    assert len(server.loopback.seen) == before


def test_file_corrupted_on_disk_is_detected_and_fetched_again(tmp_path: Path) -> None:
    with BundleServer() as server:
        t = _transport(server.loopback.url)
        cache = BundleCache(tmp_path)
        directory, _ = cache.fetch(t, BUNDLE_ID)
        victim = directory / "step.onnx"
        damaged = bytearray(victim.read_bytes())
        damaged[1234] ^= 0xFF  # same size, one bit pattern off
        victim.write_bytes(bytes(damaged))
        os.utime(victim, ns=(1, 1))
        cache.fetch(t, BUNDLE_ID)
    _assert_bundle(directory)
    assert len(server.file_gets("step.onnx")) == 2
    assert len(server.file_gets("params.f32")) == 1


def test_corrupt_transfer_is_detected_and_fetched_again(tmp_path: Path) -> None:
    sent = {"n": 0}

    def tamper(name: str, seen: Seen) -> bytes | None:
        if name == "step.onnx" and sent["n"] == 0:
            sent["n"] += 1
            return FILES[name][:-1] + b"\x00"  # right size, wrong hash
        return None

    with BundleServer(tamper) as server:
        directory, _ = BundleCache(tmp_path).fetch(_transport(server.loopback.url), BUNDLE_ID)
    _assert_bundle(directory)
    gets = server.file_gets("step.onnx")
    assert len(gets) == 2 and "range" not in gets[1].headers  # the re-fetch starts over


def test_file_that_stays_corrupt_raises_and_leaves_no_file(tmp_path: Path) -> None:
    def tamper(name: str, seen: Seen) -> bytes | None:
        return b"\x00" * len(FILES[name]) if name == "params.f32" else None

    with BundleServer(tamper) as server, pytest.raises(CacheError, match=r"params\.f32"):
        BundleCache(tmp_path).fetch(_transport(server.loopback.url), BUNDLE_ID)
    assert not (tmp_path / BUNDLE_ID / "params.f32").exists()


def test_partial_download_resumes_with_range(tmp_path: Path) -> None:
    # A previous run of the app died 120,000 bytes into step.onnx.
    partial = tmp_path / BUNDLE_ID / ".partial" / "step.onnx"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(FILES["step.onnx"][:120_000])
    with BundleServer() as server:
        t = _transport(server.loopback.url)
        directory, _ = BundleCache(tmp_path).fetch(t, BUNDLE_ID)
    _assert_bundle(directory)
    (get,) = server.file_gets("step.onnx")
    assert get.headers["range"] == "bytes=120000-"
    assert not partial.exists()


@pytest.mark.parametrize("content", ["complete", "wrong"])
def test_partial_file_of_full_size_is_checked_without_a_range_request(
    tmp_path: Path, content: str
) -> None:
    # The app died after the last byte, before the rename.
    data = FILES["step.onnx"] if content == "complete" else b"\x00" * len(FILES["step.onnx"])
    partial = tmp_path / BUNDLE_ID / ".partial" / "step.onnx"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data)
    with BundleServer() as server:
        directory, _ = BundleCache(tmp_path).fetch(_transport(server.loopback.url), BUNDLE_ID)
    _assert_bundle(directory)
    gets = server.file_gets("step.onnx")
    assert [g.headers.get("range") for g in gets] == ([] if content == "complete" else [None])


def test_download_cut_mid_file_resumes_in_the_same_fetch(tmp_path: Path) -> None:
    cut = {"done": False}

    def handler(seen: Seen) -> Reply:
        reply = server.handle(seen)
        if seen.path.endswith("/step.onnx") and not cut["done"]:
            cut["done"] = True
            reply.cut_after = 77_777
        return reply

    server = BundleServer()
    server.loopback.handler = handler
    with server:
        directory, _ = BundleCache(tmp_path).fetch(_transport(server.loopback.url), BUNDLE_ID)
    _assert_bundle(directory)
    gets = server.file_gets("step.onnx")
    assert [g.headers.get("range") for g in gets] == [None, "bytes=77777-"]


def test_stale_partial_from_other_content_is_caught_by_the_hash(tmp_path: Path) -> None:
    partial = tmp_path / BUNDLE_ID / ".partial" / "step.onnx"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\xab" * 50_000)  # not a prefix of the real file
    with BundleServer() as server:
        directory, _ = BundleCache(tmp_path).fetch(_transport(server.loopback.url), BUNDLE_ID)
    _assert_bundle(directory)
    assert [g.headers.get("range") for g in server.file_gets("step.onnx")] == [
        "bytes=50000-",
        None,
    ]


def test_manifest_of_another_bundle_is_rejected(tmp_path: Path) -> None:
    other = _manifest({"x.bin": b"abc"})

    def handler(seen: Seen) -> Reply:
        return Reply(200, json.dumps(other).encode())

    with Loopback(handler) as server, pytest.raises(CacheError, match="asked for bundle"):
        BundleCache(tmp_path).fetch(_transport(server.url), BUNDLE_ID)
    assert not (tmp_path / BUNDLE_ID / "manifest.json").exists()


def test_tampered_manifest_is_rejected_before_any_file(tmp_path: Path) -> None:
    tampered = json.loads(json.dumps(MANIFEST))
    tampered["files"]["step.onnx"]["sha256"] = "0" * 64  # bundle_id no longer matches

    with (
        Loopback(lambda s: Reply(200, json.dumps(tampered).encode())) as server,
        pytest.raises(CacheError, match="bad manifest"),
    ):
        BundleCache(tmp_path).fetch(_transport(server.url), BUNDLE_ID)
    assert len(server.seen) == 1


def test_bundle_id_that_is_not_a_digest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="sha256"):
        BundleCache(tmp_path).path("../../etc")


def test_file_names_that_need_quoting_in_a_url_are_fetched(tmp_path: Path) -> None:
    """The manifest allows any relative name; the URL of one with a space or a non-ASCII
    letter must be percent-encoded (the coordinator's router decodes it), or http.client
    refuses to send it and the bundle can never be downloaded."""
    from urllib.parse import unquote

    files = {"my model.onnx": b"graph", "gewichte/ü.f32": b"\x00" * 16, "a%b": b"percent"}
    manifest = _manifest(files)
    prefix = f"/v1/bundles/{manifest['bundle_id']}"

    def handler(seen: Seen) -> Reply:
        if seen.path == prefix:
            return Reply(200, json.dumps(manifest).encode())
        name = unquote(seen.path[len(prefix + "/files/") :])
        return ranged(files[name], seen) if name in files else json_error(404, "not_found")

    with Loopback(handler) as server:
        directory, _ = BundleCache(tmp_path).fetch(_transport(server.url), manifest["bundle_id"])
    for name, data in files.items():
        assert (directory / name).read_bytes() == data
