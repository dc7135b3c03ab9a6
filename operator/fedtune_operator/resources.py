"""Resource builders: one FederatedFineTune -> the manifests of its children.

Pure functions (no API calls), so every manifest is unit-tested without a cluster.
Children of a resource J in namespace N all carry an ownerReference to J and the labels
`app.kubernetes.io/part-of: fedtune`, `fedtune.io/job: J`, `fedtune.io/component: ...`:

    Secret    J-redis          generated Redis password (key `password`)
    Pod       J-redis          redis-server --requirepass, Service J-redis:6379
    PVC       J-redis-data     only with spec.redis.persistence (appendonly)
    ConfigMap J-job            job.yaml: the spec as given, addresses filled in
    Pod       J-scheduler      `fedtune scheduler`, Service J-scheduler:55005
    Pod       J-<party>        one per local party, Service J-<party>:55004/55006
    PVC       J-output         adapters land here (unless spec.storage.output.claimName)

Names are deterministic, so creating a child twice is a 409 and never a duplicate.
"""

from __future__ import annotations

import base64
import copy
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from fedtune.spec import FederatedFineTune, JobSpec, Party, Volume

from . import crdgen

PART_OF = "fedtune"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_JOB = "fedtune.io/job"
LABEL_COMPONENT = "fedtune.io/component"
LABEL_PARTY = "fedtune.io/party"

SCHEDULER = "scheduler"
PORTS = {"scheduler": 55005, "assist_trainer": 55004, "label_trainer": 55006}
REDIS_PORT = 6379
# The CLI subcommand of each role (`fedtune <subcommand>`).
SUBCOMMANDS = {"scheduler": "scheduler", "assist_trainer": "assist-trainer", "label_trainer": "label-trainer"}

CONFIG_DIR = "/etc/fedtune"
JOB_FILE = f"{CONFIG_DIR}/job.yaml"
OUTPUT_DIR = "/fedtune/output"
REDIS_DATA_DIR = "/data"
PASSWORD_ENV = "FEDTUNE_REDIS_PASSWORD"

# The trainer image runs as this user (trainer_image/Dockerfile); the Redis image's own user.
TRAINER_UID = 1000
REDIS_UID = 999

# Party names that would make `J-<party>` collide with the job's own pods and Services.
RESERVED_PARTY_NAMES = ("scheduler", "redis")
# Services are DNS-1035 labels.
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_MAX_DNS_LABEL = 63


@dataclass(frozen=True)
class Job:
    """What the builders need of one resource: identity, the raw spec and the parsed one."""

    name: str
    namespace: str
    uid: str
    document: dict[str, Any]  # the spec exactly as the user wrote it
    model: FederatedFineTune = field(compare=False)

    @property
    def spec(self) -> JobSpec:
        return self.model.spec


@dataclass(frozen=True)
class Workload:
    """A pod the operator keeps alive until it succeeds: the scheduler or one local party."""

    key: str  # `scheduler` or the party's name, as in status
    role: str  # scheduler | assist_trainer | label_trainer
    pod_name: str


# --- names and metadata ---------------------------------------------------------------


def child_name(job: str, suffix: str) -> str:
    return f"{job}-{suffix}"


def party_object_name(job: str, party: Party) -> str:
    return child_name(job, party.dns_name)


def name_problems(job: Job) -> list[str]:
    """Why some child's name would be refused by the API server (checked before creating any)."""
    problems = []
    for party in job.spec.parties:
        if party.dns_name in RESERVED_PARTY_NAMES:
            problems.append(f"parties[].name `{party.name}` is reserved on Kubernetes (the job's own {party.dns_name})")
    for name in [child_name(job.name, SCHEDULER), *(party_object_name(job.name, p) for p in local_parties(job.spec))]:
        if len(name) > _MAX_DNS_LABEL or not _DNS_LABEL.match(name):
            problems.append(
                f"child name `{name}` is not a valid Service name (a DNS label: a letter first, "
                f"at most {_MAX_DNS_LABEL} characters); shorten metadata.name or the party name"
            )
    return problems


def labels(job: str, component: str, party: str | None = None) -> dict[str, str]:
    out = {LABEL_PART_OF: PART_OF, LABEL_JOB: job, LABEL_COMPONENT: component}
    if party is not None:
        out[LABEL_PARTY] = party
    return out


def selector(job: str) -> str:
    """Label selector for every child of one job."""
    return f"{LABEL_PART_OF}={PART_OF},{LABEL_JOB}={job}"


def owner_reference(job: Job) -> dict[str, Any]:
    # controller + blockOwnerDeletion: foreground deletion of J waits for its children.
    return {
        "apiVersion": f"{crdgen.GROUP}/{crdgen.VERSION}",
        "kind": crdgen.KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: Job, name: str, component: str, party: str | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": labels(job.name, component, party),
        "ownerReferences": [owner_reference(job)],
    }


def local_parties(spec: JobSpec) -> list[Party]:
    """Parties this cluster runs; `remote` parties run elsewhere and get nothing here."""
    return [p for p in spec.parties if p.remote is None]


def component_of(role: str) -> str:
    """Label values for roles: `assist-trainer`, `label-trainer`, `scheduler`."""
    return role.replace("_", "-")


def workloads(job: Job) -> list[Workload]:
    out = [Workload(SCHEDULER, SCHEDULER, child_name(job.name, SCHEDULER))]
    out += [Workload(p.name, p.role, party_object_name(job.name, p)) for p in local_parties(job.spec)]
    return out


def output_claim(job: Job) -> str:
    return job.spec.storage.output.claimName or child_name(job.name, "output")


def output_location(job: Job) -> str:
    return f"pvc://{output_claim(job)}/"


# --- the job spec every role reads ------------------------------------------------------


def job_document(job: Job) -> dict[str, Any]:
    """The resource as the roles read it: the spec as given, with in-cluster addresses.

    Short Service names: every pod runs in the job's namespace.
    """
    spec = copy.deepcopy(job.document)
    spec.setdefault("scheduler", {})["address"] = f"{child_name(job.name, SCHEDULER)}:{PORTS[SCHEDULER]}"
    spec.setdefault("redis", {})["address"] = f"{child_name(job.name, 'redis')}:{REDIS_PORT}"
    for raw, party in zip(spec["parties"], job.spec.parties):
        if party.role == "assist_trainer" and party.remote is None:
            raw["address"] = f"{party_object_name(job.name, party)}:{PORTS['assist_trainer']}"
        elif party.role == "assist_trainer" and party.remote is not None:
            raw["address"] = party.remote.address
    return {
        "apiVersion": crdgen.GROUP + "/" + crdgen.VERSION,
        "kind": crdgen.KIND,
        "metadata": {"name": job.name, "namespace": job.namespace},
        "spec": spec,
    }


def job_configmap(job: Job) -> dict[str, Any]:
    text = yaml.safe_dump(job_document(job), sort_keys=False, allow_unicode=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, child_name(job.name, "job"), "config"),
        "data": {"job.yaml": text},
    }


# --- Redis --------------------------------------------------------------------------------


def redis_secret(job: Job, password: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(job, child_name(job.name, "redis"), "redis"),
        "type": "Opaque",
        "data": {"password": base64.b64encode(password.encode()).decode()},
    }


def _password_env() -> dict[str, Any]:
    return {"name": PASSWORD_ENV, "valueFrom": {"secretKeyRef": {"name": "", "key": "password"}}}


def _restricted_container_security(uid: int) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_security(uid: int) -> dict[str, Any]:
    # fsGroup makes the claims writable by the non-root user.
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def redis_pod(job: Job) -> dict[str, Any]:
    redis = job.spec.redis
    name = child_name(job.name, "redis")
    password = _password_env()
    password["valueFrom"]["secretKeyRef"]["name"] = name
    persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if redis.persistence else ["--appendonly", "no"]
    if redis.persistence:
        data = {"name": "data", "persistentVolumeClaim": {"claimName": child_name(job.name, "redis-data")}}
    else:
        data = {"name": "data", "emptyDir": {}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(job, name, "redis"),
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": _pod_security(REDIS_UID),
            "containers": [
                {
                    "name": "redis",
                    "image": redis.image,
                    "imagePullPolicy": job.spec.imagePullPolicy,
                    # `$(VAR)` is expanded by the kubelet from env: the password never sits in the spec.
                    "command": ["redis-server"],
                    "args": [
                        "--port", str(REDIS_PORT),
                        "--requirepass", f"$({PASSWORD_ENV})",
                        "--dir", REDIS_DATA_DIR,
                        "--save", "",
                        *persistence,
                    ],
                    "env": [password],
                    "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
                    "readinessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": 5},
                    "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
                    "securityContext": _restricted_container_security(REDIS_UID),
                    "volumeMounts": [{"name": "data", "mountPath": REDIS_DATA_DIR}],
                }
            ],
            "volumes": [data],
        },
    }  # fmt: skip


def _service(job: Job, name: str, component: str, port: int, port_name: str, party: str | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, name, component, party),
        "spec": {
            # Headless, one pod behind each, as training operators do: the name resolves to
            # the pod itself, and a job of many parties takes no ClusterIPs from the range.
            "clusterIP": "None",
            # Resolvable as soon as the pod has an address: the roles retry until peers serve.
            "publishNotReadyAddresses": True,
            "selector": labels(job.name, component, party),
            "ports": [{"name": port_name, "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def redis_service(job: Job) -> dict[str, Any]:
    return _service(job, child_name(job.name, "redis"), "redis", REDIS_PORT, "redis")


def _pvc(job: Job, name: str, component: str, size: str, storage_class: str | None, modes: list[str]) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": modes, "resources": {"requests": {"storage": size}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    meta = _metadata(job, name, component)
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def redis_pvc(job: Job) -> dict[str, Any] | None:
    if not job.spec.redis.persistence:
        return None
    return _pvc(job, child_name(job.name, "redis-data"), "redis", job.spec.redis.storage, None, ["ReadWriteOnce"])


def output_pvc(job: Job) -> dict[str, Any] | None:
    out = job.spec.storage.output
    if out.claimName:
        return None
    # Every role's pod mounts it: fine on one node; across nodes name a ReadWriteMany claim
    # in spec.storage.output.claimName instead.
    return _pvc(job, child_name(job.name, "output"), "output", out.size, out.storageClassName, ["ReadWriteOnce"])


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


def _role_command(job: Job, role: str, party: str | None) -> list[str]:
    command = ["fedtune", SUBCOMMANDS[role], "--job", JOB_FILE]
    if party is not None:
        command += ["--party", party]
    return [*command, "--base-dir", job.spec.workingDir, "--output", OUTPUT_DIR]


def _role_env(job: Job, party: str) -> list[dict[str, Any]]:
    password = _password_env()
    password["valueFrom"]["secretKeyRef"]["name"] = child_name(job.name, "redis")
    return [
        password,
        {"name": "FEDTUNE_PARTY", "value": party},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        # The root filesystem is read-only: caches (HF, torch, matplotlib) go to the /tmp emptyDir.
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def _resources(party: Party | None) -> dict[str, Any]:
    if party is None:
        return {"requests": {"cpu": "100m", "memory": "256Mi"}}
    res = party.resources
    requests = {k: v for k, v in (("cpu", res.cpu), ("memory", res.memory)) if v}
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if res.gpu > 0:
        # Extended resources are set as limits (requests default to them).
        out["limits"] = {"nvidia.com/gpu": str(res.gpu)}  # quantities are strings in the API
    return out


def role_pod(job: Job, workload: Workload) -> dict[str, Any]:
    """The pod of the scheduler or of one local party."""
    spec = job.spec
    party = None if workload.role == SCHEDULER else spec.party(workload.key)
    component = component_of(workload.role)
    volumes: list[dict[str, Any]] = [
        {"name": "job", "configMap": {"name": child_name(job.name, "job")}},
        {"name": "output", "persistentVolumeClaim": {"claimName": output_claim(job)}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "job", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "output", "mountPath": OUTPUT_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if party is not None:
        # Shared claims (the pretrained model) in every party pod, then the party's own.
        shared_vols, shared_mounts = _claim_mounts(spec.storage.volumes, "shared")
        own_vols, own_mounts = _claim_mounts(party.volumes, "party")
        volumes += shared_vols + own_vols
        mounts += shared_mounts + own_mounts
    port = PORTS[workload.role]
    container = {
        "name": component,
        "image": spec.image,
        "imagePullPolicy": spec.imagePullPolicy,
        "command": _role_command(job, workload.role, None if party is None else party.name),
        "workingDir": spec.workingDir,
        "env": _role_env(job, workload.key),
        "ports": [{"name": "grpc", "containerPort": port}],
        "resources": _resources(party),
        "securityContext": _restricted_container_security(TRAINER_UID),
        "volumeMounts": mounts,
        # A failed role's last log lines (which name the bad file or field) become the
        # pod's termination message, and so the resource's Failed condition.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(job, workload.pod_name, component, None if party is None else party.name),
        "spec": {
            "restartPolicy": "Never",
            # Trainer pods never talk to the Kubernetes API.
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": _pod_security(TRAINER_UID),
            "containers": [container],
            "volumes": volumes,
        },
    }


def role_service(job: Job, workload: Workload) -> dict[str, Any]:
    party = None if workload.role == SCHEDULER else workload.key
    return _service(job, workload.pod_name, component_of(workload.role), PORTS[workload.role], "grpc", party)


# --- everything at once ---------------------------------------------------------------------


def static_children(job: Job, password: str) -> list[dict[str, Any]]:
    """Every child except the role pods (those follow the retry logic in `status`)."""
    out = [redis_secret(job, password), job_configmap(job)]
    out += [pvc for pvc in (output_pvc(job), redis_pvc(job)) if pvc is not None]
    out += [redis_service(job)] + [role_service(job, w) for w in workloads(job)]
    return out


def all_children(job: Job, password: str) -> list[dict[str, Any]]:
    """The complete desired set (the benchmark and tests compare a cluster against this)."""
    return [*static_children(job, password), redis_pod(job), *(role_pod(job, w) for w in workloads(job))]
