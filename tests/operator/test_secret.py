"""Secrets: the Redis password and redis.conf, the job's CA and each role's certificate."""

from __future__ import annotations

import base64

from cryptography import x509
from cryptography.x509.oid import NameOID

from fedtune.trust import certs
from fedtune_operator import tls
from fedtune_operator.children import all_children
from fedtune_operator.children.pod import redis_pod
from fedtune_operator.children.pvc import redis_pvc
from fedtune_operator.children.secret import redis_secret
from fedtune_operator.jobs import Job, workloads
from support.children import ROLES, b64, by_kind_name, container, make_job, secret_file


def load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def sans(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def redis_conf(job: Job, password: str) -> str:
    return base64.b64decode(redis_secret(job, password)["data"]["redis.conf"]).decode()


def test_redis_secret_and_persistence(example) -> None:
    example["spec"]["redis"] = {"persistence": False}  # in memory only
    job = make_job(example)
    secret = redis_secret(job, "s3cret")
    assert base64.b64decode(secret["data"]["password"]) == b"s3cret"
    conf = redis_conf(job, "s3cret").splitlines()
    assert "requirepass s3cret" in conf and "appendonly no" in conf and "dir /data" in conf
    pod = redis_pod(job)
    c = container(pod)
    assert c["command"] == ["redis-server", "/etc/redis/redis.conf"]
    assert {"name": "config", "mountPath": "/etc/redis", "readOnly": True} in c["volumeMounts"]
    config = next(v for v in pod["spec"]["volumes"] if v["name"] == "config")
    assert config["secret"]["secretName"] == "poems-lora-redis"
    assert config["secret"]["items"] == [{"key": "redis.conf", "path": "redis.conf"}]
    assert redis_pvc(job) is None
    assert {"name": "data", "emptyDir": {}} in pod["spec"]["volumes"]

    example["spec"]["redis"] = {"storage": "2Gi", "image": "redis:7.4"}  # persistence: the default
    job = make_job(example)
    pod = redis_pod(job)
    c = container(pod)
    assert c["image"] == "redis:7.4"
    assert {"appendonly yes", "appendfsync always"} <= set(redis_conf(job, "pw").splitlines())
    pvc = redis_pvc(job)
    assert pvc["metadata"]["name"] == "poems-lora-redis-data"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "poems-lora-redis-data"}} in pod["spec"]["volumes"]


def test_every_local_role_gets_a_certificate_naming_it_from_the_jobs_ca(job) -> None:
    children = by_kind_name(all_children(job, "pw"))
    ca_secret = children[("Secret", "poems-lora-ca")]
    assert set(ca_secret["data"]) == {"ca.crt", "ca.key"}
    ca_pem = secret_file(ca_secret, "ca.crt")
    ca = load(ca_pem)
    for key, suffix in ROLES.items():
        secret = children[("Secret", f"poems-lora-tls-{suffix}")]
        assert secret["type"] == "kubernetes.io/tls"
        assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}
        assert secret_file(secret, "ca.crt") == ca_pem
        cert = load(secret_file(secret, "tls.crt"))
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == key
        service = f"poems-lora-{suffix}"
        assert {service, f"{service}.team-a.svc", f"{service}.team-a.svc.cluster.local"} <= set(sans(cert))
        # The key belongs to the certificate: the pair is what the role serves with.
        issued = certs.Issued(secret_file(secret, "tls.crt"), secret_file(secret, "tls.key"))
        bundle = certs.KeyBundle(key, b"dh", b"", "")
        certs.verify_bundle(ca_pem, issued.cert_pem, "poems-lora", bundle,
                            certs.sign_bundle(issued.key_pem, "poems-lora", bundle))
        assert secret["metadata"]["ownerReferences"][0]["uid"] == job.uid


def test_given_material_is_used_as_is(job) -> None:
    material = tls.new_material(job, workloads(job))
    again = by_kind_name(all_children(job, "pw", material))
    for w in workloads(job):
        secret = again[("Secret", tls.role_secret_name(job, w))]
        assert secret_file(secret, "tls.crt") == material.roles[w.key].cert_pem
    assert secret_file(again[("Secret", "poems-lora-ca")], "ca.key") == material.ca.key_pem


def test_a_ca_the_user_names_signs_and_no_ca_secret_is_made(example) -> None:
    example["spec"]["tls"] = {"caSecret": "federation-ca"}
    job = make_job(example)
    assert tls.ca_secret_name(job) == "federation-ca" and not tls.generates_ca(job)
    ca = certs.make_ca("federation")
    secret = {"data": {"ca.crt": b64(ca.cert_pem), "ca.key": b64(ca.key_pem)}}
    read = tls.read_ca(secret, "spec.tls.caSecret")
    material = tls.new_material(job, workloads(job), read)
    children = by_kind_name(all_children(job, "pw", material))
    assert ("Secret", "poems-lora-ca") not in children
    node1 = load(secret_file(children[("Secret", "poems-lora-tls-node-1")], "tls.crt"))
    node1.verify_directly_issued_by(load(ca.cert_pem))
