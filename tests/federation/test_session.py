"""What a party checks in the relayed start, and the run's session id (no processes: the checks alone)."""

from __future__ import annotations

import os

import pytest
import yaml

from fedtune.federation import session
from fedtune.federation.proto import fedtune_pb2 as pb
from fedtune.federation.transport import TlsMaterial
from fedtune.spec import parse_job
from fedtune.spec import terms as job_terms
from fedtune.spec.terms import TermsRefused
from fedtune.trust import certs
from support.jobs import EXAMPLE

PARTIES = ("assist_trainer", "node-1", "node-2")


@pytest.fixture(scope="module")
def keys() -> dict[str, certs.Issued]:
    ca = certs.make_ca("session")
    return {"ca": ca, **{name: certs.issue(ca, name) for name in (*PARTIES, "node-9")}}


def job_with(keys: dict, *, revoked: list[str] | None = None):
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["encryption"] = {"otp": {}}
    for party in doc["spec"]["parties"]:
        party["identity"] = certs.fingerprint(keys[party["name"]].cert_pem)
    if revoked:
        doc["spec"]["tls"] = {"revoked": revoked}
    return parse_job(doc)


def start_of(job, keys: dict, parties=PARTIES, nonces: dict | None = None) -> pb.StartInfo:
    digest = job_terms.digest(job)
    start = pb.StartInfo(ready=True)
    for name in parties:
        bundle = certs.KeyBundle(name, b"k" * 32 if name != "assist_trainer" else b"",
                                 (nonces or {}).get(name) or os.urandom(32), digest)
        start.public_keys[name], start.nonces[name], start.terms_digests[name] = (bundle.public_key, bundle.nonce,
                                                                                  digest)
        start.certificates[name] = keys[name].cert_pem
        start.public_key_signatures[name] = certs.sign_bundle(keys[name].key_pem, job.job_id, bundle)
    return start


def check(job, keys: dict, start: pb.StartInfo, me: str = "node-1") -> str:
    tls = TlsMaterial(ca=keys["ca"].cert_pem, cert=keys[me].cert_pem, key=keys[me].key_pem)
    return session.check_start(start, job.spec, me, job_terms.digest(job), job.job_id, tls)


def test_every_party_computes_one_session_and_a_new_run_another(keys) -> None:
    job = job_with(keys)
    nonces = {name: os.urandom(32) for name in PARTIES}
    start = start_of(job, keys, nonces=nonces)
    first = {me: check(job, keys, start, me) for me in PARTIES}
    assert len(set(first.values())) == 1 and next(iter(first.values())).startswith("sha256:")
    again = check(job, keys, start_of(job, keys))  # the same job re-created: fresh nonces
    assert again != first["node-1"]


def test_the_relay_cannot_add_drop_or_swap(keys) -> None:
    job = job_with(keys)
    with pytest.raises(TermsRefused, match="relayed key bundles of node-9"):
        check(job, keys, start_of(job, keys, (*PARTIES, "node-9")))
    with pytest.raises(TermsRefused, match="relayed no key bundle of node-2"):
        check(job, keys, start_of(job, keys, ("assist_trainer", "node-1")))
    swapped = start_of(job, keys)
    swapped.public_keys["node-2"] = b"x" * 32
    with pytest.raises(TermsRefused, match="does not carry node-2's signature"):
        check(job, keys, swapped)
    impostor = start_of(job, keys)  # a bundle of node-9's key passed off as node-2's
    impostor.certificates["node-2"] = keys["node-9"].cert_pem
    with pytest.raises(TermsRefused, match="names `node-9`"):
        check(job, keys, impostor)


def test_other_terms_or_a_revoked_key_are_refused(keys) -> None:
    job = job_with(keys)
    other = start_of(job, keys)
    other.terms_digests["node-2"] = "sha256:" + "0" * 64
    with pytest.raises(TermsRefused, match="node-2 agreed to terms sha256:0000"):
        check(job, keys, other)
    revoked = job_with(keys, revoked=[certs.fingerprint(keys["node-2"].cert_pem)])
    with pytest.raises(TermsRefused, match="is revoked"):
        check(revoked, keys, start_of(revoked, keys))
