"""`parties` and where they run: roles, addresses, trainsets, resources, Kubernetes scheduling."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from fedtune.spec.common import Strict, kube_type, parse_identity
from fedtune.spec.training import PartyTrainer, PretrainedModel, TrainsetEntry

# An extended resource name, as Kubernetes spells them: `nvidia.com/gpu`, `amd.com/gpu`, `nvidia.com/mig-1g.10gb`.
_RESOURCE_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"


class Resources(Strict):
    cpu: str | None = None
    memory: str | None = None
    gpu: int = Field(0, ge=0)
    # The resource `gpu` counts on Kubernetes: nvidia.com/gpu, amd.com/gpu, a MIG profile (nvidia.com/mig-1g.10gb).
    gpuResource: str = Field("nvidia.com/gpu", pattern=_RESOURCE_NAME, max_length=253)


class Volume(Strict):
    """An existing PersistentVolumeClaim mounted into a pod (Kubernetes only)."""

    claimName: str = Field(min_length=1)
    mountPath: str = Field(pattern=r"^/")
    subPath: str | None = None
    readOnly: bool = False


class Scheduling(Strict):
    """Where a job's pods may run and how the cluster treats them (Kubernetes only).

    `spec.scheduling` applies to every party's pod; `parties[].scheduling` is laid over it
    for that party's pod: lists add up, maps merge (the party's keys win), single values are
    replaced, and the party's `podTemplate` is laid over the job's. The scheduler and Redis
    take only what `ControlPlane` says.
    """

    tolerations: list[dict[str, Any]] = Field(default_factory=list,
                                              json_schema_extra=kube_type("io.k8s.api.core.v1.Toleration"))
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    affinity: dict[str, Any] | None = Field(None, json_schema_extra=kube_type("io.k8s.api.core.v1.Affinity"))
    priorityClassName: str | None = None
    schedulerName: str | None = None
    imagePullSecrets: list[dict[str, Any]] = Field(
        default_factory=list, json_schema_extra=kube_type("io.k8s.api.core.v1.LocalObjectReference"))
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    # Anything else, as a partial pod template (`metadata`, `spec`) merged over the pod fedtune builds.
    podTemplate: dict[str, Any] | None = Field(None, json_schema_extra=kube_type("PodTemplateOverlay"))


class ControlPlane(Strict):
    """The job's own pods, the scheduler and Redis (Kubernetes only). They need no GPU: `spec.scheduling`'s
    placement (tolerations, nodeSelector, affinity) and its `podTemplate` are not theirs, only its labels,
    annotations, imagePullSecrets, priorityClassName and schedulerName; `scheduling` here is laid over those."""

    scheduling: Scheduling | None = None


class Remote(Strict):
    """A party run by another organisation: only its address is known here."""

    address: str = Field(pattern=r"^[^\s:]+:\d+$")


_PARTY_NAME = r"^[A-Za-z0-9]([-_.A-Za-z0-9]{0,38}[A-Za-z0-9])?$"


class Party(Strict):
    name: str = Field(pattern=_PARTY_NAME)
    role: Literal["assist_trainer", "label_trainer"]
    trainset: list[TrainsetEntry] | None = None
    valset: list[TrainsetEntry] | None = None
    pretrained_model: PretrainedModel | None = None
    trainer: PartyTrainer = Field(default_factory=PartyTrainer)
    resources: Resources = Field(default_factory=Resources)
    # Data-parallel training processes of this party (default: one per `resources.gpu`, at least one).
    ranks: int | None = Field(None, ge=1)
    volumes: list[Volume] = Field(default_factory=list)
    scheduling: Scheduling | None = None
    remote: Remote | None = None
    # host:port of this party's gRPC server (only the assist_trainer serves); filled by the launcher.
    address: str | None = None
    # `sha256:<hex>` of the party's certificate's public key (`fedtune certs fingerprint`): when set, only
    # that key speaks for the party, whichever CA signed it. Part of the terms every party agrees to.
    identity: str | None = None

    @field_validator("identity")
    @classmethod
    def _identity(cls, value: str | None) -> str | None:
        return None if value is None else parse_identity(value)

    @property
    def endpoint(self) -> str | None:
        """Where to reach this party's gRPC server: filled in by the launcher, or its remote address."""
        return self.address or (self.remote.address if self.remote else None)

    @property
    def dns_name(self) -> str:
        """The party's name as a Kubernetes object name."""
        return self.name.lower().replace("_", "-").replace(".", "-")


class Endpoint(Strict):
    address: str | None = None
