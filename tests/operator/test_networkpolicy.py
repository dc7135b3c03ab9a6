"""The NetworkPolicy: ingress only for what the job itself needs."""

from __future__ import annotations

from fedtune_operator.children import all_children
from fedtune_operator.children.networkpolicy import OperatorPeer, network_policy, operator_peer
from support.children import OPERATOR, make_job, pods_of


def test_the_hosting_side_lets_remote_parties_reach_its_grpc_ports(example) -> None:
    example["spec"]["parties"][2]["remote"] = {"address": "bank-b.example:55006"}
    example["spec"]["tls"] = {"caSecret": "federation-ca"}
    policy = network_policy(make_job(example))
    redis, grpc, metrics = policy["spec"]["ingress"]
    assert metrics == {"ports": [{"protocol": "TCP", "port": 9090}]}  # the roles' metrics: from anywhere
    assert "from" not in grpc  # another organisation's party calls in; mutual TLS decides
    assert grpc["ports"] == [{"protocol": "TCP", "port": 55004}, {"protocol": "TCP", "port": 55005}]
    assert redis["ports"] == [{"protocol": "TCP", "port": 6379}] and redis["from"]


def test_network_policy_denies_all_but_the_jobs_own_traffic(job) -> None:
    policy = network_policy(job, OPERATOR)
    spec = policy["spec"]
    job_pods = {"matchLabels": {"app.kubernetes.io/part-of": "fedtune", "fedtune.io/job": "poems-lora"}}
    assert spec["podSelector"] == job_pods and spec["policyTypes"] == ["Ingress"]
    redis, grpc, metrics = spec["ingress"]
    assert metrics == {"ports": [{"protocol": "TCP", "port": 9090}]}
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
    for pod in pods_of(all_children(job, "pw")).values():
        labels = pod["metadata"]["labels"]
        assert all(labels[k] == v for k, v in job_pods["matchLabels"].items())
    # Outside a cluster the operator has no pod to admit.
    assert len(network_policy(job)["spec"]["ingress"][0]["from"]) == 1


def test_operator_identity_comes_from_the_charts_environment() -> None:
    env = {"FEDTUNE_OPERATOR_NAMESPACE": "ops", "FEDTUNE_OPERATOR_POD_LABELS": "a=1, b=2"}
    assert operator_peer(env) == OperatorPeer("ops", {"a": "1", "b": "2"})
    assert operator_peer({}) is None
    assert operator_peer({"FEDTUNE_OPERATOR_NAMESPACE": "ops"}) is None
