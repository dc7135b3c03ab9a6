"""NetworkPolicy J-network: ingress to the job's pods only for what the job itself needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedtune.roles import LABEL_TRAINER, METRICS_PORT, PORTS, REDIS_PORT, REDIS_ROLES

from ..jobs import (
    LABEL_COMPONENT,
    LABEL_JOB,
    LABEL_PART_OF,
    PART_OF,
    Job,
    child_name,
    component_of,
    hosts_federation,
    metadata,
    workloads,
)


@dataclass(frozen=True)
class OperatorPeer:
    """Where the operator's own pod runs: it reads each job's Redis for status."""

    namespace: str
    labels: dict[str, str]


def operator_peer(environ: dict[str, str]) -> OperatorPeer | None:
    """The operator's pod, as the chart describes it (FEDTUNE_OPERATOR_NAMESPACE and
    FEDTUNE_OPERATOR_POD_LABELS `k=v,k=v`); None when it runs outside the cluster."""
    namespace = environ.get("FEDTUNE_OPERATOR_NAMESPACE", "").strip()
    pairs = [p.split("=", 1) for p in environ.get("FEDTUNE_OPERATOR_POD_LABELS", "").split(",") if "=" in p]
    labels = {k.strip(): v.strip() for k, v in pairs if k.strip()}
    if not namespace or not labels:
        return None
    return OperatorPeer(namespace, labels)


def served_ports(job: Job) -> list[int]:
    """gRPC ports a local role listens on: the scheduler's and the assist_trainer's
    (label_trainers only call out)."""
    return sorted({PORTS[w.role] for w in workloads(job) if w.role != LABEL_TRAINER})


def network_policy(job: Job, operator: OperatorPeer | None = None) -> dict[str, Any]:
    """Default-deny ingress to the job's pods, but for what the job itself needs.

    - Redis (6379): from the scheduler and the assist_trainer, which keep state there, and
      from the operator's pod, which reads round and loss for the status;
    - gRPC: from the job's own pods; when parties are remote, from anywhere, since another
      organisation's parties call in (mutual TLS, required then, decides who may);
    - the roles' metrics port: from anywhere (Prometheus runs where the cluster puts it; the
      metrics say how far training is, nothing of the data or the adapters).
    Egress stays open: the roles resolve names and the operator's pod may be anywhere.
    """
    job_pods = {"matchLabels": {LABEL_PART_OF: PART_OF, LABEL_JOB: job.name}}
    redis_clients = {
        "matchLabels": {LABEL_PART_OF: PART_OF, LABEL_JOB: job.name},
        "matchExpressions": [
            {"key": LABEL_COMPONENT, "operator": "In", "values": [component_of(role) for role in REDIS_ROLES]}
        ],
    }
    redis_from: list[dict[str, Any]] = [{"podSelector": redis_clients}]
    if operator is not None:
        redis_from.append(
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": operator.namespace}},
                "podSelector": {"matchLabels": dict(operator.labels)},
            }
        )
    rules: list[dict[str, Any]] = []
    if hosts_federation(job.spec):
        rules.append({"from": redis_from, "ports": [{"protocol": "TCP", "port": REDIS_PORT}]})
    grpc = served_ports(job)
    if grpc:
        rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": port} for port in grpc]}
        if all(p.remote is None for p in job.spec.parties):
            rule = {"from": [{"podSelector": job_pods}], **rule}
        rules.append(rule)
    if workloads(job):
        rules.append({"ports": [{"protocol": "TCP", "port": METRICS_PORT}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(job, child_name(job.name, "network"), "network"),
        "spec": {"podSelector": job_pods, "policyTypes": ["Ingress"], "ingress": rules},
    }
