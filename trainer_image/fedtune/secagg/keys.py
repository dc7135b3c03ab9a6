"""Pairwise key agreement between label_trainers: RFC 7919 finite-field DH or X25519.

Keys travel as bytes: a private key is what a party persists (so a restart derives the same
pair secrets and hence the same masks), a public key is what it publishes, and the shared
secret, big-endian and of the group's full byte length, seeds the mask generator.
"""

from __future__ import annotations

import hashlib
import secrets as _random
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from .common import SecAggError
from .groups import FfdheGroup


class KeyAgreement(Protocol):
    name: str

    def new_private_key(self) -> bytes: ...

    def public_key(self, private_key: bytes) -> bytes: ...

    def shared_secret(self, private_key: bytes, peer_public: bytes, peer: str) -> bytes: ...

    def private_key_from_seed(self, seed: bytes) -> bytes:
        """A private key determined by a 32-byte secret seed (so whoever learns the seed has the key)."""
        ...


def _check_bytes(value: object, length: int, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise SecAggError(f"{what}: expected bytes, got {type(value).__name__}")
    value = bytes(value)
    if len(value) != length:
        raise SecAggError(f"{what}: is {len(value)} bytes, expected {length}")
    return value


class FfdheKeyAgreement:
    """Diffie-Hellman in an RFC 7919 group with generator 2.

    `optimized` draws the private exponent from [2^(e-1), 2^e] with the RFC's short-exponent size
    e (appendix A; section 5.2), otherwise from [2^(e-1), p-2], as the reference does.
    """

    def __init__(self, group: FfdheGroup, optimized: bool) -> None:
        self.group = group
        self.optimized = optimized
        self.name = group.name

    def _exponent_bounds(self) -> tuple[int, int]:
        low = 1 << (self.group.short_exponent_bits - 1)
        high = (1 << self.group.short_exponent_bits) if self.optimized else self.group.p - 2
        return low, high

    def new_private_key(self) -> bytes:
        low, high = self._exponent_bounds()
        exponent = low + _random.randbelow(high - low + 1)
        return exponent.to_bytes(self.group.byte_length, "big")

    def private_key_from_seed(self, seed: bytes) -> bytes:
        # 64 bits more than the range needs make the modular reduction's bias negligible.
        low, high = self._exponent_bounds()
        stream = hashlib.shake_256(b"fedtune ffdhe exponent\0" + _check_bytes(seed, 32, "key seed"))
        draw = int.from_bytes(stream.digest(self.group.byte_length + 8), "big")
        return (low + draw % (high - low + 1)).to_bytes(self.group.byte_length, "big")

    def _exponent(self, private_key: bytes) -> int:
        raw = _check_bytes(private_key, self.group.byte_length, f"{self.name} private key")
        exponent = int.from_bytes(raw, "big")
        if not 1 < exponent < self.group.p - 1:
            raise SecAggError(f"{self.name} private key: exponent out of range (not a key of this group)")
        return exponent

    def public_key(self, private_key: bytes) -> bytes:
        value = pow(self.group.g, self._exponent(private_key), self.group.p)
        return value.to_bytes(self.group.byte_length, "big")

    def shared_secret(self, private_key: bytes, peer_public: bytes, peer: str) -> bytes:
        exponent = self._exponent(private_key)
        raw = _check_bytes(peer_public, self.group.byte_length, f"public key of peer `{peer}` ({self.name})")
        y = int.from_bytes(raw, "big")
        # RFC 7919 section 5.1: 1 < y < p-1 excludes the only small subgroup {1, p-1} of a safe-prime group.
        if not 1 < y < self.group.p - 1:
            raise SecAggError(f"public key of peer `{peer}` is out of range: {self.name} requires 1 < y < p-1")
        return pow(y, exponent, self.group.p).to_bytes(self.group.byte_length, "big")


class X25519KeyAgreement:
    """X25519 (RFC 7748) through `cryptography`; 32-byte keys and secret."""

    name = "x25519"

    def new_private_key(self) -> bytes:
        return X25519PrivateKey.generate().private_bytes_raw()

    def private_key_from_seed(self, seed: bytes) -> bytes:
        return hashlib.sha256(b"fedtune x25519 key\0" + _check_bytes(seed, 32, "key seed")).digest()

    def _private(self, private_key: bytes) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(_check_bytes(private_key, 32, "x25519 private key"))

    def public_key(self, private_key: bytes) -> bytes:
        return self._private(private_key).public_key().public_bytes_raw()

    def shared_secret(self, private_key: bytes, peer_public: bytes, peer: str) -> bytes:
        private = self._private(private_key)
        public = X25519PublicKey.from_public_bytes(
            _check_bytes(peer_public, 32, f"public key of peer `{peer}` (x25519)")
        )
        try:
            return private.exchange(public)
        except ValueError:  # a low-order point: the secret would be all zeros
            raise SecAggError(f"public key of peer `{peer}` is invalid: a low-order x25519 point") from None
