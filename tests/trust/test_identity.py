"""Identities: pinned keys, several organisations' CAs, full certificate checks, revocation; a role refuses
bad TLS material (or none, unless --insecure) at start, naming the file and field."""

from __future__ import annotations

import argparse
import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.cli import jobs, main
from fedtune.exits import EXIT_BAD_INPUT
from fedtune.federation import transport
from fedtune.federation.jobstate import JobState
from fedtune.federation.proto import fedtune_pb2 as pb
from fedtune.federation.proto import fedtune_pb2_grpc as pb_grpc
from fedtune.federation.scheduler import SchedulerService
from fedtune.spec import load_job
from fedtune.trust import certs
from support.jobs import EXAMPLE

JOB = "poems-lora"


@pytest.fixture(scope="module")
def orgs() -> dict[str, certs.Issued]:
    """Two organisations, each with its own CA and keys: nothing secret shared between them."""
    org_a, org_b = certs.make_ca("org-a"), certs.make_ca("org-b")
    return {"ca_a": org_a, "ca_b": org_b,
            "scheduler": certs.issue(org_a, "scheduler", ips=["127.0.0.1"]),
            "node-1": certs.issue(org_a, "node-1"), "node-2": certs.issue(org_b, "node-2"),
            "node-1-other-key": certs.issue(org_b, "node-1")}


def bundle_pem(orgs: dict) -> bytes:
    return orgs["ca_a"].cert_pem + orgs["ca_b"].cert_pem


def dated(ca: certs.Issued, name: str, start: dt.datetime, end: dt.datetime) -> bytes:
    """A certificate for `name` valid only between `start` and `end` (issue() always starts now)."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.PEM)


def test_fingerprint_is_the_public_keys_and_survives_reissue(orgs) -> None:
    node1 = orgs["node-1"]
    identity = certs.fingerprint(node1.cert_pem)
    assert identity.startswith("sha256:") and len(identity) == 71
    assert identity != certs.fingerprint(orgs["node-1-other-key"].cert_pem)
    assert f"identity: {identity}" in certs.describe(node1.cert_pem)


def test_bundle_from_another_organisations_ca_checks_out_with_its_pin(orgs) -> None:
    bundle = certs.KeyBundle("node-2", b"dh", b"n" * 32, "sha256:terms")
    signature = certs.sign_bundle(orgs["node-2"].key_pem, JOB, bundle)
    pin = certs.fingerprint(orgs["node-2"].cert_pem)
    certs.verify_bundle(bundle_pem(orgs), orgs["node-2"].cert_pem, JOB, bundle, signature, pin=pin)
    with pytest.raises(certs.CertError, match="not issued by a CA"):  # org-a's bundle alone does not know org-b
        certs.verify_bundle(orgs["ca_a"].cert_pem, orgs["node-2"].cert_pem, JOB, bundle, signature, pin=pin)
    for tampered in (certs.KeyBundle("node-2", b"dh2", b"n" * 32, "sha256:terms"),
                     certs.KeyBundle("node-2", b"dh", b"m" * 32, "sha256:terms"),
                     certs.KeyBundle("node-2", b"dh", b"n" * 32, "sha256:other")):
        with pytest.raises(certs.CertError, match="does not carry node-2's signature"):
            certs.verify_bundle(bundle_pem(orgs), orgs["node-2"].cert_pem, JOB, tampered, signature, pin=pin)


def test_a_pinned_party_is_only_its_pinned_key_whoever_signed_another(orgs) -> None:
    """org-b can issue a certificate naming node-1; with node-1 pinned, it speaks for no one."""
    forged = orgs["node-1-other-key"]
    bundle = certs.KeyBundle("node-1", b"dh", b"n" * 32, "sha256:terms")
    signature = certs.sign_bundle(forged.key_pem, JOB, bundle)
    pin = certs.fingerprint(orgs["node-1"].cert_pem)
    with pytest.raises(certs.CertError, match="but the job file pins node-1 to " + pin):
        certs.verify_bundle(bundle_pem(orgs), forged.cert_pem, JOB, bundle, signature, pin=pin)
    revoked = [certs.fingerprint(forged.cert_pem)]
    with pytest.raises(certs.CertError, match="is revoked"):
        certs.verify_bundle(bundle_pem(orgs), forged.cert_pem, JOB, bundle, signature, revoked=revoked)


def test_dates_usage_and_bundle_are_checked(orgs) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = dated(orgs["ca_a"], "node-1", now - dt.timedelta(days=10), now - dt.timedelta(days=1))
    with pytest.raises(certs.CertError, match="expired on"):
        certs.check_party_certificate(orgs["ca_a"].cert_pem, expired, "node-1")
    future = dated(orgs["ca_a"], "node-1", now + dt.timedelta(days=1), now + dt.timedelta(days=10))
    with pytest.raises(certs.CertError, match="not valid before"):
        certs.check_party_certificate(orgs["ca_a"].cert_pem, future, "node-1")
    with pytest.raises(certs.CertError, match="is a CA certificate, not a party's"):
        certs.check_party_certificate(orgs["ca_a"].cert_pem, orgs["ca_a"].cert_pem, "node-1")
    with pytest.raises(certs.CertError, match=r"ca\.crt: holds no CA certificate"):
        certs.ca_bundle(b"")
    with pytest.raises(certs.CertError, match="is not a CA certificate"):
        certs.ca_bundle(orgs["node-1"].cert_pem)


# --- a role at start ---------------------------------------------------------------------------


def role_folder(tmp_path: Path, orgs: dict, *, ca: bytes | None = None, cert: bytes | None = None,
                pin: str | None = None) -> tuple[Path, Path]:
    doc = yaml.safe_load(EXAMPLE.read_text())
    if pin:
        doc["spec"]["parties"][1]["identity"] = pin
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    tls = tmp_path / "tls"
    certs.write_bundle(tls, orgs["ca_a"].cert_pem if ca is None else ca, orgs["node-1"])
    if cert is not None:
        (tls / certs.CERT_FILE).write_bytes(cert)
    return job, tls


def run_label_trainer(job: Path, *extra: str) -> int:
    return main(["label-trainer", "--job", str(job), "--party", "node-1", "--output", str(job.parent / "out"),
                 *extra])


@pytest.mark.parametrize("problem", ["no CA", "expired", "not yet valid", "pin", "pin unparsable", "key"])
def test_a_role_refuses_bad_tls_material_at_start_naming_file_and_field(tmp_path, orgs, capsys, problem) -> None:
    now = dt.datetime.now(dt.UTC)
    kwargs, expected = {
        "no CA": ({"ca": b""}, r"tls/ca\.crt: holds no CA certificate"),
        "expired": ({"cert": dated(orgs["ca_a"], "node-1", now - dt.timedelta(days=9), now - dt.timedelta(days=2))},
                    r"tls/tls\.crt: expired on"),
        "not yet valid": ({"cert": dated(orgs["ca_a"], "node-1", now + dt.timedelta(days=2),
                                         now + dt.timedelta(days=9))}, r"tls/tls\.crt: not valid before"),
        "pin": ({"pin": certs.fingerprint(orgs["node-2"].cert_pem)}, r"tls/tls\.crt: its key is sha256:.* pins node-1"),
        "pin unparsable": ({"pin": "sha256:nothex"}, r"job\.yaml: spec\.parties\[1\]\.identity: .*not an identity"),
        "key": ({"cert": orgs["node-1-other-key"].cert_pem, "ca": bundle_pem(orgs)},
                r"tls/tls\.key: is not the key of tls\.crt"),
    }[problem]
    job, tls = role_folder(tmp_path, orgs, **kwargs)
    assert run_label_trainer(job, "--tls-dir", str(tls)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(expected, err), err
    assert not (tmp_path / "out").exists()


def test_a_role_without_tls_refuses_unless_insecure(tmp_path, orgs, capsys, monkeypatch) -> None:
    monkeypatch.delenv("FEDTUNE_TLS_DIR", raising=False)
    job, _ = role_folder(tmp_path, orgs)
    assert run_label_trainer(job) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--tls-dir is not set" in err and "--insecure" in err
    assert not (tmp_path / "out").exists()

    args = argparse.Namespace(tls_dir=None, insecure=True, command="label-trainer")
    assert jobs._tls(args, "node-1") is None
    assert "WARNING: fedtune label-trainer --insecure" in capsys.readouterr().err


# --- the gRPC identity check -------------------------------------------------------------------


@pytest.fixture
def pinned_scheduler(redis_server, orgs) -> Iterator[int]:
    """The example job's scheduler trusting both organisations' CAs, with node-1 pinned."""
    job = load_job(EXAMPLE)
    data = job.model_dump(mode="json")
    data["spec"]["parties"][1]["identity"] = certs.fingerprint(orgs["node-1"].cert_pem)
    job = type(job).model_validate(data)
    state = JobState.connect(redis_server.address, redis_server.password, job.job_id)
    state.init(len(job.spec.fractions()), {p.name: p.role for p in job.spec.parties})
    tls = transport.TlsMaterial(ca=bundle_pem(orgs), cert=orgs["scheduler"].cert_pem, key=orgs["scheduler"].key_pem)
    server, port = transport.make_server("127.0.0.1:0", tls)
    pb_grpc.add_SchedulerServicer_to_server(SchedulerService(job, state, transport.PeerIdentity.of(job.spec)), server)
    server.start()
    yield port
    server.stop(0)


def status_as(port: int, orgs: dict, who: str, party: str) -> pb.JobPhase:
    tls = transport.TlsMaterial(ca=bundle_pem(orgs), cert=orgs[who].cert_pem, key=orgs[who].key_pem)
    stub = pb_grpc.SchedulerStub(transport.make_channel(f"127.0.0.1:{port}", tls, server_name="scheduler"))
    return stub.Report(pb.StatusReport(party=party, state="joined"), timeout=10)


def test_grpc_accepts_a_pinned_party_only_with_its_key(pinned_scheduler, orgs) -> None:
    assert status_as(pinned_scheduler, orgs, "node-1", "node-1").phase == "Pending"
    assert status_as(pinned_scheduler, orgs, "node-2", "node-2").phase == "Pending"  # org-b's CA, no pin
    with pytest.raises(grpc.RpcError) as info:
        status_as(pinned_scheduler, orgs, "node-1-other-key", "node-1")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "is not the one the job file pins for `node-1`" in info.value.details()
