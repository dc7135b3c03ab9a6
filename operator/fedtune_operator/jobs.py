"""A FederatedFineTune as the operator sees it: the API it serves, one job, its workloads and names.

Every child of a resource J in namespace N is named `J-<suffix>` and carries an
ownerReference to J (but the output claims, which outlive J: the annotation
`fedtune.io/job-uid` instead) and the labels `app.kubernetes.io/part-of: fedtune`,
`fedtune.io/job: J`, `fedtune.io/component: ...` (and `fedtune.io/party` on a party's
objects). Names are deterministic, so creating a child twice is a 409, never a duplicate.
The builders of each kind live in `children/`.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from fedtune.roles import SCHEDULER
from fedtune.spec import API_VERSION, KIND, FederatedFineTune, JobSpec, Party, expand_output_path

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "federatedfinetunes"

PART_OF = "fedtune"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_JOB = "fedtune.io/job"
LABEL_COMPONENT = "fedtune.io/component"
LABEL_PARTY = "fedtune.io/party"
# On an output claim that outlives its job (spec.storage.output.retain), in place of an ownerReference.
ANNOTATION_JOB_UID = "fedtune.io/job-uid"

OUTPUT_DIR = "/fedtune/output"  # where the output claim is mounted in every role's pod
# Party names that would make `J-<party>` collide with the job's own pods and Services.
RESERVED_PARTY_NAMES = (SCHEDULER, "redis")
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


# --- which roles run here ------------------------------------------------------------------


def local_parties(spec: JobSpec) -> list[Party]:
    """Parties this cluster runs; `remote` parties run elsewhere and get nothing here."""
    return [p for p in spec.parties if p.remote is None]


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


def shared_output(job: Job) -> bool:
    """All parties write to one claim (the user's, or a ReadWriteMany one); else each to its own."""
    out = job.spec.storage.output
    return bool(out.claimName) or out.accessMode == "ReadWriteMany"


def output_claim(job: Job, party: Party) -> str:
    """The claim a party's adapters land in (in its folder `<party>/`)."""
    out = job.spec.storage.output
    if out.claimName:
        return out.claimName
    return child_name(job.name, "output" if shared_output(job) else f"output-{party.dns_name}")


def party_output_dir(job: Job, party: str) -> str:
    """Where a party's pod writes its adapters: OUTPUT_DIR/<party> in the output claim, or
    spec.output.path filled in (relative: inside the output claim; absolute: as given)."""
    if job.spec.output is None:
        return f"{OUTPUT_DIR}/{party}"
    path = expand_output_path(job.spec.output.path, job.name, party)
    return path if path.startswith("/") else posixpath.normpath(posixpath.join(OUTPUT_DIR, path))


def output_location(job: Job) -> str:
    """Where the adapters land, for the status: the shared claim, or the per-party claims' pattern
    (with spec.output.path inside them, when given; or that path, when it is absolute)."""
    shared = shared_output(job)
    claim = output_claim(job, job.spec.parties[0]) if shared else f"{child_name(job.name, 'output')}-<party>"
    if job.spec.output is None:
        return f"pvc://{claim}/"
    return _location(party_output_dir(job, "<party>"), claim)


def _location(folder: str, claim: str) -> str:
    """A folder of a party's pod as the status shows it: in its output claim, or as it is."""
    return f"pvc://{claim}/{folder[len(OUTPUT_DIR) + 1:]}" if folder.startswith(OUTPUT_DIR + "/") else folder


def output_problems(job: Job) -> list[str]:
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


def storage_classes(job: Job) -> dict[str, str]:
    """The StorageClasses the claims fedtune creates name, by the field that names them."""
    out, redis = job.spec.storage.output, job.spec.redis
    found = {}
    if out.storageClassName and not out.claimName:
        found["spec.storage.output.storageClassName"] = out.storageClassName
    if redis.storageClassName and redis.persistence and hosts_federation(job.spec):
        found["spec.redis.storageClassName"] = redis.storageClassName
    return found


def party_outputs(job: Job) -> dict[str, str]:
    """Each local party's adapters folder, for its record in the status."""
    return {p.name: _location(party_output_dir(job, p.name), output_claim(job, p)) + "/"
            for p in local_parties(job.spec)}


# --- names and metadata ---------------------------------------------------------------------


def child_name(job: str, suffix: str) -> str:
    return f"{job}-{suffix}"


def party_object_name(job: str, party: Party) -> str:
    return child_name(job, party.dns_name)


def component_of(role: str) -> str:
    """Label values for roles: `assist-trainer`, `label-trainer`, `scheduler`."""
    return role.replace("_", "-")


def name_problems(job: Job) -> list[str]:
    """Why some child's name would be refused by the API server."""
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


def federation_problems(job: Job) -> list[str]:
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
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(job: Job, name: str, component: str, party: str | None = None, owned: bool = True) -> dict[str, Any]:
    """A child's metadata: its name in the job's namespace, the job's labels, owned by the job (garbage
    collection deletes it with the job); or, not `owned`, only annotated with the job's uid (it stays)."""
    meta = {"name": name, "namespace": job.namespace, "labels": labels(job.name, component, party)}
    if owned:
        meta["ownerReferences"] = [owner_reference(job)]
    else:
        meta["annotations"] = {ANNOTATION_JOB_UID: job.uid}
    return meta


def job_uids(obj: dict[str, Any]) -> set[str]:
    """The uids of the jobs a child belongs to: its owner's, or the one its annotation names."""
    meta = obj.get("metadata") or {}
    uids = {ref["uid"] for ref in meta.get("ownerReferences") or [] if ref.get("kind") == KIND and ref.get("uid")}
    kept = (meta.get("annotations") or {}).get(ANNOTATION_JOB_UID)
    return uids | ({kept} if kept else set())


def workload_party(workload: Workload) -> str | None:
    """The party a workload's objects are labelled with (none for the scheduler)."""
    return None if workload.role == SCHEDULER else workload.key
