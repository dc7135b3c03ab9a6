"""The node agent: a Node, a scheduler that knows one node, and a kubelet that runs processes.

One loop thread owns all state (pods, containers, addresses) and reconciles, level
triggered, whenever something happens: an informer saw a change, a container process
ended, a back-off expired, or a second passed. Slow work (stopping a pod's processes
within its grace period) runs in a helper thread that only reports back.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import ipaddress
import logging
import os
import platform
import queue
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from . import hosts, podspec
from .apirelay import ApiRelay
from .containers import Container
from .kubeapi import ApiError, Informer, Kube, Obj, core_path, now_rfc3339
from .logserver import LogServer
from .network import Network, NetworkError
from .podspec import FINAL, ConfigError
from .volumes import VolumePreparer, claim_dir, container_mounts

log = logging.getLogger("nodeagent")

DEFAULT_GRACE_S = 30
HEARTBEAT_S = 10.0
LEASE_S = 40
# The entrypoints of the project's images (and Redis'): containers that give only args.
DEFAULT_ENTRYPOINTS = {
    "fedtune/operator": ["fedtune-operator"],
    "fedtune/trainer": ["fedtune"],
    "redis": ["redis-server"],
}
VERSION = "0.1.0"
REPO = Path(__file__).resolve().parents[2]


def default_image_paths() -> tuple[str, ...]:
    """Host folders the containers' "image" is made of: this checkout, wherever the
    project's packages are installed from (an editable install points into a checkout,
    maybe another one), and the Python installation running the agent."""
    paths = [REPO, Path(sys.prefix), Path(sys.base_prefix)]
    for package in ("fedtune", "fedtune_operator"):
        with contextlib.suppress(ImportError, ValueError):
            spec = importlib.util.find_spec(package)  # finds, does not import
            if spec is not None and spec.submodule_search_locations:
                paths.append(Path(next(iter(spec.submodule_search_locations))).parent)
    return tuple(dict.fromkeys(str(p.resolve()) for p in paths))


@dataclass
class AgentConfig:
    kubeconfig: Path
    data_dir: Path
    node_name: str = "fedtune-node"
    pod_cidr: str = "10.200.0.0/24"
    prefix: str = "fta"
    gpus: int = 0
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    restart_backoff_s: float = 10.0  # kubelet: 10 s, doubling
    max_restart_backoff_s: float = 300.0
    entrypoints: dict[str, list[str]] = field(default_factory=lambda: dict(DEFAULT_ENTRYPOINTS))
    delete_node_on_exit: bool = True
    image_paths: tuple[str, ...] = field(default_factory=default_image_paths)


@dataclass
class PodRun:
    """A pod bound to this node, as this agent runs it."""

    uid: str
    pod: Obj
    folder: Path
    containers: list[Container]
    init_containers: list[Container]
    netns: str | None = None
    ip: str | None = None
    start_time: str | None = None
    phase: str = "Pending"
    terminating: bool = False  # a stop thread runs
    stopped: bool = False  # its processes are gone
    gone: bool = False  # the API object is gone
    sandbox_message: str = ""
    conditions: dict[str, tuple[str, str]] = field(default_factory=dict)  # type -> (status, since)
    last_status: Obj | None = None
    gpu_ids: list[int] = field(default_factory=list)

    @property
    def namespace(self) -> str:
        return self.pod["metadata"]["namespace"]

    @property
    def name(self) -> str:
        return self.pod["metadata"]["name"]

    @property
    def restart_policy(self) -> str:
        return self.pod["spec"].get("restartPolicy") or "Always"

    def all_containers(self) -> list[Container]:
        return [*self.init_containers, *self.containers]


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.kube = Kube(config.kubeconfig)
        self.network = Network(ipaddress.ip_network(config.pod_cidr), config.prefix)
        self.data_dir = config.data_dir.resolve()
        self.stop_event = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._pods: dict[str, Obj] = {}  # uid -> pod (every pod the informers see)
        self._services: dict[str, Obj] = {}
        self._claims: queue.SimpleQueue[tuple[str, Obj]] = queue.SimpleQueue()
        self.runs: dict[str, PodRun] = {}
        self.volumes = VolumePreparer(self.data_dir, self._lookup, self._token)
        self._next_heartbeat = 0.0
        self._informers: list[Informer] = []
        self._unschedulable: set[str] = set()
        self._boot_id = str(uuid.uuid4())
        self._node_since = now_rfc3339()
        self._binding: set[str] = set()  # pods a Binding was sent for
        # Pods this agent stopped and deleted, until the informer stops showing them: the
        # cache may still hold the object (deletionTimestamp set) for a moment.
        self._finished: set[str] = set()
        self.relay: ApiRelay | None = None
        self.logs: LogServer | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Host set-up (after cleaning what a crashed run left), the Node, the informers."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.data_dir / "pods", ignore_errors=True)
        self.network.setup()
        self.logs = LogServer(str(self.network.gateway), self.data_dir / "pki", self._log_of).start()
        self.register_node()
        self.relay = self._api_relay()
        handlers = {"pods": partial(self._remember, self._pods), "services": partial(self._remember, self._services),
                    "persistentvolumeclaims": self._on_claim}
        for plural, handler in handlers.items():
            for path in self._watched(plural):
                self._informers.append(Informer(self.kube, path, handler, self.stop_event).start())
        for informer in self._informers:
            informer.synced.wait(30)
        log.info("node %s ready: pods on %s, data in %s", self.config.node_name, self.network.cidr, self.data_dir)

    def _api_relay(self) -> ApiRelay | None:
        """The `kubernetes` Service's ClusterIP, relayed to the API server from every pod."""
        service = self.kube.get(core_path("services", "default", "kubernetes"))
        if not service or not (service.get("spec") or {}).get("clusterIP"):
            log.warning("no `kubernetes` Service: pods get no in-cluster API access")
            return None
        port = next((p["port"] for p in service["spec"].get("ports") or [] if p.get("name") == "https"), 443)
        endpoint = self.kube.endpoint
        return ApiRelay(service["spec"]["clusterIP"], int(port), (endpoint.host, endpoint.port))

    def _watched(self, plural: str) -> list[str]:
        if not self.config.namespaces:
            return [core_path(plural, None)]
        return [core_path(plural, ns) for ns in self.config.namespaces]

    def run(self) -> None:
        """The loop, until `stop_event` is set; then every pod's processes are stopped."""
        try:
            while not self.stop_event.is_set():
                self._wake.wait(1.0)
                self._wake.clear()
                try:
                    self.sync()
                except Exception:  # one bad pass must not end the node
                    log.exception("sync failed")
        finally:
            self.shutdown()

    def wake(self) -> None:
        self._wake.set()

    def shutdown(self) -> None:
        """Stop every process, remove every namespace, link and pod folder, and the Node."""
        self.stop_event.set()
        threads = []
        for run in self.runs.values():
            thread = threading.Thread(target=self._stop_containers, args=(run, 2.0), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join(30)
        for run in self.runs.values():
            if run.netns is not None and self.relay is not None:
                self.relay.remove_pod(run.netns)
        if self.logs is not None:
            self.logs.stop()
        self.network.cleanup()
        shutil.rmtree(self.data_dir / "pods", ignore_errors=True)
        if self.config.delete_node_on_exit:
            # Briefly: a control plane that is going away must not hold the host's clean-up.
            self.kube.set_timeout(5.0)
            with contextlib.suppress(ApiError, OSError, http.client.HTTPException):
                self.kube.delete(core_path("nodes", None, self.config.node_name))
        log.info("node agent stopped; host cleaned up")

    # --- informer callbacks (other threads) -------------------------------------------------

    def _remember(self, table: dict[str, Obj], kind: str, obj: Obj) -> None:
        """The latest of every pod or Service, by uid (`table` is `_pods` or `_services`)."""
        with self._lock:
            if kind == "DELETED":
                table.pop(obj["metadata"]["uid"], None)
            else:
                table[obj["metadata"]["uid"]] = obj
        self.wake()

    def _on_claim(self, kind: str, claim: Obj) -> None:
        self._claims.put((kind, claim))
        self.wake()

    # --- the Node ---------------------------------------------------------------------------

    def capacity(self) -> dict[str, str]:
        memory_kib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024
        disk = shutil.disk_usage(self.data_dir)
        return {
            "cpu": str(os.cpu_count() or 1),
            "memory": f"{memory_kib}Ki",
            "ephemeral-storage": f"{disk.total // 1024}Ki",
            "pods": "110",
            "nvidia.com/gpu": str(self.config.gpus),
        }

    def node_labels(self) -> dict[str, str]:
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
        return {
            "kubernetes.io/hostname": self.config.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": arch,
            "node.kubernetes.io/instance-type": "fedtune-nodeagent",
        }

    def node_status(self) -> Obj:
        now, since = now_rfc3339(), self._node_since

        def condition(type_: str, status: str, reason: str, message: str) -> Obj:
            return {
                "type": type_,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": since,
            }

        capacity = self.capacity()
        return {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                condition("Ready", "True", "KubeletReady", "fedtune node agent is posting ready status"),
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory pressure"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "no PID pressure"),
            ],
            # InternalIP only: the API server would try a Hostname address first, and no DNS knows ours.
            "addresses": [{"type": "InternalIP", "address": str(self.network.gateway)}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.logs.port if self.logs else 0}},
            "nodeInfo": {
                "machineID": self._boot_id.replace("-", ""),
                "systemUUID": self._boot_id,
                "bootID": self._boot_id,
                "kernelVersion": platform.release(),
                "osImage": f"{platform.system()} (fedtune node agent {VERSION})",
                "containerRuntimeVersion": f"fedtune-nodeagent://{VERSION}",
                "kubeletVersion": f"v{VERSION}-fedtune-nodeagent",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": self.node_labels()["kubernetes.io/arch"],
            },
        }

    def register_node(self) -> None:
        name = self.config.node_name
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": self.node_labels()},
            "spec": {"podCIDR": str(self.network.cidr), "podCIDRs": [str(self.network.cidr)]},
        }
        try:
            self.kube.request("POST", core_path("nodes", None), body=node)
        except ApiError as err:
            if err.status != 409:
                raise
            self.kube.merge_patch(core_path("nodes", None, name), {"metadata": {"labels": self.node_labels()}})
        self.heartbeat()

    def heartbeat(self) -> None:
        """Node status and the node Lease: what the node lifecycle controller watches."""
        name = self.config.node_name
        self.kube.merge_patch(core_path("nodes", None, name, "status"), {"status": self.node_status()})
        lease_path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
        renew = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        spec = {"holderIdentity": name, "leaseDurationSeconds": LEASE_S, "renewTime": renew}
        try:
            self.kube.merge_patch(lease_path, {"spec": spec})
        except ApiError as err:
            if err.status != 404:
                raise
            lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name}, "spec": spec}
            with contextlib.suppress(ApiError):
                self.kube.request("POST", lease_path.rsplit("/", 1)[0], body=lease)
        self._next_heartbeat = time.monotonic() + HEARTBEAT_S

    # --- the loop ---------------------------------------------------------------------------

    def sync(self) -> None:
        with self._lock:
            pods = dict(self._pods)
        self._binding &= set(pods)
        self._finished &= set(pods)
        self._provision_claims()
        for uid, pod in pods.items():
            node = pod["spec"].get("nodeName")
            if not node:
                self._schedule(pod)
            elif node == self.config.node_name:
                self._adopt(uid, pod)
        for uid, run in list(self.runs.items()):
            if uid not in pods:
                run.gone = True
            self._step(run)
            if run.stopped:
                self._finish(run)
        self._write_hosts()
        if time.monotonic() >= self._next_heartbeat:
            self.heartbeat()

    # --- scheduling -------------------------------------------------------------------------------

    def _schedule(self, pod: Obj) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        if meta.get("deletionTimestamp") or podspec.is_terminal(pod) or meta["uid"] in self._binding:
            return
        if spec.get("schedulerName", "default-scheduler") != "default-scheduler":
            return
        why = self._unfit(pod)
        key = meta["uid"]
        if why:
            if key not in self._unschedulable:
                self._unschedulable.add(key)
                self._patch_status(pod, {"conditions": [self._scheduled_condition("False", why)]})
            return
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "uid": meta["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.config.node_name},
        }
        try:
            self.kube.request("POST", core_path("pods", meta["namespace"], meta["name"], "binding"), body=binding)
            self._binding.add(key)
            log.info("bound pod %s/%s", meta["namespace"], meta["name"])
        except ApiError as err:
            if err.status not in (404, 409):
                log.warning("cannot bind %s/%s: %s", meta["namespace"], meta["name"], err)

    def _unfit(self, pod: Obj) -> str:
        if not podspec.node_selector_matches(pod, self.node_labels()):
            return f"0/1 nodes are available: node {self.config.node_name} didn't match the pod's node selector"
        wanted = podspec.gpu_request(pod)
        if wanted:
            used = sum(len(r.gpu_ids) for r in self.runs.values() if r.phase not in FINAL and not r.stopped)
            if wanted > self.config.gpus - used:
                free = self.config.gpus - used
                return f"0/1 nodes are available: insufficient nvidia.com/gpu (want {wanted}, free {free})"
        return ""

    @staticmethod
    def _scheduled_condition(status: str, message: str) -> Obj:
        reason = "Unschedulable" if status == "False" else ""
        out = {"type": "PodScheduled", "status": status, "lastTransitionTime": now_rfc3339()}
        if reason:
            out.update(reason=reason, message=message)
        return out

    # --- pods on this node ----------------------------------------------------------------------

    def _adopt(self, uid: str, pod: Obj) -> None:
        run = self.runs.get(uid)
        if run is not None:
            run.pod = pod
            return
        if uid in self._finished:
            return
        if podspec.is_terminal(pod) and not pod["metadata"].get("deletionTimestamp"):
            return  # finished before this agent started: nothing to run
        meta = pod["metadata"]
        folder = self.data_dir / "pods" / f"{meta['namespace']}_{meta['name']}_{uid}"
        spec = pod["spec"]
        run = PodRun(
            uid=uid,
            pod=pod,
            folder=folder,
            containers=[Container(c["name"], c, folder / c["name"]) for c in spec.get("containers") or []],
            init_containers=[Container(c["name"], c, folder / c["name"]) for c in spec.get("initContainers") or []],
        )
        self.runs[uid] = run
        self._recover(run)

    def _recover(self, run: PodRun) -> None:
        """A pod that ran under an earlier agent (whose processes died with it)."""
        statuses = {s["name"]: s for s in (run.pod.get("status") or {}).get("containerStatuses") or []}
        if not any("running" in s.get("state", {}) or "terminated" in s.get("state", {}) for s in statuses.values()):
            return
        for container in run.containers:
            old = statuses.get(container.name) or {}
            container.restart_count = int(old.get("restartCount") or 0)
            container.ran = True
            if run.restart_policy == "Never":
                container.state, container.exit_code = "terminated", 137
                container.reason = "ContainerStatusUnknown"
                container.message = "The container could not be located when the pod was terminated"
                container.started_at = container.finished_at = now_rfc3339()
            else:
                container.restart_count += 1
                container.state, container.reason = "waiting", "ContainerCreating"
        log.info("pod %s/%s ran under an earlier node agent: recovered", run.namespace, run.name)

    def _step(self, run: PodRun) -> None:
        if run.terminating or run.stopped:
            return
        if run.gone or run.pod["metadata"].get("deletionTimestamp"):
            self._begin_stop(run)
            return
        if run.phase in FINAL:
            return
        if run.netns is None and not self._make_sandbox(run):
            self._report(run)
            return
        if self._step_init_containers(run):
            for container in run.containers:
                self._step_container(run, container)
        run.phase = self._phase(run)
        if run.phase in FINAL:
            # A finished pod keeps no address (so no Service resolves to it) and no processes.
            self._remove_sandbox(run)
        self._report(run)

    def _make_sandbox(self, run: PodRun) -> bool:
        wanted = podspec.gpu_request(run.pod)
        if wanted:
            busy = {i for r in self.runs.values() if r is not run and not r.stopped for i in r.gpu_ids}
            run.gpu_ids = [i for i in range(self.config.gpus) if i not in busy][:wanted]
        try:
            run.netns, run.ip = self.network.add_pod(f"{run.namespace}/{run.name}")
        except NetworkError as err:
            run.sandbox_message = str(err)
            log.warning("pod %s/%s: %s", run.namespace, run.name, err)
            return False
        if self.relay is not None:
            try:
                self.relay.add_pod(run.netns)
            except (NetworkError, OSError) as err:
                log.warning("pod %s/%s: no API relay: %s", run.namespace, run.name, err)
        run.folder.mkdir(parents=True, exist_ok=True)
        run.start_time = now_rfc3339()
        hostname = run.pod["spec"].get("hostname") or run.name
        hosts.write_in_place(run.folder / "hostname", hostname + "\n")
        hosts.write_in_place(run.folder / "resolv.conf", hosts.resolv_conf(run.namespace))
        hosts.write_in_place(run.folder / "hosts", self._hosts_text(run))
        log.info("pod %s/%s: sandbox %s at %s", run.namespace, run.name, run.netns, run.ip)
        return True

    def _remove_sandbox(self, run: PodRun) -> None:
        if run.netns is not None:
            if self.relay is not None:
                self.relay.remove_pod(run.netns)  # its socket would keep the namespace alive
            self.network.remove_pod(run.netns)
            run.netns = None

    def _step_init_containers(self, run: PodRun) -> bool:
        """Run init containers one after another; True once all have succeeded."""
        for container in run.init_containers:
            if container.state == "terminated" and container.exit_code == 0:
                continue
            self._step_container(run, container)
            return False
        return True

    def _step_container(self, run: PodRun, container: Container) -> None:
        if container.state == "running" and container.poll():
            log.info(
                "pod %s/%s container %s exited with %s",
                run.namespace, run.name, container.name, container.exit_code,
            )  # fmt: skip
        if container.state == "terminated" and self._restarts(run, container):
            container.retire()
            delay = min(
                self.config.restart_backoff_s * 2 ** max(container.restart_count - 1, 0),
                self.config.max_restart_backoff_s,
            )
            container.state, container.reason, container.message = "waiting", "CrashLoopBackOff", ""
            container.next_start = time.monotonic() + delay
            self._wake_at(delay)
        if container.state == "waiting" and time.monotonic() >= container.next_start:
            self._start_container(run, container)

    def _restarts(self, run: PodRun, container: Container) -> bool:
        if container in run.init_containers:
            return container.exit_code != 0 and run.restart_policy != "Never"
        policy = run.restart_policy
        return policy == "Always" or (policy == "OnFailure" and container.exit_code != 0)

    def _wake_at(self, delay: float) -> None:
        timer = threading.Timer(delay, self.wake)
        timer.daemon = True
        timer.start()

    def _start_container(self, run: PodRun, container: Container) -> None:
        assert run.netns is not None and run.ip is not None
        try:
            config = self._container_config(run, container)
        except (ConfigError, ApiError, OSError) as err:
            container.state, container.reason, container.message = "waiting", "CreateContainerConfigError", str(err)
            container.next_start = time.monotonic() + 2.0
            self._wake_at(2.0)
            return
        container.start(run.netns, config, self.wake)
        # The command as written: expanded, it may hold a Secret's value.
        written = [*(container.spec.get("command") or []), *(container.spec.get("args") or [])]
        log.info("pod %s/%s: started %s: %s", run.namespace, run.name, container.name, " ".join(written))

    def _container_config(self, run: PodRun, container: Container) -> dict[str, Any]:
        """What podinit needs: resolved env and argv, and every bind mount."""
        pod = self._pod_with_status(run)
        # File volumes are rewritten at every start: a restarted container sees current data.
        volume_paths = self.volumes.prepare(pod, run.folder)
        env = podspec.container_env(pod, container.spec, self._lookup, self._base_env(run), self.capacity())
        argv = podspec.container_argv(container.spec, env, self.config.entrypoints)
        mounts = container_mounts(container.spec, volume_paths, env)
        message_path = container.spec.get("terminationMessagePath") or "/dev/termination-log"
        container.folder.mkdir(parents=True, exist_ok=True)
        container.termination_log.touch()
        files = {
            "/etc/hosts": run.folder / "hosts",
            "/etc/resolv.conf": run.folder / "resolv.conf",
            "/etc/hostname": run.folder / "hostname",
            message_path: container.termination_log,
        }
        binds = [m.as_json() for m in mounts]
        binds += [{"source": str(f), "target": t, "readOnly": False, "file": True} for t, f in files.items()]
        security = container.spec.get("securityContext") or {}
        devices = self._gpu_devices() if run.gpu_ids else []
        return {
            "hostname": (run.pod["spec"].get("hostname") or run.name)[:63],
            "mounts": binds,
            "workingDir": container.spec.get("workingDir"),
            "argv": argv,
            "env": env,
            "readOnlyRootFilesystem": bool(security.get("readOnlyRootFilesystem")),
            "devices": devices,
            "imagePaths": list(self.config.image_paths),
        }

    def _base_env(self, run: PodRun) -> dict[str, str]:
        """What every container starts with before its own env (an image's ENV would go here)."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOSTNAME": run.pod["spec"].get("hostname") or run.name,
            "HOME": "/root",
        }
        if self.relay is not None:
            env.update(self.relay.env())
        for name in ("LANG", "LC_ALL", "PYENV_ROOT", "VIRTUAL_ENV", "PYTHONPATH"):  # the checkout the host runs
            if name in os.environ:
                env[name] = os.environ[name]
        if run.gpu_ids:
            ids = ",".join(str(i) for i in run.gpu_ids)
            env.update(NVIDIA_VISIBLE_DEVICES=ids, CUDA_VISIBLE_DEVICES=ids)
        return env

    @staticmethod
    def _gpu_devices() -> list[str]:
        return sorted(name for name in os.listdir("/dev") if name.startswith("nvidia"))

    def _pod_with_status(self, run: PodRun) -> Obj:
        """The pod as the downward API sees it: with this agent's podIP even before the API has it."""
        status = {**(run.pod.get("status") or {}), "podIP": run.ip, "podIPs": [{"ip": run.ip}]}
        status["hostIP"] = str(self.network.gateway)
        return {**run.pod, "status": status}

    def _phase(self, run: PodRun) -> str:
        inits = run.init_containers
        failed_init = any(c.state == "terminated" and c.exit_code != 0 for c in inits)
        if failed_init and run.restart_policy == "Never":
            return "Failed"
        if not all(c.state == "terminated" and c.exit_code == 0 for c in inits):
            return "Pending"
        if not all(c.ran for c in run.containers):
            return "Pending"
        return podspec.pod_phase([(c.state, c.exit_code) for c in run.containers])

    # --- status ---------------------------------------------------------------------------------

    def _condition(self, run: PodRun, type_: str, ok: bool, reason: str = "") -> Obj:
        status = "True" if ok else "False"
        old = run.conditions.get(type_)
        since = old[1] if old and old[0] == status else now_rfc3339()
        run.conditions[type_] = (status, since)
        out = {"type": type_, "status": status, "lastTransitionTime": since}
        if reason:
            out["reason"] = reason
        return out

    def _status(self, run: PodRun) -> Obj:
        ready = run.phase == "Running" and all(c.state == "running" for c in run.containers)
        not_ready = "PodCompleted" if run.phase in FINAL else "ContainersNotReady"
        inits_done = all(c.state == "terminated" and c.exit_code == 0 for c in run.init_containers)
        status: Obj = {
            "phase": run.phase,
            "hostIP": str(self.network.gateway),
            "hostIPs": [{"ip": str(self.network.gateway)}],
            "conditions": [
                self._condition(run, "PodReadyToStartContainers", run.netns is not None),
                self._condition(run, "Initialized", inits_done, "" if inits_done else "ContainersNotInitialized"),
                self._condition(run, "Ready", ready, "" if ready else not_ready),
                self._condition(run, "ContainersReady", ready, "" if ready else not_ready),
                self._condition(run, "PodScheduled", True),
            ],
            "containerStatuses": [c.status() for c in run.containers],
        }
        if run.init_containers:
            status["initContainerStatuses"] = [c.status() for c in run.init_containers]
        if run.ip:
            status.update(podIP=run.ip, podIPs=[{"ip": run.ip}])
        if run.start_time:
            status["startTime"] = run.start_time
        if run.sandbox_message:
            status["message"] = run.sandbox_message
        return status

    def _report(self, run: PodRun) -> None:
        status = self._status(run)
        if status == run.last_status:
            return
        if self._patch_status(run.pod, status):
            run.last_status = status

    def _patch_status(self, pod: Obj, status: Obj) -> bool:
        meta = pod["metadata"]
        try:
            self.kube.merge_patch(core_path("pods", meta["namespace"], meta["name"], "status"), {"status": status})
            return True
        except ApiError as err:
            if err.status != 404:
                log.warning("status of %s/%s: %s", meta["namespace"], meta["name"], err)
            return False

    # --- stopping -----------------------------------------------------------------------------------

    def _grace_s(self, run: PodRun) -> float:
        meta, spec = run.pod["metadata"], run.pod["spec"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
        return float(grace if not run.gone else min(int(grace), 2))

    def _begin_stop(self, run: PodRun) -> None:
        run.terminating = True
        grace = self._grace_s(run)
        log.info("pod %s/%s deleted: stopping its processes (grace %.0fs)", run.namespace, run.name, grace)

        def stop() -> None:
            self._stop_containers(run, grace)
            run.stopped = True
            self.wake()

        threading.Thread(target=stop, name=f"stop {run.name}", daemon=True).start()

    @staticmethod
    def _stop_containers(run: PodRun, grace_s: float) -> None:
        """SIGTERM all at once, then each gets SIGKILL when the shared grace period ends."""
        running = [c for c in run.all_containers() if c.process is not None and c.process.poll() is None]
        for container in running:
            container.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for container in running:
            container.stop(max(deadline - time.monotonic(), 0.0))

    def _finish(self, run: PodRun) -> None:
        """Processes gone: remove the namespace, the pod folder and (grace 0) the API object."""
        self._remove_sandbox(run)
        for container in run.all_containers():
            container.poll()
        if not run.gone:
            self._report(run)
            meta = run.pod["metadata"]
            # The uid precondition: never delete a newer pod that took the same name.
            body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0}
            body["preconditions"] = {"uid": run.uid}
            try:
                self.kube.delete(core_path("pods", meta["namespace"], meta["name"]), body)
            except ApiError as err:
                if err.status != 409:  # 409: a newer pod of that name; ours is gone already
                    log.warning("cannot delete %s/%s: %s", meta["namespace"], meta["name"], err)
        shutil.rmtree(run.folder, ignore_errors=True)
        del self.runs[run.uid]
        self._finished.add(run.uid)
        log.info("pod %s/%s: stopped and removed", run.namespace, run.name)

    # --- Services as hosts entries -----------------------------------------------------------------

    def _service_addresses(self) -> list[hosts.ServiceAddress]:
        with self._lock:
            services = list(self._services.values())
        live = [r for r in self.runs.values() if r.ip and not r.terminating and r.phase not in FINAL]
        out = []
        for service in services:
            meta = service["metadata"]
            selector = (service.get("spec") or {}).get("selector")
            matches = [
                r
                for r in live
                if r.namespace == meta["namespace"]
                and podspec.selector_matches(selector, r.pod["metadata"].get("labels"))
            ]
            if not matches:
                continue
            # The running one first, then the newest.
            best = max(matches, key=lambda r: (r.phase == "Running", r.pod["metadata"].get("creationTimestamp", "")))
            out.append(hosts.ServiceAddress(meta["namespace"], meta["name"], str(best.ip)))
        if self.relay is not None:
            out.append(hosts.ServiceAddress("default", "kubernetes", self.relay.service_ip))
        return out

    def _hosts_text(self, run: PodRun, services: list[hosts.ServiceAddress] | None = None) -> str:
        services = self._service_addresses() if services is None else services
        return hosts.hosts_file(run.name, run.namespace, str(run.ip), services)

    def _write_hosts(self) -> None:
        services = self._service_addresses()
        for run in self.runs.values():
            fresh = run.ip and run.netns and not run.terminating
            if fresh and hosts.write_in_place(run.folder / "hosts", self._hosts_text(run, services)):
                log.debug("pod %s/%s: hosts updated", run.namespace, run.name)

    # --- kubectl logs -----------------------------------------------------------------------------

    def _log_of(self, namespace: str, pod: str, name: str, previous: bool) -> tuple[Path, Callable[[], bool]] | None:
        """Runs in the log server's threads: reads a snapshot, changes nothing."""
        runs = [r for r in list(self.runs.values()) if r.namespace == namespace and r.name == pod]
        for run in sorted(runs, key=lambda r: r.terminating):
            for container in run.all_containers():
                if container.name != name:
                    continue
                index = container.restart_count - 1 if previous else container.restart_count
                path = container.folder / f"{index}.log"
                if index < 0 or not path.exists():
                    return None
                return path, lambda c=container: c.state == "running" and not previous
        return None

    # --- lookups for env and volumes -------------------------------------------------------------

    def _lookup(self, kind: str, namespace: str, name: str) -> Obj | None:
        plural = {"Secret": "secrets", "ConfigMap": "configmaps"}[kind]
        return self.kube.get(core_path(plural, namespace, name))

    def _token(self, namespace: str, account: str, audience: str, seconds: int, pod: Obj) -> str:
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [audience] if audience else [],
                "expirationSeconds": seconds,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": pod["metadata"]["name"],
                    "uid": pod["metadata"]["uid"],
                },
            },
        }
        result = self.kube.request("POST", core_path("serviceaccounts", namespace, account, "token"), body=request)
        return result["status"]["token"]

    # --- claims: a tiny static provisioner --------------------------------------------------------

    def _provision_claims(self) -> None:
        """Bind each claim to a volume on a folder of this node (the PV binder does the binding)."""
        while True:
            try:
                kind, claim = self._claims.get_nowait()
            except queue.Empty:
                return
            meta, spec = claim["metadata"], claim.get("spec") or {}
            pv_name = f"fedtune-{meta['uid']}"
            if kind == "DELETED":
                with contextlib.suppress(ApiError):
                    self.kube.delete(core_path("persistentvolumes", None, pv_name))
                continue
            if spec.get("volumeName") or (claim.get("status") or {}).get("phase") != "Pending":
                continue
            folder = claim_dir(self.data_dir, meta["namespace"], meta["name"])
            folder.mkdir(parents=True, exist_ok=True)
            size = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
            volume = {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": pv_name, "labels": {"fedtune.io/node-agent": self.config.node_name}},
                "spec": {
                    "capacity": {"storage": size},
                    "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": spec.get("storageClassName") or "",
                    "volumeMode": spec.get("volumeMode") or "Filesystem",
                    "hostPath": {"path": str(folder), "type": "Directory"},
                    "claimRef": {"namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]},
                },
            }
            try:
                self.kube.request("POST", core_path("persistentvolumes", None), body=volume)
            except ApiError as err:
                if err.status != 409:
                    log.warning("cannot provision %s/%s: %s", meta["namespace"], meta["name"], err)
