"""TLS end to end: a real HTTPS coordinator with a certificate from a CA made in the test.

Certificates come from ``cryptography`` (the coordinator's dependency); the pins the tests
expect are computed with it too, independently of :mod:`edge_sdk.tls`'s own DER walking.
"""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from coordinator.admin import AdminClient
from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.client import Client, ClientConfig
from edge_sdk.conditions import DeviceConditions, ScriptedConditions
from edge_sdk.errors import TlsError, TransportError
from edge_sdk.protocol import Route
from edge_sdk.tls import TlsConfig, spki_der
from edge_sdk.transport import RetryPolicy, Transport
from fedge.cli import main
from tests.fixtures.coordinator import GOOD_CONDITIONS, DeviceHTTP, HttpConnection
from tests.fixtures.pki import Pki

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def https(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCoordinator]:
    db = tmp_path_factory.mktemp("tls") / "fedge.db"
    with EmbeddedCoordinator(db, seed=3, **pki.coordinator_tls()) as coord:
        yield coord


def _no_retry(url: str, tls: TlsConfig | None, sleeps: list[float]) -> Transport:
    return Transport(url, tls=tls, retry=RetryPolicy(max_attempts=3), sleep=sleeps.append,
                     timeout=10)


def _client(coord: EmbeddedCoordinator, url: str, state: Path, tls: TlsConfig) -> Client:
    x = np.zeros((4, 4), np.float32)
    return Client(
        url, state_dir=state, data=(x, np.zeros(4, np.float32)),
        conditions=ScriptedConditions(DeviceConditions.from_json(GOOD_CONDITIONS)),
        config=ClientConfig(backend="ort-step", seed=0, tls=tls,
                            enrollment_token=coord.enrollment_token,
                            retry=RetryPolicy(max_attempts=2)),
        sleep=lambda s: None,
    )


def _devices(coord: EmbeddedCoordinator) -> int:
    return int(coord.call(coord.service.store.count_devices))


def test_the_edge_pin_is_the_sha256_of_the_spki_cryptography_sees(pki: Pki) -> None:
    for path in (pki.cert, pki.ca, pki.other_ca):  # an RSA and two EC keys
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        want = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert spki_der(cert.public_bytes(serialization.Encoding.DER)) == want
    with pytest.raises(ValueError):
        spki_der(b"\x30\x03\x02\x01")
    with pytest.raises(ValueError, match="SHA-256"):
        TlsConfig(pin_sha256="not a pin")


def test_a_client_that_trusts_the_ca_works_end_to_end(
    https: EmbeddedCoordinator, pki: Pki, tiny_bundle: Path, tmp_path: Path
) -> None:
    assert https.url.startswith("https://127.0.0.1:")
    admin = https.admin()  # trusts the test CA
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    assert admin.status()["tasks"] == [] and bundle_id
    before = _devices(https)
    for i, tls in enumerate([TlsConfig(ca_file=str(pki.ca)),
                             TlsConfig(ca_file=str(pki.ca), pin_sha256=pki.pin),
                             TlsConfig(ca_file=str(pki.ca),  # the hex spelling of the same pin
                                       pin_sha256=base64.b64decode(pki.pin).hex())]):
        client = _client(https, https.url, tmp_path / f"dev{i}", tls)
        outcome = client.run_once()
        client.close()
        assert (outcome.action, outcome.reasons) == ("wait", ("no_task",)), outcome
    assert _devices(https) == before + 3


@pytest.mark.parametrize("trust", ["system CAs", "another CA", "pin mismatch"])
def test_an_untrusted_certificate_fails_with_a_tls_error_and_is_not_retried(
    https: EmbeddedCoordinator, pki: Pki, trust: str, tmp_path: Path
) -> None:
    tls = {
        "system CAs": TlsConfig(),
        "another CA": TlsConfig(ca_file=str(pki.other_ca)),
        "pin mismatch": TlsConfig(ca_file=str(pki.ca), pin_sha256=pki.wrong_pin),
    }[trust]
    before = _devices(https)
    sleeps: list[float] = []
    with pytest.raises(TlsError) as info:
        _no_retry(https.url, tls, sleeps).call("GET", Route.HEALTH)
    assert sleeps == []  # the same certificate next time: no point retrying
    assert ("pinned" in str(info.value)) == (trust == "pin mismatch")
    # the device client reports it as a failed pass and never gets to register
    client = _client(https, https.url, tmp_path / "dev", tls)
    outcome = client.run_once()
    client.close()
    expected = "pinned" if trust == "pin mismatch" else "TLS handshake failed"
    assert outcome.action == "failed" and expected in str(outcome.error), outcome
    assert _devices(https) == before
    assert not (tmp_path / "dev" / "credentials.json").exists()


def test_plain_http_to_the_tls_port_fails_cleanly(https: EmbeddedCoordinator) -> None:
    sleeps: list[float] = []
    plain = https.url.replace("https://", "http://")
    with pytest.raises(TransportError) as info:
        _no_retry(plain, None, sleeps).call("GET", Route.HEALTH)
    assert not isinstance(info.value, TlsError) and info.value.attempts == 3
    # and the server is none the worse for it
    assert https.admin().health() == {"ok": True}


def test_https_to_a_plain_server_is_a_tls_error(coordinator: EmbeddedCoordinator) -> None:
    sleeps: list[float] = []
    url = coordinator.url.replace("http://", "https://")
    with pytest.raises(TlsError):
        _no_retry(url, TlsConfig(), sleeps).call("GET", Route.HEALTH)
    assert sleeps == []


def test_tls_options_on_a_plain_url_are_refused() -> None:
    with pytest.raises(ValueError, match="https"):
        Transport("http://127.0.0.1:1", tls=TlsConfig(ca_file="ca.pem"))


def test_the_cli_speaks_tls_with_a_ca_file(
    https: EmbeddedCoordinator, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["status", "--coordinator", https.url, "--admin-token", https.admin_token, "--json"]
    assert main([*base, "--ca-file", str(pki.ca), "--pin-sha256", pki.pin]) == 0
    assert "devices_registered" in json.loads(capsys.readouterr().out)
    assert main([*base, "--ca-file", str(pki.other_ca)]) == 2
    assert "TLS" in capsys.readouterr().err
    assert main([*base, "--ca-file", str(pki.ca), "--pin-sha256", pki.wrong_pin]) == 2
    assert "pinned" in capsys.readouterr().err


@pytest.mark.parametrize("processes", ["1", "2"])  # 2: a supervisor, its children serve
def test_fedge_serve_with_tls_prints_its_pin_and_serves_https(
    pki: Pki, tmp_path: Path, processes: str
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedge.cli", "serve", "--db", str(tmp_path / "f.db"), "--port",
         "0", "--tls-cert", str(pki.cert), "--tls-key", str(pki.key), "--admin-token", "tok",
         "--processes", processes],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert "listening on https://127.0.0.1:" in line, line
        url = line.split()[-1]
        pin_line = next(x for x in iter(proc.stderr.readline, "") if "pin" in x)
        assert pin_line.split()[-1] == pki.pin
        admin = AdminClient(url, "tok", tls=TlsConfig(ca_file=str(pki.ca), pin_sha256=pki.pin))
        assert admin.tasks() == []
        admin.close()
    finally:
        proc.terminate()
        proc.wait(30)


def test_serve_refuses_half_a_tls_configuration(pki: Pki, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "serve", "--db", str(tmp_path / "f.db"),
         "--tls-cert", str(pki.cert)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "tls_cert and tls_key" in out.stderr


def test_serve_refuses_an_encrypted_key_without_asking_for_its_passphrase(
    pki: Pki, tmp_path: Path
) -> None:
    """Run as a service would be (no terminal, stdin closed): a clear refusal naming the key
    file, no passphrase prompt and no bare "Invalid argument"."""
    key = serialization.load_pem_private_key(pki.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ))  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "serve", "--db", str(tmp_path / "f.db"),
         "--port", "0", "--tls-cert", str(pki.cert), "--tls-key", str(encrypted)],
        capture_output=True, text=True, cwd=ROOT, timeout=60, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert f"the private key in {encrypted} is encrypted" in out.stderr
    assert "pass phrase" not in out.stderr.lower()


@pytest.mark.parametrize("case", ["missing key", "key as certificate", "certificate as key"])
def test_a_tls_file_that_cannot_serve_is_named_in_the_refusal(
    pki: Pki, tmp_path: Path, case: str
) -> None:
    """ssl's own errors name no file ("[Errno 2] No such file or directory", "[SSL] PEM
    lib"): the refusal says which of the two is wrong."""
    from coordinator.config import CoordinatorConfig
    from fedge.cli import CommandError
    from fedge.commands.serve import tls_context

    missing = tmp_path / "missing.pem"
    cert, key, expected = {
        "missing key": (pki.cert, missing, f"No such file or directory: '{missing}'"),
        "key as certificate": (pki.key, pki.key, f"{pki.key}: no PEM certificate"),
        "certificate as key": (pki.cert, pki.cert, f"{pki.cert}: no PEM private key"),
    }[case]
    cfg = CoordinatorConfig(db_path=str(tmp_path / "f.db"), tls_cert=str(cert), tls_key=str(key))
    with pytest.raises(CommandError) as refused:
        tls_context(cfg, print_pin=False)
    assert expected in str(refused.value)


def test_subprocess_coordinator_with_tls(pki: Pki, tmp_path: Path) -> None:
    with EmbeddedCoordinator(tmp_path / "p.db", subprocess=True, **pki.coordinator_tls()) as coord:
        assert coord.url.startswith("https://")
        assert coord.admin().status()["devices_registered"] == 0


def test_an_emulated_fleet_enrolls_over_tls(https: EmbeddedCoordinator, pki: Pki) -> None:
    from fedge.fleet import SimClock, fedprox_synthetic
    from fedge.fleet.emulator import Fleet

    before = _devices(https)
    parts = fedprox_synthetic(0.5, 0.5, 3, seed=0, max_samples=50)
    fleet = Fleet(https.url, parts, seed=0, clock=SimClock(20.0), start_spread_s=1.0,
                  enrollment_token=https.enrollment_token,
                  tls=TlsConfig(ca_file=str(pki.ca), pin_sha256=pki.pin))
    try:
        summary = fleet.run(until=lambda: _devices(https) == before + 3, timeout_s=60)
    finally:
        fleet.close()
    assert summary.devices_registered == 3 and summary.failures == 0
    assert summary.checkins >= 3


def test_the_bare_test_device_speaks_https_to_a_tls_coordinator(
    https: EmbeddedCoordinator, pki: Pki
) -> None:
    """The tests' and benchmarks' http.client device registers over HTTPS, trusting the
    coordinator's CA; with the system's CAs only, the same URL refuses the certificate."""
    before = _devices(https)
    device = DeviceHTTP(https)
    try:
        assert device.http.https and _devices(https) == before + 1
        status, _, _ = device.http.request("GET", Route.HEALTH)
        assert status == 200
    finally:
        device.close()
    with pytest.raises(ssl.SSLCertVerificationError):
        HttpConnection(https.url).request("GET", Route.HEALTH)
