"""Shamir secret sharing over the prime field GF(2^255 - 19).

A secret s is the constant term of a random polynomial f of degree t-1; party i holds the share
(x_i, f(x_i)) with x_i = 1, 2, ... Any t shares give f(0) = s by Lagrange interpolation, and any
t-1 shares are consistent with every possible secret, so they tell nothing about it.

Secrets and shares travel as 32-byte big-endian field elements.
"""

from __future__ import annotations

import secrets as _random
from collections.abc import Mapping, Sequence

from .common import SecAggError

PRIME = 2**255 - 19
ELEMENT_BYTES = 32


def to_bytes(value: int) -> bytes:
    return value.to_bytes(ELEMENT_BYTES, "big")


def from_bytes(raw: bytes, what: str) -> int:
    if not isinstance(raw, bytes) or len(raw) != ELEMENT_BYTES:
        raise SecAggError(f"{what}: a share or secret is {ELEMENT_BYTES} bytes, got {len(raw) if raw else 0}")
    value = int.from_bytes(raw, "big")
    if value >= PRIME:
        raise SecAggError(f"{what}: not an element of the field (>= 2^255 - 19)")
    return value


def split(secret: int, xs: Sequence[int], threshold: int, coefficients: Sequence[int] | None = None) -> dict[int, int]:
    """Shares f(x) for each x in `xs`, any `threshold` of which reconstruct `secret`.

    `coefficients` (threshold - 1 field elements, the polynomial's non-constant terms) make the
    shares reproducible; without them they are drawn at random.
    """
    if not 1 <= threshold <= len(xs):
        raise SecAggError(f"threshold {threshold} must lie between 1 and the {len(xs)} share holders")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise SecAggError("share points must be distinct non-zero field elements")
    if not 0 <= secret < PRIME:
        raise SecAggError("the secret must be a field element")
    if coefficients is None:
        coefficients = [_random.randbelow(PRIME) for _ in range(threshold - 1)]
    if len(coefficients) != threshold - 1:
        raise SecAggError(f"a threshold of {threshold} takes {threshold - 1} coefficients, got {len(coefficients)}")
    polynomial = [secret, *coefficients]
    shares = {}
    for x in xs:
        value = 0
        for c in reversed(polynomial):  # Horner
            value = (value * x + c) % PRIME
        shares[x] = value
    return shares


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """The weights λ_i with f(0) = Σ λ_i f(x_i) for any polynomial of degree < len(xs)."""
    weights = []
    for i, xi in enumerate(xs):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        weights.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return weights


def interpolate_at_zero(shares: Mapping[int, int]) -> int:
    """The constant term of the lowest-degree polynomial through `shares`, whatever their number."""
    xs = sorted(shares)
    return sum(w * shares[x] for w, x in zip(lagrange_at_zero(xs), xs)) % PRIME


def reconstruct(shares: Mapping[int, int], threshold: int, what: str) -> int:
    """The secret from `threshold` of the shares (the lowest points); fewer is an error naming `what`."""
    if len(shares) < threshold:
        raise SecAggError(f"{what}: {len(shares)} shares cannot reconstruct a secret shared with threshold {threshold}")
    chosen = sorted(shares)[:threshold]
    return interpolate_at_zero({x: shares[x] for x in chosen})
