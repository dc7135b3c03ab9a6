"""What checking the terms adds to a job's start (issue 20): goal under 50 ms per party.

Per party, as a role does it before any update leaves it: the canonical terms and their digest from
its own job file, the comparison with the scheduler's terms (Join), its own key bundle signed, and
`session.check_start` over the start the scheduler relays (every peer's certificate checked against
the CA bundle and its pin, every bundle's signature verified, the session id). Timed for 3, 8 and 32
parties, best of --repeat, next to the start of a role process that does no more than read the job
(`fedtune validate --schema-only`), run side by side; prints the ratio and the machine.

    python bench/terms_check.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "lora-3party.yaml"
GOAL_MS = 50.0


def best_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def federation(parties: int):  # -> (job, {party: Issued}, ca_pem)
    from fedtune.spec import parse_job
    from fedtune.trust import certs

    ca = certs.make_ca("bench")
    names = ["assist_trainer", *(f"node-{i}" for i in range(1, parties))]
    issued = {name: certs.issue(ca, name) for name in names}
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["encryption"] = {"secagg_plus": {}}
    doc["spec"]["parties"] = [{"name": n, "role": "assist_trainer" if i == 0 else "label_trainer",
                               "identity": certs.fingerprint(issued[n].cert_pem),
                               "trainset": [{"path": "data/poems/part-0.json"}]} for i, n in enumerate(names)]
    return parse_job(doc), issued, ca.cert_pem


def check_cost_ms(parties: int, repeat: int) -> float:
    from fedtune.federation import session
    from fedtune.federation.proto import fedtune_pb2 as pb
    from fedtune.federation.transport import TlsMaterial
    from fedtune.spec import terms as job_terms
    from fedtune.trust import certs

    job, issued, ca_pem = federation(parties)
    digest = job_terms.digest(job)
    start = pb.StartInfo(ready=True)
    for name, cert in issued.items():
        bundle = certs.KeyBundle(name, os.urandom(32), os.urandom(32), digest)
        start.public_keys[name], start.nonces[name] = bundle.public_key, bundle.nonce
        start.terms_digests[name], start.certificates[name] = digest, cert.cert_pem
        start.public_key_signatures[name] = certs.sign_bundle(cert.key_pem, job.job_id, bundle)
    me = "node-1"
    tls = TlsMaterial(ca=ca_pem, cert=issued[me].cert_pem, key=issued[me].key_pem)
    scheduler_terms = job_terms.terms(job)

    def one_party() -> None:
        mine = job_terms.terms(job)
        mine_digest = job_terms.digest_of(mine)
        assert mine == scheduler_terms
        certs.sign_bundle(tls.key, job.job_id, certs.KeyBundle(me, b"k" * 32, b"n" * 32, mine_digest))
        session.check_start(start, job.spec, me, mine_digest, job.job_id, tls)

    return best_ms(one_party, repeat)


def role_start_ms(repeat: int) -> float:
    argv = [sys.executable, "-m", "fedtune", "validate", "--schema-only", str(EXAMPLE)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "trainer_image"),
                                                                        os.environ.get("PYTHONPATH")]))}
    return best_ms(lambda: subprocess.run(argv, check=True, capture_output=True, env=env), repeat)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    baseline = role_start_ms(args.repeat)
    print(f"a role's start that only reads the job (fedtune validate --schema-only): {baseline:.1f} ms")
    worst = 0.0
    for parties in (3, 8, 32):
        cost = check_cost_ms(parties, args.repeat)
        worst = max(worst, cost)
        print(f"{parties:3d} parties: terms check per party {cost:6.2f} ms, ratio to that start {cost / baseline:.3f}")
    print(f"goal: under {GOAL_MS:g} ms: {'met' if worst < GOAL_MS else 'MISSED'} (worst {worst:.2f} ms)")
    return 0 if worst < GOAL_MS else 1


if __name__ == "__main__":
    sys.exit(main())
