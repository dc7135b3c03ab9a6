"""Pod networking: a bridge on the host, one network namespace and veth pair per pod.

Every host object carries the agent's name prefix (default `fta`: fedtune agent), so
`cleanup()` finds what a crashed earlier run left behind: the processes still in its
namespaces, the namespaces, the veths and the bridge. Nothing else on the host is
touched: no iptables rules, no forwarding sysctls, no routes beyond the bridge's own.

Why a real bridge and not loopback aliases: every pod gets its own address and its own
loopback, so two pods can both listen on 0.0.0.0:55004 (the roles' fixed ports), the
host reaches each pod at its address (the operator reads Redis at the pod IP), and pods
reach each other exactly as they would across a cluster network.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

# Interface names are at most 15 bytes (IFNAMSIZ - 1).
_MAX_IFNAME = 15


class NetworkError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def netns_pids(netns: str) -> list[int]:
    """Every process whose network namespace is `netns` (what `ip netns pids` reports)."""
    result = ip("netns", "pids", netns, check=False)
    return [int(pid) for pid in result.stdout.split() if pid.isdigit()]


def kill_netns_processes(netns: str, timeout_s: float = 5.0) -> None:
    """SIGKILL every process in `netns` and wait until none is left."""
    deadline = time.monotonic() + timeout_s
    while True:
        pids = netns_pids(netns)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise NetworkError(f"processes {pids} in netns {netns} survive SIGKILL")
        time.sleep(0.05)


@dataclass
class Network:
    cidr: ipaddress.IPv4Network
    prefix: str = "fta"
    _free: list[ipaddress.IPv4Address] = field(default_factory=list)
    _used: dict[str, ipaddress.IPv4Address] = field(default_factory=dict)  # netns -> address
    _sticky: dict[str, ipaddress.IPv4Address] = field(default_factory=dict)  # pod key -> last address
    _counter: int = 0

    def __post_init__(self) -> None:
        if len(self.prefix) > 6 or not self.prefix.isalnum():
            raise NetworkError(f"name prefix `{self.prefix}`: at most 6 letters or digits (interface names)")
        hosts = list(self.cidr.hosts())
        if len(hosts) < 2:
            raise NetworkError(f"pod CIDR {self.cidr} is too small")
        self.gateway = hosts[0]
        self._free = hosts[1:]

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br0"

    # --- the host side ---------------------------------------------------------------------------

    def setup(self) -> None:
        """Clean up any earlier run, then create the bridge with the gateway address."""
        self.cleanup()
        self._refuse_overlap()
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/{self.cidr.prefixlen}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def _refuse_overlap(self) -> None:
        """A pod CIDR that overlaps a route the host already has would break the host's network."""
        for line in ip("-4", "route", "show").stdout.splitlines():
            dest = line.split()[0]
            if dest == "default":
                continue
            with contextlib.suppress(ValueError):
                if ipaddress.ip_network(dest, strict=False).overlaps(self.cidr):
                    raise NetworkError(f"pod CIDR {self.cidr} overlaps the host route `{line}`; choose another")

    def cleanup(self) -> None:
        """Remove every namespace and link with our prefix, and the processes inside them."""
        for netns in self.namespaces():
            kill_netns_processes(netns)
            ip("netns", "del", netns, check=False)
        for link in self.links():
            ip("link", "del", link, check=False)

    def namespaces(self) -> list[str]:
        names = [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]
        return [n for n in names if n.startswith(f"{self.prefix}-")]

    def links(self) -> list[str]:
        out = []
        for line in ip("-o", "link", "show").stdout.splitlines():
            # "12: fta-v3@if2: <...>" -> fta-v3
            name = line.split(":", 2)[1].strip().split("@")[0]
            if name.startswith(f"{self.prefix}-"):
                out.append(name)
        # veths first: deleting one end removes its peer; the bridge last.
        return sorted(out, key=lambda n: n == self.bridge)

    # --- pods ------------------------------------------------------------------------------------

    def _address_for(self, key: str) -> ipaddress.IPv4Address:
        """The address this pod name had before when it is free (a recreated pod keeps its
        address, as a Service's ClusterIP would stay put), else the lowest free one."""
        wanted = self._sticky.get(key)
        if wanted is not None and wanted in self._free:
            self._free.remove(wanted)
            return wanted
        taken = set(self._sticky.values())
        # Prefer addresses no other pod name holds, so each name tends to keep its own.
        for candidate in self._free:
            if candidate not in taken:
                self._free.remove(candidate)
                return candidate
        if not self._free:
            raise NetworkError(f"pod CIDR {self.cidr} has no free address")
        return self._free.pop(0)

    def add_pod(self, key: str) -> tuple[str, str]:
        """A new namespace with `eth0` on the bridge and loopback up; returns (netns, address)."""
        self._counter += 1
        netns = f"{self.prefix}-p{self._counter}"
        veth = f"{self.prefix}-v{self._counter}"
        if len(veth) > _MAX_IFNAME:
            raise NetworkError(f"interface name {veth} too long")
        address = self._address_for(key)
        try:
            ip("netns", "add", netns)
            ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
            ip("link", "set", veth, "master", self.bridge, "up")
            ip("-n", netns, "addr", "add", f"{address}/{self.cidr.prefixlen}", "dev", "eth0")
            ip("-n", netns, "link", "set", "eth0", "up")
            ip("-n", netns, "link", "set", "lo", "up")
            ip("-n", netns, "route", "add", "default", "via", str(self.gateway))
        except NetworkError:
            self._release(netns, address)
            raise
        self._used[netns] = address
        self._sticky[key] = address
        return netns, str(address)

    def remove_pod(self, netns: str) -> None:
        """Kill what is left in the namespace, delete it (its veth goes with it)."""
        kill_netns_processes(netns)
        self._release(netns, self._used.pop(netns, None))

    def _release(self, netns: str, address: ipaddress.IPv4Address | None) -> None:
        ip("netns", "del", netns, check=False)
        if address is not None and address not in self._free:
            self._free.append(address)
            self._free.sort()

