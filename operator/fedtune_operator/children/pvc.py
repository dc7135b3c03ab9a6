"""PersistentVolumeClaims: J-output (the adapters) and J-redis-data (with spec.redis.persistence)."""

from __future__ import annotations

from typing import Any

from ..jobs import Job, child_name, metadata


def pvc(job: Job, name: str, component: str, size: str, storage_class: str | None, modes: list[str]) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": modes, "resources": {"requests": {"storage": size}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    meta = metadata(job, name, component)
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def redis_pvc(job: Job) -> dict[str, Any] | None:
    if not job.spec.redis.persistence:
        return None
    return pvc(job, child_name(job.name, "redis-data"), "redis", job.spec.redis.storage, None, ["ReadWriteOnce"])


def output_pvc(job: Job) -> dict[str, Any] | None:
    """The adapters' claim, unless spec.storage.output.claimName names an existing one."""
    out = job.spec.storage.output
    if out.claimName:
        return None
    # Every role's pod mounts it: fine on one node; across nodes name a ReadWriteMany claim
    # in spec.storage.output.claimName instead.
    return pvc(job, child_name(job.name, "output"), "output", out.size, out.storageClassName, ["ReadWriteOnce"])
