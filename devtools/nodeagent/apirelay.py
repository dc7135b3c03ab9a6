"""The `kubernetes` Service inside every pod: its ClusterIP relayed to the API server.

The API server listens on the host's loopback only, and there is no kube-proxy, so an
in-cluster client (the operator's own pod after `helm install`) would have nothing to
talk to. Kubernetes tells every container `KUBERNETES_SERVICE_HOST=<ClusterIP>`; here
each pod's namespace gets that address on its loopback and a listening socket on it,
created inside the pod's namespace (setns in a helper thread) and served from the
agent, which connects to the API server from the host's namespace. The API server's
certificate names that ClusterIP, so TLS is verified end to end: the relay only copies
bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import socket
import threading
from dataclasses import dataclass, field

from .network import ip

log = logging.getLogger("nodeagent.apirelay")
CLONE_NEWNET = 0x40000000


def listen_in_netns(netns: str, address: str, port: int) -> socket.socket:
    """A listening socket that lives in the network namespace `netns`."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: dict[str, object] = {}

    def work() -> None:
        # setns moves only this thread; it switches back, and ends, right after.
        with open(f"/run/netns/{netns}") as target, open("/proc/thread-self/ns/net") as own:
            if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
                result["error"] = OSError(ctypes.get_errno(), f"setns into {netns}")
                return
            try:
                result["socket"] = socket.create_server((address, port), backlog=64)
            except OSError as err:
                result["error"] = err
            finally:
                libc.setns(own.fileno(), CLONE_NEWNET)

    thread = threading.Thread(target=work, name=f"listen in {netns}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["socket"]  # type: ignore[return-value]


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _relay(client: socket.socket, upstream: tuple[str, int]) -> None:
    try:
        server = socket.create_connection(upstream, timeout=10)
    except OSError as err:
        log.warning("cannot reach the API server at %s:%d: %s", *upstream, err)
        client.close()
        return
    server.settimeout(None)
    back = threading.Thread(target=_pump, args=(server, client), daemon=True)
    back.start()
    _pump(client, server)
    back.join()
    client.close()
    server.close()


@dataclass
class ApiRelay:
    service_ip: str  # the `kubernetes` Service's ClusterIP
    service_port: int
    upstream: tuple[str, int]  # the API server as the host reaches it
    _listeners: dict[str, socket.socket] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """What a kubelet tells every container about the `kubernetes` Service."""
        host, port = self.service_ip, str(self.service_port)
        url = f"tcp://{host}:{port}"
        return {
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": url,
            f"KUBERNETES_PORT_{port}_TCP": url,
            f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
            f"KUBERNETES_PORT_{port}_TCP_PORT": port,
            f"KUBERNETES_PORT_{port}_TCP_ADDR": host,
        }

    def add_pod(self, netns: str) -> None:
        ip("-n", netns, "addr", "add", f"{self.service_ip}/32", "dev", "lo")
        listener = listen_in_netns(netns, self.service_ip, self.service_port)
        self._listeners[netns] = listener
        threading.Thread(target=self._accept, args=(listener,), name=f"relay {netns}", daemon=True).start()

    def remove_pod(self, netns: str) -> None:
        listener = self._listeners.pop(netns, None)
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed: the pod is gone
            threading.Thread(target=_relay, args=(client, self.upstream), daemon=True).start()
