"""Device authentication against the stored secret hash, over real HTTP.

The stored hash is checked against HMAC-SHA256(salt, secret) computed here with hashlib's
own HMAC (an independent reference), so that a change in how the coordinator hashes can
never lock out devices registered before it; a wrong secret, another device's secret, an
unknown device (also one whose id no device can have) and a malformed header are refused
with ``401 unauthorized`` (a deleted device: tests/coordinator/store/test_read_cache.py).
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from coordinator.embedded import EmbeddedCoordinator
from coordinator.store import SQLiteStore
from edge_sdk.protocol import Route
from tests.fixtures.coordinator import DeviceHTTP


def test_stored_hash_is_hmac_sha256_and_only_the_right_secret_passes(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    path = tmp_path / "fedge.db"
    with EmbeddedCoordinator(path) as coord:
        admin = coord.admin()
        admin.create_task(admin.upload_bundle(tiny_bundle)["bundle_id"], {"goal": 1})
        dev, other = DeviceHTTP(coord), DeviceHTTP(coord)
        store = SQLiteStore(path)
        try:
            row = store.get_device(dev.device_id)
        finally:
            store.close()
        assert row is not None
        reference = hmac.new(bytes.fromhex(row.secret_salt), dev.secret.encode(), hashlib.sha256)
        assert row.secret_hash == reference.hexdigest()

        assert dev.check_in()["action"] == "wait"
        for header in (
            f"Device {dev.device_id}:{dev.secret[:-1]}x",  # wrong secret
            f"Device {dev.device_id}:{other.secret}",  # another device's secret
            f"Device d-unknown:{dev.secret}",
            # A byte that is not UTF-8 in the id: aiohttp hands it over as a lone surrogate,
            # which no store can take as a query parameter.
            f"Device {dev.device_id}\xff:{dev.secret}",
            f"Device {dev.device_id}",
            "Bearer nope",
        ):
            status, _, body = dev.http.request(
                "POST", Route.CHECKIN, b"{}", {"Authorization": header}
            )
            assert status == 401, (header, body)
            assert b'"unauthorized"' in body


def test_the_scheme_names_are_case_insensitive(tmp_path: Path) -> None:
    """RFC 9110 (11.1): an authentication scheme's name is case-insensitive. A proxy or
    client library that writes ``bearer``/``DEVICE`` was refused 401 before."""
    with EmbeddedCoordinator(tmp_path / "fedge.db") as coord:
        dev = DeviceHTTP(coord)
        for scheme in ("device", "DEVICE"):
            status, _, body = dev.http.request(
                "POST", Route.CHECKIN, b'{"runtimes": ["ort-step"]}',
                {"Authorization": f"{scheme} {dev.device_id}:{dev.secret}"},
            )
            assert status == 200, body
        for scheme in ("bearer", "BEARER"):
            auth = {"Authorization": f"{scheme} {coord.admin_token}"}
            assert dev.http.request("GET", Route.ADMIN_TASKS, None, auth)[0] == 200
        # the scheme's name only: a wrong token or secret is refused whatever its case
        bad = {"Authorization": "bearer nope"}
        assert dev.http.request("GET", Route.ADMIN_TASKS, None, bad)[0] == 401
        dev.close()
