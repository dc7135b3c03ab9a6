"""Pods: Redis (J-redis), the scheduler (J-scheduler) and one per local party (J-<party>).

Each pod is placed as spec.scheduling (and, for a party, its parties[].scheduling) says: `scheduling.py`.

Every pod is bare (restartPolicy Never: the operator decides about retries, `status.py`)
and locked down: non-root users, every capability dropped, no privilege escalation,
seccomp RuntimeDefault, a read-only root filesystem (caches go to a /tmp emptyDir) and no
service-account token; secrets reach them as mounted files or secretKeyRefs, never as
literal values in the manifest.
"""

from __future__ import annotations

import copy
from typing import Any

from fedtune import roles
from fedtune.roles import REDIS_PORT, SCHEDULER
from fedtune.spec import Party, Volume

from .. import tls
from ..jobs import (
    OUTPUT_DIR,
    Job,
    Workload,
    child_name,
    component_of,
    metadata,
    output_claim,
    party_output_dir,
    workload_party,
)
from . import scheduling
from .configmap import CONFIG_DIR, JOB_FILE

REDIS_DATA_DIR = "/data"
REDIS_CONFIG_DIR = "/etc/redis"
REDIS_CONFIG = "redis.conf"
# Secret volumes: owner and group (fsGroup) may read, nobody else.
SECRET_MODE = 0o440

# High uids, distinct from any host user's (trainer_image/Dockerfile makes 10001 its user);
# Redis runs as a uid of its own: its append-only files on a node's disk belong to no role's user.
TRAINER_UID = 10001
REDIS_UID = 10002

# Where the role containers keep caches: the root filesystem is read-only, /tmp is an
# emptyDir. transformers (HF_HOME: remote-code modules of ChatGLM, hub metadata), torch
# (TORCH_HOME, TORCHINDUCTOR_CACHE_DIR under torch_compile), Triton's kernel cache, the
# CUDA JIT cache and matplotlib (imported by transformers' integrations) all write there.
SCRATCH = "/tmp"
CACHE_ENV = {
    "HOME": SCRATCH,
    "TMPDIR": SCRATCH,
    "XDG_CACHE_HOME": f"{SCRATCH}/.cache",
    "HF_HOME": f"{SCRATCH}/.cache/huggingface",
    "TORCH_HOME": f"{SCRATCH}/.cache/torch",
    "TORCHINDUCTOR_CACHE_DIR": f"{SCRATCH}/.cache/torchinductor",
    "TRITON_CACHE_DIR": f"{SCRATCH}/.cache/triton",
    "CUDA_CACHE_PATH": f"{SCRATCH}/.cache/nv",
    "MPLCONFIGDIR": f"{SCRATCH}/.cache/matplotlib",
}

# Requests every pod makes, and memory limits that bound them. A party's
# `resources.memory` is both its request and its limit; a party that names none gets a
# small request (so a job fits a small cluster) and a cap.
REDIS_RESOURCES = {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "2Gi"}}
SCHEDULER_RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
PARTY_CPU_REQUEST = "250m"
PARTY_MEMORY_REQUEST = "1Gi"
PARTY_MEMORY_LIMIT = "4Gi"


def secret_volume(name: str, secret: str, keys: list[str] | None = None) -> dict[str, Any]:
    source: dict[str, Any] = {"secretName": secret, "defaultMode": SECRET_MODE}
    if keys is not None:  # only these keys become files
        source["items"] = [{"key": k, "path": k} for k in keys]
    return {"name": name, "secret": source}


def container_security(uid: int) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def pod_security(uid: int) -> dict[str, Any]:
    # fsGroup makes the claims writable by the non-root user.
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


# --- Redis --------------------------------------------------------------------------------


def redis_pod(job: Job) -> dict[str, Any]:
    redis = job.spec.redis
    name = child_name(job.name, "redis")
    if redis.persistence:
        data = {"name": "data", "persistentVolumeClaim": {"claimName": child_name(job.name, "redis-data")}}
    else:
        data = {"name": "data", "emptyDir": {}}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata(job, name, "redis"),
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": pod_security(REDIS_UID),
            "containers": [
                {
                    "name": "redis",
                    "image": redis.image,
                    "imagePullPolicy": job.spec.imagePullPolicy,
                    # Everything, the password included, comes from the mounted redis.conf:
                    # nothing secret in the command line, the environment or `ps`.
                    "command": ["redis-server", f"{REDIS_CONFIG_DIR}/{REDIS_CONFIG}"],
                    "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
                    "readinessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": 5},
                    "resources": copy.deepcopy(REDIS_RESOURCES),
                    "securityContext": container_security(REDIS_UID),
                    "volumeMounts": [
                        {"name": "data", "mountPath": REDIS_DATA_DIR},
                        {"name": "config", "mountPath": REDIS_CONFIG_DIR, "readOnly": True},
                    ],
                }
            ],
            "volumes": [data, secret_volume("config", name, [REDIS_CONFIG])],
        },
    }
    return scheduling.apply(pod, scheduling.for_pod(job, None))


# --- the roles ----------------------------------------------------------------------------


def _claim_mounts(volumes: list[Volume], prefix: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pod volumes (one per distinct claim) and the container mounts for `volumes`."""
    pod_volumes: dict[str, dict[str, Any]] = {}
    mounts = []
    for vol in volumes:
        if vol.claimName not in pod_volumes:
            pod_volumes[vol.claimName] = {
                "name": f"{prefix}-{len(pod_volumes)}",
                "persistentVolumeClaim": {"claimName": vol.claimName},
            }
        mount: dict[str, Any] = {"name": pod_volumes[vol.claimName]["name"], "mountPath": vol.mountPath}
        if vol.readOnly:  # the API server omits the default (false)
            mount["readOnly"] = True
        if vol.subPath:
            mount["subPath"] = vol.subPath
        mounts.append(mount)
    return list(pod_volumes.values()), mounts


def _role_env(job: Job, workload: Workload) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if roles.uses_redis(workload.role):
        # A secretKeyRef: the pod spec names the Secret, never the value. The runtime reads
        # the password from this variable, as under `fedtune run`.
        ref = {"name": child_name(job.name, "redis"), "key": "password"}
        env.append({"name": roles.REDIS_PASSWORD_ENV, "valueFrom": {"secretKeyRef": ref}})
    if tls.enabled(job):
        env.append({"name": roles.TLS_DIR_ENV, "value": tls.TLS_DIR})
    if workload.role != SCHEDULER:
        # As many torch threads as CPUs requested (rounded up): pods sharing a node must not oversubscribe it.
        cpus = {"resource": "requests.cpu", "divisor": "1"}
        env.append({"name": roles.TORCH_THREADS_ENV, "valueFrom": {"resourceFieldRef": cpus}})
    env += [
        {"name": roles.PARTY_ENV, "value": workload.key},
        {"name": roles.METRICS_PORT_ENV, "value": str(roles.METRICS_PORT)},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        *({"name": k, "value": v} for k, v in CACHE_ENV.items()),
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
    ]
    return env


def _resources(party: Party | None) -> dict[str, Any]:
    if party is None:
        return copy.deepcopy(SCHEDULER_RESOURCES)
    res = party.resources
    requests = {"cpu": res.cpu or PARTY_CPU_REQUEST, "memory": res.memory or PARTY_MEMORY_REQUEST}
    limits = {"memory": res.memory or PARTY_MEMORY_LIMIT}
    if res.gpu > 0:
        # Extended resources are set as limits (requests default to them).
        limits[res.gpuResource] = str(res.gpu)  # quantities are strings in the API
    return {"requests": requests, "limits": limits}


def role_pod(job: Job, workload: Workload) -> dict[str, Any]:
    """The pod of the scheduler or of one local party."""
    spec = job.spec
    party_name = workload_party(workload)
    party = None if party_name is None else spec.party(party_name)
    component = component_of(workload.role)
    volumes: list[dict[str, Any]] = [
        {"name": "job", "configMap": {"name": child_name(job.name, "job")}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "job", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": SCRATCH},
    ]
    if party is not None:  # the scheduler writes no adapters
        volumes.insert(1, {"name": "output", "persistentVolumeClaim": {"claimName": output_claim(job, party)}})
        mounts.insert(1, {"name": "output", "mountPath": OUTPUT_DIR})
    if tls.enabled(job):
        # This role's own certificate and key, nobody else's (and never the CA's key).
        volumes.append(secret_volume("tls", tls.role_secret_name(job, workload)))
        mounts.append({"name": "tls", "mountPath": tls.TLS_DIR, "readOnly": True})
    if party is not None:
        # Shared claims (the pretrained model) in every party pod, then the party's own.
        shared_vols, shared_mounts = _claim_mounts(spec.storage.volumes, "shared")
        own_vols, own_mounts = _claim_mounts(party.volumes, "party")
        volumes += shared_vols + own_vols
        mounts += shared_mounts + own_mounts
        if spec.ranks(party) > 1:
            # The party's command starts its ranks in this container (fedtune.train.ranks); they exchange
            # tensors through shared memory (NCCL), and a container's own /dev/shm is 64 MiB.
            volumes.append({"name": "shm", "emptyDir": {"medium": "Memory"}})
            mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    container = {
        "name": component,
        "image": spec.image,
        "imagePullPolicy": spec.imagePullPolicy,
        "command": ["fedtune", *roles.role_argv(
            workload.role, JOB_FILE, party=party_name, base_dir=spec.workingDir, output=OUTPUT_DIR,
            output_dir=party_output_dir(job, party_name) if party_name and spec.output else None,
            insecure=not tls.enabled(job))],
        "workingDir": spec.workingDir,
        "env": _role_env(job, workload),
        "ports": [{"name": "grpc", "containerPort": roles.PORTS[workload.role]},
                  {"name": "metrics", "containerPort": roles.METRICS_PORT}],
        "resources": _resources(party),
        "securityContext": container_security(TRAINER_UID),
        "volumeMounts": mounts,
        # A failed role's last log lines (which name the bad file or field) become the
        # pod's termination message, and so the resource's Failed condition.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata(job, workload.pod_name, component, party_name),
        "spec": {
            "restartPolicy": "Never",
            # Trainer pods never talk to the Kubernetes API.
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": pod_security(TRAINER_UID),
            "containers": [container],
            "volumes": volumes,
        },
    }
    return scheduling.apply(pod, scheduling.for_pod(job, party))
