"""Key agreement, authenticated encryption of shares, and the mask stream.

Every primitive comes from ``cryptography``: X25519 for agreement, HKDF-SHA256 to turn a
shared point into a key (with a label per use, so the share-encryption key and the mask seed
of one pair of devices never coincide), AES-256-GCM for the shares, and AES-256-CTR as the
pseudo-random generator that expands a 32-byte seed into a mask of any length.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "CryptoError",
    "KeyPair",
    "agree",
    "decrypt",
    "encrypt",
    "mask_stream",
]

KEY_BYTES = 32
NONCE_BYTES = 12
LABEL_SHARES = b"fedge/secagg/v1/share-key"
LABEL_MASK = b"fedge/secagg/v1/pair-mask"
LABEL_STREAM = b"fedge/secagg/v1/mask-stream"


class CryptoError(ValueError):
    """A key of the wrong size, or a ciphertext that does not authenticate."""


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair as raw 32-byte strings."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        sk = X25519PrivateKey.generate()
        raw = serialization.Encoding.Raw
        private = sk.private_bytes(
            raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return cls(private, sk.public_key().public_bytes(raw, serialization.PublicFormat.Raw))


def _hkdf(material: bytes, label: bytes, context: bytes) -> bytes:
    kdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=label + context)
    return kdf.derive(material)


def agree(private: bytes, peer_public: bytes, label: bytes, context: bytes = b"") -> bytes:
    """A 32-byte key both ends derive from their X25519 agreement, bound to ``label+context``."""
    if len(private) != KEY_BYTES or len(peer_public) != KEY_BYTES:
        raise CryptoError("X25519 keys are 32 bytes")
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as e:  # an all-zero (low-order) shared point
        raise CryptoError(f"key agreement failed: {e}") from e
    return _hkdf(shared, label, context)


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """``nonce || AES-GCM(plaintext)``; ``aad`` binds the ciphertext to its sender and stage."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    if len(ciphertext) < NONCE_BYTES + 16:
        raise CryptoError("ciphertext too short")
    try:
        return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], aad)
    except InvalidTag as e:
        raise CryptoError("ciphertext does not authenticate") from e


def mask_stream(seed: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` uniform elements of Z/2**bits (as uint64) from AES-256-CTR keyed by ``seed``."""
    if len(seed) != KEY_BYTES:
        raise CryptoError("a mask seed is 32 bytes")
    if not 1 <= bits <= 64:
        raise CryptoError("ring bits must be in [1, 64]")
    key = _hkdf(seed, LABEL_STREAM, b"")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    raw = encryptor.update(bytes(8 * length)) + encryptor.finalize()
    words = np.frombuffer(raw, dtype="<u8").astype(np.uint64)
    if bits < 64:
        words &= np.uint64((1 << bits) - 1)
    return words
