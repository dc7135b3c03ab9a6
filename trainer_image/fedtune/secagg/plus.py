"""SecAgg+: secure aggregation that survives label_trainers dropping out mid-round, and a dishonest host.

After Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
(CCS 2017), with its consistency check and the threshold of Bell et al., "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead" (CCS 2020) for a host that colludes with up to c
label_trainers; keys for every round are made up front, so a job needs no extra key exchange.
As in Flower's SecAgg+, the protocol (this module: what each side computes and checks), the
workflow (`fedtune.federation.aggregator`: who sends what when) and the primitives (`shamir`,
`keys`, `streams`) are apart.

Keys. Every label_trainer keeps one random 32-byte master seed (persisted beside its training
state: a restart re-derives everything below) and derives from it, by HKDF-SHA256 (extract with
the job's context as salt, then expand),
- an encryption key pair c, for the shares it sends its peers;
- for each round r, a mask key pair m_r and a self-mask seed b_r.
The context (`context: bytes`, one argument of the codec) binds every key, mask and share to one
run of one job. Its public bundle, signed with its identity by the party flow, holds c's public
key, every m_r's public key and a hash commitment to every b_r. Before round 1 it splits each m_r
seed and each b_r into Shamir shares (threshold t, one per label_trainer, itself included) and
sends every peer its shares, encrypted (ChaCha20-Poly1305) under a key agreed from c, to the
aggregator, which keeps them for the peers but cannot read them.

Threshold. With n label_trainers of which up to c (`max_colluders`) collude with the host, t must
exceed (n + c)/2: a host that shows one group of honest parties "u uploaded" and another "u
dropped" needs t answers for each, the colluders answering both, so the two honest groups would
have to share a member, who answers only one of them.

A round r, the messages in order (party u, aggregator A):
1. upload      u -> A   y_u = enc(x_u) + PRG(b_r,u) + Σ_{v ≠ u} ±PRG(DH(m_r,u, m_r,v))
                        (+ when u's name sorts before v's), in the ring of the fixed-point encoding.
                        u journals that it uploaded r.
2. split       A        after the upload deadline A fixes who uploaded (U) and who did not (D).
3. confirm     A -> u   (r, U, D), for u in U.
               u -> A   u's signature over the statement (context, r, U, D). u signs only for the
                        round it is closing, which it uploaded, only if it is in U, |U| >= t and U, D
                        split the label_trainers, and never two different splits of one round (journal).
4. reveal      A -> u   (r, U, D), the signatures of S ⊆ U, and the ciphertexts addressed to u.
               u -> A   u checks (r, U, D) is the split it signed and that at least t members of U,
                        itself included, signed that very statement (their certificates); then it
                        reveals its share of b_r,v for each v in U and of m_r,w for each w in D: one
                        kind per party, never both (the mask key only of those all signers saw drop).
5. unmask      A        with t answers, A removes every self-mask and the pair masks between U and D;
                        pair masks within U cancel in the sum.
A party answers a repeated message as before (a signature over the same statement, the same shares),
so retries and late answers are harmless (and the party flow resends a round's upload unchanged);
the aggregator takes an answer for a round it has already unmasked as not needed. Learning m_r of
a dropped party exposes only that round's pair masks; its upload for that round, if it arrives
late, is refused, and its self-mask still hides it.

States, per round, at the aggregator: collecting (uploads) -> confirming (split fixed; signatures)
-> revealing (signers fixed; shares) -> done (global adapter) or failed. At a party: uploaded ->
confirmed (split signed) -> revealed -> done.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

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
# Checks a survivor's signature over a statement: (signer, statement, signature) -> valid or not.
Verify = Callable[[str, bytes, bytes], bool]


def _derive(secret: bytes, context: bytes, label: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256, extract (the context as salt) then expand (`label` as info): RFC 5869 in full."""
    return HKDF(hashes.SHA256(), length, b"fedtune secagg+\0" + context, b"fedtune secagg+\0" + label).derive(secret)


def _stream(key: bytes, length: int) -> bytes:
    """`length` pseudorandom bytes from a 32-byte key (the ChaCha20 keystream): no bound on the length,
    unlike one HKDF expansion (255 hash blocks)."""
    return Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(length))


def _fields(*fields: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(f)) + f for f in fields)


def survivor_statement(context: bytes, round_: int, uploaded: Sequence[str], dropped: Sequence[str]) -> bytes:
    """What a survivor signs in the consistency check: this run, this round, and its split into U and D."""
    return _fields(b"fedtune secagg+ survivors", context, str(round_).encode(),
                   json.dumps(sorted(uploaded)).encode(), json.dumps(sorted(dropped)).encode())


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
                 threshold: int, holders: Sequence[str], rounds: int, context: bytes, colluders: int = 0) -> None:
        super().__init__(key_bits, key_agreement, generator)
        self.holders = sorted(holders)
        if len(set(self.holders)) != len(self.holders) or not self.holders:
            raise SecAggError("secagg_plus needs the distinct names of the label_trainers")
        low = majority(len(self.holders), colluders)
        if not low <= threshold <= len(self.holders):
            raise SecAggError(
                f"encryption.secagg_plus.threshold: {threshold} is outside {low}..{len(self.holders)} for "
                f"{len(self.holders)} label_trainers and {colluders} colluders (it must exceed (n + c)/2)"
            )
        if rounds < 1:
            raise SecAggError(f"secagg_plus needs at least one round, got {rounds}")
        if not isinstance(context, bytes) or not context:
            raise SecAggError("secagg_plus needs the run's context (bytes) to bind its keys to")
        self.threshold = threshold
        self.colluders = colluders
        self.context = context
        # A party's keys derive from its master seed (fresh per run) before the run's session is known (its
        # public bundle is part of what fixes the session): they keep the context the codec was made with.
        self.key_context = context
        self.rounds = rounds
        self.points = {name: i + 1 for i, name in enumerate(self.holders)}  # Shamir x-coordinates
        probe = key_agreement.public_key(key_agreement.private_key_from_seed(bytes(32)))
        self.key_bytes = len(probe)

    def bound_to(self, context: bytes) -> SecAggPlusCodec:
        """The same codec bound to the run's session id (known once every party's bundle is in): masks, share
        encryption and signed statements use it; the keys derived from a master seed stay as they were."""
        if not isinstance(context, bytes) or not context:
            raise SecAggError("secagg_plus needs the run's context (bytes) to bind its keys to")
        bound = copy.copy(self)
        bound.context = context
        return bound

    def __repr__(self) -> str:
        return (f"SecAggPlusCodec({self.fixed.bits} bits, {self.key_agreement.name}, {self.generator.name}, "
                f"threshold {self.threshold} of {len(self.holders)}, {self.colluders} colluders, {self.rounds} rounds)")

    # --- keys ---------------------------------------------------------------------------------

    def new_private_key(self) -> bytes:
        """A party's master seed: every key and secret it uses derives from it."""
        return os.urandom(MASTER_BYTES)

    def secret(self, master: bytes, kind: bytes, round_: int) -> bytes:
        """The round's mask-key seed (MASK_KEY) or self-mask seed (SELF_MASK), as a field element."""
        return shamir.to_bytes(_element(self._expand(master, _round_label(kind, round_), 40)))

    def _expand(self, master: bytes, label: bytes, length: int = 32) -> bytes:
        return _derive(_check_master(master), self.key_context, label, length)

    def _encryption_private(self, master: bytes) -> bytes:
        seed = shamir.to_bytes(_element(self._expand(master, b"share encryption key", 40)))
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

    def party(self, master: bytes, party: str, publics: Mapping[str, bytes],
              journal: Path | None = None) -> SecAggPlusParty:
        return SecAggPlusParty(self, master, party, publics, journal)

    # --- shares -------------------------------------------------------------------------------

    def _coefficients(self, master: bytes, kind: bytes, round_: int) -> list[int]:
        # Reproducible, so a restarted party hands out the very same shares; 8 spare bytes per
        # coefficient make the reduction modulo the prime unbiased to 2^-64.
        key = self._expand(master, b"coefficients\0" + _round_label(kind, round_))
        raw = _stream(key, 40 * (self.threshold - 1))
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

    def unmask(self, masked: dict[str, Tensors], plaintext: dict[str, Tensors], *, round_: int,
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
            _apply_masks(total, self._removal_masks(round_, name, uploaded, dropped, seeds, bundles))
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

    def _removal_masks(self, round_: int, tensor: str, uploaded: list[str], dropped: Sequence[str],
                       seeds: dict[str, bytes], bundles: dict[str, PublicBundle]) -> list[Mask]:
        """Subtract every self-mask; undo each uploader's mask with each dropped party (added if it sorts first)."""
        masks = [(False, self._streams(seeds[u], round_, tensor)) for u in uploaded]
        for w in dropped:
            for u in uploaded:
                secret = self.key_agreement.shared_secret(seeds[w], bundles[u].mask_keys[round_ - 1], u)
                masks.append((not u < w, self._streams(secret, round_, tensor)))
        return masks

    def _streams(self, secret: bytes, round_: int, tensor: str) -> list[MaskStream]:
        limbs = range(self.fixed.limbs)
        return [self.generator.stream(secret, mask_info(self.context, round_, tensor, limb)) for limb in limbs]


def _check_master(master: bytes) -> bytes:
    if not isinstance(master, bytes) or len(master) != MASTER_BYTES:
        raise SecAggError(f"a secagg_plus master seed is {MASTER_BYTES} bytes (is the saved agreement.key from "
                          "another scheme?)")
    return master


def _associated_data(context: bytes, sender: str, recipient: str, round_: int) -> bytes:
    return _fields(b"fedtune secagg+ shares", context, sender.encode(), recipient.encode(), str(round_).encode())


class SecAggPlusParty:
    """One label_trainer's side of SecAgg+: its shares for the peers, its masked uploads, its confirmations
    and reveals, each checked against what a dishonest host could ask (see the module's docstring).

    `journal`, a file beside the party's training state, records the rounds this party uploaded and the
    split it signed for each, so that a restarted party still refuses a different one.
    """

    def __init__(self, codec: SecAggPlusCodec, master: bytes, party: str, publics: Mapping[str, bytes],
                 journal: Path | None = None) -> None:
        if party not in codec.points:
            raise SecAggError(f"`{party}` is not a label_trainer of this job")
        missing = [p for p in codec.holders if p not in publics]
        if missing:
            raise SecAggError(f"no public keys from label_trainer `{missing[0]}`")
        self.codec = codec
        self.master = _check_master(master)
        self.party = party
        self.bundles = {p: codec.unpack(publics[p], p) for p in codec.holders}
        if codec.public_key(master) != publics[party]:
            raise SecAggError(f"the public keys relayed for `{party}` are not its own (a different master seed?)")
        self.peers = [p for p in codec.holders if p != party]
        self._record = _Journal(journal)
        encryption = codec._encryption_private(master)
        self._share_keys = {
            peer: _derive(codec.key_agreement.shared_secret(encryption, self.bundles[peer].encryption_key, peer),
                          codec.context, b"share key")
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
                parts.append(nonce + aead.encrypt(nonce, plain, _associated_data(codec.context, self.party, peer, r)))
            out[peer] = b"".join(parts)
        return out

    # --- a round ----------------------------------------------------------------------------------

    def protect(self, update: Tensors, round_: int) -> Tensors:
        """The masked upload: encoding + self-mask + one pair mask per peer. Journals the round as uploaded."""
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
            masks = [(True, codec._streams(self_seed, round_, name))]
            masks += [(self.party < peer, codec._streams(pair_secrets[peer], round_, name)) for peer in self.peers]
            _apply_masks(encoded, masks)
            out[name] = codec._wire(encoded, array.shape)
        self._record.uploaded(round_)
        return out

    def confirm(self, round_: int, uploaded: Sequence[str], dropped: Sequence[str]) -> bytes:
        """The statement this party signs for the consistency check: (context, round, U, D), once checked
        that the round is the one it is closing, that it is in U, and that it never signed another split."""
        self._check_request(round_, uploaded, dropped)
        self._record.signed(round_, sorted(uploaded), sorted(dropped))
        return survivor_statement(self.codec.context, round_, uploaded, dropped)

    def reveal(self, round_: int, uploaded: Sequence[str], dropped: Sequence[str], ciphertexts: Mapping[str, bytes],
               signatures: Mapping[str, bytes], verify: Verify | None) -> dict[str, bytes]:
        """This party's shares for the aggregator: self-mask seeds of `uploaded`, mask-key seeds of `dropped`.

        Only for the split it signed, and only once at least `threshold` members of U (itself among them)
        signed the same statement: `verify` checks each signature against the signer's identity (None where
        parties have no identity to sign with, as without TLS: then the signers are only counted).
        """
        codec = self.codec
        self._check_request(round_, uploaded, dropped)
        signed = self._record.split(round_)
        if signed != {"uploaded": sorted(uploaded), "dropped": sorted(dropped)}:
            what = "signed no survivor set" if signed is None else f"signed another one ({_describe(signed)})"
            raise SecAggError(f"round {round_}: asked to reveal for {_describe(uploaded, dropped)}, but this party "
                              f"{what}; refusing (only a split every survivor confirmed may be unmasked)")
        self._check_signatures(round_, uploaded, dropped, signatures, verify)
        shares = {}
        for owner in codec.holders:
            kind = SELF_MASK if owner in uploaded else MASK_KEY
            if owner == self.party:
                shares[owner] = shamir.to_bytes(codec.shares_of(self.master, kind, round_)[self.party])
                continue
            mask_share, self_share = self._decrypt(owner, round_, ciphertexts.get(owner, b""))
            shares[owner] = self_share if kind == SELF_MASK else mask_share
        return shares

    def _check_request(self, round_: int, uploaded: Sequence[str], dropped: Sequence[str]) -> None:
        """A request to confirm or reveal must be for the round this party is closing (the last it uploaded),
        name it among the uploaders, and split the label_trainers with at least `threshold` uploads."""
        self._check_round(round_)
        last = self._record.last_uploaded()
        if round_ != last:
            done = f"the last round it uploaded is {last}" if last else "it has uploaded no round"
            raise SecAggError(f"round {round_}: asked for shares of a round this party is not closing ({done}); "
                              "refusing")
        self.codec.check_split(round_, uploaded, dropped)
        if self.party not in uploaded:
            raise SecAggError(f"round {round_}: `{self.party}` is listed as dropped, but it uploaded; refusing")

    def _check_signatures(self, round_: int, uploaded: Sequence[str], dropped: Sequence[str],
                          signatures: Mapping[str, bytes], verify: Verify | None) -> None:
        statement = survivor_statement(self.codec.context, round_, uploaded, dropped)
        valid = sorted(p for p, signature in signatures.items()
                       if p in uploaded and (verify is None or verify(p, statement, signature)))
        if self.party not in valid or len(valid) < self.codec.threshold:
            raise SecAggError(
                f"round {round_}: only {len(valid)} survivors ({', '.join(valid) or 'none'}) signed the survivor set "
                f"{_describe(uploaded, dropped)}{'' if self.party in valid else ', this party not among them'}; "
                f"encryption.secagg_plus.threshold needs {self.codec.threshold}: refusing to reveal (the survivors "
                "may have been shown different sets)"
            )

    def _decrypt(self, sender: str, round_: int, ciphertext: bytes) -> tuple[bytes, bytes]:
        if len(ciphertext) != CIPHERTEXT_BYTES:
            raise SecAggError(f"round {round_}: no encrypted shares from `{sender}` came with the request")
        nonce, sealed = ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:]
        try:
            plain = ChaCha20Poly1305(self._share_keys[sender]).decrypt(
                nonce, sealed, _associated_data(self.codec.context, sender, self.party, round_))
        except InvalidTag:
            raise SecAggError(f"round {round_}: the encrypted shares from `{sender}` do not authenticate "
                              "(altered, or meant for another party, job or round)") from None
        return plain[: shamir.ELEMENT_BYTES], plain[shamir.ELEMENT_BYTES:]

    def _check_round(self, round_: int) -> None:
        if isinstance(round_, bool) or not isinstance(round_, int) or not 1 <= round_ <= self.codec.rounds:
            raise SecAggError(f"party `{self.party}`: round {round_!r} is not in 1..{self.codec.rounds}")


def _describe(uploaded: Sequence[str] | Mapping[str, list[str]], dropped: Sequence[str] = ()) -> str:
    if isinstance(uploaded, Mapping):
        uploaded, dropped = uploaded["uploaded"], uploaded["dropped"]
    return f"uploaded {', '.join(uploaded)} / dropped {', '.join(dropped) or 'none'}"


class _Journal:
    """What a party has done in the protocol, kept in a file when given so that a restart remembers it:
    the rounds it uploaded, and the one split it signed for each round."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict = {"uploaded": [], "signed": {}}
        if path is not None and path.exists():
            self.data = json.loads(path.read_text())

    def uploaded(self, round_: int) -> None:
        if round_ not in self.data["uploaded"]:
            self.data["uploaded"].append(round_)
            self._save()

    def last_uploaded(self) -> int:
        return max(self.data["uploaded"], default=0)

    def split(self, round_: int) -> dict[str, list[str]] | None:
        return self.data["signed"].get(str(round_))

    def signed(self, round_: int, uploaded: list[str], dropped: list[str]) -> None:
        """Refuse a split other than the one signed before for this round: the same party's self-mask and
        mask-key shares would then both be out."""
        split = {"uploaded": uploaded, "dropped": dropped}
        before = self.split(round_)
        if before is not None and before != split:
            raise SecAggError(
                f"round {round_}: asked to confirm {_describe(split)}, but this party already signed "
                f"{_describe(before)}; refusing (both answers together would unmask a single party's update)"
            )
        if before is None:
            self.data["signed"][str(round_)] = split
            self._save()

    def _save(self) -> None:
        if self.path is not None:
            files.write_json_atomic(self.path, self.data)
