"""Secrets: J-redis (the Redis password and the redis.conf that carries it) and the TLS Secrets.

    Secret J-redis           `password`, `redis.conf`
    Secret J-ca              ca.crt, ca.key: the job's generated CA (never mounted in a pod);
                             absent when spec.tls.caSecret names the user's CA instead
    Secret J-tls-<role>      ca.crt, tls.crt, tls.key (type kubernetes.io/tls): one per local
                             role, mounted read-only in that role's pod only

The certificates themselves come from `tls.py`.
"""

from __future__ import annotations

import base64
from typing import Any

from fedtune.roles import REDIS_PORT
from fedtune.trust import certs

from .. import tls
from ..jobs import Job, Workload, child_name, hosts_federation, metadata, workload_party, workloads
from .pod import REDIS_CONFIG, REDIS_DATA_DIR


def _secret(meta: dict[str, Any], type_: str, data: dict[str, bytes]) -> dict[str, Any]:
    encoded = {key: base64.b64encode(value).decode() for key, value in data.items()}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": type_, "data": encoded}


# --- Redis --------------------------------------------------------------------------------


def redis_config(job: Job, password: str) -> str:
    """redis.conf: the password lives in this file, in the Secret, never on a command line."""
    lines = [
        f"port {REDIS_PORT}",
        f"requirepass {password}",
        f"dir {REDIS_DATA_DIR}",
        'save ""',  # no RDB snapshots: append-only persistence or none
    ]
    if job.spec.redis.persistence:
        # Every write synced to the claim before it is acknowledged: even a node that dies mid-job
        # loses nothing (a killed process never does). The job writes a few times a round: cheap.
        lines += ["appendonly yes", "appendfsync always"]
    else:
        lines += ["appendonly no"]
    return "\n".join(lines) + "\n"


def redis_secret(job: Job, password: str) -> dict[str, Any]:
    meta = metadata(job, child_name(job.name, "redis"), "redis")
    return _secret(meta, "Opaque", {"password": password.encode(), REDIS_CONFIG: redis_config(job, password).encode()})


# --- TLS ----------------------------------------------------------------------------------


def ca_secret(job: Job, ca: certs.Issued) -> dict[str, Any]:
    """The generated CA (`tls.generates_ca`); its key stays in this Secret, mounted nowhere."""
    meta = metadata(job, tls.ca_secret_name(job), "tls")
    return _secret(meta, "Opaque", {certs.CA_FILE: ca.cert_pem, tls.CA_KEY_FILE: ca.key_pem})


def tls_secret(job: Job, workload: Workload, material: tls.Material) -> dict[str, Any]:
    meta = metadata(job, tls.role_secret_name(job, workload), "tls", workload_party(workload))
    issued = material.roles[workload.key]
    # kubernetes.io/tls: tools (cert-manager, ingress controllers, kubectl) know the layout;
    # ca.crt rides along, as cert-manager's Secrets carry it.
    return _secret(meta, "kubernetes.io/tls",
                   {certs.CA_FILE: material.ca.cert_pem, certs.CERT_FILE: issued.cert_pem,
                    certs.KEY_FILE: issued.key_pem})


def tls_secrets(job: Job, material: tls.Material) -> list[dict[str, Any]]:
    """The CA Secret (when generated) and every local role's certificate Secret."""
    if not tls.enabled(job):
        return []
    out = [ca_secret(job, material.ca)] if tls.generates_ca(job) else []
    return out + [tls_secret(job, w, material) for w in workloads(job)]


def secrets(job: Job, password: str, material: tls.Material | None = None) -> list[dict[str, Any]]:
    """The Redis Secret and the TLS Secrets.

    Without `material`, a TLS job gets a fresh CA and certificates (tests, benchmarks).
    """
    if material is None and tls.enabled(job):
        material = tls.new_material(job, workloads(job))
    out = [redis_secret(job, password)] if hosts_federation(job.spec) else []
    return out + (tls_secrets(job, material) if material is not None else [])
