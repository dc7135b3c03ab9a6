"""Fixtures for the secure-aggregation tests: codecs, reproducible pair secrets and updates.

Helpers are handed out as fixtures (not imported) so the tests work under any pytest import mode.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable

import numpy as np
import pytest

from fedtune.secagg import Tensors, UpdateCodec, make_codec


def _otp_codec(bits: int = 64, generator: str = "chacha20", method: str = "sha512", **key_exchange) -> UpdateCodec:
    otp = {
        "key_bitlength": bits,
        "key_exchange": key_exchange or {"curve": "x25519"},
        "csprng": {"name": generator, "method": method},
    }
    return make_codec({"otp": otp})


def _pair_secrets(parties: list[str], salt: str = "") -> dict[str, dict[str, bytes]]:
    """Deterministic pair secrets (standing in for key agreement), so statistical tests are reproducible."""
    secrets: dict[str, dict[str, bytes]] = {p: {} for p in parties}
    for i, a in enumerate(parties):
        for b in parties[i + 1 :]:
            secret = hashlib.sha512(f"pair {a} {b} {salt}".encode()).digest()
            secrets[a][b] = secrets[b][a] = secret
    return secrets


def _random_update(rng: np.random.Generator, shapes: dict[str, tuple[int, ...]], scale: float = 0.01) -> Tensors:
    return {name: (rng.standard_normal(shape) * scale).astype(np.float32) for name, shape in shapes.items()}


@pytest.fixture
def otp_codec() -> Callable[..., UpdateCodec]:
    return _otp_codec


@pytest.fixture
def pair_secrets() -> Callable[..., dict[str, dict[str, bytes]]]:
    return _pair_secrets


@pytest.fixture
def random_update() -> Callable[..., Tensors]:
    return _random_update


@pytest.fixture
def protect_all() -> Callable[..., dict[str, Tensors]]:
    """Every party's protected update for one round, each masked with its secrets for the others."""

    def run(codec: UpdateCodec, updates: dict[str, Tensors], job_id: str = "job", round_: int = 0, secrets=None):
        secrets = secrets or _pair_secrets(list(updates))
        return {
            party: codec.protect(update, party=party, secrets=secrets[party], job_id=job_id, round_=round_)
            for party, update in updates.items()
        }

    return run


def _worst_byte_chi_square(words: np.ndarray) -> tuple[float, float]:
    """The largest chi-square statistic over the byte histograms of each byte position of 64-bit words,
    and the critical value a uniform source exceeds with probability 1e-4 (Wilson-Hilferty; z = 3.719)."""
    as_bytes = np.ascontiguousarray(words, dtype=np.uint64).view(np.uint8).reshape(-1, 8)
    stats = []
    for position in range(8):
        counts = np.bincount(as_bytes[:, position], minlength=256)
        expected = len(as_bytes) / 256
        stats.append(float(((counts - expected) ** 2 / expected).sum()))
    dof, z = 255, 3.719
    return max(stats), dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.fixture
def byte_chi_square() -> Callable[[np.ndarray], tuple[float, float]]:
    return _worst_byte_chi_square


def _miller_rabin(n: int, rounds: int, rng: random.Random) -> bool:
    """False if `n` is certainly composite; True if it passed `rounds` Miller-Rabin rounds."""
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(rounds):
        x = pow(rng.randrange(2, n - 2), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


@pytest.fixture
def miller_rabin() -> Callable[[int, int, random.Random], bool]:
    return _miller_rabin
