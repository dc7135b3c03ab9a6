"""One aggregation round over real gRPC and a real Redis equals the sample-weighted mean, computed here."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from fedtune.federation import transport
from fedtune.federation.aggregator import AggregatorClient, AggregatorService, PlusAnswers, start_server
from fedtune.federation.jobstate import JobState
from fedtune.federation.proto import fedtune_pb2 as pb
from fedtune.secagg import SecAggError, make_codec
from fedtune.spec import Encryption
from fedtune.trust import certs

SAMPLES = {"assist_trainer": 10, "node-1": 35, "node-2": 19}
ENCRYPTIONS = {
    "plain": ({"plain": {}}, 1e-6),
    # Fixed point at scale 2^32: each of 3 terms is off by at most 2^-32 after truncation.
    "otp": ({"otp": {"key_bitlength": 64, "csprng": {"name": "chacha20"},
                     "key_exchange": {"curve": "x25519"}}}, 3 * 2.0**-32 + 1e-7),
}


def adapters(seed: int, parties=SAMPLES) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {p: {"layer.0.lora_A": rng.normal(size=(4, 16)).astype(np.float32),
                "layer.0.lora_B": rng.normal(size=(16, 4)).astype(np.float32)} for p in parties}


@pytest.mark.parametrize("scheme", sorted(ENCRYPTIONS))
def test_round_is_the_sample_weighted_mean(redis_server, scheme: str) -> None:
    encryption, tolerance = ENCRYPTIONS[scheme]
    codec = make_codec(Encryption.model_validate(encryption))
    state = JobState.connect(redis_server.address, redis_server.password, "agg-test")
    service = AggregatorService(state, codec, rounds=1, round_timeout_s=30)
    server, port = start_server(service, "127.0.0.1:0")
    try:
        service.configure({p: n / sum(SAMPLES.values()) for p, n in SAMPLES.items()}, own="assist_trainer")
        local = adapters(seed=3)
        total = sum(SAMPLES.values())
        labels = ["node-1", "node-2"]
        keys = {p: codec.new_private_key() for p in labels} if codec.needs_keys else {}
        publics = {p: codec.public_key(k) for p, k in keys.items()}

        def submit(party: str) -> None:
            weighted = {k: v * (SAMPLES[party] / total) for k, v in local[party].items()}
            secrets = {peer: codec.shared_secret(keys[party], publics[peer], peer)
                       for peer in labels if peer != party and keys}
            protected = codec.protect(weighted, party=party, secrets=secrets, job_id="agg-test", round_=1)
            client = AggregatorClient(f"127.0.0.1:{port}", party, None, deadline_s=30)
            client.submit(1, transport.pack_tensors(protected))

        threads = [threading.Thread(target=submit, args=(p,)) for p in labels]
        for thread in threads:
            thread.start()
        own = {k: v * (SAMPLES["assist_trainer"] / total) for k, v in local["assist_trainer"].items()}
        service.accept(1, "assist_trainer", transport.pack_tensors(codec.encode_plain(own)))
        for thread in threads:
            thread.join()
        blob = AggregatorClient(f"127.0.0.1:{port}", "node-1", None, deadline_s=30).fetch(1)
    finally:
        server.stop(0)
    result = transport.unpack_tensors(blob)
    for name in local["node-1"]:
        expected = sum(SAMPLES[p] * local[p][name].astype(np.float64) for p in SAMPLES) / total
        np.testing.assert_allclose(result[name], expected, rtol=0, atol=tolerance)
        if scheme == "otp":  # the aggregator never held node-1's update in the clear
            assert not np.allclose(result[name], local["node-1"][name])


# --- secagg_plus: label_trainers drop out mid-round -------------------------------------------------

PLUS_SAMPLES = {"assist_trainer": 10, "node-1": 35, "node-2": 19, "node-3": 22, "node-4": 14}
LABELS = ["node-1", "node-2", "node-3", "node-4"]
PLUS = {"secagg_plus": {"key_bitlength": 64, "key_exchange": {"curve": "x25519"}, "csprng": {"name": "chacha20"},
                        "dropout_timeout_s": 1.0}}


class PlusRound:
    """An aggregator over real gRPC and Redis, four label_trainers (threshold 3) that have handed in their shares.

    Each label_trainer has a certificate and keeps its journal in `folder`, so one that is built again (as a
    restarted party rebuilds itself) remembers what it uploaded and signed."""

    def __init__(self, redis_server, job_id: str, folder: Path, round_timeout_s: float = 60,
                 service: type[AggregatorService] = AggregatorService) -> None:
        self.codec = make_codec(PLUS, label_trainers=LABELS, rounds=2, context=job_id.encode())
        self.job_id = job_id
        self.folder = folder
        ca = certs.make_ca(job_id)
        self.identities = {p: certs.issue(ca, p) for p in LABELS}
        self.state = JobState.connect(redis_server.address, redis_server.password, job_id)
        self.service = service(self.state, self.codec, rounds=2, round_timeout_s=round_timeout_s,
                               dropout_timeout_s=1.0)
        self.server, self.port = start_server(self.service, "127.0.0.1:0")
        total = sum(PLUS_SAMPLES.values())
        self.weights = {p: n / total for p, n in PLUS_SAMPLES.items()}
        self.masters = {p: self.codec.new_private_key() for p in LABELS}
        self.publics = {p: self.codec.public_key(m) for p, m in self.masters.items()}
        self.service.configure(self.weights, "assist_trainer", self.publics)
        self.local = adapters(seed=5, parties=PLUS_SAMPLES)
        for party in LABELS:
            self.client(party).share_keys(self.party(party).encrypted_shares())

    def party(self, name: str):
        """A label_trainer's keys, as it (re)derives them from its master seed, and its journal."""
        return self.codec.party(self.masters[name], name, self.publics, self.folder / f"{name}.json")

    def answers(self, name: str) -> PlusAnswers:
        """How `name` answers the aggregator's confirmation and reveal requests, as in a job under TLS."""
        return PlusAnswers(self.party(name), self.identities[name].key_pem,
                           {p: i.cert_pem for p, i in self.identities.items()})

    def client(self, name: str) -> AggregatorClient:
        return AggregatorClient(f"127.0.0.1:{self.port}", name, None, deadline_s=30)

    def weighted(self, name: str) -> dict[str, np.ndarray]:
        """What a party sends: its update times its weight, in float32."""
        return {k: (v * self.weights[name]).astype(np.float32) for k, v in self.local[name].items()}

    def upload(self, name: str, round_: int) -> None:
        weighted = self.weighted(name)
        if name == "assist_trainer":
            self.service.accept(round_, name, transport.pack_tensors(self.codec.encode_plain(weighted)))
        else:
            self.client(name).submit(round_, transport.pack_tensors(self.party(name).protect(weighted, round_)))

    def fetch(self, name: str, round_: int) -> dict:
        return transport.unpack_tensors(self.client(name).fetch(round_, self.answers(name)))

    def mean_of(self, survivors: list[str]) -> dict:
        weight = sum(self.weights[p] for p in survivors)
        return {name: sum(self.weighted(p)[name].astype(np.float64) for p in survivors) / weight
                for name in self.local["node-1"]}

    def stop(self) -> None:
        self.server.stop(0)


def test_secagg_plus_round_completes_without_the_parties_that_dropped(redis_server, tmp_path: Path) -> None:
    """node-2 dies before it uploads, node-1 right after (and comes back, as a pod would): the round is the
    mean of the others over their own weights, and node-2's upload, once it is back, is ignored."""
    plus = PlusRound(redis_server, "plus-dropouts", tmp_path)
    try:
        for party in ("assist_trainer", "node-1", "node-3", "node-4"):
            plus.upload(party, 1)
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda p: plus.fetch(p, 1), ["node-3", "node-4", "node-1"]))
        assert plus.state.snapshot().dropouts == {"1": ["node-2"]}
        plus.upload("node-2", 1)  # back, late: ignored
        results.append(plus.fetch("node-2", 1))
    finally:
        plus.stop()
    expected = plus.mean_of(["assist_trainer", "node-1", "node-3", "node-4"])
    everyone = plus.mean_of(list(PLUS_SAMPLES))
    assert not np.allclose(results[0]["layer.0.lora_A"], everyone["layer.0.lora_A"], atol=1e-3)  # node-2 is out
    # Each of 4 terms is truncated by at most 2^-32, then divided by the survivors' weight (< 1); plus float32
    # rounding of the result.
    survivors_weight = 1 - plus.weights["node-2"]
    for result in results:
        for name, values in expected.items():
            np.testing.assert_allclose(result[name], values, rtol=2.0**-23, atol=4 * 2.0**-32 / survivors_weight)


@pytest.mark.parametrize(
    ("uploaders", "message"),
    [
        # node-1 died after its upload and never returns: two survivors cannot reveal three shares.
        (["node-1", "node-3", "node-4"], "round 1: only 2 survivors confirmed the survivor set (node-3, node-4) "
                                         "within aggregation.round_timeout_s=3 s; encryption.secagg_plus.threshold "
                                         "needs 3"),
        # node-1 and node-2 died before they uploaded.
        (["node-3", "node-4"], "round 1: only 2 of the 4 label_trainers uploaded; encryption.secagg_plus.threshold "
                               "needs at least 3 survivors (dropped: node-1, node-2)"),
    ],
)
def test_secagg_plus_round_fails_with_fewer_survivors_than_the_threshold(redis_server, tmp_path: Path, uploaders,
                                                                         message) -> None:
    plus = PlusRound(redis_server, "plus-too-few", tmp_path, round_timeout_s=3)
    try:
        for party in ["assist_trainer", *uploaders]:
            plus.upload(party, 1)
        with ThreadPoolExecutor(2) as pool, pytest.raises(transport.JobAborted) as failed:
            list(pool.map(lambda p: plus.fetch(p, 1), ["node-3", "node-4"]))
    finally:
        plus.stop()
    assert message in str(failed.value)
    assert plus.state.phase() == "Failed"


def test_an_answer_that_arrives_after_its_round_is_unmasked_is_not_needed(redis_server, tmp_path: Path) -> None:
    """node-4 is asked to confirm round 1 but its answer is held back; the round is unmasked with the other
    three. Its confirmation, then a reveal, arrive over gRPC afterwards: both are taken as not needed, and
    node-4 fetches the round's result and goes on (issue 21: such a reveal failed the job)."""
    plus = PlusRound(redis_server, "plus-late", tmp_path)
    try:
        for party in ["assist_trainer", *LABELS]:
            plus.upload(party, 1)
        _, request = plus.service.wait_for(1, 5.0, "node-4")
        assert request is not None and not request.signatures  # asked to confirm the survivor set
        held = plus.answers("node-4")(request)
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda p: plus.fetch(p, 1), ["node-1", "node-2", "node-3"]))
        assert plus.state.get_global(1) is not None
        client = plus.client("node-4")
        client._reveal(held)  # no error: not needed
        late = pb.RevealedShares(party="node-4", round=1, shares={p: bytes(32) for p in LABELS})
        client._reveal(late)
        assert plus.state.phase() != "Failed"
        mine = plus.fetch("node-4", 1)
    finally:
        plus.stop()
    for name, values in results[0].items():
        np.testing.assert_array_equal(mine[name], values)


class SplitViewHost(AggregatorService):
    """A dishonest host (tests only): it tells node-1 and node-2 that node-4 dropped out of round 1 and node-3 and
    node-4 that everyone uploaded, to get node-4's mask-key shares from the first pair and its self-mask shares
    from the second; once all four confirmed, it sends each the reveal request of its view with every signature
    it collected, and keeps whatever shares come back."""

    SHORT_VIEW = (["node-1", "node-2", "node-3"], ["node-4"])  # node-1 and node-2 see this; the others all four

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.signatures: dict[str, bytes] = {}
        self.revealed: dict[str, dict[str, bytes]] = {}

    def _unmask_request(self, round_: int, party: str) -> pb.UnmaskRequest | None:
        uploaded, dropped = self.SHORT_VIEW if party in ("node-1", "node-2") else (LABELS, [])
        if party not in self.signatures:
            return pb.UnmaskRequest(round=round_, uploaded=uploaded, dropped=dropped)
        if len(self.signatures) < len(LABELS):
            return None
        ciphertexts = {sender: self.plus.round_ciphertexts(shares[party], round_, sender)
                       for sender, shares in self._shares().items() if sender != party}
        return pb.UnmaskRequest(round=round_, uploaded=uploaded, dropped=dropped, ciphertexts=ciphertexts,
                                signatures=self.signatures)

    def accept_reveal(self, round_: int, party: str, shares: dict[str, bytes], signature: bytes = b"") -> None:
        if shares:
            self.revealed[party] = shares
        else:
            self.signatures[party] = signature


def test_honest_parties_refuse_a_host_that_shows_split_survivor_views(redis_server, tmp_path: Path) -> None:
    """Over real gRPC: every label_trainer signs the view it is shown, sees that no view carries the threshold's
    signatures (3 of 4), and refuses to reveal; the host gets no share at all."""
    plus = PlusRound(redis_server, "plus-split-views", tmp_path, service=SplitViewHost)
    try:
        for party in ["assist_trainer", *LABELS]:
            plus.upload(party, 1)

        def refusal(party: str) -> str:
            with pytest.raises(SecAggError) as refused:
                plus.fetch(party, 1)
            return str(refused.value)

        with ThreadPoolExecutor(4) as pool:
            refusals = dict(zip(LABELS, pool.map(refusal, LABELS)))
    finally:
        plus.stop()
    assert set(plus.service.signatures) == set(LABELS)
    assert plus.service.revealed == {}
    for message in refusals.values():
        assert "survivors" in message and "signed the survivor set" in message and "refusing" in message, message
