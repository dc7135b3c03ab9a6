"""Mask streams: deterministic pseudorandom bytes from a pair's shared secret and a context.

The context (`mask_info`) names the job, the round, the tensor and the 64-bit limb, so both
parties of a pair derive the same stream for the same tensor in the same round, a restarted
party derives it again, and no two tensors, rounds or jobs ever share a stream.

- `hmac_drbg` (the reference's generator): NIST SP 800-90A HMAC_DRBG instantiated with the
  shared secret as entropy input, an empty nonce and `mask_info` as personalisation string. The
  stream is the concatenation of 2^16-byte Generate calls, so it does not depend on how a
  reader chunks it.
- `chacha20`: the ChaCha20 keystream (RFC 8439 block function, 32-bit counter from 0, zero
  nonce) under a key derived with HKDF-SHA256 from the shared secret, `mask_info` as info.
  A key is never reused for another context, so the fixed nonce is safe.
"""

from __future__ import annotations

import struct
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .common import SecAggError
from .drbg import MAX_REQUEST_BYTES, HmacDrbg

_DOMAIN = b"fedtune/secagg/v1"
_ZEROS = bytes(1 << 16)  # plaintext for the keystream: ChaCha20 of zeros is the keystream itself
# ChaCha20 with a 32-bit block counter: 2^32 blocks of 64 bytes per key.
_CHACHA_MAX_BYTES = (1 << 32) * 64


def mask_info(job_id: str | bytes, round_: int, tensor: str, limb: int) -> bytes:
    """An unambiguous encoding of the mask context: length-prefixed fields (`job_id`: a name, or a run's
    opaque context as bytes)."""
    job = job_id if isinstance(job_id, bytes) else job_id.encode()
    fields = [_DOMAIN, job, str(round_).encode(), tensor.encode(), str(limb).encode()]
    return b"".join(struct.pack(">I", len(f)) + f for f in fields)


class MaskStream(Protocol):
    def read_into(self, out: memoryview) -> None:
        """Fill `out` (a writable byte buffer) with the next len(out) bytes of the stream."""
        ...


class MaskGenerator(Protocol):
    name: str

    def stream(self, secret: bytes, info: bytes) -> MaskStream: ...


class _DrbgStream:
    def __init__(self, drbg: HmacDrbg) -> None:
        self._drbg = drbg
        self._buffer = b""
        self._offset = 0

    def read_into(self, out: memoryview) -> None:
        filled = 0
        while filled < len(out):
            if self._offset == len(self._buffer):
                self._buffer, self._offset = self._drbg.generate(MAX_REQUEST_BYTES), 0
            take = min(len(out) - filled, len(self._buffer) - self._offset)
            out[filled : filled + take] = self._buffer[self._offset : self._offset + take]
            filled += take
            self._offset += take


class HmacDrbgGenerator:
    name = "hmac_drbg"

    def __init__(self, method: str) -> None:
        self.method = method
        HmacDrbg(method, bytes(32))  # fail at configuration time on an unsupported hash

    def stream(self, secret: bytes, info: bytes) -> MaskStream:
        return _DrbgStream(HmacDrbg(self.method, secret, b"", info))


class _ChaChaStream:
    def __init__(self, key: bytes) -> None:
        # cryptography's 16-byte ChaCha20 "nonce" is the 32-bit little-endian counter, then the 96-bit nonce.
        self._encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
        self._produced = 0

    def read_into(self, out: memoryview) -> None:
        self._produced += len(out)
        if self._produced > _CHACHA_MAX_BYTES:
            raise SecAggError("a ChaCha20 mask stream is limited to 256 GiB per tensor")
        for start in range(0, len(out), len(_ZEROS)):
            piece = out[start : start + len(_ZEROS)]
            self._encryptor.update_into(_ZEROS[: len(piece)], piece)


class ChaCha20Generator:
    name = "chacha20"

    def stream(self, secret: bytes, info: bytes) -> MaskStream:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"chacha20 mask key|" + info).derive(secret)
        return _ChaChaStream(key)


GENERATORS = ("hmac_drbg", "chacha20")


def make_generator(name: str, method: str) -> MaskGenerator:
    """The generator named by the spec's `encryption.otp.csprng` (`method` applies to hmac_drbg)."""
    if name == "hmac_drbg":
        return HmacDrbgGenerator(method)
    if name == "chacha20":
        return ChaCha20Generator()
    raise SecAggError(f"encryption.otp.csprng.name: unknown generator `{name}` (have {', '.join(GENERATORS)})")
