"""SecAgg+ on one machine: rounds with and without dropouts, what the aggregator sees, refusals, and what
honest parties do when the host asks what it should not (split survivor views, rounds not uploaded, both
shares of one party)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedtune.secagg import SecAggError, make_codec, shamir
from fedtune.secagg.codec import _apply_masks
from fedtune.secagg.plus import CIPHERTEXT_BYTES, SELF_MASK, SecAggPlusCodec, SecAggPlusParty
from fedtune.trust import certs

FAST = {"key_bitlength": 64, "key_exchange": {"curve": "x25519"}, "csprng": {"name": "chacha20"}}
SHAPES = {"lora_A": (4, 16), "lora_B": (3000,)}


class Federation:
    """Label_trainers that have published their keys and handed their encrypted shares to the aggregator; each
    has a certificate of its own, so the survivors sign and check the survivor sets as in a job."""

    def __init__(self, names: list[str], rounds: int = 3, threshold: int | None = None, context: bytes = b"job",
                 **settings) -> None:
        self.codec: SecAggPlusCodec = make_codec({"secagg_plus": {**FAST, **settings}}, label_trainers=names,
                                                 rounds=rounds, threshold=threshold, context=context)
        self.masters = {p: self.codec.new_private_key() for p in names}
        self.publics = {p: self.codec.public_key(m) for p, m in self.masters.items()}
        self.parties = {p: self.party(p) for p in names}
        self.shares = {p: party.encrypted_shares() for p, party in self.parties.items()}
        ca = certs.make_ca("secagg-test")
        self.identities = {p: certs.issue(ca, p) for p in names}

    def party(self, name: str, journal: Path | None = None) -> SecAggPlusParty:
        return self.codec.party(self.masters[name], name, self.publics, journal)

    def inbox(self, recipient: str, round_: int) -> dict[str, bytes]:
        """What the aggregator hands `recipient` with a reveal request: the round's ciphertexts addressed to it."""
        return {sender: self.codec.round_ciphertexts(blobs[recipient], round_, sender)
                for sender, blobs in self.shares.items() if sender != recipient}

    def verify(self, signer: str, statement: bytes, signature: bytes) -> bool:
        return certs.statement_signed(self.identities[signer].cert_pem, statement, signature)

    def confirm(self, round_: int, uploaded: list[str], dropped: list[str], signers: list[str]) -> dict[str, bytes]:
        """The signatures of `signers`, each over the split as it was shown to it."""
        return {p: certs.sign_statement(self.identities[p].key_pem, self.parties[p].confirm(round_, uploaded, dropped))
                for p in signers}

    def reveal(self, name: str, round_: int, uploaded: list[str], dropped: list[str],
               signatures: dict[str, bytes]) -> dict[str, bytes]:
        return self.parties[name].reveal(round_, uploaded, dropped, self.inbox(name, round_), signatures, self.verify)

    def round(self, updates: dict, round_: int, uploaders: list[str], revealers: list[str] | None = None):
        """Masked uploads of `uploaders`, their confirmations, reveals of `revealers` (default: all uploaders),
        and the unmasked sum."""
        masked = {p: self.parties[p].protect(updates[p], round_) for p in uploaders}
        uploaded, dropped = sorted(uploaders), sorted(set(self.parties) - set(uploaders))
        signatures = self.confirm(round_, uploaded, dropped, uploaded)
        reveals = {p: self.reveal(p, round_, uploaded, dropped, signatures)
                   for p in (revealers if revealers is not None else uploaders)}
        total = self.codec.unmask(masked, {}, round_=round_, publics=self.publics, dropped=dropped, reveals=reveals)
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
        seeds["node-5"], bundles[u].mask_keys[0], u), 1, "w")) for u in names[:4]]
    _apply_masks(stripped, pair)
    statistic, critical = byte_chi_square(stripped[0])
    assert statistic < critical
    # and stripping its self-mask as well (which nobody revealed) would have given its encoding
    _apply_masks(stripped, [(False, codec._streams(codec.secret(federation.masters["node-5"], b"self mask", 1),
                                                   1, "w"))])
    assert np.array_equal(stripped[0], codec.encode_plain(updates["node-5"])["w"])


def test_a_party_never_reveals_both_secrets_of_one_party_for_a_round(tmp_path: Path) -> None:
    """node-1 confirmed round 2 with node-5 dropped. A host that asks it to confirm or reveal node-5 as an
    uploader (its self-mask share) gets a refusal, also from node-1 restarted; so do malformed splits."""
    federation = Federation(NAMES)
    journal = tmp_path / "secagg-journal.json"
    party = federation.parties["node-1"] = federation.party("node-1", journal)
    updates = _updates(NAMES)
    for p in NAMES:
        federation.parties[p].protect(updates[p], 2)
    four, everyone = ["node-1", "node-2", "node-3", "node-4"], NAMES
    signatures = federation.confirm(2, four, ["node-5"], four)
    first = federation.reveal("node-1", 2, four, ["node-5"], signatures)
    assert federation.reveal("node-1", 2, four, ["node-5"], signatures) == first  # asked again: the same answer
    assert party.confirm(2, four, ["node-5"])  # and confirmed again (a retry)
    for uploaded, dropped, message in [
        (["node-1", "node-2", "node-3", "node-5"], ["node-4"], "already signed uploaded node-1, node-2, node-3, "
                                                               "node-4 / dropped node-5"),
        (everyone, [], "already signed"),
        (everyone, ["node-5"], "`node-5` is listed as uploaded and as"),
        (["node-1", "node-2", "node-3"], ["node-5"], "must list every label_trainer once"),
        (["node-2", "node-3", "node-4"], ["node-1", "node-5"], "`node-1` is listed as dropped, but it uploaded"),
        (["node-1", "node-2"], ["node-3", "node-4", "node-5"], "only 2 of the 5 label_trainers uploaded"),
    ]:
        with pytest.raises(SecAggError, match=message):
            party.confirm(2, uploaded, dropped)
    # Signatures of every other party over "everyone uploaded" do not make node-1 reveal node-5's self-mask share.
    colluders = {p: federation.party(p) for p in ("node-2", "node-3")}  # copies that sign a second view
    others = {p: certs.sign_statement(federation.identities[p].key_pem, (q.protect(updates[p], 2), q)[1].confirm(
        2, everyone, [])) for p, q in colluders.items()}
    others.update(federation.confirm(2, everyone, [], ["node-5"]))
    with pytest.raises(SecAggError, match="but this party signed another one"):
        federation.reveal("node-1", 2, everyone, [], {**others, "node-1": signatures["node-1"]})
    restarted = federation.party("node-1", journal)  # the record survives a restart
    with pytest.raises(SecAggError, match="already signed"):
        restarted.confirm(2, everyone, [])
    assert restarted.reveal(2, four, ["node-5"], federation.inbox("node-1", 2), signatures, federation.verify) == first


def test_split_survivor_views_never_reach_the_threshold(tmp_path: Path) -> None:
    """The host shows node-1..3 "node-5 dropped" and node-4, node-5 "everyone uploaded", to collect node-5's
    mask-key shares from the first group and its self-mask shares from the second. Each group signs its own
    view; no view carries the threshold's signatures, so nobody reveals, whatever signatures the host attaches."""
    federation = Federation(NAMES)  # threshold 3 of 5
    updates = _updates(NAMES)
    for p in NAMES:
        federation.parties[p].protect(updates[p], 1)
    view_a = (["node-1", "node-2", "node-3", "node-4"], ["node-5"])
    view_b = (NAMES, [])
    signed_a = federation.confirm(1, *view_a, ["node-1", "node-2"])
    signed_b = federation.confirm(1, *view_b, ["node-4", "node-5"])
    for name, view in (("node-1", view_a), ("node-2", view_a), ("node-4", view_b), ("node-5", view_b)):
        with pytest.raises(SecAggError, match=r"only 2 survivors .* signed the survivor set .* needs 3: refusing"):
            federation.reveal(name, 1, *view, {**signed_a, **signed_b})
    # A signature forged for node-3 (node-3 never signed anything) counts for nothing either.
    forged = {**signed_a, "node-3": certs.sign_statement(federation.identities["node-1"].key_pem,
                                                         federation.parties["node-1"].confirm(1, *view_a))}
    with pytest.raises(SecAggError, match="only 2 survivors"):
        federation.reveal("node-1", 1, *view_a, forged)
    # Once node-3 really signed view A, those who saw it reveal; node-3 itself can no longer confirm view B.
    signed_a.update(federation.confirm(1, *view_a, ["node-3"]))
    assert federation.reveal("node-1", 1, *view_a, signed_a)
    with pytest.raises(SecAggError, match="already signed"):
        federation.parties["node-3"].confirm(1, *view_b)


def test_colluders_raise_the_threshold_above_half_of_n_plus_c() -> None:
    """With max_colluders 1 among 5 the threshold is 4: a colluder (node-5) that signs both views still leaves
    each view short, while t = 3 would have let each view through with its help."""
    federation = Federation(NAMES, max_colluders=1)
    assert federation.codec.threshold == 4
    with pytest.raises(SecAggError, match=r"threshold: 3 is outside 4\.\.5 for 5 label_trainers and 1 colluders"):
        make_codec({"secagg_plus": {**FAST, "max_colluders": 1}}, label_trainers=NAMES, threshold=3, context=b"j")
    updates = _updates(NAMES)
    for p in NAMES:
        federation.parties[p].protect(updates[p], 1)
    view_a = (["node-1", "node-2", "node-3", "node-5"], ["node-4"])
    view_b = (NAMES, [])
    signed_a = federation.confirm(1, *view_a, ["node-1", "node-2", "node-5"])
    colluder = federation.party("node-5")  # node-5 colludes: a second copy of it signs the other view too
    colluder.protect(updates["node-5"], 1)
    signed_b = federation.confirm(1, *view_b, ["node-3", "node-4"])
    signed_b["node-5"] = certs.sign_statement(federation.identities["node-5"].key_pem, colluder.confirm(1, *view_b))
    with pytest.raises(SecAggError, match=r"only 3 survivors .* needs 4"):
        federation.reveal("node-1", 1, *view_a, signed_a)
    with pytest.raises(SecAggError, match=r"only 3 survivors .* needs 4"):
        federation.reveal("node-4", 1, *view_b, signed_b)


def test_reveals_only_for_the_round_being_closed() -> None:
    """A host that asks for shares of a round a party never uploaded, or of one it has moved past, is refused."""
    federation = Federation(NAMES)
    party = federation.parties["node-1"]
    everyone = (NAMES, [])
    with pytest.raises(SecAggError, match="round 1: asked for shares of a round this party is not closing "
                                          r"\(it has uploaded no round\)"):
        party.confirm(1, *everyone)
    updates = _updates(NAMES)
    federation.round(updates, 1, NAMES)
    with pytest.raises(SecAggError, match=r"round 2: .*not closing \(the last round it uploaded is 1\)"):
        party.confirm(2, *everyone)
    party.protect(updates["node-1"], 2)
    with pytest.raises(SecAggError, match=r"round 1: .*not closing \(the last round it uploaded is 2\)"):
        party.reveal(1, *everyone, federation.inbox("node-1", 1), {}, federation.verify)


def test_no_hidden_limit_on_the_number_of_parties() -> None:
    """420 label_trainers: threshold 211 (HKDF's one expansion would stop at 205); any 211 shares give the secret."""
    names = [f"node-{i:03d}" for i in range(420)]
    codec = make_codec({"secagg_plus": FAST}, label_trainers=names, rounds=1, context=b"many")
    assert codec.threshold == 211
    master = codec.new_private_key()
    shares = codec.shares_of(master, SELF_MASK, 1)
    secret = shamir.from_bytes(codec.secret(master, SELF_MASK, 1), "secret")
    for chosen in (names[:211], names[-211:], names[::2][:105] + names[1::2][:106]):
        assert shamir.interpolate_at_zero({codec.points[p]: shares[p] for p in chosen}) == secret
    assert shamir.interpolate_at_zero({codec.points[p]: shares[p] for p in names[:210]}) != secret


def test_keys_and_masks_are_bound_to_the_run_context() -> None:
    """The same master seed in another run (another context) gives other public keys and another mask."""
    first, second = Federation(NAMES[:3], context=b"run-1"), Federation(NAMES[:3], context=b"run-2")
    master = first.masters["node-1"]
    assert first.codec.public_key(master) != second.codec.public_key(master)
    assert first.codec.secret(master, SELF_MASK, 1) != second.codec.secret(master, SELF_MASK, 1)


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
    masked = {p: federation.parties[p].protect(updates[p], 1) for p in uploaders}
    signatures = federation.confirm(1, uploaders, ["node-5"], uploaders)
    with pytest.raises(SecAggError, match="encrypted shares from `node-3` do not authenticate"):
        federation.parties["node-1"].reveal(1, uploaders, ["node-5"], inbox, signatures, federation.verify)
    elsewhere = Federation(NAMES, context=b"another run")  # the same shares are not accepted in another run
    with pytest.raises(SecAggError, match="relayed for `node-1` are not its own"):
        elsewhere.codec.party(federation.masters["node-1"], "node-1", elsewhere.publics)
    reveals = {p: federation.reveal(p, 1, uploaders, ["node-5"], signatures) for p in uploaders}
    for owner, what in (("node-2", "committed self-mask seed"), ("node-5", "the mask key `node-5` published")):
        bad = {p: dict(r) for p, r in reveals.items()}
        share = bytearray(bad["node-1"][owner])
        share[-1] ^= 1
        bad["node-1"][owner] = bytes(share)
        with pytest.raises(SecAggError, match=f"do not give .*{what}"):
            federation.codec.unmask(masked, {}, round_=1, publics=federation.publics,
                                    dropped=["node-5"], reveals=bad)


def test_bad_configuration_and_keys_are_refused() -> None:
    with pytest.raises(SecAggError, match=r"threshold: 2 is outside 3\.\.4 for 4 label_trainers"):
        make_codec({"secagg_plus": {**FAST, "threshold": 2}}, label_trainers=NAMES[:4], context=b"j")
    with pytest.raises(SecAggError, match=r"threshold: 5 is outside 3\.\.4"):
        make_codec({"secagg_plus": FAST}, label_trainers=NAMES[:4], threshold=5, context=b"j")
    with pytest.raises(SecAggError, match="needs the run's context"):
        make_codec({"secagg_plus": FAST}, label_trainers=NAMES[:4])
    federation = Federation(NAMES[:3])
    publics = dict(federation.publics)
    publics["node-3"] = publics["node-3"][:-1]
    with pytest.raises(SecAggError, match=r"public keys of `node-3`: 223 bytes, expected 224 for 3 rounds"):
        federation.codec.party(federation.masters["node-1"], "node-1", publics)
    with pytest.raises(SecAggError, match="relayed for `node-1` are not its own"):
        federation.codec.party(federation.masters["node-2"], "node-1", federation.publics)
    with pytest.raises(SecAggError, match=r"round 4 is not in 1\.\.3"):
        federation.parties["node-1"].protect(_updates(NAMES[:1])["node-1"], 4)
    assert len(federation.shares["node-1"]["node-2"]) == 3 * CIPHERTEXT_BYTES
    with pytest.raises(SecAggError, match="must address each peer once"):
        federation.codec.check_share_upload("node-1", {"node-2": federation.shares["node-1"]["node-2"]})
