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


IDENTITY_PREFIX = "sha256:"  # a party's identity: the SHA-256 of its certificate's public key (fedtune.trust.certs)


def parse_identity(text: str) -> str:
    """`sha256:` and 64 hex digits, lower-cased; ValueError saying what is wrong otherwise."""
    value = text.strip().lower()
    digits = value.removeprefix(IDENTITY_PREFIX)
    if not value.startswith(IDENTITY_PREFIX) or len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError(f"`{text}` is not an identity: expected sha256: and 64 hex digits (`fedtune certs "
                         "fingerprint tls.crt` prints it)")
    return value
