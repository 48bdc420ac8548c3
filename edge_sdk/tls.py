"""How a device trusts its coordinator over HTTPS: CA bundles and public-key pinning.

::

    tls = TlsConfig(ca_file="fleet-ca.pem", pin_sha256="hex or base64 of sha256(SPKI)")
    Transport("https://coordinator:8443", tls=tls)

Certificates are always verified (chain and host name), against the system's CAs or, with
``ca_file``, against that bundle only (a private CA for a fleet). ``pin_sha256`` additionally
requires the server's public key to be the pinned one: the SHA-256 of its DER
SubjectPublicKeyInfo, as HPKP and OkHttp's ``CertificatePinner`` define it, so the pin
survives renewing a certificate on the same key. A mismatch raises
:class:`~edge_sdk.errors.TlsError` before any request is sent.

The edge side has no X.509 library, and needs none: the key is cut out of the certificate's
DER by :func:`spki_der` (a few lines of TLV walking over fields every certificate has).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import ssl
from dataclasses import dataclass
from typing import Any

from edge_sdk.errors import TlsError

__all__ = ["PinnedHTTPSConnection", "TlsConfig", "pem_pin", "spki_der", "spki_sha256"]


def _parse_pin(pin: str) -> bytes:
    text = pin.strip()
    if text.startswith("sha256/"):  # OkHttp's spelling
        text = text[len("sha256/") :]
    try:
        digest = bytes.fromhex(text) if len(text) == 64 else base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        digest = b""
    if len(digest) != 32:
        raise ValueError(f"pin_sha256 must be a SHA-256 digest in hex or base64, got {pin!r}")
    return digest


@dataclass(frozen=True)
class TlsConfig:
    """``ca_file``: PEM bundle to trust instead of the system's CAs; ``pin_sha256``: the
    server's public-key pin (hex, base64 or ``sha256/<base64>``)."""

    ca_file: str | None = None
    pin_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.pin_sha256 is not None:
            _parse_pin(self.pin_sha256)

    @property
    def pin(self) -> bytes | None:
        return None if self.pin_sha256 is None else _parse_pin(self.pin_sha256)

    def context(self) -> ssl.SSLContext:
        """A client context that verifies the chain and the host name (TLS 1.2 at least)."""
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as e:
            raise TlsError(f"cannot load CA bundle {self.ca_file}: {e}") from e
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """``(tag, start of contents, end of contents)`` of the DER element at ``at``."""
    if at + 2 > len(der):
        raise ValueError("truncated DER")
    tag, first = der[at], der[at + 1]
    at += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or at + n > len(der):
            raise ValueError("unsupported DER length")
        length = int.from_bytes(der[at : at + n], "big")
        at += n
    if at + length > len(der):
        raise ValueError("truncated DER")
    return tag, at, at + length


def spki_der(certificate_der: bytes) -> bytes:
    """The SubjectPublicKeyInfo element (DER) of an X.509 certificate (RFC 5280 4.1):
    Certificate = SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber,
    signature, issuer, validity, subject, subjectPublicKeyInfo, ... }, ... }."""
    _, cert, _ = _tlv(certificate_der, 0)
    _, at, _ = _tlv(certificate_der, cert)  # into tbsCertificate
    if certificate_der[at] == 0xA0:  # explicit version tag
        at = _tlv(certificate_der, at)[2]
    for _ in range(5):  # serialNumber, signature, issuer, validity, subject
        at = _tlv(certificate_der, at)[2]
    tag, _, end = _tlv(certificate_der, at)
    if tag != 0x30:
        raise ValueError("no SubjectPublicKeyInfo where RFC 5280 puts it")
    return certificate_der[at:end]


def spki_sha256(certificate_der: bytes) -> bytes:
    """The public-key pin of a certificate: SHA-256 of its DER SubjectPublicKeyInfo."""
    return hashlib.sha256(spki_der(certificate_der)).digest()


def pem_pin(pem: str) -> str:
    """The pin (base64, as ``TlsConfig.pin_sha256`` takes it) of the first certificate in a
    PEM text: what an operator hands to devices."""
    begin = pem.find("-----BEGIN CERTIFICATE-----")
    end = pem.find("-----END CERTIFICATE-----", begin)
    if begin < 0 or end < 0:
        raise ValueError("no PEM certificate found")
    der = ssl.PEM_cert_to_DER_cert(pem[begin : end + len("-----END CERTIFICATE-----")])
    return base64.b64encode(spki_sha256(der)).decode()


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection that, once the handshake has verified the chain, also checks the
    server's public key against a pin, and closes the socket before sending anything if it
    does not match."""

    def __init__(self, host: str, port: int | None, *, pin: bytes, **kwargs: Any) -> None:
        super().__init__(host, port, **kwargs)
        self._pin = pin

    def connect(self) -> None:
        super().connect()
        der = self.sock.getpeercert(binary_form=True)
        try:
            seen = spki_sha256(der) if der else b""
        except ValueError:
            seen = b""
        if seen != self._pin:
            self.close()
            raise TlsError(
                f"the server's public key does not match the pinned one (pinned "
                f"{base64.b64encode(self._pin).decode()}, got "
                f"{base64.b64encode(seen).decode() if seen else 'none'})"
            )
