"""A real exported bundle through the coordinator: upload, serve to devices, version bundles."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from coordinator.admin import ApiCallError, tar_directory
from edge_sdk.bundle import verify_bundle
from edge_sdk.frame import decode_tensor
from edge_sdk.protocol import Route
from tests.fixtures.coordinator import DeviceHTTP, HttpConnection, make_synthetic_bundle


def test_real_bundle_round_trip(coordinator, digits_bundle: Path, tmp_path: Path) -> None:
    admin = coordinator.admin()
    manifest = verify_bundle(digits_bundle)
    up = admin.upload_bundle(digits_bundle)
    assert up == {
        "bundle_id": manifest.bundle_id,
        "num_parameters": manifest.num_parameters,
        "created": True,
    }
    assert admin.upload_bundle(digits_bundle)["created"] is False  # content-addressed

    device = DeviceHTTP(coordinator)
    # a bundle no task of the device's population uses does not exist for it
    status, _, body = device.raw("GET", f"/v1/bundles/{manifest.bundle_id}")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    plan = {
        "goal": 1,
        "selection_window_s": 0.0,
        "rounds": 1,
        "eligibility": {"require_charging": False},
        "codec": {"name": "int8", "bits": 8, "block": 64},  # the upload below is held to it
    }
    task = admin.create_task(manifest.bundle_id, plan, name="digits")
    status, _, body = device.raw("GET", f"/v1/bundles/{manifest.bundle_id}")
    assert status == 200 and json.loads(body) == manifest.raw
    for name in manifest.files:
        status, _, data = device.raw("GET", f"/v1/bundles/{manifest.bundle_id}/files/{name}")
        assert status == 200 and data == (digits_bundle / name).read_bytes(), name
    stranger = DeviceHTTP(coordinator, population="elsewhere")
    for path in (f"/v1/bundles/{manifest.bundle_id}", f"/v1/bundles/{manifest.bundle_id}/files/"
                 f"{next(iter(manifest.files))}"):  # fmt: skip
        assert stranger.raw("GET", path)[0] == 404
    initial = np.fromfile(digits_bundle / "params.f32", dtype="<f4")
    np.testing.assert_array_equal(decode_tensor(device.params(task["task_id"], 0)), initial)

    answer = device.check_in()
    assert answer["action"] == "train"
    delta = np.linspace(-0.01, 0.01, manifest.num_parameters).astype(np.float32)
    aid = answer["assignment"]["assignment_id"]
    assert device.upload(aid, delta, codec=plan["codec"])[0] == 200
    assert admin.task(task["task_id"])["model_version"] == 1
    v1 = decode_tensor(device.params(task["task_id"], 1))
    np.testing.assert_allclose(v1, initial + delta, atol=0.02 / 255 + 1e-7)  # int8 step

    # the current version as a bundle: verifies on its own, carries v1's parameters
    out = tmp_path / "v1"
    with tarfile.open(fileobj=io.BytesIO(admin.task_bundle(task["task_id"]))) as tar:
        tar.extractall(out, filter="data")
    derived = verify_bundle(out)
    assert derived.bundle_id != manifest.bundle_id
    assert derived.raw["derived_from"] == {
        "bundle_id": manifest.bundle_id,
        "task_id": task["task_id"],
        "model_version": 1,
    }
    np.testing.assert_array_equal(np.fromfile(out / "params.f32", dtype="<f4"), v1)
    for name in manifest.files:
        if name != "params.f32":
            assert (out / name).read_bytes() == (digits_bundle / name).read_bytes()
    # and it can seed a new task
    assert admin.upload_bundle(out)["bundle_id"] == derived.bundle_id


def test_bundle_whose_params_do_not_match_the_layout_is_refused(
    coordinator, tiny_bundle: Path, tmp_path: Path
) -> None:
    from tests.fixtures.coordinator import make_synthetic_bundle

    bad = make_synthetic_bundle(tmp_path / "bad", num_parameters=8)
    raw = json.loads((bad / "manifest.json").read_text())
    (bad / "params.f32").write_bytes(b"\0" * 12)  # 3 floats for 8 parameters
    from edge_sdk.bundle import bundle_id_of, sha256_file

    raw["files"]["params.f32"] = {"sha256": sha256_file(bad / "params.f32"), "bytes": 12}
    raw["bundle_id"] = bundle_id_of(raw)
    (bad / "manifest.json").write_text(json.dumps(raw))
    try:
        coordinator.admin().upload_bundle(bad)
    except ApiCallError as e:
        assert (e.status, e.code) == (422, "bundle_invalid")
    else:
        raise AssertionError("a bundle with 3 floats for 8 parameters was accepted")


def _post_tar(coord, data: bytes) -> tuple[int, dict]:
    conn = HttpConnection(coord.url)
    try:
        status, _, body = conn.request(
            "POST",
            Route.ADMIN_BUNDLES,
            data,
            {"Authorization": f"Bearer {coord.admin_token}", "Content-Type": "application/x-tar"},
        )
    finally:
        conn.close()
    return status, json.loads(body)


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar writes the sparse member")
def test_sparse_member_is_refused_before_it_is_unpacked(coordinator, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "params.f32", "wb") as f:  # 64 MB apparent, a few bytes stored
        f.truncate(64 << 20)
        f.seek(0)
        f.write(b"\1" * 16)
    tar = tmp_path / "sparse.tar"
    subprocess.run(["tar", "-S", "-cf", str(tar), "-C", str(src), "params.f32"], check=True)
    data = tar.read_bytes()
    assert len(data) < 1 << 20
    blobs = coordinator.config.blob_dir
    before = sorted(p.relative_to(blobs) for p in blobs.rglob("*"))
    status, body = _post_tar(coordinator, data)
    assert (status, body["error"]["code"]) == (422, "bundle_invalid"), body
    assert "not a plain file" in body["error"]["message"]
    assert sorted(p.relative_to(blobs) for p in blobs.rglob("*")) == before


@pytest.mark.parametrize("entry", ["a string", 7, None, [1], {"sha256": 5, "bytes": 4},
                                   {"sha256": "ab", "bytes": True}])  # fmt: skip
def test_files_entry_that_is_not_an_object_is_refused(
    coordinator, tmp_path: Path, entry: object
) -> None:
    bundle = make_synthetic_bundle(tmp_path / "b", num_parameters=8)
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["files"]["extra.bin"] = entry
    (bundle / "manifest.json").write_text(json.dumps(raw))
    status, body = _post_tar(coordinator, tar_directory(bundle))
    assert (status, body["error"]["code"]) == (422, "bundle_invalid"), body
    assert coordinator.admin().tasks() == []
