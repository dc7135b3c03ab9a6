"""Certificates on Kubernetes: a usable CA, no certificate that names another party, any namespace's names."""

from __future__ import annotations

from typing import Any

import pytest

from fedtune.trust import certs
from fedtune_operator import tls
from fedtune_operator.children import problems
from fedtune_operator.status import find_condition
from support.children import b64, make_job


def test_an_unusable_ca_secret_is_explained() -> None:
    ca, other = certs.make_ca("a"), certs.make_ca("b")
    with pytest.raises(tls.TlsUnavailable, match="not found"):
        tls.read_ca(None, "spec.tls.caSecret `x`")
    with pytest.raises(tls.TlsUnavailable, match=r"no ca\.key"):
        tls.read_ca({"data": {"ca.crt": b64(ca.cert_pem)}}, "x")
    with pytest.raises(tls.TlsUnavailable, match="usable CA"):
        tls.read_ca({"data": {"ca.crt": b64(ca.cert_pem), "ca.key": b64(other.key_pem)}}, "x")
    with pytest.raises(tls.TlsUnavailable, match="usable CA"):
        tls.read_ca({"data": {"ca.crt": b64(b"junk"), "ca.key": b64(ca.key_pem)}}, "x")


def test_a_service_name_that_is_another_partys_name_is_refused(example) -> None:
    # node-1's certificate carries its Service name, poems-lora-node-1: a party of that name
    # could be impersonated by node-1.
    example["spec"]["parties"][2]["name"] = "poems-lora-node-1"
    found = problems(make_job(example))
    assert any("`poems-lora-node-1`" in p and "could act as" in p for p in found), found
    example["spec"]["tls"] = {"enabled": False}
    assert problems(make_job(example)) == []


# The longest namespace Kubernetes allows (a DNS label): the CA's name and the Services' DNS names hold it.
LONG_NAMESPACE = "team-" + "a" * 58


@pytest.mark.parametrize("namespace", ["fedtune-ns-" + "b" * 29, LONG_NAMESPACE])
def test_long_namespaces_get_certificates_naming_each_party(example, namespace) -> None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from fedtune_operator.jobs import workloads

    job = make_job(example, namespace)
    material = tls.new_material(job, workloads(job))
    ca = x509.load_pem_x509_certificate(material.ca.cert_pem)
    (common,) = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert len(common.value) <= 64 and common.value.startswith("fedtune CA ")
    for w in workloads(job):
        cert = material.roles[w.key].cert_pem
        x509.load_pem_x509_certificate(cert).verify_directly_issued_by(ca)
        # The party's name first; the Service's qualified names (longer than a common name may be) whole.
        assert certs.names(cert)[0] == w.key
        assert f"{w.pod_name}.{namespace}.svc.cluster.local" in certs.names(cert)
    # Key-agreement signatures check out for the party the certificate names, and only for it.
    node1 = material.roles["node-1"]
    bundle = certs.KeyBundle("node-1", b"dh", b"", "")
    signature = certs.sign_bundle(node1.key_pem, job.name, bundle)
    certs.verify_bundle(material.ca.cert_pem, node1.cert_pem, job.name, bundle, signature)
    with pytest.raises(certs.CertError, match="the certificate sent for node-2 names `node-1`"):
        certs.verify_bundle(material.ca.cert_pem, node1.cert_pem, job.name, certs.KeyBundle("node-2", b"dh", b"", ""),
                            signature)


def test_long_names_are_cut_to_distinct_common_names() -> None:
    from cryptography import x509

    first, second = (certs.make_ca(f"{LONG_NAMESPACE}/poems-{n}") for n in ("lora-1", "lora-2"))
    subjects = [x509.load_pem_x509_certificate(ca.cert_pem).subject.rfc4514_string() for ca in (first, second)]
    assert subjects[0] != subjects[1] and all(len(s) <= len("CN=") + 64 for s in subjects), subjects


def _job_in_memory(example, namespace: str) -> tuple[Any, Any, str]:
    from fedtune_operator.jobs import API_VERSION, KIND
    from support.children import UID
    from support.memory_kube import memory_reconciler

    rec, kube = memory_reconciler()
    name = example["metadata"]["name"]
    kube.create({"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": namespace,
                                                                        "uid": UID}, "spec": example["spec"]})
    return rec, kube, name


def test_a_job_in_the_longest_namespace_runs_with_mutual_tls(example) -> None:
    from fedtune_operator.jobs import KIND

    rec, kube, name = _job_in_memory(example, LONG_NAMESPACE)
    assert rec.reconcile(LONG_NAMESPACE, name) == "Pending"
    status = kube.get(KIND, LONG_NAMESPACE, name)["status"]
    assert find_condition(status["conditions"], "TLS")["reason"] == "MutualTLS", status
    assert "Pod" in kube.kinds(), sorted(kube.kinds())


def test_a_certificate_that_cannot_be_made_is_the_jobs_tls_condition(example, monkeypatch) -> None:
    """Any refusal of the cryptography library (before names were cut to 64 characters, a long namespace's:
    reproduced here by making `certs.issue` raise what it raised then) shows in the status, and no pod starts."""
    from fedtune_operator.jobs import KIND

    rec, kube, name = _job_in_memory(example, "team-a")

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise ValueError("Attribute's length must be >= 1 and <= 64, but it was 85")

    monkeypatch.setattr(certs, "issue", refuse)
    assert rec.reconcile("team-a", name) == "Pending"
    status = kube.get(KIND, "team-a", name)["status"]
    condition = find_condition(status["conditions"], "TLS")
    assert condition["status"] == "False" and condition["reason"] == "CertificateFailed", condition
    assert "cannot make the certificate of" in condition["message"] and "<= 64" in condition["message"], condition
    assert status["message"] == condition["message"]
    assert "Pod" not in kube.kinds()
    events = [obj for (kind, _), obj in kube.objects.items() if kind == "Event"]
    assert [e["reason"] for e in events] == ["CertificateFailed"], events

    monkeypatch.undo()  # the next pass (the resync) makes them with the CA the first one stored
    rec.static_changed(kube.get(KIND, "team-a", name)["metadata"]["uid"])
    assert rec.reconcile("team-a", name) == "Pending"
    status = kube.get(KIND, "team-a", name)["status"]
    assert find_condition(status["conditions"], "TLS")["reason"] == "MutualTLS", status
    assert "Pod" in kube.kinds()
