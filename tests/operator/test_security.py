"""What the operator's children do for security: certificates, Redis, NetworkPolicy, pods (no cluster)."""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from fedtune import certs
from fedtune_operator import resources as r
from fedtune_operator import status as s
from fedtune_operator import tls
from support.children import OPERATOR, by_kind_name, container, make_job, pod_secrets

ROLES = {"scheduler": "scheduler", "assist_trainer": "assist-trainer", "node-1": "node-1", "node-2": "node-2"}
# Roles that keep state in Redis, and so read its password.
REDIS_USERS = {"scheduler", "assist_trainer"}


def pods_of(children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["metadata"]["name"]: c for c in children if c["kind"] == "Pod"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def secret_file(secret: dict[str, Any], key: str) -> bytes:
    return base64.b64decode(secret["data"][key])


def load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def sans(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def secret_volumes(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v["secret"] for v in pod["spec"]["volumes"] if "secret" in v}


# --- certificates -------------------------------------------------------------------------


def test_every_local_role_gets_a_certificate_naming_it_from_the_jobs_ca(job) -> None:
    children = by_kind_name(r.all_children(job, "pw"))
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
        signature = certs.sign_public_key(issued.key_pem, "poems-lora", key, b"dh")
        certs.verify_public_key(ca_pem, issued.cert_pem, "poems-lora", key, b"dh", signature)
        assert secret["metadata"]["ownerReferences"][0]["uid"] == job.uid


def test_each_pod_mounts_its_own_certificate_and_no_other_secret(job) -> None:
    pods = pods_of(r.all_children(job, "pw"))
    for key, suffix in ROLES.items():
        pod = pods[f"poems-lora-{suffix}"]
        volumes = secret_volumes(pod)
        assert volumes == {"tls": {"secretName": f"poems-lora-tls-{suffix}", "defaultMode": 0o440}}
        (mount,) = [m for m in container(pod)["volumeMounts"] if m["name"] == "tls"]
        assert mount == {"name": "tls", "mountPath": "/etc/fedtune-tls", "readOnly": True}
        # Only the roles that keep state in Redis get its password; nobody gets the CA's key.
        expected = {f"poems-lora-tls-{suffix}"} | ({"poems-lora-redis"} if key in REDIS_USERS else set())
        assert pod_secrets(pod) == expected, key
    assert pod_secrets(pods["poems-lora-redis"]) == {"poems-lora-redis"}  # its redis.conf


def test_given_material_is_used_as_is(job) -> None:
    material = tls.new_material(job, r.workloads(job))
    again = by_kind_name(r.all_children(job, "pw", material))
    for w in r.workloads(job):
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
    material = tls.new_material(job, r.workloads(job), read)
    children = by_kind_name(r.all_children(job, "pw", material))
    assert ("Secret", "poems-lora-ca") not in children
    node1 = load(secret_file(children[("Secret", "poems-lora-tls-node-1")], "tls.crt"))
    node1.verify_directly_issued_by(load(ca.cert_pem))


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


def test_tls_off_mounts_no_certificate(example) -> None:
    example["spec"]["tls"] = {"enabled": False}
    job = make_job(example)
    children = r.all_children(job, "pw")
    assert [c["metadata"]["name"] for c in children if c["kind"] == "Secret"] == ["poems-lora-redis"]
    for pod in pods_of(children).values():
        assert "tls" not in secret_volumes(pod)
        assert all(e["name"] != "FEDTUNE_TLS_DIR" for e in container(pod).get("env") or [])


def test_a_service_name_that_is_another_partys_name_is_refused(example) -> None:
    # node-1's certificate carries its Service name, poems-lora-node-1: a party of that name
    # could be impersonated by node-1.
    example["spec"]["parties"][2]["name"] = "poems-lora-node-1"
    problems = r.name_problems(make_job(example))
    assert any("`poems-lora-node-1`" in p and "could act as" in p for p in problems), problems
    example["spec"]["tls"] = {"enabled": False}
    assert r.name_problems(make_job(example)) == []


# --- cross-silo ------------------------------------------------------------------------------


def test_remote_parties_need_tls_and_a_shared_ca(example) -> None:
    example["spec"]["parties"][2]["remote"] = {"address": "bank-b.example:55006"}
    (problem,) = r.name_problems(make_job(example))
    assert "spec.tls.caSecret" in problem and "`node-2`" in problem
    example["spec"]["tls"] = {"enabled": False}
    (problem,) = r.name_problems(make_job(example))
    assert "unencrypted" in problem
    example["spec"]["tls"] = {"caSecret": "federation-ca"}
    assert r.name_problems(make_job(example)) == []


def test_the_hosting_side_lets_remote_parties_reach_its_grpc_ports(example) -> None:
    example["spec"]["parties"][2]["remote"] = {"address": "bank-b.example:55006"}
    example["spec"]["tls"] = {"caSecret": "federation-ca"}
    policy = r.network_policy(make_job(example))
    redis, grpc = policy["spec"]["ingress"]
    assert "from" not in grpc  # another organisation's party calls in; mutual TLS decides
    assert grpc["ports"] == [{"protocol": "TCP", "port": 55004}, {"protocol": "TCP", "port": 55005}]
    assert redis["ports"] == [{"protocol": "TCP", "port": 6379}] and redis["from"]


def test_a_guest_organisation_runs_only_its_label_trainers(example) -> None:
    """The assist_trainer (and so the scheduler and Redis) runs at another organisation."""
    spec = example["spec"]
    spec["parties"][0]["remote"] = {"address": "fedtune.host.example:55004"}
    spec["parties"][1]["remote"] = {"address": "fedtune.bank-a.example:55006"}
    spec["tls"] = {"caSecret": "federation-ca"}
    job = make_job(example)
    assert any("spec.scheduler.address" in p for p in r.name_problems(job))
    spec["scheduler"] = {"address": "fedtune.host.example:55005"}
    job = make_job(example)
    assert r.name_problems(job) == []
    assert [w.key for w in r.workloads(job)] == ["node-2"] and r.redis_pod_name(job) is None
    names = {(c["kind"], c["metadata"]["name"]) for c in r.all_children(job, "pw")}
    assert names == {
        ("ConfigMap", "poems-lora-job"),
        ("Secret", "poems-lora-tls-node-2"),
        ("PersistentVolumeClaim", "poems-lora-output"),
        ("Service", "poems-lora-node-2"),
        ("Pod", "poems-lora-node-2"),
        ("NetworkPolicy", "poems-lora-network"),
    }
    document = yaml.safe_load(r.job_configmap(job)["data"]["job.yaml"])
    assert document["spec"]["scheduler"]["address"] == "fedtune.host.example:55005"
    assert document["spec"]["parties"][0]["address"] == "fedtune.host.example:55004"
    assert "address" not in document["spec"].get("redis", {})
    # Nothing here serves: every ingress is denied.
    assert r.network_policy(job)["spec"]["ingress"] == []


# --- Redis ----------------------------------------------------------------------------------


def literal_values(pod: dict[str, Any]) -> list[str]:
    """Everything a pod spec states outright: command, args, env values."""
    out = []
    for c in pod["spec"]["containers"]:
        out += c.get("command") or []
        out += c.get("args") or []
        out += [e["value"] for e in c.get("env") or [] if "value" in e]
    return out


def test_no_pod_states_the_redis_password(job) -> None:
    password = "Zm9vYmFyLXNlY3JldA-unique"
    for pod in pods_of(r.all_children(job, password)).values():
        assert not any(password in v for v in literal_values(pod)), pod["metadata"]["name"]
    redis = r.redis_pod(job)
    assert "env" not in container(redis) and "args" not in container(redis)
    assert f"requirepass {password}" in base64.b64decode(r.redis_secret(job, password)["data"]["redis.conf"]).decode()


# --- NetworkPolicy --------------------------------------------------------------------------


def test_network_policy_denies_all_but_the_jobs_own_traffic(job) -> None:
    policy = r.network_policy(job, OPERATOR)
    spec = policy["spec"]
    job_pods = {"matchLabels": {"app.kubernetes.io/part-of": "fedtune", "fedtune.io/job": "poems-lora"}}
    assert spec["podSelector"] == job_pods and spec["policyTypes"] == ["Ingress"]
    redis, grpc = spec["ingress"]
    assert redis["ports"] == [{"protocol": "TCP", "port": 6379}]
    clients, operator = redis["from"]
    assert clients["podSelector"]["matchLabels"] == job_pods["matchLabels"]
    assert clients["podSelector"]["matchExpressions"] == [
        {"key": "fedtune.io/component", "operator": "In", "values": ["scheduler", "assist-trainer"]}
    ]
    assert operator == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "fedtune-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "fedtune-operator"}},
    }
    assert grpc == {"from": [{"podSelector": job_pods}], "ports": [
        {"protocol": "TCP", "port": 55004}, {"protocol": "TCP", "port": 55005}]}  # fmt: skip
    # Selects every pod of the job, and only those.
    for pod in pods_of(r.all_children(job, "pw")).values():
        labels = pod["metadata"]["labels"]
        assert all(labels[k] == v for k, v in job_pods["matchLabels"].items())
    # Outside a cluster the operator has no pod to admit.
    assert len(r.network_policy(job)["spec"]["ingress"][0]["from"]) == 1


def test_operator_identity_comes_from_the_charts_environment() -> None:
    env = {"FEDTUNE_OPERATOR_NAMESPACE": "ops", "FEDTUNE_OPERATOR_POD_LABELS": "a=1, b=2"}
    assert r.operator_peer(env) == r.OperatorPeer("ops", {"a": "1", "b": "2"})
    assert r.operator_peer({}) is None
    assert r.operator_peer({"FEDTUNE_OPERATOR_NAMESPACE": "ops"}) is None


# --- pods -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["example", "gpu-persistent", "tls-off"])
def test_every_pod_is_locked_down_and_sized(example, variant) -> None:
    doc = copy.deepcopy(example)
    if variant == "gpu-persistent":
        doc["spec"]["parties"][1]["resources"] = {"gpu": 1, "cpu": "8", "memory": "48Gi"}
        doc["spec"]["redis"] = {"persistence": True}
    if variant == "tls-off":
        doc["spec"]["tls"] = {"enabled": False}
    for pod in pods_of(r.all_children(make_job(doc), "pw")).values():
        name = pod["metadata"]["name"]
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False, name
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] >= 10000, name
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
        (c,) = spec["containers"]
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
        assert set(c["resources"]["requests"]) >= {"cpu", "memory"}, name
        assert "memory" in c["resources"]["limits"], name
        # Whatever the container writes goes to a mounted volume, never the read-only root.
        writable = [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")]
        for env in c.get("env") or []:
            if env["name"] in r.CACHE_ENV:
                assert any(env["value"].startswith(w) for w in writable), (name, env)
    redis = r.redis_pod(make_job(doc))
    assert redis["spec"]["securityContext"]["runAsUser"] != r.TRAINER_UID


def test_role_caches_cover_what_the_training_stack_writes(job) -> None:
    pod = r.role_pod(job, r.workloads(job)[1])
    env = {e["name"]: e.get("value") for e in container(pod)["env"]}
    for name in (
        "HOME",
        "HF_HOME",
        "XDG_CACHE_HOME",
        "TRITON_CACHE_DIR",
        "TORCHINDUCTOR_CACHE_DIR",
        "TORCH_HOME",
        "CUDA_CACHE_PATH",
        "MPLCONFIGDIR",
        "TMPDIR",
    ):
        assert env[name].startswith("/tmp"), name
    assert {"name": "tmp", "emptyDir": {}} in pod["spec"]["volumes"]


# --- status -------------------------------------------------------------------------------------


def test_tls_off_is_a_warning_once_and_a_false_condition() -> None:
    conditions, events = s.tls_condition([], s.Tls(enabled=False), "t0")
    (cond,) = conditions
    assert cond["type"] == "TLS" and cond["status"] == "False" and cond["reason"] == "TLSDisabled"
    assert events == [("Warning", "TLSDisabled", s.TLS_DISABLED_MESSAGE)]
    again, events = s.tls_condition(conditions, s.Tls(enabled=False), "t1")
    assert events == [] and again[0]["lastTransitionTime"] == "t0"
    on, events = s.tls_condition([], s.Tls(enabled=True, ca="Secret j-ca"), "t0")
    assert on[0]["status"] == "True" and "Secret j-ca" in on[0]["message"] and events == []


def test_a_missing_ca_secret_keeps_the_job_pending_and_says_why() -> None:
    st, events = s.tls_unavailable_status({}, "spec.tls.caSecret `fed-ca`: Secret not found", "t0")
    assert st["phase"] == "Pending" and "fed-ca" in st["message"]
    assert [e[1] for e in events] == ["CAUnavailable"]
    again, events = s.tls_unavailable_status(st, "spec.tls.caSecret `fed-ca`: Secret not found", "t1")
    assert again == st and events == []
