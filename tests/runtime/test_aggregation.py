"""One aggregation round over real gRPC and a real Redis equals the sample-weighted mean, computed here."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fedtune import transport
from fedtune.aggregator import AggregatorClient, AggregatorService, start_server
from fedtune.jobstate import JobState
from fedtune.secagg import make_codec
from fedtune.spec import Encryption

SAMPLES = {"assist_trainer": 10, "node-1": 35, "node-2": 19}
ENCRYPTIONS = {
    "plain": ({"plain": {}}, 1e-6),
    # Fixed point at scale 2^32: each of 3 terms is off by at most 2^-32 after truncation.
    "otp": ({"otp": {"key_bitlength": 64, "csprng": {"name": "chacha20"},
                     "key_exchange": {"curve": "x25519"}}}, 3 * 2.0**-32 + 1e-7),
}


def adapters(seed: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {p: {"layer.0.lora_A": rng.normal(size=(4, 16)).astype(np.float32),
                "layer.0.lora_B": rng.normal(size=(16, 4)).astype(np.float32)} for p in SAMPLES}


@pytest.mark.parametrize("scheme", sorted(ENCRYPTIONS))
def test_round_is_the_sample_weighted_mean(redis_server, scheme: str) -> None:
    encryption, tolerance = ENCRYPTIONS[scheme]
    codec = make_codec(Encryption.model_validate(encryption))
    state = JobState.connect(redis_server.address, redis_server.password, "agg-test")
    service = AggregatorService(state, codec, rounds=1, round_timeout_s=30)
    server, port = start_server(service, "127.0.0.1:0")
    try:
        service.configure(set(SAMPLES), own="assist_trainer")
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
