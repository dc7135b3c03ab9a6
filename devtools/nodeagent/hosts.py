"""The pod's /etc/hosts, /etc/resolv.conf and /etc/hostname.

There is no cluster DNS and no kube-proxy: a Service name resolves straight to the IP
of the pod its selector matches (a recreated pod gets its old address back, so a
Service keeps its address as a ClusterIP would). Every Service of the cluster is listed
under `svc.ns`, `svc.ns.svc` and `svc.ns.svc.cluster.local`; those of the pod's own
namespace also under the bare `svc`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLUSTER_DOMAIN = "cluster.local"


@dataclass(frozen=True)
class ServiceAddress:
    namespace: str
    name: str
    ip: str


def service_names(service: ServiceAddress, own_namespace: str) -> list[str]:
    base = f"{service.name}.{service.namespace}"
    names = [base, f"{base}.svc", f"{base}.svc.{CLUSTER_DOMAIN}"]
    if service.namespace == own_namespace:
        names.insert(0, service.name)
    return names


def hosts_file(pod_name: str, namespace: str, pod_ip: str, services: list[ServiceAddress]) -> str:
    lines = [
        "# written by the fedtune node agent: Service names resolve to their pod's address",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"{pod_ip}\t{pod_name}",
    ]
    for service in sorted(services, key=lambda s: (s.namespace != namespace, s.namespace, s.name)):
        lines.append(f"{service.ip}\t{' '.join(service_names(service, namespace))}")
    return "\n".join(lines) + "\n"


def resolv_conf(namespace: str) -> str:
    # No DNS server: a name missing from /etc/hosts fails at once (refused on the pod's
    # own loopback) instead of waiting for a server that cannot be reached.
    search = f"{namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}"
    return f"nameserver 127.0.0.1\nsearch {search}\noptions ndots:5 timeout:1 attempts:1\n"


def write_in_place(path: Path, text: str) -> bool:
    """Rewrite a file keeping its inode (containers bind-mount it); False when unchanged.

    New content first, then the truncation: a reader never sees an empty file.
    """
    data = text.encode()
    if path.exists() and path.read_bytes() == data:
        return False
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
    return True
