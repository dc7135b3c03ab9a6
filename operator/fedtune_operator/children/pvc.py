"""PersistentVolumeClaims: J-output-<party> or J-output (the adapters, kept past the job by default) and
J-redis-data (spec.redis.persistence, the default)."""

from __future__ import annotations

from typing import Any

from ..jobs import Job, child_name, local_parties, metadata, output_claim


def pvc(job: Job, name: str, component: str, size: str, storage_class: str | None, modes: list[str],
        owned: bool = True) -> dict[str, Any]:  # fmt: skip
    spec: dict[str, Any] = {"accessModes": modes, "resources": {"requests": {"storage": size}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    meta = metadata(job, name, component, owned=owned)
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def redis_pvc(job: Job) -> dict[str, Any] | None:
    """Redis' append-only file (spec.redis.persistence, the default): owned by the job, it goes with it."""
    redis = job.spec.redis
    if not redis.persistence:
        return None
    return pvc(job, child_name(job.name, "redis-data"), "redis", redis.storage, redis.storageClassName,
               ["ReadWriteOnce"])


def output_pvcs(job: Job) -> list[dict[str, Any]]:
    """The adapters' claims: one per local party (ReadWriteOnce: each pod may land on its own
    node), or one ReadWriteMany claim they share; none when spec.storage.output.claimName
    names an existing claim. Unless spec.storage.output.retain is false they belong to no owner,
    so that deleting the job never deletes the adapters (an annotation names the job's uid)."""
    out = job.spec.storage.output
    if out.claimName:
        return []
    names = sorted({output_claim(job, p) for p in local_parties(job.spec)})
    return [pvc(job, name, "output", out.size, out.storageClassName, [out.accessMode], owned=not out.retain)
            for name in names]
