"""How a job is kept and run: Redis, storage of the outputs, the run policy."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedtune.spec.common import Strict
from fedtune.spec.parties import Volume


class RunPolicy(Strict):
    """How long a job may run, how long it stays once finished, and whether it runs now (Kubernetes only).

    The one part of a spec that may change once applied (a queue such as Kueue sets `suspend`).
    """

    # Counted from when the job last started running (a suspension restarts the count); past it, the job fails.
    activeDeadlineSeconds: int | None = Field(None, ge=1)
    # This long after the job succeeded or failed, its pods and Services are deleted; the resource, its
    # status (where the adapters are) and the output claims stay.
    ttlSecondsAfterFinished: int | None = Field(None, ge=0)
    # True: the job's pods are removed (Redis, the claims and the Secrets stay); false again: it goes on
    # from the last round.
    suspend: bool = False


class RedisSpec(Strict):
    address: str | None = None
    # The job's state in an append-only file on a claim (`<job>-redis-data`), so a restarted Redis pod
    # carries on where it was; false: in memory only.
    persistence: bool = True
    storage: str = "1Gi"
    # The Redis claim's StorageClass (default: the cluster's default one).
    storageClassName: str | None = None
    image: str = "redis:7.2-alpine"


class OutputStorage(Strict):
    """Where the adapters land on Kubernetes: by default one ReadWriteOnce claim per local party
    (`<job>-output-<party>`, so parties may run on different nodes); `ReadWriteMany` makes one
    claim all parties share (`<job>-output`: name a storage class that provides that mode)."""

    size: str = "1Gi"
    storageClassName: str | None = None
    accessMode: Literal["ReadWriteOnce", "ReadWriteMany"] = "ReadWriteOnce"
    # Use this existing claim for the adapters instead of creating any.
    claimName: str | None = None
    # The claims fedtune creates outlive the resource (deleting it, or its TTL, never deletes the adapters);
    # false: they are deleted with it.
    retain: bool = True

    @model_validator(mode="after")
    def _claim_or_settings(self) -> OutputStorage:
        given = self.model_fields_set & {"size", "storageClassName", "accessMode", "retain"}
        if self.claimName and given:
            raise ValueError(f"`claimName` names an existing claim: {', '.join(sorted(given))} would not apply; "
                             "remove it, or remove claimName to have fedtune create the claims")
        return self


class Storage(Strict):
    output: OutputStorage = Field(default_factory=OutputStorage)
    # Existing claims mounted into every party pod (the pretrained model, shared data).
    volumes: list[Volume] = Field(default_factory=list)
