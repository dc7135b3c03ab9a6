"""Codecs end to end on one machine: accuracy of the OTP sum, wire format, configuration and bad input."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import numpy as np
import pytest
from pydantic import ValidationError

from fedtune.secagg import FixedPoint, SecAggError, make_codec
from fedtune.spec import Encryption

SHAPES = {"layer.0.lora_A": (8, 64), "layer.0.lora_B": (96, 8), "prefix": (20, 16)}


def _weighted(rng, random_update, samples: dict[str, int]) -> tuple[dict, dict]:
    """Raw updates of a few parties (adapter deltas of order 1e-2 .. 1) and the runtime's weighted ones."""
    total = sum(samples.values())
    raw = {p: random_update(rng, SHAPES, scale=float(rng.uniform(0.01, 1.0))) for p in samples}
    weighted = {p: {k: (v * np.float32(samples[p] / total)).astype(np.float32) for k, v in raw[p].items()} for p in raw}
    return raw, weighted


@pytest.mark.parametrize("bits", [64, 128])
@pytest.mark.parametrize("generator", ["hmac_drbg", "chacha20"])
def test_otp_sum_of_weighted_updates_matches_the_float_sum(bits, generator, otp_codec, random_update, protect_all):
    """Bound: |otp - exact| <= n · 2^-(bits/2) (truncation, per weight and contribution) + float32 rounding."""
    codec = otp_codec(bits, generator, method="sha256")
    rng = np.random.default_rng(bits)
    samples = {"node-1": 1200, "node-2": 300, "node-3": 4500, "assist": 1000}
    _, weighted = _weighted(rng, random_update, samples)
    label_trainers = {p: u for p, u in weighted.items() if p != "assist"}
    protected = protect_all(codec, label_trainers)
    total = codec.combine(protected, {"assist": codec.encode_plain(weighted["assist"])})
    n = len(samples)
    for name in SHAPES:
        exact = sum(weighted[p][name].astype(np.float64) for p in samples)
        bound = n * 2.0 ** -(bits // 2) + np.abs(exact) * 2.0**-24
        assert total[name].dtype == np.float32 and total[name].shape == SHAPES[name]
        assert np.all(np.abs(total[name] - exact) <= bound), name
    plain = make_codec({"plain": {}})
    plain_total = plain.combine(
        {p: plain.protect(u, party=p, secrets={}, job_id="j", round_=0) for p, u in weighted.items()}, {}
    )
    for name in SHAPES:
        assert np.allclose(total[name], plain_total[name], rtol=2**-22, atol=n * 2.0**-32)


def test_plain_sums_in_float64() -> None:
    codec = make_codec({"plain": {}})
    values = [np.array([1.0], np.float32), np.array([1e-8], np.float32), np.array([-1.0], np.float32)]
    protected = {
        f"p{i}": codec.protect({"w": v}, party=f"p{i}", secrets={}, job_id="j", round_=0) for i, v in enumerate(values)
    }
    assert codec.combine(protected, {})["w"][0] == np.float32(1e-8)  # float32 accumulation would give 0
    assert codec.encode_plain({"w": np.zeros(3, np.float64)})["w"].dtype == np.float32


@pytest.mark.parametrize("bits", [64, 128])
def test_wire_format_is_uint64_and_no_larger_than_the_encoding(bits, otp_codec, random_update, pair_secrets) -> None:
    codec = otp_codec(bits)
    update = random_update(np.random.default_rng(0), SHAPES)
    protected = codec.protect(update, party="a", secrets=pair_secrets(["a", "b"])["a"], job_id="j", round_=0)
    assert list(protected) == list(update)  # key order kept
    for name, array in protected.items():
        assert array.dtype == np.uint64 and array.flags.c_contiguous
        assert array.shape == (SHAPES[name] if bits == 64 else (2, *SHAPES[name]))
        assert array.nbytes == update[name].size * bits // 8


def test_protected_updates_survive_safetensors(otp_codec, random_update, protect_all) -> None:
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    codec = otp_codec(128)
    updates = {p: random_update(np.random.default_rng(i), SHAPES) for i, p in enumerate(["a", "b", "c"])}
    protected = protect_all(codec, updates)
    # safetensors hands tensors back sorted by name; masks are per tensor name, so order does not matter
    received = {p: safetensors_numpy.load(safetensors_numpy.save(t)) for p, t in protected.items()}
    expected = codec.combine(protected, {})
    assert {name: values.tolist() for name, values in codec.combine(received, {}).items()} == {
        name: values.tolist() for name, values in expected.items()
    }


# --- configuration --------------------------------------------------------------------------------


def test_make_codec_follows_the_spec(otp_codec) -> None:
    assert make_codec(Encryption()).scheme == "plain"
    codec = make_codec(Encryption.model_validate({"otp": {}}))  # fedtune's defaults: fast, equally strong
    assert (codec.scheme, codec.needs_keys, codec.fixed.bits) == ("otp", True, 64)
    assert (codec.key_agreement.name, codec.generator.name) == ("x25519", "chacha20")
    # The reference's configuration (as `import-xfl` writes it, or with its keys alone) is the reference's scheme.
    for otp in ({"key_exchange": {"curve": "ffdhe"}, "csprng": {"name": "hmac_drbg"}},
                {"key_exchange": {"key_bitlength": 3072, "optimized": True}, "csprng": {"method": "sha512"}}):
        codec = make_codec(Encryption.model_validate({"otp": otp}))
        assert (codec.key_agreement.name, codec.generator.name, codec.generator.method) == (
            "ffdhe3072", "hmac_drbg", "sha512")
    codec = otp_codec(128, "chacha20", curve="x25519")
    assert (codec.fixed.bits, codec.key_agreement.name, codec.generator.name) == (128, "x25519", "chacha20")


@pytest.mark.parametrize(
    ("otp", "field"),
    [
        ({"csprng": {"name": "mersenne"}}, "otp.csprng.name"),
        ({"csprng": {"name": "hmac_drbg", "method": "sha1"}}, "otp.csprng.method"),
        ({"key_bitlength": 96}, "otp.key_bitlength"),
        ({"key_exchange": {"key_bitlength": 1024}}, "otp.key_exchange.key_bitlength"),
        ({"key_exchange": {"curve": "p256"}}, "otp.key_exchange.curve"),
    ],
)
def test_unknown_generator_or_key_length_is_refused_naming_the_field(otp: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(field)):
        Encryption.model_validate({"otp": otp})
    with pytest.raises(SecAggError, match=re.escape(f"encryption: {field}: ")):
        make_codec({"otp": otp})


@pytest.mark.parametrize("bits", [64, 128])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_encoding_is_exactly_trunc_of_the_scaled_value(bits: int, dtype) -> None:
    """trunc(x · 2^(bits/2)) mod 2^bits, computed with exact rationals, for values across many magnitudes."""
    fixed = FixedPoint(bits)
    rng = np.random.default_rng(bits)
    edge = [0.0, -0.0, 1.0, -1.0, -0.75, 2.0**-40, -(2.0**-60), -(2.0**-64), -3 * 2.0**-65, -1e-30, 32767.5, -32767.5]
    scattered = rng.standard_normal(20_000) * np.exp2(rng.integers(-80, 14, 20_000))  # spans several blocks
    values = np.concatenate([edge, scattered]).astype(dtype)
    encoded = fixed.encode(values, "t")
    for i in [*range(len(edge)), *rng.integers(len(edge), len(values), 500)]:
        word = sum(int(encoded[limb, i]) << (64 * limb) for limb in range(fixed.limbs))
        assert word == math.trunc(Fraction(float(values[i])) * 2 ** (bits // 2)) % 2**bits, values[i]
    # decoding loses at most the truncation and the rounding to float32; at 128 bits a float32 of
    # magnitude >= 2^-40 has no bits below 2^-64 and comes back exactly
    decoded = fixed.decode(encoded, 1, "t")
    assert np.all(np.abs(decoded - values) <= 2.0 ** -(bits // 2) + np.abs(values) * 2.0**-24)
    if bits == 128 and dtype == np.float32:
        representable = np.abs(values) >= 2.0**-40
        assert np.array_equal(decoded[representable], values[representable])


def test_fixed_point_range_and_resolution() -> None:
    assert (FixedPoint(64).limit, FixedPoint(64).resolution) == (2.0**15, 2.0**-32)
    assert (FixedPoint(128).limit, FixedPoint(128).resolution) == (2.0**47, 2.0**-64)
    with pytest.raises(SecAggError, match="key_bitlength"):
        FixedPoint(32)


# --- bad input: each a clear SecAggError ------------------------------------------------------------


@pytest.fixture
def three(otp_codec, random_update, protect_all):
    codec = otp_codec(64)
    updates = {p: random_update(np.random.default_rng(i), SHAPES) for i, p in enumerate(["a", "b", "c"])}
    return codec, updates, protect_all(codec, updates)


def test_mismatched_shapes_between_parties_name_party_and_tensor(three) -> None:
    codec, _, protected = three
    protected["b"]["prefix"] = protected["b"]["prefix"][:10]
    with pytest.raises(
        SecAggError, match=r"party `b`: tensor `prefix` has shape \(10, 16\), but party `a`'s has \(20, 16\)"
    ):
        codec.combine(protected, {})


def test_missing_extra_or_mistyped_tensors_name_party_and_tensor(three) -> None:
    codec, _, protected = three
    broken = {**protected, "c": {k: v for k, v in protected["c"].items() if k != "prefix"}}
    with pytest.raises(SecAggError, match=r"party `c`: tensor `prefix` is missing"):
        codec.combine(broken, {})
    broken = {**protected, "b": {**protected["b"], "extra": protected["b"]["prefix"]}}
    with pytest.raises(SecAggError, match=r"party `b`: tensor `extra` is not in party `a`'s update"):
        codec.combine(broken, {})
    broken = {**protected, "c": {**protected["c"], "prefix": protected["c"]["prefix"].astype(np.float32)}}
    with pytest.raises(SecAggError, match=r"party `c`: tensor `prefix` has dtype float32, expected uint64"):
        codec.combine(broken, {})
    with pytest.raises(SecAggError, match=r"party `a` contributed both"):
        codec.combine(protected, {"a": protected["a"]})
    with pytest.raises(SecAggError, match="nothing to combine"):
        codec.combine({}, {})


def test_a_64_bit_update_given_to_a_128_bit_codec_is_refused(three, otp_codec) -> None:
    _, _, protected = three
    with pytest.raises(
        SecAggError, match=r"party `a`: tensor `layer.0.lora_A` has shape \(8, 64\); 128-bit updates are \(2, ...\)"
    ):
        otp_codec(128).combine(protected, {})


def test_a_missing_or_stale_party_is_detected_not_decoded(three, protect_all) -> None:
    codec, updates, protected = three
    with pytest.raises(SecAggError, match="masks did not cancel"):
        codec.combine({p: protected[p] for p in ("a", "b")}, {})
    stale = protect_all(codec, updates, round_=1)["c"]
    with pytest.raises(SecAggError, match="masks did not cancel"):
        codec.combine({**protected, "c": stale}, {})


@pytest.mark.parametrize(("bits", "value"), [(64, 40_000.0), (64, -32_768.0), (128, 2.0**48)])
def test_values_outside_the_encodable_range_name_the_tensor(bits, value, otp_codec, pair_secrets) -> None:
    update = {"ok": np.zeros(4, np.float32), "big": np.array([0.5, value], np.float32)}
    message = re.escape(f"party `a`: tensor `big`: value {value:g} is outside the encodable range")
    with pytest.raises(SecAggError, match=message):
        otp_codec(bits).protect(update, party="a", secrets=pair_secrets(["a", "b"])["a"], job_id="j", round_=0)
    with pytest.raises(SecAggError, match=r"plaintext update: tensor `big`: value"):
        otp_codec(bits).encode_plain(update)


@pytest.mark.parametrize("scheme", ["plain", "otp"])
def test_nan_and_non_float_updates_name_the_tensor(scheme, otp_codec) -> None:
    codec = make_codec({"plain": {}}) if scheme == "plain" else otp_codec(64)
    with pytest.raises(SecAggError, match=r"party `a`: tensor `w`: contains NaN or infinite values"):
        codec.protect({"w": np.array([1.0, np.nan], np.float32)}, party="a", secrets={}, job_id="j", round_=0)
    with pytest.raises(SecAggError, match=r"party `a`: tensor `w` must be a floating-point numpy array, got int64"):
        codec.protect({"w": np.arange(3)}, party="a", secrets={}, job_id="j", round_=0)


def test_bad_protect_context_is_refused(otp_codec, pair_secrets) -> None:
    codec, update, secrets = otp_codec(64), {"w": np.zeros(2, np.float32)}, pair_secrets(["a", "b"])["a"]
    with pytest.raises(SecAggError, match="secret for the party itself"):
        codec.protect(update, party="a", secrets={"a": bytes(32)}, job_id="j", round_=0)
    with pytest.raises(SecAggError, match="shared secret with peer `b` must be at least 32 bytes"):
        codec.protect(update, party="a", secrets={"b": b"short"}, job_id="j", round_=0)
    with pytest.raises(SecAggError, match="round_"):
        codec.protect(update, party="a", secrets=secrets, job_id="j", round_=-1)
    with pytest.raises(SecAggError, match="job_id"):
        codec.protect(update, party="a", secrets=secrets, job_id="", round_=0)
