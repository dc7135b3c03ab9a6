"""One-time-pad secure aggregation: the assist_trainer learns only the sum of the updates.

The runtime calls `make_codec(spec.encryption)` and then, on each label_trainer, agrees a
secret with every other label_trainer (`new_private_key`, `public_key`, `shared_secret`) and
sends `protect(update, ...)`; the assist_trainer sends its own update through `encode_plain`
and sums everything with `combine`. See codec.py for the scheme and wire format, encoding.py
for the encodable range and precision.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from fedtune.spec import Encryption, format_validation_error

from .codec import OtpCodec, PlainCodec, UpdateCodec
from .common import SecAggError, Tensors
from .encoding import HEADROOM_BITS, MAX_CONTRIBUTIONS, FixedPoint
from .groups import ffdhe_group
from .keys import FfdheKeyAgreement, KeyAgreement, X25519KeyAgreement
from .streams import make_generator

__all__ = [
    "HEADROOM_BITS",
    "MAX_CONTRIBUTIONS",
    "FixedPoint",
    "OtpCodec",
    "PlainCodec",
    "SecAggError",
    "Tensors",
    "UpdateCodec",
    "make_codec",
    "make_key_agreement",
]


def make_key_agreement(key_exchange: Any) -> KeyAgreement:
    """The key agreement named by a `fedtune.spec.KeyExchange` (`curve: x25519` wins over the group)."""
    if key_exchange.curve == "x25519":
        return X25519KeyAgreement()
    if key_exchange.curve is not None:
        raise SecAggError(f"encryption.otp.key_exchange.curve: unknown curve `{key_exchange.curve}` (have x25519)")
    try:
        group = ffdhe_group(key_exchange.key_bitlength)
    except KeyError as err:
        raise SecAggError(f"encryption.otp.key_exchange.key_bitlength: {err.args[0]}") from None
    return FfdheKeyAgreement(group, key_exchange.optimized)


def make_codec(encryption: Encryption | Mapping[str, Any]) -> UpdateCodec:
    """The codec for a job's `encryption` section: `plain` or `otp`."""
    if isinstance(encryption, Mapping):
        try:
            encryption = Encryption.model_validate(dict(encryption))
        except ValidationError as err:
            raise SecAggError(format_validation_error(err, "encryption")) from None
    if encryption.scheme == "plain":
        return PlainCodec()
    otp = encryption.otp
    return OtpCodec(
        otp.key_bitlength, make_key_agreement(otp.key_exchange), make_generator(otp.csprng.name, otp.csprng.method)
    )
