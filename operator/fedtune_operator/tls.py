"""The federation's certificates on Kubernetes: which CA, which names, which Secrets.

Pure functions (no API calls) over `fedtune.trust.certs`, the runtime's own CA and certificate
code, so a pod's certificate is exactly what `fedtune certs issue` would make; the
Secrets that hold them are built in `children/secret.py`:

    Secret J-ca              ca.crt, ca.key: the job's generated CA (never mounted in a pod);
                             absent when spec.tls.caSecret names the user's CA instead
    Secret J-tls-<role>      ca.crt, tls.crt, tls.key (type kubernetes.io/tls): one per local
                             role, mounted read-only in that role's pod only

A certificate names the party (`scheduler` for the scheduler) as its first DNS name and its
common name: that is what the roles check (`transport.PeerIdentity`,
`ssl_target_name_override`). The Service names are added as DNS names so that ordinary TLS
clients can verify the pods too; they hold the namespace, so they live in the SANs alone
(a common name has at most 64 characters). A certificate that cannot be made is
`CertificateFailed`: the job's `TLS` condition says which and why.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from fedtune.roles import SCHEDULER
from fedtune.trust import certs

from .jobs import Job, Workload

CA_KEY_FILE = "ca.key"
TLS_DIR = "/etc/fedtune-tls"  # beside, not inside, the job ConfigMap's /etc/fedtune (no nested mounts)


class TlsUnavailable(Exception):
    """The job's certificates cannot be made now (the named CA Secret is missing or unusable)."""

    reason = "CAUnavailable"  # of the job's `TLS` condition


class CertificateFailed(TlsUnavailable):
    """The cryptography library refused a certificate of this job (a name it cannot carry, ...)."""

    reason = "CertificateFailed"


@dataclass(frozen=True)
class Material:
    """The CA and the certificate of every local role (keyed like `Workload.key`)."""

    ca: certs.Issued
    roles: dict[str, certs.Issued] = field(default_factory=dict)


def enabled(job: Job) -> bool:
    return job.spec.tls.enabled


def generates_ca(job: Job) -> bool:
    """The operator makes (and keeps) the job's CA unless the user names one."""
    return enabled(job) and not job.spec.tls.caSecret


def ca_secret_name(job: Job) -> str:
    """The Secret holding the CA that signs this job's certificates."""
    return job.spec.tls.caSecret or f"{job.name}-ca"


def role_secret_name(job: Job, workload: Workload) -> str:
    return f"{job.name}-tls-{workload.pod_name.removeprefix(job.name + '-')}"


def common_name(workload: Workload) -> str:
    """The name the runtime checks: the party's name, or `scheduler`."""
    return workload.key


def dns_names(job: Job, workload: Workload) -> list[str]:
    """The role's Service, short and qualified (the Service has the pod's name)."""
    svc = workload.pod_name
    return [svc, f"{svc}.{job.namespace}", f"{svc}.{job.namespace}.svc", f"{svc}.{job.namespace}.svc.cluster.local"]


def name_problems(job: Job, workloads: list[Workload]) -> list[str]:
    """Names a certificate would carry that are another party's name.

    The runtime lets a caller act for any name on its certificate (common name or DNS
    name), so a Service name that happens to be another party's name would let one role
    impersonate that party.
    """
    if not enabled(job):
        return []
    names = {SCHEDULER, *(p.name for p in job.spec.parties)}
    problems = []
    for w in workloads:
        for other in sorted((names - {common_name(w)}) & set(dns_names(job, w))):
            problems.append(
                f"parties[].name `{other}` equals the Service name of {common_name(w)}, which its certificate "
                f"carries: {common_name(w)} could act as `{other}`; rename the party"
            )
    return problems


def new_ca(job: Job) -> certs.Issued:
    try:
        return certs.make_ca(f"{job.namespace}/{job.name}")
    except (ValueError, TypeError) as err:
        raise CertificateFailed(f"cannot make the job's CA: {err}") from None


def issue(job: Job, ca: certs.Issued, workload: Workload) -> certs.Issued:
    try:
        return certs.issue(ca, common_name(workload), dns_names=dns_names(job, workload))
    except (ValueError, TypeError) as err:
        raise CertificateFailed(f"cannot make the certificate of {common_name(workload)}: {err}") from None


def new_material(job: Job, workloads: list[Workload], ca: certs.Issued | None = None) -> Material:
    """A CA (or the given one) and a fresh certificate for every workload."""
    ca = ca or new_ca(job)
    return Material(ca, {w.key: issue(job, ca, w) for w in workloads})


def read_ca(secret: dict[str, Any] | None, where: str) -> certs.Issued:
    """The CA in a Secret (ca.crt and ca.key), checked by issuing a test certificate."""
    if secret is None:
        raise TlsUnavailable(f"{where}: Secret not found (it must hold ca.crt and ca.key)")
    data = secret.get("data") or {}
    missing = [k for k in (certs.CA_FILE, CA_KEY_FILE) if k not in data]
    if missing:
        raise TlsUnavailable(f"{where}: Secret has no {' or '.join(missing)} (it must hold ca.crt and ca.key)")
    ca = certs.Issued(base64.b64decode(data[certs.CA_FILE]), base64.b64decode(data[CA_KEY_FILE]))
    try:
        probe = x509.load_pem_x509_certificate(certs.issue(ca, "probe").cert_pem)
        probe.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_pem))
    except (ValueError, TypeError, InvalidSignature) as err:  # unreadable PEM, or a key of another CA
        reason = str(err) or "ca.key is not the key of ca.crt"
        raise TlsUnavailable(f"{where}: ca.crt and ca.key do not form a usable CA ({reason})") from None
    return ca
