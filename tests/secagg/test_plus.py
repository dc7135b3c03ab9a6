"""SecAgg+ on one machine: rounds with and without dropouts, what the aggregator sees, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedtune.secagg import SecAggError, make_codec
from fedtune.secagg.codec import _apply_masks
from fedtune.secagg.plus import CIPHERTEXT_BYTES, SecAggPlusCodec, SecAggPlusParty

FAST = {"key_bitlength": 64, "key_exchange": {"curve": "x25519"}, "csprng": {"name": "chacha20"}}
SHAPES = {"lora_A": (4, 16), "lora_B": (3000,)}


class Federation:
    """Label_trainers that have published their keys and handed their encrypted shares to the aggregator."""

    def __init__(self, names: list[str], rounds: int = 3, threshold: int | None = None, **settings) -> None:
        self.codec: SecAggPlusCodec = make_codec({"secagg_plus": {**FAST, **settings}}, label_trainers=names,
                                                 rounds=rounds, threshold=threshold)
        self.masters = {p: self.codec.new_private_key() for p in names}
        self.publics = {p: self.codec.public_key(m) for p, m in self.masters.items()}
        self.parties = {p: self.party(p) for p in names}
        self.shares = {p: party.encrypted_shares() for p, party in self.parties.items()}

    def party(self, name: str, journal: Path | None = None) -> SecAggPlusParty:
        return self.codec.party(self.masters[name], name, "job", self.publics, journal)

    def inbox(self, recipient: str, round_: int) -> dict[str, bytes]:
        """What the aggregator hands `recipient` with a reveal request: the round's ciphertexts addressed to it."""
        return {sender: self.codec.round_ciphertexts(blobs[recipient], round_, sender)
                for sender, blobs in self.shares.items() if sender != recipient}

    def round(self, updates: dict, round_: int, uploaders: list[str], revealers: list[str] | None = None):
        """Masked uploads of `uploaders`, reveals of `revealers` (default: all uploaders), and the unmasked sum."""
        masked = {p: self.parties[p].protect(updates[p], round_) for p in uploaders}
        dropped = sorted(set(self.parties) - set(uploaders))
        reveals = {p: self.parties[p].reveal(round_, sorted(uploaders), dropped, self.inbox(p, round_))
                   for p in (revealers if revealers is not None else uploaders)}
        total = self.codec.unmask(masked, {}, job_id="job", round_=round_, publics=self.publics, dropped=dropped,
                                  reveals=reveals)
        return masked, reveals, total


def _updates(names, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {p: {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in SHAPES.items()} for p in names}


def _exact(updates: dict, parties) -> dict:
    return {k: sum(updates[p][k].astype(np.float64) for p in parties) for k in SHAPES}


NAMES = ["node-1", "node-2", "node-3", "node-4", "node-5"]


@pytest.mark.parametrize(
    ("settings", "uploaders"),
    [
        ({}, NAMES),  # nobody dropped: only the self-masks are removed
        ({}, ["node-1", "node-3", "node-4", "node-5"]),
        ({}, ["node-2", "node-4", "node-5"]),  # two dropped, the threshold (3) survives
        ({"key_bitlength": 128}, ["node-1", "node-2", "node-5"]),
        ({"csprng": {"name": "hmac_drbg", "method": "sha256"}}, ["node-1", "node-2", "node-3", "node-4"]),
        ({"key_exchange": {"key_bitlength": 2048}}, ["node-2", "node-3", "node-5"]),
    ],
)
def test_the_aggregator_gets_the_sum_of_the_uploads_whoever_dropped(settings: dict, uploaders: list[str]) -> None:
    federation = Federation(NAMES, **settings)
    updates = _updates(NAMES)
    _, _, total = federation.round(updates, 2, uploaders)
    bound = len(uploaders) * federation.codec.fixed.resolution + 1e-7  # truncation per term, float32 rounding
    for name, exact in _exact(updates, uploaders).items():
        np.testing.assert_allclose(total[name], exact, rtol=0, atol=bound)


def test_any_threshold_of_the_survivors_can_reveal() -> None:
    federation = Federation(NAMES)
    updates = _updates(NAMES, seed=1)
    uploaders = ["node-1", "node-2", "node-3", "node-5"]
    for revealers in (["node-1", "node-2", "node-3"], ["node-2", "node-3", "node-5"], uploaders):
        _, _, total = federation.round(updates, 1, uploaders, revealers)
        np.testing.assert_allclose(total["lora_B"], _exact(updates, uploaders)["lora_B"], rtol=0, atol=1e-6)


def test_fewer_than_threshold_uploads_or_reveals_fail_saying_how_many_are_needed() -> None:
    federation = Federation(NAMES)
    updates = _updates(NAMES)
    with pytest.raises(SecAggError, match=r"round 1: only 2 of the 5 label_trainers uploaded; .*needs at least 3"):
        federation.round(updates, 1, ["node-1", "node-2"])
    with pytest.raises(SecAggError, match=r"round 1: only 2 survivors revealed their shares; .*threshold needs 3"):
        federation.round(updates, 1, ["node-1", "node-2", "node-3"], revealers=["node-1", "node-3"])


def test_a_masked_upload_looks_uniform_even_once_a_dropped_peers_masks_are_known(byte_chi_square) -> None:
    """The aggregator's view of one party: its upload, and (node-5 dropped) the pair mask node-5 shared with it."""
    names = ["node-1", "node-2", "node-3", "node-4", "node-5"]
    federation = Federation(names, rounds=1)
    rng = np.random.default_rng(3)
    updates = {p: {"w": (rng.standard_normal(65_536) * 0.01).astype(np.float32)} for p in names}
    masked, _, total = federation.round(updates, 1, names[:4])
    statistic, critical = byte_chi_square(masked["node-1"]["w"])
    assert statistic < critical
    # The same statistic flags the plain encoding, and the sum comes out right: the masks were really there.
    assert byte_chi_square(federation.codec.encode_plain(updates["node-1"])["w"])[0] > 100 * critical
    exact = sum(updates[p]["w"].astype(np.float64) for p in names[:4])
    np.testing.assert_allclose(total["w"], exact, rtol=0, atol=1e-6)


def test_a_late_upload_of_a_dropped_party_stays_hidden_by_its_self_mask(byte_chi_square) -> None:
    """node-5 was declared dropped, so its round-1 mask key is revealed; its upload, if it came late, still looks
    uniform after the aggregator strips every pair mask from it."""
    names = ["node-1", "node-2", "node-3", "node-4", "node-5"]
    federation = Federation(names, rounds=1)
    codec = federation.codec
    rng = np.random.default_rng(4)
    updates = {p: {"w": (rng.standard_normal(65_536) * 0.01).astype(np.float32)} for p in names}
    _, reveals, _ = federation.round(updates, 1, names[:4])
    late = federation.parties["node-5"].protect(updates["node-5"], 1)
    bundles = {p: codec.unpack(federation.publics[p], p) for p in names}
    seeds = codec._reconstruct(1, names[:3], reveals, [], ["node-5"], bundles)
    stripped = late["w"].reshape(1, -1).copy()
    pair = [(not u > "node-5", codec._streams(codec.key_agreement.shared_secret(
        seeds["node-5"], bundles[u].mask_keys[0], u), "job", 1, "w")) for u in names[:4]]
    _apply_masks(stripped, pair)
    statistic, critical = byte_chi_square(stripped[0])
    assert statistic < critical
    # and stripping its self-mask as well (which nobody revealed) would have given its encoding
    _apply_masks(stripped, [(False, codec._streams(codec.secret(federation.masters["node-5"], b"self mask", 1),
                                                   "job", 1, "w"))])
    assert np.array_equal(stripped[0], codec.encode_plain(updates["node-5"])["w"])


def test_a_party_never_reveals_both_secrets_of_one_party_for_a_round(tmp_path: Path) -> None:
    federation = Federation(NAMES)
    inbox = federation.inbox("node-1", 2)
    journal = tmp_path / "reveals.json"
    party = federation.party("node-1", journal)
    first = party.reveal(2, ["node-1", "node-2", "node-3", "node-4"], ["node-5"], inbox)
    assert party.reveal(2, ["node-1", "node-2", "node-3", "node-4"], ["node-5"], inbox) == first  # asked again
    assert party.reveal(3, NAMES, [], federation.inbox("node-1", 3))  # another round, another split: fine
    for uploaded, dropped, message in [
        (["node-1", "node-2", "node-3", "node-5"], ["node-4"], "already answered for uploaded"),
        (["node-1", "node-2", "node-3", "node-4", "node-5"], ["node-5"], "`node-5` is listed as uploaded and as"),
        (["node-1", "node-2", "node-3"], ["node-5"], "must list every label_trainer once"),
        (["node-2", "node-3", "node-4"], ["node-1", "node-5"], "`node-1` is listed as dropped, but it is here"),
        (["node-1", "node-2"], ["node-3", "node-4", "node-5"], "only 2 of the 5 label_trainers uploaded"),
    ]:
        with pytest.raises(SecAggError, match=message):
            party.reveal(2, uploaded, dropped, inbox)
    restarted = federation.party("node-1", journal)  # the record survives a restart
    with pytest.raises(SecAggError, match="already answered"):
        restarted.reveal(2, ["node-1", "node-2", "node-3", "node-5"], ["node-4"], inbox)


def test_a_restarted_party_derives_the_same_keys_shares_and_masks() -> None:
    federation = Federation(NAMES[:3])
    again = federation.party("node-2")
    update = _updates(NAMES[:3])["node-2"]
    first = federation.parties["node-2"].protect(update, 1)
    assert all(np.array_equal(first[k], v) for k, v in again.protect(update, 1).items())
    # New ciphertexts (fresh nonces) of the very same shares.
    resent = again.encrypted_shares()
    node1 = federation.parties["node-1"]
    for round_ in (1, 2, 3):
        a = node1._decrypt("node-2", round_, federation.codec.round_ciphertexts(resent["node-1"], round_, "node-2"))
        b = node1._decrypt("node-2", round_, federation.inbox("node-1", round_)["node-2"])
        assert a == b


def test_altered_shares_and_ciphertexts_are_detected() -> None:
    federation = Federation(NAMES)
    updates = _updates(NAMES)
    uploaders = ["node-1", "node-2", "node-3", "node-4"]
    inbox = federation.inbox("node-1", 1)
    inbox["node-3"] = inbox["node-3"][:-1] + bytes([inbox["node-3"][-1] ^ 1])
    with pytest.raises(SecAggError, match="encrypted shares from `node-3` do not authenticate"):
        federation.parties["node-1"].reveal(1, uploaders, ["node-5"], inbox)
    with pytest.raises(SecAggError, match="round 2: the encrypted shares from `node-2` do not authenticate"):
        federation.parties["node-1"].reveal(2, uploaders, ["node-5"], federation.inbox("node-1", 1))
    masked, reveals, _ = federation.round(updates, 1, uploaders)
    for owner, what in (("node-2", "committed self-mask seed"), ("node-5", "the mask key `node-5` published")):
        bad = {p: dict(r) for p, r in reveals.items()}
        share = bytearray(bad["node-1"][owner])
        share[-1] ^= 1
        bad["node-1"][owner] = bytes(share)
        with pytest.raises(SecAggError, match=f"do not give .*{what}"):
            federation.codec.unmask(masked, {}, job_id="job", round_=1, publics=federation.publics,
                                    dropped=["node-5"], reveals=bad)


def test_bad_configuration_and_keys_are_refused() -> None:
    with pytest.raises(SecAggError, match=r"threshold: 2 is outside 3\.\.4 for 4 label_trainers"):
        make_codec({"secagg_plus": {**FAST, "threshold": 2}}, label_trainers=NAMES[:4])
    with pytest.raises(SecAggError, match=r"threshold: 5 is outside 3\.\.4"):
        make_codec({"secagg_plus": FAST}, label_trainers=NAMES[:4], threshold=5)
    federation = Federation(NAMES[:3])
    publics = dict(federation.publics)
    publics["node-3"] = publics["node-3"][:-1]
    with pytest.raises(SecAggError, match=r"public keys of `node-3`: 223 bytes, expected 224 for 3 rounds"):
        federation.codec.party(federation.masters["node-1"], "node-1", "job", publics)
    with pytest.raises(SecAggError, match="relayed for `node-1` are not its own"):
        federation.codec.party(federation.masters["node-2"], "node-1", "job", federation.publics)
    with pytest.raises(SecAggError, match=r"round 4 is not in 1\.\.3"):
        federation.parties["node-1"].protect(_updates(NAMES[:1])["node-1"], 4)
    assert len(federation.shares["node-1"]["node-2"]) == 3 * CIPHERTEXT_BYTES
    with pytest.raises(SecAggError, match="must address each peer once"):
        federation.codec.check_share_upload("node-1", {"node-2": federation.shares["node-1"]["node-2"]})
