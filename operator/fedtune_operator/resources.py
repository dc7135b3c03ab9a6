"""Resource builders: one FederatedFineTune -> the manifests of its children.

Pure functions (no API calls), so every manifest is unit-tested without a cluster.
Children of a resource J in namespace N all carry an ownerReference to J and the labels
`app.kubernetes.io/part-of: fedtune`, `fedtune.io/job: J`, `fedtune.io/component: ...`:

    Secret    J-redis          generated Redis password (key `password`) and the redis.conf
                               that carries it (key `redis.conf`)
    Pod       J-redis          `redis-server /etc/redis/redis.conf`, Service J-redis:6379
    PVC       J-redis-data     only with spec.redis.persistence (appendonly)
    ConfigMap J-job            job.yaml: the spec as given, addresses filled in
    Pod       J-scheduler      `fedtune scheduler`, Service J-scheduler:55005
    Pod       J-<party>        one per local party, Service J-<party>:55004/55006
    PVC       J-output         adapters land here (unless spec.storage.output.claimName)
    Secret    J-ca, J-tls-<role>   the federation's CA and each role's certificate (`tls.py`)
    NetworkPolicy J-network    ingress to the job's pods: Redis from the roles that use it and
                               the operator, gRPC from the job's pods; nothing else

Names are deterministic, so creating a child twice is a 409 and never a duplicate.

Pods run as non-root users with every capability dropped, no privilege escalation,
seccomp RuntimeDefault, a read-only root filesystem (caches go to a /tmp emptyDir) and no
service-account token; secrets reach them as mounted files or secretKeyRefs, never as
literal values in the manifest.
"""

from __future__ import annotations

import base64
import copy
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from fedtune import certs
from fedtune.spec import FederatedFineTune, JobSpec, Party, Volume, expand_output_path

from . import crdgen, tls

PART_OF = "fedtune"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_JOB = "fedtune.io/job"
LABEL_COMPONENT = "fedtune.io/component"
LABEL_PARTY = "fedtune.io/party"

SCHEDULER = "scheduler"
REDIS_ROLES = (SCHEDULER, "assist_trainer")  # the roles that keep state in Redis and read its password
PORTS = {"scheduler": 55005, "assist_trainer": 55004, "label_trainer": 55006}
REDIS_PORT = 6379
# The CLI subcommand of each role (`fedtune <subcommand>`).
SUBCOMMANDS = {"scheduler": "scheduler", "assist_trainer": "assist-trainer", "label_trainer": "label-trainer"}

CONFIG_DIR = "/etc/fedtune"
JOB_FILE = f"{CONFIG_DIR}/job.yaml"
OUTPUT_DIR = "/fedtune/output"
REDIS_DATA_DIR = "/data"
REDIS_CONFIG_DIR = "/etc/redis"
REDIS_CONFIG = "redis.conf"
PASSWORD_ENV = "FEDTUNE_REDIS_PASSWORD"
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
class OperatorPeer:
    """Where the operator's own pod runs: it reads each job's Redis for status."""

    namespace: str
    labels: dict[str, str]


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
    return problems + tls.name_problems(job, workloads(job)) + _federation_problems(job) + _output_problems(job)


def _output_problems(job: Job) -> list[str]:
    """An absolute spec.output.path must lie on a writable claim mounted in the party's pod
    (the root filesystem is read-only)."""
    problems = []
    for party in local_parties(job.spec):
        folder = party_output_dir(job, party.name)
        if folder.startswith(OUTPUT_DIR + "/"):
            continue
        mounts = [v.mountPath for v in [*job.spec.storage.volumes, *party.volumes] if not v.readOnly]
        if not any(folder == m or folder.startswith(m.rstrip("/") + "/") for m in mounts):
            problems.append(f"spec.output.path: {folder} (party `{party.name}`) is on no writable volume; use a "
                            "relative path (inside the output claim) or mount a claim there (spec.storage.volumes)")
    return problems


def _federation_problems(job: Job) -> list[str]:
    """Cross-silo rules: other organisations reach this job's ports, so they need mTLS and a shared CA."""
    spec = job.spec
    remote = [p.name for p in spec.parties if p.remote is not None]
    if not remote:
        return []
    who = ", ".join(f"`{n}`" for n in remote)
    problems = []
    if not hosts_federation(spec) and not spec.scheduler.address:
        problems.append(
            f"the assist_trainer `{spec.authority.name}` is remote, and the scheduler runs with it: set "
            "spec.scheduler.address to the host:port where that organisation serves it"
        )
    if not spec.tls.enabled:
        problems.append(
            f"spec.tls.enabled is false but parties {who} are remote: their gRPC traffic would cross "
            "organisations unencrypted and unauthenticated; keep TLS on"
        )
    elif not spec.tls.caSecret:
        problems.append(
            f"parties {who} are remote: set spec.tls.caSecret to a CA Secret (ca.crt, ca.key) that every "
            "organisation of the federation shares, or their certificates cannot verify each other"
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


def hosts_federation(spec: JobSpec) -> bool:
    """The scheduler and Redis run where the assist_trainer runs.

    When another organisation runs the assist_trainer (`remote`), it hosts the federation:
    this cluster runs only its own label_trainers, which call that scheduler
    (`spec.scheduler.address`) and that aggregator (the assist_trainer's `remote.address`).
    """
    return spec.authority.remote is None


def workloads(job: Job) -> list[Workload]:
    out = [Workload(SCHEDULER, SCHEDULER, child_name(job.name, SCHEDULER))] if hosts_federation(job.spec) else []
    out += [Workload(p.name, p.role, party_object_name(job.name, p)) for p in local_parties(job.spec)]
    return out


def redis_pod_name(job: Job) -> str | None:
    return child_name(job.name, "redis") if hosts_federation(job.spec) else None


def output_claim(job: Job) -> str:
    return job.spec.storage.output.claimName or child_name(job.name, "output")


def party_output_dir(job: Job, party: str) -> str:
    """Where a party's pod writes its adapters: OUTPUT_DIR/<party> in the output claim, or
    spec.output.path filled in (relative: inside the output claim; absolute: as given)."""
    if job.spec.output is None:
        return f"{OUTPUT_DIR}/{party}"
    path = expand_output_path(job.spec.output.path, job.name, party)
    return path if path.startswith("/") else posixpath.normpath(posixpath.join(OUTPUT_DIR, path))


def output_location(job: Job) -> str:
    """Where the adapters are, `[NODE_ID]` standing for each party."""
    folder = party_output_dir(job, "[NODE_ID]")
    if folder == f"{OUTPUT_DIR}/[NODE_ID]":
        return f"pvc://{output_claim(job)}/"
    inside = folder[len(OUTPUT_DIR) + 1:] if folder.startswith(OUTPUT_DIR + "/") else None
    return f"pvc://{output_claim(job)}/{inside}" if inside is not None else folder


# --- the job spec every role reads ------------------------------------------------------


def job_document(job: Job) -> dict[str, Any]:
    """The resource as the roles read it: the spec as given, with in-cluster addresses.

    Short Service names: every pod runs in the job's namespace.
    """
    spec = copy.deepcopy(job.document)
    if hosts_federation(job.spec):
        spec.setdefault("scheduler", {})["address"] = f"{child_name(job.name, SCHEDULER)}:{PORTS[SCHEDULER]}"
        spec.setdefault("redis", {})["address"] = f"{child_name(job.name, 'redis')}:{REDIS_PORT}"
    # Otherwise spec.scheduler.address is the hosting organisation's, as the user gave it.
    for raw, party in zip(spec["parties"], job.spec.parties):
        if party.role == "assist_trainer":
            local = f"{party_object_name(job.name, party)}:{PORTS['assist_trainer']}"
            raw["address"] = party.remote.address if party.remote is not None else local
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


def redis_config(job: Job, password: str) -> str:
    """redis.conf: the password lives in this file, in the Secret, never on a command line."""
    lines = [
        f"port {REDIS_PORT}",
        f"requirepass {password}",
        f"dir {REDIS_DATA_DIR}",
        'save ""',  # no RDB snapshots: append-only persistence or none
    ]
    if job.spec.redis.persistence:
        lines += ["appendonly yes", "appendfsync everysec"]
    else:
        lines += ["appendonly no"]
    return "\n".join(lines) + "\n"


def redis_secret(job: Job, password: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(job, child_name(job.name, "redis"), "redis"),
        "type": "Opaque",
        "data": {
            "password": base64.b64encode(password.encode()).decode(),
            REDIS_CONFIG: base64.b64encode(redis_config(job, password).encode()).decode(),
        },
    }


def _secret_volume(name: str, secret: str, keys: list[str] | None = None) -> dict[str, Any]:
    source: dict[str, Any] = {"secretName": secret, "defaultMode": SECRET_MODE}
    if keys is not None:  # only these keys become files
        source["items"] = [{"key": k, "path": k} for k in keys]
    return {"name": name, "secret": source}


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
                    # Everything, the password included, comes from the mounted redis.conf:
                    # nothing secret in the command line, the environment or `ps`.
                    "command": ["redis-server", f"{REDIS_CONFIG_DIR}/{REDIS_CONFIG}"],
                    "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
                    "readinessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": 5},
                    "resources": copy.deepcopy(REDIS_RESOURCES),
                    "securityContext": _restricted_container_security(REDIS_UID),
                    "volumeMounts": [
                        {"name": "data", "mountPath": REDIS_DATA_DIR},
                        {"name": "config", "mountPath": REDIS_CONFIG_DIR, "readOnly": True},
                    ],
                }
            ],
            "volumes": [data, _secret_volume("config", name, [REDIS_CONFIG])],
        },
    }


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
    if party is not None and job.spec.output is not None:
        return [*command, "--base-dir", job.spec.workingDir, "--output-dir", party_output_dir(job, party)]
    return [*command, "--base-dir", job.spec.workingDir, "--output", OUTPUT_DIR]


def uses_redis(role: str) -> bool:
    """The scheduler keeps the job state and the assist_trainer aggregates through Redis;
    label_trainers only speak gRPC, so they get neither its password nor its port."""
    return role in REDIS_ROLES


def _role_env(job: Job, workload: Workload) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if uses_redis(workload.role):
        # A secretKeyRef: the pod spec names the Secret, never the value. The runtime reads
        # the password from this variable, as under `fedtune run`.
        ref = {"name": child_name(job.name, "redis"), "key": "password"}
        env.append({"name": PASSWORD_ENV, "valueFrom": {"secretKeyRef": ref}})
    if tls.enabled(job):
        env.append({"name": tls.TLS_DIR_ENV, "value": tls.TLS_DIR})
    if workload.role != SCHEDULER:
        # As many torch threads as CPUs requested (rounded up): pods sharing a node must not oversubscribe it.
        cpus = {"resource": "requests.cpu", "divisor": "1"}
        env.append({"name": "FEDTUNE_TORCH_THREADS", "valueFrom": {"resourceFieldRef": cpus}})
    env += [
        {"name": "FEDTUNE_PARTY", "value": workload.key},
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
        limits["nvidia.com/gpu"] = str(res.gpu)  # quantities are strings in the API
    return {"requests": requests, "limits": limits}


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
        {"name": "tmp", "mountPath": SCRATCH},
    ]
    if tls.enabled(job):
        # This role's own certificate and key, nobody else's (and never the CA's key).
        volumes.append(_secret_volume("tls", tls.role_secret_name(job, workload)))
        mounts.append({"name": "tls", "mountPath": tls.TLS_DIR, "readOnly": True})
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
        "env": _role_env(job, workload),
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


# --- network ------------------------------------------------------------------------------


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
    return sorted({PORTS[w.role] for w in workloads(job) if w.role != "label_trainer"})


def network_policy(job: Job, operator: OperatorPeer | None = None) -> dict[str, Any]:
    """Default-deny ingress to the job's pods, but for what the job itself needs.

    - Redis (6379): from the scheduler and the assist_trainer, which keep state there, and
      from the operator's pod, which reads round and loss for the status;
    - gRPC: from the job's own pods; when parties are remote, from anywhere, since another
      organisation's parties call in (mutual TLS, required then, decides who may).
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
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(job, child_name(job.name, "network"), "network"),
        "spec": {"podSelector": job_pods, "policyTypes": ["Ingress"], "ingress": rules},
    }


# --- TLS Secrets ------------------------------------------------------------------------------


def ca_secret(job: Job, ca: certs.Issued) -> dict[str, Any]:
    """The generated CA (`tls.generates_ca`); its key stays in this Secret, mounted nowhere."""
    return tls.ca_secret(ca, _metadata(job, tls.ca_secret_name(job), "tls"))


def tls_secret(job: Job, workload: Workload, material: tls.Material) -> dict[str, Any]:
    party = None if workload.role == SCHEDULER else workload.key
    meta = _metadata(job, tls.role_secret_name(job, workload), "tls", party)
    return tls.role_secret(material.ca.cert_pem, material.roles[workload.key], meta)


def tls_secrets(job: Job, material: tls.Material) -> list[dict[str, Any]]:
    """The CA Secret (when generated) and every local role's certificate Secret."""
    if not tls.enabled(job):
        return []
    out = [ca_secret(job, material.ca)] if tls.generates_ca(job) else []
    return out + [tls_secret(job, w, material) for w in workloads(job)]


# --- everything at once ---------------------------------------------------------------------


def secrets(job: Job, password: str, material: tls.Material | None = None) -> list[dict[str, Any]]:
    """The Redis Secret and the TLS Secrets.

    Without `material`, a TLS job gets a fresh CA and certificates (tests, benchmarks).
    """
    if material is None and tls.enabled(job):
        material = tls.new_material(job, workloads(job))
    out = [redis_secret(job, password)] if hosts_federation(job.spec) else []
    return out + (tls_secrets(job, material) if material is not None else [])


def plain_children(job: Job, operator: OperatorPeer | None = None) -> list[dict[str, Any]]:
    """The static children that hold no secret: ConfigMap, claims, Services, NetworkPolicy."""
    hosts = hosts_federation(job.spec)
    out = [job_configmap(job)]
    out += [pvc for pvc in (output_pvc(job), redis_pvc(job) if hosts else None) if pvc is not None]
    out += [redis_service(job)] if hosts else []
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
