"""Shamir sharing: any t shares give the secret, t-1 shares give nothing."""

from __future__ import annotations

import itertools
import random

import pytest

from fedtune.secagg import SecAggError
from fedtune.secagg.shamir import PRIME, interpolate_at_zero, lagrange_at_zero, reconstruct, split


def test_the_field_is_prime(miller_rabin) -> None:
    assert miller_rabin(PRIME, 32, random.Random(0))
    assert not miller_rabin(PRIME + 2, 32, random.Random(0))  # the test itself can say no


@pytest.mark.parametrize(("n", "t"), [(1, 1), (3, 2), (4, 3), (5, 3), (7, 4)])
def test_every_set_of_t_shares_reconstructs_and_t_minus_1_does_not(n: int, t: int) -> None:
    rng = random.Random(n * 10 + t)
    secret = rng.randrange(PRIME)
    shares = split(secret, list(range(1, n + 1)), t)
    for subset in itertools.combinations(shares, t):
        assert reconstruct({x: shares[x] for x in subset}, t, "s") == secret
    if t > 1:
        for subset in itertools.combinations(shares, t - 1):
            few = {x: shares[x] for x in subset}
            assert interpolate_at_zero(few) != secret  # interpolating too few points gives another value
            with pytest.raises(SecAggError, match=rf"s: {t - 1} shares cannot reconstruct .* threshold {t}"):
                reconstruct(few, t, "s")


def _coefficients_through(points: dict[int, int]) -> list[int]:
    """The coefficients (constant first) of the polynomial of degree < len(points) through `points`."""
    xs = sorted(points)
    coefficients = [0] * len(xs)
    for i, xi in enumerate(xs):
        basis, denominator = [1], 1  # the Lagrange basis polynomial for xi, built up factor by factor
        for j, xj in enumerate(xs):
            if i != j:
                basis = [(a - xj * b) % PRIME for a, b in zip([0, *basis], [*basis, 0])]
                denominator = denominator * (xi - xj) % PRIME
        scale = points[xi] * pow(denominator, -1, PRIME) % PRIME
        coefficients = [(c + scale * b) % PRIME for c, b in zip(coefficients, basis)]
    return coefficients


@pytest.mark.parametrize(("n", "t"), [(4, 3), (7, 4)])
def test_t_minus_1_shares_are_as_likely_under_any_secret(n: int, t: int) -> None:
    """Perfect secrecy: for every candidate secret there is exactly one polynomial that gives the same t-1 shares."""
    rng = random.Random(t)
    secret = rng.randrange(PRIME)
    shares = split(secret, list(range(1, n + 1)), t)
    seen = {x: shares[x] for x in list(shares)[: t - 1]}
    for candidate in [0, 1, secret + 1, rng.randrange(PRIME)]:
        coefficients = _coefficients_through({0: candidate % PRIME, **seen})
        assert coefficients[0] == candidate % PRIME
        other = split(candidate % PRIME, list(range(1, n + 1)), t, coefficients[1:])
        assert {x: other[x] for x in seen} == seen
        assert other != shares  # the shares not seen tell the secrets apart


def test_lagrange_weights_sum_to_one() -> None:
    # f = 1 is a polynomial of every degree: its value at 0 is the sum of the weights.
    assert sum(lagrange_at_zero([2, 5, 9, 11])) % PRIME == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"xs": [1, 2], "threshold": 3}, "threshold 3 must lie between 1 and the 2 share holders"),
        ({"xs": [1, 1, 2], "threshold": 2}, "distinct non-zero"),
        ({"xs": [0, 1], "threshold": 2}, "distinct non-zero"),
        ({"xs": [1, 2], "threshold": 2, "coefficients": [1, 2]}, "takes 1 coefficients, got 2"),
        ({"xs": [1, 2], "threshold": 2, "secret": PRIME}, "field element"),
    ],
)
def test_bad_sharing_parameters_are_refused(kwargs: dict, message: str) -> None:
    kwargs.setdefault("secret", 5)
    with pytest.raises(SecAggError, match=message):
        split(**kwargs)
