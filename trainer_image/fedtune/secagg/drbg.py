"""NIST SP 800-90A rev. 1 HMAC_DRBG (section 10.1.2), SHA-256 or SHA-512, without prediction resistance.

Checked against the NIST CAVP vectors in tests/secagg/data/. The HMAC is computed from
precomputed inner and outer hash states (the key is fixed for a whole Generate call), which
halves the hash work of a plain `hmac.digest` per block; output is identical.
"""

from __future__ import annotations

import hashlib
from typing import Any

from .common import SecAggError

# SP 800-90A table 2: at most 2^19 bits per request and 2^48 requests between reseeds.
MAX_REQUEST_BYTES = 1 << 16
RESEED_INTERVAL = 1 << 48
HASHES = ("sha256", "sha512")


class _Hmac:
    """HMAC (RFC 2104) under one key, reusing the hash states after the padded key block."""

    def __init__(self, method: str, key: bytes) -> None:
        block = hashlib.new(method).block_size
        if len(key) > block:
            key = hashlib.new(method, key).digest()
        key = key.ljust(block, b"\0")
        self.inner: Any = hashlib.new(method, bytes(b ^ 0x36 for b in key))
        self.outer: Any = hashlib.new(method, bytes(b ^ 0x5C for b in key))

    def __call__(self, *parts: bytes) -> bytes:
        inner = self.inner.copy()
        for part in parts:
            inner.update(part)
        outer = self.outer.copy()
        outer.update(inner.digest())
        return outer.digest()


class HmacDrbg:
    """HMAC_DRBG state (Key, V, reseed_counter) instantiated from entropy, nonce and personalisation."""

    def __init__(self, method: str, entropy: bytes, nonce: bytes = b"", personalization: bytes = b"") -> None:
        if method not in HASHES:
            raise SecAggError(f"encryption.otp.csprng.method: HMAC_DRBG supports {', '.join(HASHES)}, not `{method}`")
        self.method = method
        self.outlen = hashlib.new(method).digest_size
        # Security strength is 256 bits for both hashes; the entropy input must carry at least that much.
        if len(entropy) < 32:
            raise SecAggError(f"HMAC_DRBG needs at least 32 bytes of entropy input, got {len(entropy)}")
        self._key = b"\0" * self.outlen
        self._v = b"\1" * self.outlen
        self._mac = _Hmac(method, self._key)
        self._update(entropy + nonce + personalization)
        self._reseed_counter = 1

    def _update(self, provided: bytes) -> None:
        """HMAC_DRBG_Update (10.1.2.2)."""
        self._key = self._mac(self._v, b"\0", provided)
        self._mac = _Hmac(self.method, self._key)
        self._v = self._mac(self._v)
        if provided:
            self._key = self._mac(self._v, b"\1", provided)
            self._mac = _Hmac(self.method, self._key)
            self._v = self._mac(self._v)

    def generate(self, n_bytes: int, additional_input: bytes = b"") -> bytes:
        """HMAC_DRBG_Generate (10.1.2.5): `n_bytes` <= 2^16 pseudorandom bytes."""
        if not 0 <= n_bytes <= MAX_REQUEST_BYTES:
            raise SecAggError(f"HMAC_DRBG request of {n_bytes} bytes; at most {MAX_REQUEST_BYTES} per call")
        if self._reseed_counter > RESEED_INTERVAL:
            raise SecAggError("HMAC_DRBG reached its reseed interval (2^48 requests)")
        if additional_input:
            self._update(additional_input)
        # The hot loop of mask generation: V = HMAC(Key, V), with the HMAC inlined.
        inner, outer, v, blocks = self._mac.inner, self._mac.outer, self._v, []
        for _ in range(-(-n_bytes // self.outlen)):
            h = inner.copy()
            h.update(v)
            o = outer.copy()
            o.update(h.digest())
            v = o.digest()
            blocks.append(v)
        self._v = v
        self._update(additional_input)
        self._reseed_counter += 1
        return b"".join(blocks)[:n_bytes]
