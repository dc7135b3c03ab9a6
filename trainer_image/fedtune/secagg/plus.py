"""SecAgg+: secure aggregation that survives label_trainers dropping out mid-round.

After Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
(CCS 2017), with keys for every round made up front so a job needs no extra key exchange.

Keys. Every label_trainer keeps one random 32-byte master seed (persisted beside its training
state: a restart re-derives everything below) and derives from it, by HKDF,
- an encryption key pair c, for the shares it sends its peers;
- for each round r, a mask key pair m_r and a self-mask seed b_r.
Its public bundle, signed with its party certificate by the party flow, holds c's public key,
every m_r's public key and a hash commitment to every b_r. Before round 1 it splits each m_r
seed and each b_r into Shamir shares (threshold t, one per label_trainer, itself included)
and sends every peer its shares, encrypted (ChaCha20-Poly1305) under a key agreed from c, to
the aggregator, which keeps them for the peers but cannot read them.

A round. Party u uploads   enc(x_u) + PRG(b_r,u) + Σ_{v ≠ u} ±PRG(DH(m_r,u, m_r,v))
(+ when u's name sorts before v's), in the ring of the fixed-point encoding, as `otp` does.
After the upload deadline the aggregator fixes which label_trainers uploaded (U) and which did
not (D) and asks the uploaders for their shares: of b_r,u for each u in U, of the m_r seed of
each w in D. A party reveals one or the other for a party and round, never both: it checks the
request (U and D split the label_trainers, it is in U, U has at least t members) and refuses a
second, different split of a round. With t shares per secret the aggregator removes every
self-mask and the pair masks between U and D; pair masks within U cancel in the sum. Learning
m_r of a dropped party exposes only that round's pair masks, and its upload for that round,
if it arrives late, is refused: its self-mask still hides it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from fedtune import files
from fedtune.spec import majority

from . import shamir
from .codec import OtpCodec, _apply_masks, _float_tensors
from .common import SecAggError, Tensors
from .keys import KeyAgreement
from .streams import MaskGenerator, MaskStream, mask_info

MASTER_BYTES = 32
COMMITMENT_BYTES = 32
_NONCE_BYTES = 12
# One round's shares from one party to one peer: nonce, the m and b shares, the Poly1305 tag.
CIPHERTEXT_BYTES = _NONCE_BYTES + 2 * shamir.ELEMENT_BYTES + 16
MASK_KEY, SELF_MASK = b"mask key", b"self mask"
Mask = tuple[bool, list[MaskStream]]  # add (True) or subtract, and a stream per 64-bit limb


def _expand(master: bytes, label: bytes, length: int = 32) -> bytes:
    return HKDFExpand(hashes.SHA256(), length, b"fedtune secagg+\0" + label).derive(master)


def _element(raw: bytes) -> int:
    return int.from_bytes(raw, "big") % shamir.PRIME


def _round_label(kind: bytes, round_: int) -> bytes:
    return kind + b"\0" + str(round_).encode()


def _commit(self_mask_seed: bytes) -> bytes:
    return hashlib.sha256(b"fedtune secagg+ self-mask commitment\0" + self_mask_seed).digest()


@dataclass(frozen=True)
class PublicBundle:
    """What a label_trainer publishes: its share-encryption key, and per round a mask key and a commitment."""

    encryption_key: bytes
    mask_keys: list[bytes]  # [r - 1] for round r
    commitments: list[bytes]


class SecAggPlusCodec(OtpCodec):
    """Fixed-point encoding, pairwise masks and self-masks that the aggregator can remove for dropouts."""

    scheme = "secagg_plus"
    needs_keys = True

    def __init__(self, key_bits: int, key_agreement: KeyAgreement, generator: MaskGenerator, *,
                 threshold: int, holders: Sequence[str], rounds: int) -> None:
        super().__init__(key_bits, key_agreement, generator)
        self.holders = sorted(holders)
        if len(set(self.holders)) != len(self.holders) or not self.holders:
            raise SecAggError("secagg_plus needs the distinct names of the label_trainers")
        if not majority(len(self.holders)) <= threshold <= len(self.holders):
            raise SecAggError(
                f"encryption.secagg_plus.threshold: {threshold} is outside {majority(len(self.holders))}.."
                f"{len(self.holders)} for {len(self.holders)} label_trainers"
            )
        if rounds < 1:
            raise SecAggError(f"secagg_plus needs at least one round, got {rounds}")
        self.threshold = threshold
        self.rounds = rounds
        self.points = {name: i + 1 for i, name in enumerate(self.holders)}  # Shamir x-coordinates
        probe = key_agreement.public_key(key_agreement.private_key_from_seed(bytes(32)))
        self.key_bytes = len(probe)

    def __repr__(self) -> str:
        return (f"SecAggPlusCodec({self.fixed.bits} bits, {self.key_agreement.name}, {self.generator.name}, "
                f"threshold {self.threshold} of {len(self.holders)}, {self.rounds} rounds)")

    # --- keys ---------------------------------------------------------------------------------

    def new_private_key(self) -> bytes:
        """A party's master seed: every key and secret it uses derives from it."""
        return os.urandom(MASTER_BYTES)

    def secret(self, master: bytes, kind: bytes, round_: int) -> bytes:
        """The round's mask-key seed (MASK_KEY) or self-mask seed (SELF_MASK), as a field element."""
        return shamir.to_bytes(_element(_expand(_check_master(master), _round_label(kind, round_))))

    def _encryption_private(self, master: bytes) -> bytes:
        seed = shamir.to_bytes(_element(_expand(_check_master(master), b"share encryption key")))
        return self.key_agreement.private_key_from_seed(seed)

    def public_key(self, master: bytes) -> bytes:
        """The public bundle: encryption key, then per round the mask key and the self-mask commitment."""
        agreement = self.key_agreement
        parts = [agreement.public_key(self._encryption_private(master))]
        for round_ in range(1, self.rounds + 1):
            parts.append(agreement.public_key(agreement.private_key_from_seed(self.secret(master, MASK_KEY, round_))))
            parts.append(_commit(self.secret(master, SELF_MASK, round_)))
        return b"".join(parts)

    def unpack(self, bundle: bytes, party: str) -> PublicBundle:
        k, c = self.key_bytes, COMMITMENT_BYTES
        expected = k + self.rounds * (k + c)
        if not isinstance(bundle, bytes) or len(bundle) != expected:
            raise SecAggError(
                f"public keys of `{party}`: {len(bundle) if isinstance(bundle, bytes) else 0} bytes, expected "
                f"{expected} for {self.rounds} rounds of {self.key_agreement.name} (is it running the same job?)"
            )
        rounds = [bundle[k + i * (k + c): k + (i + 1) * (k + c)] for i in range(self.rounds)]
        return PublicBundle(bundle[:k], [r[:k] for r in rounds], [r[k:] for r in rounds])

    def shared_secret(self, private_key: bytes, peer_public: bytes, peer: str) -> bytes:
        raise SecAggError("secagg_plus derives a secret per round: use SecAggPlusCodec.party()")

    def protect(self, update: Tensors, *, party: str, secrets: dict[str, bytes], job_id: str, round_: int) -> Tensors:
        raise SecAggError("secagg_plus masks through the party's session: use SecAggPlusCodec.party()")

    def party(self, master: bytes, party: str, job_id: str, publics: Mapping[str, bytes],
              journal: Path | None = None) -> SecAggPlusParty:
        return SecAggPlusParty(self, master, party, job_id, publics, journal)

    # --- shares -------------------------------------------------------------------------------

    def _coefficients(self, master: bytes, kind: bytes, round_: int) -> list[int]:
        # Reproducible, so a restarted party hands out the very same shares; 8 spare bytes per
        # coefficient make the reduction modulo the prime unbiased to 2^-64.
        raw = _expand(master, b"coefficients\0" + _round_label(kind, round_), 40 * (self.threshold - 1) or 1)
        return [_element(raw[40 * i: 40 * (i + 1)]) for i in range(self.threshold - 1)]

    def shares_of(self, master: bytes, kind: bytes, round_: int) -> dict[str, int]:
        """Every holder's share of this party's secret `kind` for `round_`."""
        secret = _element(self.secret(master, kind, round_))
        by_point = shamir.split(secret, list(self.points.values()), self.threshold,
                                self._coefficients(master, kind, round_))
        return {name: by_point[x] for name, x in self.points.items()}

    def round_ciphertexts(self, blob: bytes, round_: int, sender: str) -> bytes:
        """One round's ciphertext out of the shares a sender gave the aggregator for one peer."""
        if len(blob) != self.rounds * CIPHERTEXT_BYTES:
            raise SecAggError(f"the encrypted shares from `{sender}` are {len(blob)} bytes, expected "
                              f"{self.rounds * CIPHERTEXT_BYTES}")
        return blob[(round_ - 1) * CIPHERTEXT_BYTES: round_ * CIPHERTEXT_BYTES]

    def check_share_upload(self, sender: str, shares: Mapping[str, bytes]) -> None:
        """What a label_trainer hands the aggregator before round 1: a ciphertext for every peer."""
        if sender not in self.points:
            raise SecAggError(f"`{sender}` is not a label_trainer of this job")
        peers = set(self.holders) - {sender}
        if set(shares) != peers:
            missing = sorted(peers - set(shares)) or sorted(set(shares) - peers)
            raise SecAggError(f"the encrypted shares from `{sender}` must address each peer once (`{missing[0]}`)")
        for blob in shares.values():
            self.round_ciphertexts(blob, 1, sender)

    def check_split(self, round_: int, uploaded: Sequence[str], dropped: Sequence[str]) -> None:
        """U and D must split the label_trainers, with at least `threshold` uploads."""
        up, down = set(uploaded), set(dropped)
        if up & down:
            raise SecAggError(f"round {round_}: `{sorted(up & down)[0]}` is listed as uploaded and as dropped")
        if up | down != set(self.holders) or len(up) + len(down) != len(uploaded) + len(dropped):
            raise SecAggError(f"round {round_}: uploaded and dropped parties must list every label_trainer once")
        if len(up) < self.threshold:
            raise SecAggError(
                f"round {round_}: only {len(up)} of the {len(self.holders)} label_trainers uploaded; "
                f"encryption.secagg_plus.threshold needs at least {self.threshold} survivors"
            )

    # --- the aggregator -------------------------------------------------------------------------

    def unmask(self, masked: dict[str, Tensors], plaintext: dict[str, Tensors], *, job_id: str, round_: int,
               publics: Mapping[str, bytes], dropped: Sequence[str],
               reveals: Mapping[str, Mapping[str, bytes]]) -> Tensors:
        """The sum of the uploads (`masked`, by label_trainer) and `plaintext`, with every mask removed.

        `reveals` maps each survivor that answered to its shares: of the self-mask seed of every
        uploader, of the mask-key seed of every party in `dropped`.
        """
        uploaded = sorted(masked)
        self.check_split(round_, uploaded, dropped)
        answered = sorted(p for p in reveals if p in masked)
        if len(answered) < self.threshold:
            raise SecAggError(
                f"round {round_}: only {len(answered)} survivors revealed their shares; "
                f"encryption.secagg_plus.threshold needs {self.threshold}"
            )
        bundles = {p: self.unpack(publics[p], p) for p in self.holders}
        seeds = self._reconstruct(round_, answered[: self.threshold], reveals, uploaded, dropped, bundles)
        ring_sum = self._ring_sum(masked, plaintext)
        for name, (total, _) in ring_sum.totals.items():
            _apply_masks(total, self._removal_masks(job_id, round_, name, uploaded, dropped, seeds, bundles))
        return self._decode(ring_sum)

    def _reconstruct(self, round_: int, revealers: list[str], reveals: Mapping[str, Mapping[str, bytes]],
                     uploaded: list[str], dropped: Sequence[str], bundles: dict[str, PublicBundle]) -> dict[str, bytes]:
        """Each uploader's self-mask seed and each dropped party's mask-key private key, checked against its bundle."""
        xs = [self.points[p] for p in revealers]
        weights = shamir.lagrange_at_zero(xs)
        seeds = {}
        for owner in [*uploaded, *dropped]:
            total = 0
            for weight, revealer in zip(weights, revealers):
                raw = reveals[revealer].get(owner)
                if raw is None:
                    raise SecAggError(f"round {round_}: `{revealer}` revealed no share for `{owner}`")
                total += weight * shamir.from_bytes(raw, f"round {round_}: the share for `{owner}` from `{revealer}`")
            seed = shamir.to_bytes(total % shamir.PRIME)
            if owner in uploaded:
                if _commit(seed) != bundles[owner].commitments[round_ - 1]:
                    raise SecAggError(f"round {round_}: the shares revealed by {', '.join(revealers)} do not give "
                                      f"`{owner}`'s committed self-mask seed (a share was altered)")
                seeds[owner] = seed
            else:
                private = self.key_agreement.private_key_from_seed(seed)
                if self.key_agreement.public_key(private) != bundles[owner].mask_keys[round_ - 1]:
                    raise SecAggError(f"round {round_}: the shares revealed by {', '.join(revealers)} do not give "
                                      f"the mask key `{owner}` published (a share was altered)")
                seeds[owner] = private
        return seeds

    def _removal_masks(self, job_id: str, round_: int, tensor: str, uploaded: list[str], dropped: Sequence[str],
                       seeds: dict[str, bytes], bundles: dict[str, PublicBundle]) -> list[Mask]:
        """Subtract every self-mask; undo each uploader's mask with each dropped party (added if it sorts first)."""
        masks = [(False, self._streams(seeds[u], job_id, round_, tensor)) for u in uploaded]
        for w in dropped:
            for u in uploaded:
                secret = self.key_agreement.shared_secret(seeds[w], bundles[u].mask_keys[round_ - 1], u)
                masks.append((not u < w, self._streams(secret, job_id, round_, tensor)))
        return masks

    def _streams(self, secret: bytes, job_id: str, round_: int, tensor: str) -> list[MaskStream]:
        limbs = range(self.fixed.limbs)
        return [self.generator.stream(secret, mask_info(job_id, round_, tensor, limb)) for limb in limbs]


def _check_master(master: bytes) -> bytes:
    if not isinstance(master, bytes) or len(master) != MASTER_BYTES:
        raise SecAggError(f"a secagg_plus master seed is {MASTER_BYTES} bytes (is the saved agreement.key from "
                          "another scheme?)")
    return master


def _associated_data(job_id: str, sender: str, recipient: str, round_: int) -> bytes:
    fields = [b"fedtune secagg+ shares", job_id.encode(), sender.encode(), recipient.encode(), str(round_).encode()]
    return b"".join(struct.pack(">I", len(f)) + f for f in fields)


class SecAggPlusParty:
    """One label_trainer's side of SecAgg+: its shares for the peers, its masked uploads, its reveals.

    `journal`, a file beside the party's training state, records the split each round's reveal
    answered, so that a restarted party still refuses a different one.
    """

    def __init__(self, codec: SecAggPlusCodec, master: bytes, party: str, job_id: str,
                 publics: Mapping[str, bytes], journal: Path | None = None) -> None:
        if party not in codec.points:
            raise SecAggError(f"`{party}` is not a label_trainer of this job")
        missing = [p for p in codec.holders if p not in publics]
        if missing:
            raise SecAggError(f"no public keys from label_trainer `{missing[0]}`")
        self.codec = codec
        self.master = _check_master(master)
        self.party = party
        self.job_id = job_id
        self.bundles = {p: codec.unpack(publics[p], p) for p in codec.holders}
        if codec.public_key(master) != publics[party]:
            raise SecAggError(f"the public keys relayed for `{party}` are not its own (a different master seed?)")
        self.peers = [p for p in codec.holders if p != party]
        self.journal = journal
        self._answered: dict[str, dict[str, list[str]]] = {}
        encryption = codec._encryption_private(master)
        self._share_keys = {
            peer: HKDFExpand(hashes.SHA256(), 32, b"fedtune secagg+ share key\0" + job_id.encode()).derive(
                codec.key_agreement.shared_secret(encryption, self.bundles[peer].encryption_key, peer))
            for peer in self.peers
        }

    # --- before round 1 ---------------------------------------------------------------------------

    def encrypted_shares(self) -> dict[str, bytes]:
        """For each peer, its shares of every round's secrets, encrypted to it: what goes to the aggregator."""
        codec = self.codec
        rounds = range(1, codec.rounds + 1)
        mask_shares = [codec.shares_of(self.master, MASK_KEY, r) for r in rounds]
        self_shares = [codec.shares_of(self.master, SELF_MASK, r) for r in rounds]
        out = {}
        for peer in self.peers:
            aead = ChaCha20Poly1305(self._share_keys[peer])
            parts = []
            for r in rounds:
                nonce = os.urandom(_NONCE_BYTES)
                plain = shamir.to_bytes(mask_shares[r - 1][peer]) + shamir.to_bytes(self_shares[r - 1][peer])
                parts.append(nonce + aead.encrypt(nonce, plain, _associated_data(self.job_id, self.party, peer, r)))
            out[peer] = b"".join(parts)
        return out

    # --- a round ----------------------------------------------------------------------------------

    def protect(self, update: Tensors, round_: int) -> Tensors:
        """The masked upload: encoding + self-mask + one pair mask per peer."""
        codec, who = self.codec, f"party `{self.party}`"
        self._check_round(round_)
        tensors = _float_tensors(update, who)
        agreement = codec.key_agreement
        mine = agreement.private_key_from_seed(codec.secret(self.master, MASK_KEY, round_))
        pair_secrets = {peer: agreement.shared_secret(mine, self.bundles[peer].mask_keys[round_ - 1], peer)
                        for peer in self.peers}
        self_seed = codec.secret(self.master, SELF_MASK, round_)
        out: Tensors = {}
        for name, array in tensors.items():
            encoded = codec.fixed.encode(array, f"{who}: tensor `{name}`")
            masks = [(True, codec._streams(self_seed, self.job_id, round_, name))]
            masks += [(self.party < peer, codec._streams(pair_secrets[peer], self.job_id, round_, name))
                      for peer in self.peers]
            _apply_masks(encoded, masks)
            out[name] = codec._wire(encoded, array.shape)
        return out

    def reveal(self, round_: int, uploaded: Sequence[str], dropped: Sequence[str],
               ciphertexts: Mapping[str, bytes]) -> dict[str, bytes]:
        """This party's shares for the aggregator: self-mask seeds of `uploaded`, mask-key seeds of `dropped`."""
        codec = self.codec
        self._check_round(round_)
        codec.check_split(round_, uploaded, dropped)
        if self.party not in uploaded:
            raise SecAggError(f"round {round_}: `{self.party}` is listed as dropped, but it is here to reveal")
        self._record_split(round_, sorted(uploaded), sorted(dropped))
        shares = {}
        for owner in codec.holders:
            kind = SELF_MASK if owner in uploaded else MASK_KEY
            if owner == self.party:
                shares[owner] = shamir.to_bytes(codec.shares_of(self.master, kind, round_)[self.party])
                continue
            mask_share, self_share = self._decrypt(owner, round_, ciphertexts.get(owner, b""))
            shares[owner] = self_share if kind == SELF_MASK else mask_share
        return shares

    def _decrypt(self, sender: str, round_: int, ciphertext: bytes) -> tuple[bytes, bytes]:
        if len(ciphertext) != CIPHERTEXT_BYTES:
            raise SecAggError(f"round {round_}: no encrypted shares from `{sender}` came with the request")
        nonce, sealed = ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:]
        try:
            plain = ChaCha20Poly1305(self._share_keys[sender]).decrypt(
                nonce, sealed, _associated_data(self.job_id, sender, self.party, round_))
        except InvalidTag:
            raise SecAggError(f"round {round_}: the encrypted shares from `{sender}` do not authenticate "
                              "(altered, or meant for another party, job or round)") from None
        return plain[: shamir.ELEMENT_BYTES], plain[shamir.ELEMENT_BYTES:]

    def _check_round(self, round_: int) -> None:
        if isinstance(round_, bool) or not isinstance(round_, int) or not 1 <= round_ <= self.codec.rounds:
            raise SecAggError(f"party `{self.party}`: round {round_!r} is not in 1..{self.codec.rounds}")

    def _record_split(self, round_: int, uploaded: list[str], dropped: list[str]) -> None:
        """Refuse a split that differs from one answered before for this round: the same party's
        self-mask and mask-key shares would then both be out."""
        answered = self._answered
        if self.journal is not None and self.journal.exists():
            answered = json.loads(self.journal.read_text())
        split = {"uploaded": uploaded, "dropped": dropped}
        before = answered.get(str(round_))
        if before is not None and before != split:
            raise SecAggError(
                f"round {round_}: asked to reveal for uploaded {', '.join(uploaded)} / dropped "
                f"{', '.join(dropped) or 'none'}, but this party already answered for uploaded "
                f"{', '.join(before['uploaded'])} / dropped {', '.join(before['dropped']) or 'none'}; "
                "refusing (both answers together would unmask a single party's update)"
            )
        answered[str(round_)] = split
        self._answered = answered
        if self.journal is not None:
            files.write_json_atomic(self.journal, answered)

