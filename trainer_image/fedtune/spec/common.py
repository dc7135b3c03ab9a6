"""What every section of the job spec shares: the API's names, the error, strict models, paths."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

API_VERSION = "fedtune.io/v1alpha1"


KIND = "FederatedFineTune"


class SpecError(ValueError):
    """A job spec that cannot run; the message names the file and the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PathRef(Strict):
    path: str = Field(min_length=1)


# Fields typed by a Kubernetes API type: the CRD generator puts that type's own OpenAPI schema here.
KUBE_TYPE = "x-fedtune-kube-type"


def kube_type(name: str) -> dict[str, str]:
    return {KUBE_TYPE: name}
