"""One aggregation round of a 3.67M-weight adapter among 3 parties, with mutual TLS versus without.

The assist_trainer's aggregator serves on loopback (real gRPC, real redis-server); node-1
and node-2 submit their updates and fetch the global adapter concurrently, the assist_trainer
adds its own. Both variants run in the same process, interleaved. Goal: mTLS/plain <= 1.05.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import chatglm_lora_adapter, machine

from fedtune.federation import transport
from fedtune.federation.aggregator import AggregatorClient, AggregatorService, start_server
from fedtune.federation.jobstate import JobState
from fedtune.local.launcher import RedisServer
from fedtune.secagg import make_codec
from fedtune.spec import Encryption
from fedtune.trust import certs

PARTIES = ("assist_trainer", "node-1", "node-2")


def tls_for(ca: certs.Issued, name: str) -> transport.TlsMaterial:
    issued = certs.issue(ca, name, ips=["127.0.0.1"])
    return transport.TlsMaterial(ca=ca.cert_pem, cert=issued.cert_pem, key=issued.key_pem)


def one_round(service: AggregatorService, clients: dict[str, AggregatorClient], round_: int,
              blobs: dict[str, bytes]) -> float:
    start = time.perf_counter()

    def label(party: str) -> None:
        clients[party].submit(round_, blobs[party])
        clients[party].fetch(round_)

    threads = [threading.Thread(target=label, args=(p,)) for p in clients]
    for thread in threads:
        thread.start()
    service.accept(round_, "assist_trainer", blobs["assist_trainer"])
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds per variant")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    codec = make_codec(Encryption())
    adapters = {p: chatglm_lora_adapter(seed=i) for i, p in enumerate(PARTIES)}
    blobs = {p: transport.pack_tensors(a) for p, a in adapters.items()}
    weights = sum(a.size for a in adapters["node-1"].values())
    print(f"adapter: {weights:,} weights, {len(blobs['node-1']) / 2**20:.1f} MiB per update")
    ca = certs.make_ca("bench")
    variants = {"plain": None, "mtls": {p: tls_for(ca, p) for p in PARTIES}}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with RedisServer() as redis_server:
        setups = {}
        for name, tls in variants.items():
            state = JobState.connect(redis_server.address, redis_server.password, f"bench-{name}")
            service = AggregatorService(state, codec, args.rounds + 1, round_timeout_s=600)
            service.configure(dict.fromkeys(PARTIES, 1 / len(PARTIES)), "assist_trainer")
            server, port = start_server(service, "127.0.0.1:0", tls["assist_trainer"] if tls else None)
            clients = {p: AggregatorClient(f"127.0.0.1:{port}", p, tls[p] if tls else None, deadline_s=60)
                       for p in PARTIES[1:]}
            setups[name] = (service, clients, server)
        for round_ in range(1, args.rounds + 2):
            for name, (service, clients, _) in setups.items():
                elapsed = one_round(service, clients, round_, blobs)
                if round_ > 1:  # the first round warms connections and allocators
                    times[name].append(elapsed)
        for _, _, server in setups.values():
            server.stop(0)
    plain, mtls = (statistics.median(times[n]) for n in ("plain", "mtls"))
    print(f"round without TLS: median {plain * 1000:.1f} ms over {len(times['plain'])} rounds")
    print(f"round with mTLS:   median {mtls * 1000:.1f} ms over {len(times['mtls'])} rounds")
    print(f"ratio mTLS / plain: {mtls / plain:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
