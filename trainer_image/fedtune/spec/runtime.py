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
    # This long after the job succeeded or failed, the resource (and with it every child) is deleted.
    ttlSecondsAfterFinished: int | None = Field(None, ge=0)
    # True: the job's pods are removed (Redis, the claims and the Secrets stay); false again: it goes on
    # from the last round.
    suspend: bool = False


class RedisSpec(Strict):
    address: str | None = None
    persistence: bool = False
    storage: str = "1Gi"
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

    @model_validator(mode="after")
    def _claim_or_settings(self) -> OutputStorage:
        given = self.model_fields_set & {"size", "storageClassName", "accessMode"}
        if self.claimName and given:
            raise ValueError(f"`claimName` names an existing claim: {', '.join(sorted(given))} would not apply; "
                             "remove it, or remove claimName to have fedtune create the claims")
        return self


class Storage(Strict):
    output: OutputStorage = Field(default_factory=OutputStorage)
    # Existing claims mounted into every party pod (the pretrained model, shared data).
    volumes: list[Volume] = Field(default_factory=list)
