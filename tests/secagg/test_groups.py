"""The ffdhe primes are RFC 7919's: the RFC's hex, its derivation from e, and safe primality."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from fedtune.secagg.groups import GROUP_BITS, ffdhe_group

DATA = Path(__file__).resolve().parent / "data"


def _rfc_groups() -> dict[int, dict[str, int]]:
    text = (DATA / "rfc7919_appendix_a.txt").read_text()
    groups = {}
    for section in re.split(r"\nA\.\d\.\s+", text)[1:]:
        bits = int(re.match(r"ffdhe(\d+)", section).group(1))
        formula = re.search(r"p = 2\^(\d+) - 2\^(\d+) \+ \{\[2\^(\d+) \* e\] \+ (\d+) ?\} \* 2\^64 - 1", section)
        hex_p = re.search(r"representation of p is:\s*\n((?:\s+[0-9A-F ]+\n)+)", section).group(1)
        hex_q = re.search(r"representation of q is:\s*\n((?:\s+[0-9A-F ]+\n)+)", section)
        groups[bits] = {
            "p": int("".join(hex_p.split()), 16),
            "q": int("".join(hex_q.group(1).split()), 16) if hex_q else None,
            "e_shift": int(formula.group(3)),
            "X": int(formula.group(4)),
            "short": int(re.search(r"at least\s+(\d+)\s+bits", section).group(1)),
        }
    return groups


RFC = _rfc_groups()


def _floor_e_times_2_to(shift: int) -> int:
    """[2^shift · e] exactly: e = sum 1/k!, with 64 guard bits against the truncated terms."""
    guard = 64
    total, term, k = 0, 1 << (shift + guard), 0
    while term:
        total += term
        k += 1
        term //= k
    return total >> guard


def test_all_five_groups_are_present() -> None:
    assert set(RFC) == set(GROUP_BITS) == {2048, 3072, 4096, 6144, 8192}


@pytest.mark.parametrize("bits", GROUP_BITS)
def test_prime_matches_the_rfc_text_and_its_derivation_from_e(bits: int) -> None:
    group, rfc = ffdhe_group(bits), RFC[bits]
    assert group.p == rfc["p"]
    assert group.g == 2 and group.bits == bits == group.p.bit_length()
    assert group.short_exponent_bits == rfc["short"]
    # p = 2^b - 2^(b-64) + {[2^(b-130) e] + X} * 2^64 - 1
    assert rfc["e_shift"] == bits - 130
    derived = 2**bits - 2 ** (bits - 64) + (_floor_e_times_2_to(bits - 130) + rfc["X"]) * 2**64 - 1
    assert group.p == derived
    if rfc["q"] is not None:
        assert group.q == rfc["q"]


@pytest.mark.parametrize("bits", GROUP_BITS)
def test_prime_is_safe(bits: int, miller_rabin) -> None:
    group = ffdhe_group(bits)
    rng = random.Random(bits)
    # q = (p-1)/2 passes Miller-Rabin (fewer rounds for the big groups, whose every round costs ~1 s) ...
    assert miller_rabin(group.q, 8 if bits <= 3072 else 2, rng)
    # ... and then p = 2q+1 is prime by Pocklington: 2^(p-1) = 1 mod p, and gcd(2^2 - 1, p) = 1.
    assert pow(2, group.p - 1, group.p) == 1 and group.p % 3 != 0


def test_unknown_group_size_is_an_error() -> None:
    with pytest.raises(KeyError, match="1024"):
        ffdhe_group(1024)
