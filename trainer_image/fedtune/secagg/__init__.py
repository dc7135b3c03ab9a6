"""Secure aggregation: the assist_trainer learns only the sum of the updates.

The runtime calls `make_codec(spec.encryption, ...)`. Under `otp` each label_trainer agrees a
secret with every other label_trainer (`new_private_key`, `public_key`, `shared_secret`) and
sends `protect(update, ...)`; the assist_trainer sends its own update through `encode_plain`
and sums everything with `combine`. See codec.py for the scheme and wire format, encoding.py
for the encodable range and precision. `secagg_plus` (plus.py) adds self-masks and Shamir
shares so that a round completes without the label_trainers that dropped out of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from fedtune.spec import Encryption, JobSpec, format_validation_error, majority

from .codec import OtpCodec, PlainCodec, UpdateCodec
from .common import SecAggError, Tensors
from .encoding import HEADROOM_BITS, MAX_CONTRIBUTIONS, FixedPoint
from .groups import ffdhe_group
from .keys import FfdheKeyAgreement, KeyAgreement, X25519KeyAgreement
from .plus import SecAggPlusCodec, SecAggPlusParty
from .streams import make_generator

__all__ = [
    "HEADROOM_BITS",
    "MAX_CONTRIBUTIONS",
    "FixedPoint",
    "OtpCodec",
    "PlainCodec",
    "SecAggError",
    "SecAggPlusCodec",
    "SecAggPlusParty",
    "Tensors",
    "UpdateCodec",
    "job_codec",
    "make_codec",
    "make_key_agreement",
]


def make_key_agreement(key_exchange: Any, section: str = "otp") -> KeyAgreement:
    """The key agreement named by a `fedtune.spec.KeyExchange`: X25519, or an RFC 7919 group."""
    if key_exchange.curve == "x25519":
        return X25519KeyAgreement()
    if key_exchange.curve != "ffdhe":
        curve = key_exchange.curve
        raise SecAggError(f"encryption.{section}.key_exchange.curve: unknown curve `{curve}` (have x25519, ffdhe)")
    try:
        group = ffdhe_group(key_exchange.key_bitlength)
    except KeyError as err:
        raise SecAggError(f"encryption.{section}.key_exchange.key_bitlength: {err.args[0]}") from None
    return FfdheKeyAgreement(group, key_exchange.optimized)


def make_codec(encryption: Encryption | Mapping[str, Any], *, label_trainers: Sequence[str] = (), rounds: int = 1,
               threshold: int | None = None, context: bytes = b"") -> UpdateCodec | SecAggPlusCodec:
    """The codec for a job's `encryption` section: `plain`, `otp` or `secagg_plus`.

    `secagg_plus` also needs the job's label_trainers (the share holders), its number of rounds, the
    threshold (`JobSpec.secagg_threshold()`; the least above (n + max_colluders)/2 when not given) and
    `context`, the opaque identity of the run every key and mask is bound to.
    """
    if isinstance(encryption, Mapping):
        try:
            encryption = Encryption.model_validate(dict(encryption))
        except ValidationError as err:
            raise SecAggError(format_validation_error(err, "encryption")) from None
    if encryption.scheme == "plain":
        return PlainCodec()
    section = encryption.scheme
    settings = encryption.masking
    assert settings is not None
    agreement = make_key_agreement(settings.key_exchange, section)
    generator = make_generator(settings.csprng.name, settings.csprng.method)
    plus = encryption.secagg_plus
    if plus is None:
        return OtpCodec(settings.key_bitlength, agreement, generator)
    colluders = plus.max_colluders
    return SecAggPlusCodec(settings.key_bitlength, agreement, generator, holders=label_trainers, rounds=rounds,
                           threshold=threshold or plus.threshold or majority(len(label_trainers), colluders),
                           context=context, colluders=colluders)


def job_codec(spec: JobSpec, context: bytes) -> UpdateCodec | SecAggPlusCodec:
    """The codec of a job's parties: its `encryption`, its label_trainers, rounds and threshold, bound to
    `context` (the run's identity; today the job's name)."""
    return make_codec(spec.encryption, label_trainers=[p.name for p in spec.label_trainers],
                      rounds=len(spec.fractions()), threshold=spec.secagg_threshold(), context=context)
