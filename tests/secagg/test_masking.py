"""Pairwise masks: they cancel exactly, they are reproducible, and a masked update looks uniform."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.secagg import make_codec
from fedtune.secagg.drbg import MAX_REQUEST_BYTES, HmacDrbg
from fedtune.secagg.ring import add_into
from fedtune.secagg.streams import ChaCha20Generator, HmacDrbgGenerator, mask_info

GENERATORS = ("hmac_drbg", "chacha20")
BITS = (64, 128)
# A scalar, a matrix, and a vector spanning several mask chunks (codec.CHUNK_WORDS = 8192).
SHAPES = {"scalar": (), "lora_A": (3, 5), "lora_B": (20_001,)}


def _ring_sum(tensors: list[np.ndarray], limbs: int) -> np.ndarray:
    total = np.array(tensors[0], dtype=np.uint64).reshape(limbs, -1)
    for t in tensors[1:]:
        add_into(total, t.reshape(limbs, -1))
    return total


@pytest.mark.parametrize("n_parties", [2, 3, 8])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("generator", GENERATORS)
def test_masks_cancel_exactly(generator, bits, n_parties, otp_codec, random_update, protect_all) -> None:
    codec = otp_codec(bits, generator)
    rng = np.random.default_rng(n_parties)
    updates = {f"node-{i}": random_update(rng, SHAPES) for i in range(n_parties)}
    protected = protect_all(codec, updates)
    plain = {party: codec.encode_plain(update) for party, update in updates.items()}
    limbs = bits // 64
    for name in SHAPES:
        masked_sum = _ring_sum([p[name] for p in protected.values()], limbs)
        assert np.array_equal(masked_sum, _ring_sum([p[name] for p in plain.values()], limbs)), name
        if name == "lora_B":  # and every single masked update differs from its encoding almost everywhere
            for party in updates:
                assert np.mean(protected[party][name] == plain[party][name]) < 1e-3
    unmasked = codec.combine(plain, {})
    assert all(np.array_equal(values, unmasked[name]) for name, values in codec.combine(protected, {}).items())


@pytest.mark.parametrize("generator", GENERATORS)
def test_masks_are_a_function_of_secret_job_round_and_tensor(generator, otp_codec, pair_secrets, random_update) -> None:
    rng = np.random.default_rng(0)
    update = random_update(rng, {"a": (64,), "b": (64,)})
    secrets = pair_secrets(["x", "y", "z"])["x"]

    def protect(codec, update=update, job_id="job", round_=3, secrets=secrets):
        return codec.protect(update, party="x", secrets=secrets, job_id=job_id, round_=round_)

    first = protect(otp_codec(64, generator))
    restarted = protect(otp_codec(64, generator))  # a fresh codec, as after a restart: the same masks
    assert all(np.array_equal(first[k], restarted[k]) for k in update)
    # a tensor's mask depends on its name only, not on the other tensors or their order
    alone = protect(otp_codec(64, generator), update={"b": update["b"]})
    assert np.array_equal(alone["b"], first["b"])
    for changed in (
        protect(otp_codec(64, generator), round_=4),
        protect(otp_codec(64, generator), job_id="other-job"),
        protect(otp_codec(64, generator), secrets=pair_secrets(["x", "y", "z"], salt="new keys")["x"]),
    ):
        assert all(np.mean(changed[k] == first[k]) < 0.05 for k in update)
    renamed = protect(otp_codec(64, generator), update={"c": update["a"]})
    assert np.mean(renamed["c"] == first["a"]) < 0.05


def test_hmac_drbg_stream_is_consecutive_max_size_requests_whatever_the_reads() -> None:
    secret, info = bytes(range(64)), mask_info("job", 2, "w", 0)
    drbg = HmacDrbg("sha512", secret, b"", info)
    expected = b"".join(drbg.generate(MAX_REQUEST_BYTES) for _ in range(3))
    for sizes in ([len(expected)], [8, 65_528, 8, 65_536, 4, 65_524], [100_000, 96_608]):
        stream, out = HmacDrbgGenerator("sha512").stream(secret, info), bytearray()
        for size in sizes:
            buf = bytearray(size)
            stream.read_into(memoryview(buf))
            out += buf
        assert bytes(out) == expected


def test_chacha20_stream_is_the_keystream_under_an_hkdf_key() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    secret, info = bytes(range(32)), mask_info("job", 0, "w", 1)
    key = HKDF(hashes.SHA256(), 32, None, b"chacha20 mask key|" + info).derive(secret)
    expected = Cipher(algorithms.ChaCha20(key, bytes(16)), None).encryptor().update(bytes(200_000))
    stream, parts = ChaCha20Generator().stream(secret, info), []
    for size in (64, 1, 131_071, 68_864):
        buf = bytearray(size)
        stream.read_into(memoryview(buf))
        parts.append(bytes(buf))
    assert b"".join(parts) == expected


def test_mask_info_is_unambiguous() -> None:
    assert mask_info("a", 1, "bc", 0) != mask_info("ab", 1, "c", 0)
    assert mask_info("a", 11, "b", 0) != mask_info("a", 1, "1b", 0)


# --- a masked update on its own is indistinguishable from uniform ------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("generator", GENERATORS)
def test_a_masked_update_looks_uniform_and_its_encoding_does_not(
    generator, bits, otp_codec, random_update, protect_all, byte_chi_square
) -> None:
    codec = otp_codec(bits, generator)
    rng = np.random.default_rng(7)
    updates = {name: random_update(rng, {"w": (65_536,)}) for name in ("node-1", "node-2")}
    masked = protect_all(codec, updates)["node-1"]["w"]
    encoded = codec.encode_plain(updates["node-1"])["w"]
    # each byte position of each 64-bit limb (65,536 samples per histogram, 256 expected per bin)
    for limb in masked.reshape(bits // 64, -1):
        statistic, critical = byte_chi_square(limb)
        assert statistic < critical
    # the same test flags the unmasked fixed-point encoding at once
    statistic, critical = byte_chi_square(encoded.reshape(bits // 64, -1)[0])
    assert statistic > 100 * critical


def test_one_label_trainer_alone_is_not_masked_and_says_so(otp_codec, random_update, caplog) -> None:
    codec = otp_codec(64, "chacha20")
    update = random_update(np.random.default_rng(0), {"w": (10,)})
    with caplog.at_level("WARNING", logger="fedtune.secagg"):
        protected = codec.protect(update, party="solo", secrets={}, job_id="j", round_=0)
    assert np.array_equal(protected["w"], codec.encode_plain(update)["w"])
    assert "party `solo` has no peer label_trainer" in caplog.text
    assert make_codec({"plain": {}}).scheme == "plain"
