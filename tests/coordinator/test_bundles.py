"""A real exported bundle through the coordinator: upload, serve to devices, version bundles."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from coordinator.admin import ApiCallError
from edge_sdk.bundle import verify_bundle
from edge_sdk.frame import decode_tensor
from tests.fixtures.coordinator import DeviceHTTP


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

    device = DeviceHTTP(coordinator.url)
    status, _, body = device.raw("GET", f"/v1/bundles/{manifest.bundle_id}")
    assert status == 200 and json.loads(body) == manifest.raw
    for name in manifest.files:
        status, _, data = device.raw("GET", f"/v1/bundles/{manifest.bundle_id}/files/{name}")
        assert status == 200 and data == (digits_bundle / name).read_bytes(), name

    plan = {
        "goal": 1,
        "selection_window_s": 0.0,
        "rounds": 1,
        "eligibility": {"require_charging": False},
    }
    task = admin.create_task(manifest.bundle_id, plan, name="digits")
    initial = np.fromfile(digits_bundle / "params.f32", dtype="<f4")
    np.testing.assert_array_equal(decode_tensor(device.params(task["task_id"], 0)), initial)

    answer = device.check_in()
    assert answer["action"] == "train"
    delta = np.linspace(-0.01, 0.01, manifest.num_parameters).astype(np.float32)
    aid = answer["assignment"]["assignment_id"]
    assert device.upload(aid, delta, codec={"name": "int8", "bits": 8, "block": 64})[0] == 200
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
