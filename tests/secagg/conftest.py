"""Fixtures for the secure-aggregation tests: codecs, reproducible pair secrets and updates.

Helpers are handed out as fixtures (not imported) so the tests work under any pytest import mode.
"""

from __future__ import annotations

import hashlib
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
