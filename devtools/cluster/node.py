"""A real node for the local control plane: containerd, kubelet, kube-proxy, CNI and CoreDNS.

Pods run as containers from images, with their securityContext applied by the runtime:

- **containerd** (Debian's, with its CRI plugin) under the node's own socket, root and
  state, so it never meets a system containerd or Docker's. Its image store is kept in
  the cache (``$FEDTUNE_CACHE/node/containerd``), so images survive from one start to
  the next.
- **Images** come from Docker's store (``make images``) through a local registry
  (distribution's ``registry``, storage in the cache): ``docker push`` sends only the
  layers it lacks, ``ctr pull`` fetches only the layers containerd lacks, so a change to
  the project's code moves a few MB, not the trainer's GB. The node's own images
  (pause, CoreDNS) are built from the binaries ``build.sh`` made; the public
  ``redis:7.2-alpine`` name is served from a local stand-in (Debian's redis-server).
- **kubelet**, **kube-proxy** (iptables mode) from the same Kubernetes source as the
  API server; **CNI**: Debian's bridge, host-local, loopback and portmap plugins on the
  bridge ``fedtune0`` (``10.244.0.0/24``), whose first address is also where the API
  server listens, so pods reach it through the ``kubernetes`` Service.
- **CoreDNS** as a Deployment behind the Service ``10.0.0.10``, from its image.
- **NetworkPolicy** enforced by kube-router's policy controller (iptables and ipset).
- **Volumes**: every claim without a storage class is bound to a hostPath volume, the
  folder ``<volumes>/<namespace>/<claim>/`` (made world-writable, as local-path
  provisioners do; kept after the claim goes).

One node per machine at a time: iptables rules and the bridge are machine-wide, so a
second node waits for the first (a lock in the cache).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from devtools.cluster.devcluster import (
    SERVICE_CIDR,
    Component,
    ControlPlane,
    ControlPlaneError,
    _spawn,
    _wait_healthy,
    bin_dir,
    cache_dir,
    free_ports,
)

NODE_NAME = "fedtune-node"
BRIDGE = "fedtune0"
POD_CIDR = "10.244.0.0/24"
GATEWAY = "10.244.0.1"  # the bridge's address: the node's IP and the API server's
DNS_SERVICE_IP = "10.0.0.10"
RUN_DIR = Path("/run/fedtune-node")
SOCKET = RUN_DIR / "containerd.sock"
REGISTRY_FILE = RUN_DIR / "registry"  # the running node's registry address
CNI_BIN = Path("/usr/lib/cni")
HOST_PACKAGES = {"containerd": "containerd", "runc": "runc", "iptables": "iptables", "conntrack": "conntrack",
                 "ipset": "ipset",  # kube-router's NetworkPolicy rules
                 "unpigz": "pigz",  # containerd unpacks layers with it, on every core
                 str(CNI_BIN / "bridge"): "containernetworking-plugins"}  # fmt: skip
COREDNS_UID = 65532
# Public names the dev cluster serves from local images: what the operator defaults to.
STANDINS = {"redis:7.2-alpine": "fedtune-standin/redis:bookworm"}


def state_dir() -> Path:
    """What the node keeps between starts: containerd's image store, the registry's blobs."""
    return cache_dir() / "node"


def run(*argv: str, check: bool = True, timeout: float = 600, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if check and result.returncode != 0:
        raise ControlPlaneError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return result


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def ensure_host() -> None:
    """Root, Debian's containerd, runc, CNI plugins, iptables and conntrack (installed when missing)."""
    if os.geteuid() != 0:
        raise ControlPlaneError("a node needs root (containers, the bridge, iptables)")
    missing = sorted({pkg for tool, pkg in HOST_PACKAGES.items() if not shutil.which(tool) and not Path(tool).exists()})
    if missing:
        run("apt-get", "update", "-qq")
        run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})  # fmt: skip
    if not Path("/proc/sys/net/bridge").exists():
        run("modprobe", "br_netfilter", check=False)
    # Routing between pods and Services: forwarding, and bridged traffic through iptables.
    for key in ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables"):
        Path("/proc/sys", key).write_text("1")


def ensure_bridge() -> None:
    """The pod bridge with its gateway address: made before the API server binds to it."""
    if run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        run("ip", "link", "add", BRIDGE, "type", "bridge")
    if GATEWAY not in run("ip", "-4", "addr", "show", BRIDGE).stdout:
        run("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")


def remove_kube_chains() -> None:
    """Remove the iptables chains the kubelet makes (KUBE-FIREWALL and its canaries), which
    `kube-proxy --cleanup` leaves, and every rule that jumps to one."""
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            rules = run(tool, "-t", table, "-S", check=False).stdout.splitlines()
            for rule in rules:
                if rule.startswith("-A ") and " -j KUBE-" in rule:
                    run(tool, "-t", table, "-D", *shlex.split(rule)[1:], check=False)
            for rule in rules:
                if rule.startswith("-N KUBE-"):
                    run(tool, "-t", table, "-F", rule.split()[1], check=False)
                    run(tool, "-t", table, "-X", rule.split()[1], check=False)


def remove_bridge() -> None:
    run("ip", "link", "delete", BRIDGE, check=False)


class NodeLock:
    """One node per machine: a second waits (printing why) until the first is gone."""

    def __init__(self) -> None:
        state_dir().mkdir(parents=True, exist_ok=True)
        self._file = (state_dir() / "node.lock").open("a+")

    def acquire(self, timeout: float = 1800) -> None:
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ControlPlaneError("another dev-cluster node still runs on this machine") from None
                if not told:
                    print("waiting for another dev-cluster node on this machine to stop", flush=True)
                    told = True
                time.sleep(2)

    def release(self) -> None:
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


# --- images -----------------------------------------------------------------------------


def docker_has(image: str) -> bool:
    return run("docker", "image", "inspect", image, check=False).returncode == 0


def build_node_images() -> dict[str, str]:
    """pause and CoreDNS images from the binaries build.sh made; returns name -> Docker image."""
    images = {}
    for program, version_file in (("pause", ".pause.version"), ("coredns", ".coredns.version")):
        version = (bin_dir() / version_file).read_text().strip()
        image = f"fedtune-dev/{program}:{version}"
        if not docker_has(image):
            with tempfile.TemporaryDirectory() as context:
                shutil.copy2(bin_dir() / program, Path(context) / program)
                (Path(context) / "Dockerfile").write_text(
                    f"FROM scratch\nCOPY {program} /{program}\nUSER 65532:65532\nENTRYPOINT [\"/{program}\"]\n"
                )
                run("docker", "build", "-q", "-t", image, context, env={**os.environ, "DOCKER_BUILDKIT": "0"})
        images[image] = image
    return images


def _qualified(name: str) -> str:
    """The name containerd's CRI gives an image reference (docker.io/library/... for short ones)."""
    first = name.split("/", 1)[0]
    if "/" in name and ("." in first or ":" in first or first == "localhost"):
        return name
    return f"docker.io/{name}" if "/" in name else f"docker.io/library/{name}"


def ctr(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return run("ctr", "--address", str(SOCKET), "--namespace", "k8s.io", *args, timeout=timeout)


def load_images(registry: str, images: dict[str, str]) -> None:
    """Make each Docker image available to the node under the name pods use.

    Pushed to the node's registry and pulled by containerd: both move only missing layers.
    """
    for name, source in images.items():
        if not docker_has(source):
            raise ControlPlaneError(f"image {source} is not in Docker's store: run `make images`")
        staged = f"{registry}/{_qualified(source).split('/', 1)[1]}"
        run("docker", "tag", source, staged)
        try:
            run("docker", "push", "-q", staged, timeout=1800)
        finally:
            run("docker", "rmi", staged, check=False)
        ctr("images", "pull", "--plain-http", staged)
        ctr("images", "tag", "--force", staged, _qualified(name))
        ctr("images", "rm", staged)


def load_into_running_node(images: dict[str, str]) -> None:
    """`load_images` for the node a `python -m devtools.cluster up` runs."""
    if not REGISTRY_FILE.exists():
        raise ControlPlaneError("no dev-cluster node runs on this machine (make dev-cluster)")
    load_images(REGISTRY_FILE.read_text().strip(), images)


# --- the node -----------------------------------------------------------------------------


class Node:
    """containerd, a local registry, kubelet, kube-proxy, CoreDNS and claim volumes for `plane`.

    `plane` must listen on GATEWAY (ControlPlane(address=GATEWAY, scheduler=True)).
    `images` maps the names pods use to the Docker images that back them.
    """

    def __init__(self, plane: ControlPlane, images: dict[str, str], stop_grace: float = 20.0) -> None:
        self.plane = plane
        self.images = {**build_node_images(), **images}
        self.stop_grace = stop_grace
        self.dir = plane.workdir / "node"
        self.volumes = plane.workdir / "volumes"
        self._components: dict[str, Component] = {}
        self._stop = threading.Event()
        self._provisioner: threading.Thread | None = None
        self.registry = ""

    # -- life cycle --

    def start(self, timeout: float = 300.0) -> Node:
        """Start everything; `timeout` bounds each step but loading the images (the first
        load of the trainer image takes minutes)."""
        deadline = time.monotonic() + timeout
        self.dir.mkdir(parents=True, exist_ok=True)
        self.volumes.mkdir(parents=True, exist_ok=True)
        try:
            self._start_containerd(deadline)
            self._remove_all_pods()  # what a node killed before left behind
            self._start_registry(deadline)
            self.load_images(self.images)
            deadline = time.monotonic() + timeout
            self._start_kubelet(deadline)
            self._start_kube_proxy()
            self._provisioner = threading.Thread(target=self._provision_forever, name="volumes", daemon=True)
            self._provisioner.start()
            self._wait_ready(deadline)
            self._start_network_policies(deadline)
            self._start_coredns(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every pod's containers and every node process; undo kube-proxy's rules."""
        self._stop.set()
        if self._provisioner is not None:
            self._provisioner.join(5)
        kubelet = self._components.pop("kubelet", None)
        if kubelet is not None:
            kubelet.stop(self.stop_grace)
        if "containerd" in self._components:
            with contextlib.suppress(ControlPlaneError, subprocess.TimeoutExpired):
                self._remove_all_pods()
        router = self._components.pop("kube-router", None)
        if router is not None:
            router.stop(self.stop_grace)
            run(str(bin_dir() / "kube-router"), "--cleanup-config", check=False)
        proxy = self._components.pop("kube-proxy", None)
        if proxy is not None:
            proxy.stop(self.stop_grace)
            run(str(bin_dir() / "kube-proxy"), "--cleanup", check=False)
            remove_kube_chains()
        for name in ("registry", "containerd"):
            component = self._components.pop(name, None)
            if component is not None:
                component.stop(self.stop_grace)
        self._unmount_kubelet_dir()

    # -- containerd and images --

    def crictl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run(str(bin_dir() / "crictl"), "--runtime-endpoint", f"unix://{SOCKET}", "--timeout", "60s", *args,
                   check=check, timeout=timeout)  # fmt: skip

    def _start_containerd(self, deadline: float) -> None:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        cni = self.dir / "cni"
        cni.mkdir(exist_ok=True)
        (cni / "10-fedtune.conflist").write_text(json.dumps(self._cni_config(), indent=2))
        config = self.dir / "containerd.toml"
        pause = next(name for name in self.images if name.startswith("fedtune-dev/pause:"))
        config.write_text(
            "version = 2\n"
            f'root = "{state_dir() / "containerd"}"\n'
            f'state = "{RUN_DIR / "containerd"}"\n'
            f'[grpc]\n  address = "{SOCKET}"\n'
            '[plugins."io.containerd.grpc.v1.cri"]\n'
            f'  sandbox_image = "{_qualified(pause)}"\n'
            # Lowering a process's OOM score needs CAP_SYS_RESOURCE, which containers on
            # machines like ours lack: keep pods' scores no lower than containerd's own.
            "  restrict_oom_score_adj = true\n"
            '  [plugins."io.containerd.grpc.v1.cri".cni]\n'
            f'    bin_dir = "{CNI_BIN}"\n'
            f'    conf_dir = "{cni}"\n'
            '  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
            '    runtime_type = "io.containerd.runc.v2"\n'
        )
        containerd = self._launch("containerd", ["containerd", "--config", str(config)])
        _wait_healthy(containerd, lambda: self.crictl("info", check=False).returncode == 0, deadline)

    def _cni_config(self) -> dict[str, Any]:
        return {
            "cniVersion": "0.4.0",
            "name": "fedtune",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR, "gateway": GATEWAY}]],
                             "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.dir / "ipam")},
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }

    def _remove_all_pods(self) -> None:
        """Stop and remove every pod sandbox containerd holds (CNI teardown included)."""
        self.crictl("rmp", "--all", "--force", check=False, timeout=300)

    def _start_registry(self, deadline: float) -> None:
        (port,) = free_ports(1)
        self.registry = f"127.0.0.1:{port}"
        config = self.dir / "registry.yml"
        config.write_text(
            "version: 0.1\n"
            "log: {level: warn}\n"
            f"storage: {{filesystem: {{rootdirectory: {state_dir() / 'registry'}}}, delete: {{enabled: true}}}}\n"
            f"http: {{addr: {self.registry}}}\n"
        )
        # Without a collector to send them to, its traces would only be errors in its log.
        registry = self._launch("registry", [str(bin_dir() / "registry"), "serve", str(config)],
                                env={"OTEL_TRACES_EXPORTER": "none"})

        _wait_healthy(registry, lambda: http_ok(f"http://{self.registry}/v2/"), deadline)
        REGISTRY_FILE.write_text(self.registry)  # for `python -m devtools.cluster load`

    def load_images(self, images: dict[str, str]) -> None:
        load_images(self.registry, images)

    # -- kubelet, kube-proxy --

    def _start_kubelet(self, deadline: float) -> None:
        port, healthz = free_ports(2)
        root = self.dir / "kubelet"
        root.mkdir(exist_ok=True)
        config = self.dir / "kubelet.yaml"
        config.write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": GATEWAY,
            "port": port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz,
            # The API server calls it (logs, exec) with the admin certificate.
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": str(self.plane.pki.ca_cert)}},
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "containerRuntimeEndpoint": f"unix://{SOCKET}",
            "clusterDNS": [DNS_SERVICE_IP],
            "clusterDomain": "cluster.local",
            "resolvConf": "/etc/resolv.conf",
            "failSwapOn": False,
            "serializeImagePulls": False,
            # The images are loaded, not pulled again: never collect them, and evict only
            # when the machine is really out of room.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "nodeStatusUpdateFrequency": "4s",
            "syncFrequency": "10s",
        }))
        kubelet = self._launch("kubelet", [
            str(bin_dir() / "kubelet"), f"--config={config}", f"--kubeconfig={self.plane.kubeconfig}",
            f"--root-dir={root}", f"--hostname-override={NODE_NAME}", f"--node-ip={GATEWAY}",
            f"--cert-dir={self.dir / 'kubelet-pki'}", "--v=1",
        ])  # fmt: skip

        _wait_healthy(kubelet, lambda: http_ok(f"http://127.0.0.1:{healthz}/healthz"), deadline)

    def _start_kube_proxy(self) -> None:
        healthz, metrics = free_ports(2)
        config = self.dir / "kube-proxy.yaml"
        config.write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.plane.kubeconfig)},
            "mode": "iptables",
            "clusterCIDR": POD_CIDR,
            "hostnameOverride": NODE_NAME,
            "healthzBindAddress": f"127.0.0.1:{healthz}",
            "metricsBindAddress": f"127.0.0.1:{metrics}",
            # Leave the machine's conntrack table size alone.
            "conntrack": {"maxPerCore": 0},
        }))  # fmt: skip
        self._launch("kube-proxy", [str(bin_dir() / "kube-proxy"), f"--config={config}", "--v=1"])

    def _wait_ready(self, deadline: float) -> None:
        def ready() -> bool:
            ready_path = "jsonpath={.status.conditions[?(@.type=='Ready')].status}"
            out = self.kubectl("get", "node", NODE_NAME, "-o", ready_path, check=False)
            return out.stdout.strip() == "True"

        _wait_healthy(self._components["kubelet"], ready, deadline)

    # -- CoreDNS --

    def _start_coredns(self, deadline: float) -> None:
        image = next(name for name in self.images if name.startswith("fedtune-dev/coredns:"))
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                           "items": coredns_manifests(image)}))  # fmt: skip

        def ready() -> bool:
            out = self.kubectl("get", "deployment", "coredns", "-n", "kube-system", "-o",
                               "jsonpath={.status.readyReplicas}", check=False)  # fmt: skip
            return out.stdout.strip() == "1"

        _wait_healthy(self._components["kubelet"], ready, deadline)

    # -- NetworkPolicy --

    def _start_network_policies(self, deadline: float) -> None:
        """kube-router's NetworkPolicy controller alone (no routing, no service proxy).

        kube-network-policies, the other engine from the module proxy, cannot run on kernels
        without nftables' `queue` expression (ours: `nft add rule ... queue num 100` answers
        "No such file or directory"); kube-router enforces policies with iptables and ipset.
        """
        (health,) = free_ports(1)
        router = self._launch("kube-router", [
            str(bin_dir() / "kube-router"), f"--kubeconfig={self.plane.kubeconfig}",
            f"--hostname-override={NODE_NAME}", "--run-firewall=true", "--run-router=false",
            "--run-service-proxy=false", "--enable-cni=false", "--enable-ipv6=false",
            f"--service-cluster-ip-range={SERVICE_CIDR}", f"--health-port={health}", "--metrics-port=0",
            "--iptables-sync-period=30s", "--v=1",
        ])  # fmt: skip
        _wait_healthy(router, lambda: http_ok(f"http://127.0.0.1:{health}/healthz"), deadline)

    # -- claims as folders --

    def claim_dir(self, namespace: str, claim: str) -> Path:
        return self.volumes / namespace / claim

    def _provision_forever(self) -> None:
        while not self._stop.wait(0.5):
            with contextlib.suppress(Exception):  # the API server may be stopping; try again
                self._provision_once()

    def _provision_once(self) -> None:
        claims = json.loads(self.kubectl("get", "pvc", "--all-namespaces", "-o", "json").stdout)["items"]
        for claim in claims:
            spec, meta = claim["spec"], claim["metadata"]
            if claim["status"].get("phase") != "Pending" or spec.get("volumeName") or spec.get("storageClassName"):
                continue
            folder = self.claim_dir(meta["namespace"], meta["name"])
            if not folder.exists():
                folder.mkdir(parents=True)
                folder.chmod(0o777)  # any pod user may write, as with local-path provisioners
            self.kubectl("apply", "-f", "-", input=json.dumps(self._volume(claim, folder)))
        volumes = json.loads(self.kubectl("get", "pv", "-o", "json").stdout)["items"]
        for volume in volumes:  # a claim gone: its volume goes, its folder stays
            if volume["status"].get("phase") == "Released" and volume["metadata"]["name"].startswith("fedtune-"):
                self.kubectl("delete", "pv", volume["metadata"]["name"], "--wait=false", check=False)

    @staticmethod
    def _volume(claim: dict[str, Any], folder: Path) -> dict[str, Any]:
        meta = claim["metadata"]
        return {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"fedtune-{meta['uid']}"},
            "spec": {
                "capacity": {"storage": claim["spec"]["resources"]["requests"]["storage"]},
                "accessModes": claim["spec"]["accessModes"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": str(folder), "type": "Directory"},
                "claimRef": {"namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]},
            },
        }

    # -- helpers --

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("kubectl", "--kubeconfig", str(self.plane.kubeconfig), *args, input=input, check=check, timeout=60)

    def _launch(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Component:
        component = _spawn(name, argv, self.plane.log_dir, env)
        self._components[name] = component
        return component

    def failed_component(self) -> Component | None:
        return next((c for c in self._components.values() if c.process.poll() is not None), None)

    def _unmount_kubelet_dir(self) -> None:
        """Unmount what the kubelet mounted for pods (secrets, tokens) under its folder."""
        root = str(self.dir / "kubelet")
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        # The kubelet also bind-mounts its folder onto itself (to share mounts with pods).
        for mount in sorted((m for m in mounts if m == root or m.startswith(root + "/")), key=len, reverse=True):
            run("umount", "-l", mount, check=False)


def coredns_manifests(image: str) -> list[dict[str, Any]]:
    """CoreDNS for cluster.local, as kubeadm deploys it (non-root, on port 1053 behind 53)."""
    labels = {"k8s-app": "kube-dns"}
    corefile = (
        ".:1053 {\n    errors\n    health :8080\n    ready :8181\n"
        "    kubernetes cluster.local in-addr.arpa ip6.arpa {\n"
        "        pods insecure\n        fallthrough in-addr.arpa ip6.arpa\n        ttl 5\n    }\n"
        "    forward . /etc/resolv.conf\n    cache 5\n    loop\n    reload\n}\n"
    )
    meta = {"name": "coredns", "namespace": "kube-system"}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "fedtune-coredns"},
         "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "fedtune-coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "fedtune-coredns"},
         "subjects": [{"kind": "ServiceAccount", **meta}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"Corefile": corefile}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {**meta, "labels": labels}, "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {
                "serviceAccountName": "coredns",
                "dnsPolicy": "Default",
                "securityContext": {"runAsNonRoot": True, "runAsUser": COREDNS_UID, "runAsGroup": COREDNS_UID,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "name": "coredns", "image": image, "imagePullPolicy": "Never",
                    "args": ["-conf", "/etc/coredns/Corefile"],
                    "ports": [{"name": "dns", "containerPort": 1053, "protocol": "UDP"},
                              {"name": "dns-tcp", "containerPort": 1053, "protocol": "TCP"}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
                    "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"]}},
                    "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
                }],
                "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
            }},
        }},
        {"apiVersion": "v1", "kind": "Service", "metadata": {**meta, "name": "kube-dns", "labels": labels}, "spec": {
            "selector": labels, "clusterIP": DNS_SERVICE_IP,
            "ports": [{"name": "dns", "port": 53, "targetPort": 1053, "protocol": "UDP"},
                      {"name": "dns-tcp", "port": 53, "targetPort": 1053, "protocol": "TCP"}],
        }},
    ]  # fmt: skip


def project_images(tag: str) -> dict[str, str]:
    """The names pods use -> Docker images: the project's two and the public ones stood in for."""
    return {f"fedtune/operator:{tag}": f"fedtune/operator:{tag}", f"fedtune/trainer:{tag}": f"fedtune/trainer:{tag}",
            **STANDINS}  # fmt: skip


class DevCluster:
    """The control plane on the node's bridge plus the node: a whole local cluster."""

    def __init__(self, images: dict[str, str], workdir: Path | None = None) -> None:
        self.images = images
        self.plane = ControlPlane(workdir, address=GATEWAY, scheduler=True)
        self.node: Node | None = None
        self._lock: NodeLock | None = None

    def start(self) -> DevCluster:
        ensure_host()
        self._lock = NodeLock()
        self._lock.acquire()
        try:
            ensure_bridge()
            self.plane.start()
            self.node = Node(self.plane, self.images).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            if self.node is not None:
                self.node.stop()
                self.node = None
            self.plane.stop()
            remove_bridge()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def failed_component(self) -> Component | None:
        return self.plane.failed_component() or (self.node.failed_component() if self.node else None)

    def __enter__(self) -> DevCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

