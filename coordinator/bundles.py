"""Bundles on the coordinator: taking in an uploaded bundle tar, and building the bundle of a
task's model version.

An upload is an uncompressed tar of a bundle directory (``manifest.json`` plus the files it
lists). It is unpacked into a temporary directory with no links, devices, sparse files, absolute
paths or ``..`` allowed, and no more bytes unpacked than the tar holds (a sparse or otherwise
expanding member could fill the disk from a small upload); each ``files`` entry of the
manifest must be an object with a ``sha256`` string and a ``bytes`` count; then it is checked
with :func:`edge_sdk.bundle.verify_bundle` (structure, bundle id, every
file's size and sha256), then every file goes into the blob store under its sha256 and the
manifest into the database.

A version bundle is the original bundle with its initial parameters file replaced by the
version's parameters, and a manifest with that file's new hash, a ``derived_from`` entry
(``{"bundle_id", "task_id", "model_version"}``) and the resulting new ``bundle_id``.
"""

from __future__ import annotations

import copy
import io
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from coordinator.blobs import BlobStore
from coordinator.errors import Unprocessable
from edge_sdk.bundle import MANIFEST_NAME, BundleError, bundle_id_of, verify_bundle
from edge_sdk.protocol import ErrorCode

__all__ = ["bundle_tar", "extract_bundle", "initial_params_name", "version_manifest"]


def initial_params_name(manifest: dict[str, Any]) -> str:
    return str(manifest.get("initial_parameters") or "params.f32")


def _invalid(message: str) -> Unprocessable:
    return Unprocessable(message, ErrorCode.BUNDLE_INVALID)


def extract_bundle(data: bytes, blobs: BlobStore, max_files: int = 256) -> dict[str, Any]:
    """Check an uploaded bundle tar and store its files as blobs; returns the manifest."""
    with tempfile.TemporaryDirectory(dir=blobs.root / "tmp") as tmp:
        root = Path(tmp)
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                members = tar.getmembers()
                if len(members) > max_files:
                    raise _invalid(f"bundle tar holds {len(members)} entries, at most {max_files}")
                for m in members:
                    name = Path(m.name)
                    if name.is_absolute() or ".." in name.parts:
                        raise _invalid(f"bundle tar entry {m.name!r} escapes the bundle")
                    if not (m.isfile() or m.isdir()) or m.issparse():
                        raise _invalid(f"bundle tar entry {m.name!r} is not a plain file")
                # A plain member's bytes are all in the tar: more would be an expansion.
                unpacked = sum(m.size for m in members if m.isfile())
                if unpacked > len(data):
                    raise _invalid(
                        f"bundle tar unpacks to {unpacked} bytes, more than its {len(data)}"
                    )
                tar.extractall(root, filter="data")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise _invalid(f"body is not a readable uncompressed tar: {e}") from e
        bundle_dir = _bundle_root(root)
        try:
            manifest = verify_bundle(bundle_dir)
        except BundleError as e:
            raise _invalid(str(e)) from e
        raw = manifest.raw
        params_name = initial_params_name(raw)
        meta = raw["files"].get(params_name)
        if meta is None:
            raise _invalid(f"manifest does not list its initial parameters {params_name!r}")
        if int(meta["bytes"]) != 4 * manifest.num_parameters:
            raise _invalid(
                f"{params_name} holds {meta['bytes']} bytes, "
                f"{manifest.num_parameters} float32 parameters need {4 * manifest.num_parameters}"
            )
        for name, meta in raw["files"].items():
            blobs.put_file(bundle_dir / name, sha=meta["sha256"])
        return raw


def _bundle_root(root: Path) -> Path:
    """The directory holding manifest.json: the tar's root or its single top-level folder."""
    if (root / MANIFEST_NAME).is_file():
        return root
    entries = list(root.iterdir())
    if len(entries) == 1 and (entries[0] / MANIFEST_NAME).is_file():
        return entries[0]
    raise _invalid(f"no {MANIFEST_NAME} at the top of the bundle tar")


def version_manifest(
    manifest: dict[str, Any], task_id: str, version: int, params_sha: str, params_bytes: int
) -> dict[str, Any]:
    out = copy.deepcopy(manifest)
    out["files"][initial_params_name(manifest)] = {"sha256": params_sha, "bytes": params_bytes}
    out["derived_from"] = {
        "bundle_id": manifest["bundle_id"],
        "task_id": task_id,
        "model_version": version,
    }
    out["bundle_id"] = bundle_id_of(out)
    return out


def bundle_tar(manifest: dict[str, Any], blobs: BlobStore) -> bytes:
    """An uncompressed tar of ``manifest.json`` and every file it lists (read from blobs)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        text = json.dumps(manifest, indent=2, sort_keys=True).encode()
        info = tarfile.TarInfo(MANIFEST_NAME)
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
        for name, meta in sorted(manifest["files"].items()):
            path = blobs.path(meta["sha256"])
            info = tarfile.TarInfo(name)
            info.size = path.stat().st_size
            with open(path, "rb") as f:
                tar.addfile(info, f)
    return buf.getvalue()
