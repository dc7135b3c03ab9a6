"""Update codecs: how a party's adapter update travels to the assist_trainer and is summed there.

`plain` sends float32 and sums in float64. `otp` encodes each weight in fixed point, adds one
pairwise mask per other label_trainer (added when the party's name sorts before the peer's,
subtracted otherwise) and sends the masked ring elements; in the aggregator's modular sum every
mask meets its negation and cancels, leaving the sum of the encodings.

Wire format of `otp`: a 64-bit update keeps the tensor's shape as uint64; a 128-bit update is
uint64 of shape (2, *shape), [0] the low and [1] the high 64 bits. That is 8 or 16 bytes per
weight, exactly what the encoding needs.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .common import SecAggError, Tensors
from .encoding import MAX_CONTRIBUTIONS, FixedPoint
from .keys import KeyAgreement
from .ring import add_into, sub_into
from .streams import MaskGenerator, MaskStream, mask_info

logger = logging.getLogger(__name__)

# Masks are applied in chunks small enough that each chunk of keystream is still in cache when it
# is added; a multiple of the HMAC_DRBG request size (2^16 bytes) keeps its buffering trivial.
CHUNK_WORDS = 1 << 13


class UpdateCodec(Protocol):
    scheme: str
    needs_keys: bool

    def new_private_key(self) -> bytes: ...

    def public_key(self, private_key: bytes) -> bytes: ...

    def shared_secret(self, private_key: bytes, peer_public: bytes, peer: str) -> bytes: ...

    def protect(
        self, update: Tensors, *, party: str, secrets: dict[str, bytes], job_id: str, round_: int
    ) -> Tensors: ...

    def encode_plain(self, update: Tensors) -> Tensors: ...

    def combine(self, protected: dict[str, Tensors], plaintext: dict[str, Tensors]) -> Tensors: ...


# --- validation shared by both codecs ------------------------------------------------------


def _float_tensors(update: object, who: str) -> Tensors:
    """The update as a dict of floating arrays, or a SecAggError naming the tensor."""
    if not isinstance(update, Mapping):
        raise SecAggError(f"{who}: an update is a mapping of tensor name to array, got {type(update).__name__}")
    tensors: Tensors = {}
    for name, value in update.items():
        if not isinstance(name, str):
            raise SecAggError(f"{who}: tensor names must be strings, got {name!r}")
        if isinstance(value, np.generic):  # a numpy scalar: a 0-d tensor
            value = np.asarray(value)
        if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
            kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
            raise SecAggError(f"{who}: tensor `{name}` must be a floating-point numpy array, got {kind}")
        tensors[name] = value
    return tensors


def _contributions(protected: object, plaintext: object) -> list[tuple[str, Mapping]]:
    """(label, tensors) for every contribution to a sum, labels naming the party."""
    if not isinstance(protected, Mapping) or not isinstance(plaintext, Mapping):
        raise SecAggError("combine takes two mappings: protected and plaintext updates by party name")
    both = sorted(set(protected) & set(plaintext))
    if both:
        raise SecAggError(f"party `{both[0]}` contributed both a protected and a plaintext update")
    found = [(f"party `{p}`", t) for p, t in protected.items()]
    found += [(f"party `{p}` (plaintext)", t) for p, t in plaintext.items()]
    if not found:
        raise SecAggError("nothing to combine: no updates were given")
    if len(found) > MAX_CONTRIBUTIONS:
        raise SecAggError(f"{len(found)} updates to combine; at most {MAX_CONTRIBUTIONS} fit the fixed-point headroom")
    for label, tensors in found:
        if not isinstance(tensors, Mapping):
            raise SecAggError(f"{label}: an update is a mapping of tensor name to array, got {type(tensors).__name__}")
    return found


def _check_alike(found: list[tuple[str, Mapping]], dtype: np.dtype, limbs: int = 0) -> list[str]:
    """Every contribution has the first one's tensor names and shapes, all of `dtype`; returns the names."""
    ref_label, ref = found[0]
    names = list(ref)
    for label, tensors in found:
        missing = [n for n in names if n not in tensors]
        extra = [n for n in tensors if n not in ref]
        if missing:
            raise SecAggError(f"{label}: tensor `{missing[0]}` is missing (present in {ref_label}'s update)")
        if extra:
            raise SecAggError(f"{label}: tensor `{extra[0]}` is not in {ref_label}'s update")
        for name in names:
            array = tensors[name]
            if not isinstance(array, np.ndarray):
                raise SecAggError(f"{label}: tensor `{name}` is a {type(array).__name__}, not a numpy array")
            if array.dtype != dtype:
                raise SecAggError(f"{label}: tensor `{name}` has dtype {array.dtype}, expected {dtype}")
            if limbs == 2 and (array.ndim == 0 or array.shape[0] != 2):
                raise SecAggError(f"{label}: tensor `{name}` has shape {array.shape}; 128-bit updates are (2, ...)")
            if array.shape != ref[name].shape:
                raise SecAggError(
                    f"{label}: tensor `{name}` has shape {array.shape}, but {ref_label}'s has {ref[name].shape}"
                )
    return names


# --- plain --------------------------------------------------------------------------------


class PlainCodec:
    """No protection: updates travel as float32 and the sum is accumulated in float64."""

    scheme = "plain"
    needs_keys = False

    def _no_keys(self) -> SecAggError:
        return SecAggError("encryption `plain` exchanges no keys")

    def new_private_key(self) -> bytes:
        raise self._no_keys()

    def public_key(self, private_key: bytes) -> bytes:
        raise self._no_keys()

    def shared_secret(self, private_key: bytes, peer_public: bytes, peer: str) -> bytes:
        raise self._no_keys()

    def protect(self, update: Tensors, *, party: str, secrets: dict[str, bytes], job_id: str, round_: int) -> Tensors:
        return self._as_float32(update, f"party `{party}`")

    def encode_plain(self, update: Tensors) -> Tensors:
        return self._as_float32(update, "plaintext update")

    @staticmethod
    def _as_float32(update: Tensors, who: str) -> Tensors:
        out: Tensors = {}
        for name, array in _float_tensors(update, who).items():
            values = np.ascontiguousarray(array, dtype=np.float32)
            if not np.isfinite(values).all():
                raise SecAggError(f"{who}: tensor `{name}`: contains NaN or infinite values")
            out[name] = values
        return out

    def combine(self, protected: dict[str, Tensors], plaintext: dict[str, Tensors]) -> Tensors:
        found = _contributions(protected, plaintext)
        names = _check_alike(found, np.dtype(np.float32))
        out: Tensors = {}
        for name in names:
            total = np.zeros(found[0][1][name].shape, dtype=np.float64)
            for _, tensors in found:
                total += tensors[name]
            out[name] = total.astype(np.float32)
        return out


# --- one-time pad ---------------------------------------------------------------------------


class OtpCodec:
    """Fixed-point encoding plus pairwise one-time-pad masks (see the module docstring)."""

    scheme = "otp"
    needs_keys = True

    def __init__(self, key_bits: int, key_agreement: KeyAgreement, generator: MaskGenerator) -> None:
        self.fixed = FixedPoint(key_bits)
        self.key_agreement = key_agreement
        self.generator = generator

    def __repr__(self) -> str:
        return f"OtpCodec({self.fixed.bits} bits, {self.key_agreement.name}, {self.generator.name})"

    # keys

    def new_private_key(self) -> bytes:
        return self.key_agreement.new_private_key()

    def public_key(self, private_key: bytes) -> bytes:
        return self.key_agreement.public_key(private_key)

    def shared_secret(self, private_key: bytes, peer_public: bytes, peer: str) -> bytes:
        return self.key_agreement.shared_secret(private_key, peer_public, peer)

    # party side

    def protect(self, update: Tensors, *, party: str, secrets: dict[str, bytes], job_id: str, round_: int) -> Tensors:
        who = f"party `{party}`"
        tensors = _float_tensors(update, who)
        peers = self._check_context(party, secrets, job_id, round_)
        if not peers:
            logger.warning("otp: %s has no peer label_trainer; its update reaches the aggregator unmasked", who)
        out: Tensors = {}
        for name, array in tensors.items():
            encoded = self.fixed.encode(array, f"{who}: tensor `{name}`")
            _apply_masks(encoded, [self._pair_mask(party, peer, secrets[peer], job_id, round_, name) for peer in peers])
            out[name] = self._wire(encoded, array.shape)
        return out

    def _pair_mask(
        self, party: str, peer: str, secret: bytes, job_id: str, round_: int, tensor: str
    ) -> tuple[bool, list[MaskStream]]:
        """Whether `party` adds (True) or subtracts the pair's mask, and its stream for each 64-bit limb."""
        limbs = range(self.fixed.limbs)
        return party < peer, [self.generator.stream(secret, mask_info(job_id, round_, tensor, limb)) for limb in limbs]

    def encode_plain(self, update: Tensors) -> Tensors:
        tensors = _float_tensors(update, "plaintext update")
        return {
            name: self._wire(self.fixed.encode(array, f"plaintext update: tensor `{name}`"), array.shape)
            for name, array in tensors.items()
        }

    def _wire(self, encoded: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return encoded.reshape(shape if self.fixed.limbs == 1 else (2, *shape))

    @staticmethod
    def _check_context(party: str, secrets: object, job_id: str, round_: int) -> list[str]:
        if not isinstance(party, str) or not party:
            raise SecAggError(f"protect: `party` must be a non-empty name, got {party!r}")
        if not isinstance(job_id, str) or not job_id:
            raise SecAggError(f"party `{party}`: `job_id` must be a non-empty string, got {job_id!r}")
        if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
            raise SecAggError(f"party `{party}`: `round_` must be a non-negative integer, got {round_!r}")
        if not isinstance(secrets, Mapping):
            raise SecAggError(f"party `{party}`: `secrets` maps each peer's name to the pair's shared secret")
        for peer, secret in secrets.items():
            if peer == party:
                raise SecAggError(f"party `{party}`: `secrets` holds a secret for the party itself")
            if not isinstance(secret, bytes) or len(secret) < 32:
                raise SecAggError(f"party `{party}`: the shared secret with peer `{peer}` must be at least 32 bytes")
        return sorted(secrets)

    # aggregator side

    def combine(self, protected: dict[str, Tensors], plaintext: dict[str, Tensors]) -> Tensors:
        return self._decode(self._ring_sum(protected, plaintext))

    def _ring_sum(self, protected: dict[str, Tensors], plaintext: dict[str, Tensors]) -> RingSum:
        """The modular sum of every contribution, tensor by tensor, as (limbs, n) arrays."""
        found = _contributions(protected, plaintext)
        names = _check_alike(found, np.dtype(np.uint64), self.fixed.limbs)
        limbs, totals = self.fixed.limbs, {}
        for name in names:
            shape = found[0][1][name].shape
            total = np.array(found[0][1][name], dtype=np.uint64).reshape(limbs, -1)
            scratch = np.empty(total.shape[1], dtype=bool) if limbs == 2 else None
            for _, tensors in found[1:]:
                add_into(total, tensors[name].reshape(limbs, -1), scratch)
            totals[name] = (total, shape if limbs == 1 else shape[1:])
        return RingSum(totals, len(found))

    def _decode(self, ring_sum: RingSum) -> Tensors:
        return {
            name: self.fixed.decode(total, ring_sum.contributions, f"tensor `{name}`").reshape(shape)
            for name, (total, shape) in ring_sum.totals.items()
        }


@dataclass
class RingSum:
    totals: dict[str, tuple[np.ndarray, tuple[int, ...]]]  # tensor -> (limbs, n) sum and the tensor's shape
    contributions: int


def _apply_masks(encoded: np.ndarray, masks: list[tuple[bool, list[MaskStream]]]) -> None:
    """Add (True) or subtract (False) each peer's mask stream into the (limbs, n) encoding, in place.

    Mask words are the little-endian 64-bit words of each limb's stream.
    """
    if not masks:
        return
    limbs, n = encoded.shape
    scratch = np.empty((limbs, min(n, CHUNK_WORDS)), dtype=np.uint64)
    flags = np.empty(scratch.shape[1], dtype=bool)
    swap = sys.byteorder == "big"
    for start in range(0, n, CHUNK_WORDS):
        stop = min(n, start + CHUNK_WORDS)
        acc, mask, flag = encoded[:, start:stop], scratch[:, : stop - start], flags[: stop - start]
        for add, streams in masks:
            for limb, stream in enumerate(streams):
                stream.read_into(memoryview(mask[limb]).cast("B"))
            if swap:
                mask.byteswap(inplace=True)
            (add_into if add else sub_into)(acc, mask, flag)
