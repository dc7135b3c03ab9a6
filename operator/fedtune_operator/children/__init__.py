"""The children of one FederatedFineTune: pure builders, one module per kind (no API calls).

    Secret    J-redis          the Redis password and its redis.conf                  secret.py
    Pod       J-redis          `redis-server /etc/redis/redis.conf`                   pod.py
    Service   J-redis          :6379                                                  service.py
    PVC       J-redis-data     spec.redis.persistence, the default (appendonly)       pvc.py
    ConfigMap J-job            job.yaml: the spec as given, addresses filled in       configmap.py
    Pod       J-scheduler      `fedtune scheduler`, Service J-scheduler:55005         pod.py, service.py
    Pod       J-<party>        one per local party, Service J-<party>:55004/55006     pod.py, service.py
    PVC       J-output-<party> a party's adapters (or one J-output they share: ReadWriteMany;
                               none with spec.storage.output.claimName); no owner:
                               they outlive the job unless storage.output.retain is false  pvc.py
    Secret    J-ca, J-tls-<role>   the federation's CA and each role's certificate    secret.py (tls.py)
    NetworkPolicy J-network    ingress to the job's pods: Redis from the roles that use it and
                               the operator, gRPC from the job's pods; nothing else   networkpolicy.py

Names, labels and ownership are `jobs.py`'s. This module gathers the builders: what a
job's children are, and why they could not be made.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .. import tls
from ..jobs import Job, federation_problems, hosts_federation, name_problems, output_problems, workloads
from .configmap import job_configmap
from .networkpolicy import OperatorPeer, network_policy
from .pod import redis_pod, role_pod
from .pvc import output_pvcs, redis_pvc
from .scheduling import template_problems
from .secret import secrets
from .service import redis_service, role_service


def problems(job: Job, allow: Iterable[str] = ()) -> list[str]:
    """Why some child would be refused or unsafe (checked before creating any); `allow`: the escalating
    pod template fields this cluster admits (`podpolicy`)."""
    return (name_problems(job) + tls.name_problems(job, workloads(job)) + federation_problems(job)
            + output_problems(job) + template_problems(job, allow))


def plain_children(job: Job, operator: OperatorPeer | None = None) -> list[dict[str, Any]]:
    """The static children that hold no secret: ConfigMap, claims, Services, NetworkPolicy."""
    out = [job_configmap(job), *output_pvcs(job)]
    if hosts_federation(job.spec):
        redis_claim = redis_pvc(job)
        out += [redis_service(job), *([redis_claim] if redis_claim else [])]
    out += [role_service(job, w) for w in workloads(job)]
    return [*out, network_policy(job, operator)]


def static_children(
    job: Job, password: str, material: tls.Material | None = None, operator: OperatorPeer | None = None
) -> list[dict[str, Any]]:
    """Every child except the role pods (those follow the retry logic in `status`)."""
    return [*secrets(job, password, material), *plain_children(job, operator)]


def all_children(
    job: Job, password: str, material: tls.Material | None = None, operator: OperatorPeer | None = None
) -> list[dict[str, Any]]:
    """The complete desired set (the benchmark and tests compare a cluster against this)."""
    pods = [redis_pod(job)] if hosts_federation(job.spec) else []
    pods += [role_pod(job, w) for w in workloads(job)]
    return [*static_children(job, password, material, operator), *pods]
