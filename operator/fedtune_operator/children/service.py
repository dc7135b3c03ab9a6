"""Services: J-redis:6379, J-scheduler:55005 and one per local party, J-<party>:55004/55006 (each role's also
on its metrics port, 9090)."""

from __future__ import annotations

from typing import Any

from fedtune import roles
from fedtune.roles import REDIS_PORT

from ..jobs import Job, Workload, child_name, component_of, labels, metadata, workload_party


def service(job: Job, name: str, component: str, ports: dict[str, int], party: str | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(job, name, component, party),
        "spec": {
            # Headless, one pod behind each, as training operators do: the name resolves to
            # the pod itself, and a job of many parties takes no ClusterIPs from the range.
            "clusterIP": "None",
            # Resolvable as soon as the pod has an address: the roles retry until peers serve.
            "publishNotReadyAddresses": True,
            "selector": labels(job.name, component, party),
            "ports": [{"name": n, "port": port, "targetPort": port, "protocol": "TCP"} for n, port in ports.items()],
        },
    }


def redis_service(job: Job) -> dict[str, Any]:
    return service(job, child_name(job.name, "redis"), "redis", {"redis": REDIS_PORT})


def role_service(job: Job, workload: Workload) -> dict[str, Any]:
    ports = {"grpc": roles.PORTS[workload.role], "metrics": roles.METRICS_PORT}
    return service(job, workload.pod_name, component_of(workload.role), ports, workload_party(workload))
