"""The bundle cache: bundles downloaded once, verified against their manifest, resumed, repaired.

Layout: ``<root>/<bundle_id>/`` holds ``manifest.json`` and the bundle's files; a file being
downloaded lives at ``<root>/<bundle_id>/.partial/<name>`` until its sha256 matches the
manifest, then it is renamed into place. So:

* an interrupted download resumes from the partial file's size with ``Range`` (in this process
  on a retry, or in the next run of the app);
* a file that does not match its hash (a bad download, or a cached file damaged on disk) is
  deleted and fetched again from the start, once; a second mismatch raises
  :class:`~edge_sdk.errors.CacheError`;
* the manifest must hash to the bundle id the coordinator named, so a wrong or tampered
  manifest is rejected before any file is fetched.

One :class:`BundleCache` may serve many clients of a process (the fleet emulator shares one):
it verifies a bundle's files by hash once and afterwards only when their size or mtime changes.
Its locks are per process: give separate processes separate roots (a file two processes append
to at once fails its hash check, so nothing corrupt is ever used, but the round may fail).

Usage::

    cache = BundleCache("~/.cache/fedge/bundles")
    bundle_dir, manifest = cache.fetch(transport, bundle_id)
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from urllib.parse import quote

from edge_sdk.bundle import (
    MANIFEST_NAME,
    BundleError,
    Manifest,
    load_manifest,
    parse_manifest,
    sha256_file,
)
from edge_sdk.errors import CacheError
from edge_sdk.protocol import Route
from edge_sdk.transport import Transport

__all__ = ["BundleCache"]

_BUNDLE_ID = re.compile(r"^[0-9a-f]{64}$")
_PARTIAL = ".partial"
_MAX_MANIFEST = 16 * 1024 * 1024


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class BundleCache:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._bundle_locks: dict[str, threading.Lock] = {}
        # bundle_id -> {file name: (size, mtime_ns) when its hash last matched}
        self._verified: dict[str, dict[str, tuple[int, int]]] = {}
        self._manifests: dict[str, tuple[tuple[int, int], Manifest]] = {}
        self.files_fetched = 0  # files downloaded (partly or wholly) by this cache object

    def path(self, bundle_id: str) -> Path:
        if not _BUNDLE_ID.match(bundle_id):
            raise CacheError(f"bundle id {bundle_id!r} is not a sha256 hex digest")
        return self.root / bundle_id

    def fetch(self, transport: Transport, bundle_id: str) -> tuple[Path, Manifest]:
        """The verified bundle directory and manifest, downloading what is missing or corrupt."""
        directory = self.path(bundle_id)
        with self._lock:
            lock = self._bundle_locks.setdefault(bundle_id, threading.Lock())
        with lock:
            manifest = self._manifest(transport, bundle_id, directory)
            for name, meta in manifest.files.items():
                self._ensure_file(transport, bundle_id, directory, name, meta)
            return directory, manifest

    def _manifest(self, transport: Transport, bundle_id: str, directory: Path) -> Manifest:
        path = directory / MANIFEST_NAME
        known = self._manifests.get(bundle_id)
        if known is not None and path.is_file() and _stamp(path) == known[0]:
            return known[1]
        try:
            manifest = load_manifest(directory)
        except BundleError:
            manifest = None
        if manifest is not None and manifest.bundle_id == bundle_id:
            self._manifests[bundle_id] = (_stamp(path), manifest)
            return manifest
        self._verified.pop(bundle_id, None)
        response = transport.request("GET", Route.BUNDLE_MANIFEST.format(bundle_id=bundle_id))
        if len(response.body) > _MAX_MANIFEST:
            raise CacheError(f"manifest of bundle {bundle_id} is larger than {_MAX_MANIFEST} B")
        try:
            raw = json.loads(response.body)
            # The structure, safe file names, and that the content hashes to its bundle_id;
            # we also need that id to be the one we asked for.
            staged = parse_manifest(raw, where=f"of bundle {bundle_id}")
        except (ValueError, UnicodeDecodeError, BundleError) as e:
            raise CacheError(f"coordinator sent a bad manifest for {bundle_id}: {e}") from e
        if staged.bundle_id != bundle_id:
            raise CacheError(f"asked for bundle {bundle_id}, got a manifest of {staged.bundle_id}")
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{MANIFEST_NAME}.tmp"
        tmp.write_bytes(response.body)
        os.replace(tmp, path)
        self._manifests[bundle_id] = (_stamp(path), staged)
        return staged

    def _ensure_file(
        self, transport: Transport, bundle_id: str, directory: Path, name: str, meta: dict
    ) -> None:
        final = directory / name
        verified = self._verified.setdefault(bundle_id, {})
        if final.is_file():
            stamp = _stamp(final)
            if verified.get(name) == stamp:
                return
            if stamp[0] == int(meta["bytes"]) and sha256_file(final) == meta["sha256"]:
                verified[name] = stamp
                return
            final.unlink()  # damaged on disk: fetch it again
        verified.pop(name, None)
        partial = directory / _PARTIAL / name
        partial.parent.mkdir(parents=True, exist_ok=True)
        # Percent-encoded (the coordinator's router decodes it): a manifest may name a file
        # with a space, a non-ASCII letter, "?" or "%", which http.client would refuse to
        # send or the server would read as something else.
        url = Route.BUNDLE_FILE.replace("{name:.+}", "{name}").format(
            bundle_id=bundle_id, name=quote(name, safe="/")
        )
        size, digest = int(meta["bytes"]), str(meta["sha256"])
        for attempt in (1, 2):
            # A partial file already of full size (the app died before the rename) needs no
            # request: asking for bytes from its end would only get 416.
            if not partial.is_file() or partial.stat().st_size < size:
                with open(partial, "ab") as sink:
                    transport.download(url, sink, limit=size)
                self.files_fetched += 1
            if partial.stat().st_size == size and sha256_file(partial) == digest:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(partial, final)
                verified[name] = _stamp(final)
                return
            # A resumed tail on a stale head, or a bad transfer: start this file over.
            partial.unlink()
            if attempt == 2:
                raise CacheError(
                    f"bundle file {name} of {bundle_id} does not match its sha256 after a re-fetch"
                )

