"""Pairwise key agreement: both sides derive one secret; bad public values are refused by peer name."""

from __future__ import annotations

import pytest

from fedtune.secagg import SecAggError, make_codec, make_key_agreement
from fedtune.secagg.groups import GROUP_BITS, ffdhe_group
from fedtune.spec import KeyExchange


def _agree(agreement) -> tuple[bytes, bytes, bytes, bytes]:
    alice, bob = agreement.new_private_key(), agreement.new_private_key()
    alice_pub, bob_pub = agreement.public_key(alice), agreement.public_key(bob)
    return alice, bob, agreement.shared_secret(alice, bob_pub, "bob"), agreement.shared_secret(bob, alice_pub, "alice")


@pytest.mark.parametrize("bits", GROUP_BITS)
def test_ffdhe_short_exponents_agree(bits: int) -> None:
    agreement = make_key_agreement(KeyExchange(key_bitlength=bits, optimized=True))
    alice, _, secret_a, secret_b = _agree(agreement)
    assert secret_a == secret_b and len(secret_a) == bits // 8
    e = ffdhe_group(bits).short_exponent_bits
    assert 2 ** (e - 1) <= int.from_bytes(alice, "big") <= 2**e


def test_ffdhe_full_exponents_agree() -> None:
    agreement = make_key_agreement(KeyExchange(key_bitlength=2048, optimized=False))
    group = ffdhe_group(2048)
    exponents = [int.from_bytes(agreement.new_private_key(), "big") for _ in range(8)]
    assert all(2 ** (group.short_exponent_bits - 1) <= x <= group.p - 2 for x in exponents)
    assert max(exponents).bit_length() > 2000  # drawn from the whole range, not the short one
    _, _, secret_a, secret_b = _agree(agreement)
    assert secret_a == secret_b


def test_x25519_agrees() -> None:
    agreement = make_key_agreement(KeyExchange(curve="x25519"))
    _, _, secret_a, secret_b = _agree(agreement)
    assert secret_a == secret_b and len(secret_a) == 32


@pytest.mark.parametrize("curve", [None, "x25519"])
def test_a_persisted_private_key_reproduces_the_secret(curve: str | None) -> None:
    codec = make_codec({"otp": {"key_exchange": {"key_bitlength": 2048, "curve": curve}}})
    private, peer = codec.new_private_key(), codec.new_private_key()
    restored = bytes(bytearray(private))  # what a restarted party reads back from its store
    peer_public = codec.public_key(peer)
    assert codec.shared_secret(restored, peer_public, "p") == codec.shared_secret(private, peer_public, "p")
    assert codec.public_key(restored) == codec.public_key(private)


@pytest.mark.parametrize("value", ["0", "1", "p-1", "p", "2^2048-1"])
def test_ffdhe_public_value_out_of_range_names_the_peer(value: str) -> None:
    agreement = make_key_agreement(KeyExchange(key_bitlength=2048))
    p = ffdhe_group(2048).p
    y = {"0": 0, "1": 1, "p-1": p - 1, "p": p, "2^2048-1": 2**2048 - 1}[value]
    with pytest.raises(SecAggError, match=r"public key of peer `node-2` is out of range.*1 < y < p-1"):
        agreement.shared_secret(agreement.new_private_key(), y.to_bytes(256, "big"), "node-2")


def test_public_values_of_the_wrong_size_or_kind_name_the_peer() -> None:
    ffdhe = make_key_agreement(KeyExchange(key_bitlength=3072))
    with pytest.raises(SecAggError, match=r"peer `node-2`.*is 256 bytes, expected 384"):
        ffdhe.shared_secret(ffdhe.new_private_key(), (5).to_bytes(256, "big"), "node-2")
    with pytest.raises(SecAggError, match=r"peer `node-2`.*expected bytes"):
        ffdhe.shared_secret(ffdhe.new_private_key(), "abc", "node-2")
    x25519 = make_key_agreement(KeyExchange(curve="x25519"))
    with pytest.raises(SecAggError, match=r"peer `node-3`.*low-order"):
        x25519.shared_secret(x25519.new_private_key(), bytes(32), "node-3")
    with pytest.raises(SecAggError, match=r"peer `node-3`.*is 31 bytes, expected 32"):
        x25519.shared_secret(x25519.new_private_key(), bytes(31), "node-3")


def test_a_private_key_of_another_configuration_is_refused() -> None:
    ffdhe = make_key_agreement(KeyExchange(key_bitlength=2048))
    x25519 = make_key_agreement(KeyExchange(curve="x25519"))
    with pytest.raises(SecAggError, match="ffdhe2048 private key: is 32 bytes, expected 256"):
        ffdhe.public_key(x25519.new_private_key())
    with pytest.raises(SecAggError, match="x25519 private key: is 256 bytes, expected 32"):
        x25519.public_key(ffdhe.new_private_key())
    with pytest.raises(SecAggError, match="out of range"):
        ffdhe.public_key(bytes(256))


def test_plain_exchanges_no_keys() -> None:
    codec = make_codec({"plain": {}})
    assert not codec.needs_keys
    with pytest.raises(SecAggError, match="no keys"):
        codec.new_private_key()
