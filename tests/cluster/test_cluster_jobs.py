"""Whole jobs on the local control plane: `kubectl apply` -> pods run -> Succeeded.

The node agent (devtools/nodeagent) is the cluster's only node: it binds pods and runs
their containers as processes in per-pod network and mount namespaces, so the
operator's pods really run `fedtune <role>`, talk gRPC over the operator's Services and
write adapters into the output claim, a folder on the node. The operator runs as a
subprocess with the admin kubeconfig (its RBAC is test_operator.py's business).

Needs root, iproute2 and util-linux (installed with apt-get when missing) and overlayfs.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.nodeagent import hosts, podinit, podspec
from devtools.nodeagent.network import netns_pids
from fedtune import roles
from support.jobs import EXAMPLE, EXAMPLES, PARTIES, POEMS, REPO, assert_identical_adapters
from support.kube import Api, OperatorProcess, unavailable, wait_for

cluster = pytest.mark.cluster

CRD = REPO / "crds" / "federatedfinetune.yaml"
WORKSPACE_PVC = EXAMPLES / "k8s" / "workspace-pvc.yaml"
ROLE_PODS = ("scheduler", "assist-trainer", "node-1", "node-2")
NODE = "fedtune-test-node"
# Every namespace the module uses: the agent and the operator touch nothing else.
NS = {
    key: f"jobs-{key}"
    for key in ("agent", "lora", "ptuning", "party-restart", "scheduler-restart", "suspend", "ha", "malformed",
                "delete")
}
HOST_TOOLS = {"ip": "iproute2", "nsenter": "util-linux", "unshare": "util-linux", "mount": "mount"}
JOB_TIMEOUT_S = 420.0


# --- helpers --------------------------------------------------------------------------------


def ensure_host_tools() -> None:
    """Root, `ip`, `nsenter`, `unshare`, `mount` (apt-get them if missing) and overlayfs."""
    if os.geteuid() != 0:
        unavailable("the node agent needs root (network and mount namespaces)")
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if missing and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=False, capture_output=True)
    still = [tool for tool in HOST_TOOLS if shutil.which(tool) is None]
    if still:
        unavailable(f"the node agent needs {', '.join(still)} (apt-get install iproute2 util-linux mount)")
    if "overlay" not in Path("/proc/filesystems").read_text():
        unavailable("the node agent needs overlayfs (modprobe overlay)")


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, digit = divmod(number, 36)
        out = digits[digit] + out
        if not number:
            return out


def session_prefix(letter: str) -> str:
    """A name prefix of this test session's own: `<letter><pid in base 36>`.

    Two sessions on one machine (two engineers' `make test`) must never clean up each
    other's pods, and a crashed session's leftovers must still be found: the pid in the
    name says whose they are (see `clean_stale_sessions`).
    """
    return letter + _base36(os.getpid())


def clean_stale_sessions() -> None:
    """Remove what test agents of sessions that no longer run left on the host."""
    stale = set()
    for name in [*netns_list(""), *links("")]:
        match = re.fullmatch(r"([tc])([0-9a-z]{1,5})-(br0|p\d+|v\d+)", name)
        if match and not Path(f"/proc/{int(match.group(2), 36)}").exists():
            stale.add(match.group(1) + match.group(2))
    for prefix in stale:
        subprocess.run([sys.executable, "-m", "devtools.nodeagent", "cleanup", "--prefix", prefix], cwd=REPO,
                       check=False, capture_output=True)  # fmt: skip


def free_pod_cidr() -> str:
    """A /24 in 10.201-250.x that no host route overlaps (another session's bridge, say)."""
    routes = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True, check=True).stdout
    taken = [ipaddress.ip_network(line.split()[0], strict=False) for line in routes.splitlines()
             if line and line.split()[0] != "default"]  # fmt: skip
    start = os.getpid() % 50  # sessions starting together rarely pick the same
    for offset in range(50):
        candidate = ipaddress.ip_network(f"10.{201 + (start + offset) % 50}.0.0/24")
        if not any(candidate.overlaps(net) for net in taken):
            return str(candidate)
    raise AssertionError(f"no free /24 for pods in 10.201-250.x.x:\n{routes}")


def netns_list(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(f"{prefix}-")] if prefix else names


def links(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    names = [line.split(":", 2)[1].strip().split("@")[0] for line in out.splitlines()]
    return [n for n in names if n.startswith(f"{prefix}-")] if prefix else names


def netns_with_address(prefix: str, address: str) -> str | None:
    for netns in netns_list(prefix):
        shown = subprocess.run(["ip", "-n", netns, "-4", "addr"], capture_output=True, text=True, check=False)
        if f"inet {address}/" in shown.stdout:
            return netns
    return None


def alive(pids: Iterable[int]) -> set[int]:
    """The pids still running (a zombie has ended; its reaping is its new parent's business)."""
    out = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state not in ("Z", "X"):
                out.add(pid)
    return out


class NodeAgent:
    """`python -m devtools.nodeagent run` as a subprocess."""

    def __init__(self, kubeconfig: Path, data_dir: Path, namespaces: list[str], *, prefix: str,
                 node: str = NODE) -> None:  # fmt: skip
        self.kubeconfig, self.data_dir, self.namespaces = kubeconfig, data_dir, namespaces
        self.prefix, self.cidr, self.node = prefix, free_pod_cidr(), node
        self.log = data_dir.parent / f"{data_dir.name}-agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, api: Api) -> NodeAgent:
        argv = [
            sys.executable, "-m", "devtools.nodeagent", "run",
            "--kubeconfig", str(self.kubeconfig), "--data-dir", str(self.data_dir),
            "--node-name", self.node, "--prefix", self.prefix, "--pod-cidr", self.cidr,
            "--restart-backoff", "1", "--log-level", "DEBUG",
            *(arg for ns in self.namespaces for arg in ("--namespace", ns)),
        ]  # fmt: skip
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"node agent exited:\n{self.tail()}"
            with self.log.open("rb") as log:  # this run's output only: an earlier run said "ready" too
                log.seek(offset)
                said_ready = f"node {self.node} ready\n".encode() in log.read()
            node = api.node(self.node)
            conditions = ((node or {}).get("status") or {}).get("conditions") or []
            return said_ready and any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        wait_for(f"node {self.node} to be Ready", ready, 60, self.tail)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def claim(self, ns: str, claim: str) -> Path:
        return self.data_dir / "volumes" / ns / claim

    def outputs(self, ns: str, job: str) -> Path:
        """Every party's adapters folder as one folder: `<party>/` links into that party's own claim."""
        view = self.data_dir / "outputs" / ns / job
        view.mkdir(parents=True, exist_ok=True)
        for party in PARTIES:
            if not (view / party).is_symlink():
                (view / party).symlink_to(self.claim(ns, f"{job}-output-{party.replace('_', '-')}") / party)
        return view

    def container_logs(self, ns: str, lines: int = 15) -> str:
        out = []
        for log in sorted((self.data_dir / "pods").glob(f"{ns}_*/*/*.log")):
            text = "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
            out.append(f"--- {log.parent.parent.name.split('_')[1]}/{log.parent.name} {log.name}\n{text}")
        return "\n".join(out)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(control_plane) -> Api:
    return Api(control_plane.kubeconfig)


@pytest.fixture(scope="module")
def node(control_plane, api, kubectl, tmp_path_factory) -> Iterator[NodeAgent]:
    ensure_host_tools()
    clean_stale_sessions()
    for ns in NS.values():
        kubectl("create", "namespace", ns)
    data = tmp_path_factory.mktemp("node") / "data"
    agent = NodeAgent(control_plane.kubeconfig, data, list(NS.values()), prefix=session_prefix("t"))
    agent.data_dir.mkdir()
    agent.start(api)
    try:
        yield agent
    finally:
        for ns in NS.values():
            kubectl("delete", "namespace", ns, "--wait=false", check=False)
        agent.stop()
        # Everything the agent did to the host is undone, and its Node is gone.
        leftovers = netns_list(agent.prefix) + links(agent.prefix)
        assert not leftovers, (leftovers, agent.tail())
        assert api.node(NODE) is None


@pytest.fixture(scope="module")
def operator(control_plane, node, kubectl, tmp_path_factory) -> Iterator[OperatorProcess]:
    kubectl("apply", "--server-side", "-f", str(CRD))
    # `kubectl wait` fails outright while the new CRD has no conditions yet: poll instead.
    established = "jsonpath={.status.conditions[?(@.type=='Established')].status}"
    wait_for("the CRD to be established",
             lambda: kubectl("get", "crd", "federatedfinetunes.fedtune.io", "-o", established, check=False).stdout
             == "True", 60)
    # The agent tests run no operator; the HA test runs two of its own.
    namespaces = [ns for key, ns in NS.items() if key not in ("agent", "ha")]
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = OperatorProcess(control_plane.kubeconfig, log, namespaces=namespaces).start()
    try:
        yield op
    finally:
        op.stop()
        # Leave the cluster as test_operator.py expects it: the chart installs the CRD.
        kubectl("delete", "-f", str(CRD), "--wait=true", "--timeout=120s", check=False)


def fill_workspace(node: NodeAgent, ns: str, tiny_model: Path) -> Path:
    """The workspace claim of the examples, holding the tiny model and the poems."""
    folder = node.claim(ns, "fedtune-workspace")
    shutil.copytree(tiny_model, folder / "models" / "tiny-glm", dirs_exist_ok=True)
    shutil.copytree(POEMS, folder / "data" / "poems", dirs_exist_ok=True)
    return folder


@pytest.fixture
def workspace(node, kubectl, tiny_model) -> Callable[[str], Path]:
    """Make the example's workspace claim in a namespace and fill its folder on the node."""

    def make(ns: str) -> Path:
        wait_for(f"the default ServiceAccount of {ns}",
                 lambda: kubectl("get", "serviceaccount", "default", "-n", ns, check=False).returncode == 0, 60)
        kubectl("apply", "-n", ns, "-f", str(WORKSPACE_PVC))
        return fill_workspace(node, ns, tiny_model)

    return make


def example(path: Path, name: str | None = None, **spec: Any) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    if name:
        doc["metadata"]["name"] = name
    doc["spec"].update(copy.deepcopy(spec))
    return doc


def apply(kubectl, ns: str, doc: dict[str, Any]) -> None:
    kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc, allow_unicode=True))


def diagnose(api: Api, node: NodeAgent, operator: OperatorProcess | None, ns: str, job: str = "") -> Callable[[], str]:
    def text() -> str:
        parts = []
        if job:
            parts.append(f"status: {api.status(ns, job)}")
        for pod in api.pods(ns):
            statuses = [(c["name"], c.get("state"), c.get("restartCount")) for c in
                        pod["status"].get("containerStatuses") or []]  # fmt: skip
            parts.append(f"pod {pod['metadata']['name']}: {pod['status'].get('phase')} {statuses}")
        parts += [f"container logs:\n{node.container_logs(ns)}", f"node agent:\n{node.tail(20)}"]
        if operator is not None:
            parts.append(f"operator:\n{operator.tail()}")
        return "\n".join(parts)

    return text


Hook = Callable[[dict[str, Any]], None]


def run_to_phase(api: Api, ns: str, name: str, phases: tuple[str, ...], describe: Callable[[], str],
                 during: Hook | None = None) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """Poll the resource until its phase is one of `phases`; returns the status and every round seen."""
    rounds: list[str] = []
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        status = api.status(ns, name)
        if status.get("round") and (not rounds or rounds[-1] != status["round"]):
            rounds.append(status["round"])
        if status.get("phase") in phases:
            return status, rounds
        if status.get("phase") in ("Succeeded", "Failed"):
            raise AssertionError(f"{name} ended {status['phase']}: {status.get('message')}\n{describe()}")
        if during is not None:
            during(status)
        time.sleep(0.2)
    raise AssertionError(f"{name} did not reach {phases} in {JOB_TIMEOUT_S:.0f}s\n{describe()}")


def checkpoints(output: Path, party: str) -> list[str]:
    return sorted(p.name for p in (output / party).glob("checkpoint-*"))


def assert_every_round(status: dict[str, Any], rounds_seen: list[str], output: Path, fractions: list[str]) -> None:
    total = len(fractions)
    assert status["round"] == f"{total}/{total}", status
    # Round k of K as status moved on: never backwards, ending at K.
    numbers = [int(r.split("/")[0]) for r in rounds_seen]
    assert numbers == sorted(numbers) and numbers[-1] == total, rounds_seen
    for party in PARTIES:
        assert status["parties"][party]["round"] == total, status["parties"][party]
        assert checkpoints(output, party) == [f"checkpoint-{f}" for f in fractions], party


def role_pid_sets(api: Api, node: NodeAgent, ns: str) -> dict[str, set[int]]:
    """pod name -> the processes in its network namespace (found through its address)."""
    out = {}
    for pod in api.pods(ns):
        ip = pod["status"].get("podIP")
        netns = netns_with_address(node.prefix, ip) if ip else None
        if netns is not None and pod["status"].get("phase") == "Running":
            out[pod["metadata"]["name"]] = set(netns_pids(netns))
    return out


# --- the node agent's rules, without a cluster ----------------------------------------------------


def test_env_resolution_and_expansion() -> None:
    pod = {"metadata": {"name": "p", "namespace": "ns", "labels": {"app": "x"}}, "spec": {"nodeName": "n"},
           "status": {"podIP": "10.1.2.3"}}  # fmt: skip
    objects = {("Secret", "ns", "s"): {"data": {"pw": base64.b64encode(b"hunter2").decode()}},
               ("ConfigMap", "ns", "c"): {"data": {"k": "v", "other": "o"}}}  # fmt: skip
    container = {"name": "main", "envFrom": [{"configMapRef": {"name": "c"}, "prefix": "CM_"}], "env": [
        {"name": "A", "value": "a"},
        {"name": "B", "value": "$(A)-$(UNKNOWN)-$$(A)"},
        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "pw"}}},
        {"name": "K", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}},
        {"name": "GONE", "valueFrom": {"secretKeyRef": {"name": "missing", "key": "x", "optional": True}}},
    ], "command": ["echo", "$(PW)"], "args": ["$(B)"]}  # fmt: skip
    env = podspec.container_env(pod, container, lambda *key: objects.get(key), {"PATH": "/bin"}, {})
    assert env == {"PATH": "/bin", "CM_k": "v", "CM_other": "o", "A": "a", "B": "a-$(UNKNOWN)-$(A)",
                   "IP": "10.1.2.3", "APP": "x", "PW": "hunter2", "K": "v"}  # fmt: skip
    assert podspec.container_argv(container, env, {}) == ["echo", "hunter2", "a-$(UNKNOWN)-$(A)"]
    with pytest.raises(podspec.ConfigError, match='secret "missing" not found'):
        bad = {"name": "m", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "missing", "key": "x"}}}]}
        podspec.container_env(pod, bad, lambda *key: None, {}, {})
    # resourceFieldRef: in units of the divisor, rounded up, as the kubelet gives it.
    sized = {"name": "t", "resources": {"requests": {"cpu": "250m", "memory": "1Gi"}}, "env": [
        {"name": "THREADS", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1"}}},
        {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "requests.memory", "divisor": "1Mi"}}},
    ]}  # fmt: skip
    assert podspec.container_env(pod, sized, lambda *key: None, {}, {}) == {"THREADS": "1", "MEM_MI": "1024"}
    # No command: the image's entrypoint, when the agent knows it.
    assert podspec.container_argv({"name": "r", "image": "redis:7.2-alpine", "args": ["--port", "1"]}, {},
                                  {"redis": ["redis-server"]}) == ["redis-server", "--port", "1"]  # fmt: skip


def test_pod_phase_follows_the_containers() -> None:
    phase = podspec.pod_phase
    assert phase([("running", None), ("terminated", 0)]) == "Running"
    assert phase([("terminated", 0), ("terminated", 0)]) == "Succeeded"
    assert phase([("terminated", 0), ("terminated", 2)]) == "Failed"
    assert phase([("waiting", None)]) == "Running"  # restart back-off after a run


def test_hosts_file_names_every_service() -> None:
    services = [hosts.ServiceAddress("a", "redis", "10.9.0.2"), hosts.ServiceAddress("b", "web", "10.9.0.3")]
    text = hosts.hosts_file("p", "a", "10.9.0.4", services)
    assert "10.9.0.2\tredis redis.a redis.a.svc redis.a.svc.cluster.local\n" in text
    assert "10.9.0.3\tweb.b web.b.svc web.b.svc.cluster.local\n" in text  # no short name across namespaces
    assert "10.9.0.4\tp\n" in text


def test_mount_targets_resolve_symlinks_inside_the_root(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "run").symlink_to("/run")  # absolute, as on Debian
    (tmp_path / "etc").symlink_to("run/etc")  # relative
    assert podinit.in_root(tmp_path, "/var/run/secrets/token") == tmp_path / "run" / "secrets" / "token"
    assert podinit.in_root(tmp_path, "/etc/hosts") == tmp_path / "run" / "etc" / "hosts"
    assert podinit.in_root(tmp_path, "/../../x") == tmp_path / "x"


# --- the node agent on its own ------------------------------------------------------------------


WRITER = """
echo "greeting: $(cat /etc/cfg/greeting.txt) after $(cat /data/init.txt)" > /data/greeting.txt
echo "$SECRET_PW" > /data/secret.txt
echo "$POD_NAME $POD_NAMESPACE $POD_IP $(hostname)" > /data/identity.txt
echo "about to fail on purpose"
exit 7
"""

ECHO_SERVER = """
import socket, sys
srv = socket.create_server(("0.0.0.0", 7000))
print("listening", flush=True)
while True:
    conn, _ = srv.accept()
    conn.sendall(socket.gethostname().encode())
    conn.close()
"""

# Fails on its first run (OnFailure restarts it in place), then asks the Service.
ECHO_CLIENT = """
import os, pathlib, socket, sys
marker = pathlib.Path("/data/client-ran-once")
if not marker.exists():
    marker.write_text("1")
    sys.exit(3)
answers = []
for name in ("echo", "echo.{ns}.svc.cluster.local"):
    with socket.create_connection((name, 7000), timeout=10) as conn:
        answers.append(conn.recv(100).decode())
pathlib.Path("/data/answers.txt").write_text(" ".join(answers))
"""


# In-cluster API access as a client library does it: the Service's env, the token, the CA.
API_CLIENT = """
import json, os, ssl, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
url = "https://kubernetes.default.svc:" + os.environ["KUBERNETES_SERVICE_PORT"]
url += "/apis/authentication.k8s.io/v1/selfsubjectreviews"
body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode()
token = open(sa + "/token").read()
request = urllib.request.Request(url, data=body, method="POST", headers={
    "Authorization": "Bearer " + token, "Content-Type": "application/json"})
context = ssl.create_default_context(cafile=sa + "/ca.crt")
with urllib.request.urlopen(request, context=context, timeout=10) as answer:
    print("I am", json.load(answer)["status"]["userInfo"]["username"])
print("host", os.environ["KUBERNETES_SERVICE_HOST"], open(sa + "/namespace").read())
"""


def agent_manifests(ns: str) -> list[dict[str, Any]]:
    data = {"name": "data", "persistentVolumeClaim": {"claimName": "data"}}
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"greeting.txt": "hello"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sec"},
         "data": {"password": base64.b64encode(b"s3cret").decode()}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
         "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "writer"}, "spec": {
            "restartPolicy": "Never",
            "initContainers": [{"name": "init", "image": "busybox",
                                "command": ["sh", "-c", "echo init > /data/init.txt"],
                                "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
            "containers": [{
                "name": "main", "image": "busybox", "command": ["sh", "-c", WRITER],
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "env": [
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "SECRET_PW", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "password"}}},
                ],
                "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg", "readOnly": True},
                                 {"name": "data", "mountPath": "/data"}],
            }],
            "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}, data],
        }},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "echo-server", "labels": {"app": "echo"}}, "spec": {
            "restartPolicy": "Always",
            "containers": [{"name": "main", "image": "python", "command": ["python3", "-c", ECHO_SERVER]}],
        }},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
         "spec": {"selector": {"app": "echo"}, "ports": [{"port": 7000}]}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gpu-hungry"}, "spec": {
            "containers": [{"name": "main", "image": "cuda", "command": ["true"],
                            "resources": {"limits": {"nvidia.com/gpu": 1}}}],
        }},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "api-client"}, "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "python", "command": ["python3", "-c", API_CLIENT]}],
        }},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "echo-client"}, "spec": {
            "restartPolicy": "OnFailure",
            "containers": [{"name": "main", "image": "python",
                            "command": ["python3", "-c", ECHO_CLIENT.replace("{ns}", ns)],
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
            "volumes": [data],
        }},
    ]  # fmt: skip


@cluster
def test_pod_runs_with_env_volumes_services_and_restarts(node, api, kubectl) -> None:
    ns = NS["agent"]
    wait_for("the default ServiceAccount", lambda: kubectl("get", "sa", "default", "-n", ns, check=False)
             .returncode == 0, 60)  # fmt: skip
    kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all(agent_manifests(ns)))
    describe = diagnose(api, node, None, ns)
    claim = node.claim(ns, "data")

    writer = wait_for("writer to fail", lambda: (p := api.pod(ns, "writer")) and
                      p["status"].get("phase") == "Failed" and p, 60, describe)  # fmt: skip
    ended = writer["status"]["containerStatuses"][0]["state"]["terminated"]
    assert ended["exitCode"] == 7 and ended["reason"] == "Error", ended
    assert "about to fail on purpose" in ended["message"]  # FallbackToLogsOnError
    assert (claim / "greeting.txt").read_text() == "greeting: hello after init\n"  # the init container ran first
    assert (claim / "secret.txt").read_text() == "s3cret\n"
    assert (claim / "identity.txt").read_text() == f"writer {ns} {writer['status']['podIP']} writer\n"

    client = wait_for("echo-client to succeed", lambda: (p := api.pod(ns, "echo-client")) and
                      p["status"].get("phase") == "Succeeded" and p, 60, describe)  # fmt: skip
    assert client["status"]["containerStatuses"][0]["restartCount"] == 1  # OnFailure: restarted in place
    assert (claim / "answers.txt").read_text() == "echo-server echo-server"

    # The `kubernetes` Service from inside a pod, with its projected token; and `kubectl logs`.
    wait_for("api-client to succeed", lambda: (p := api.pod(ns, "api-client")) and
             p["status"].get("phase") == "Succeeded", 60, describe)  # fmt: skip
    logs = kubectl("logs", "api-client", "-n", ns).stdout
    assert f"I am system:serviceaccount:{ns}:default" in logs, logs
    assert f"host 10.0.0.1 {ns}" in logs, logs
    assert "about to fail on purpose" in kubectl("logs", "writer", "-n", ns, "--tail", "1").stdout

    # The node has no GPU (nvidia.com/gpu 0): a pod that wants one stays unscheduled, saying why.
    assert (api.node(NODE) or {})["status"]["capacity"]["nvidia.com/gpu"] == "0"
    hungry = api.pod(ns, "gpu-hungry") or {}
    assert not hungry["spec"].get("nodeName")
    scheduled = next(c for c in hungry["status"]["conditions"] if c["type"] == "PodScheduled")
    assert scheduled["status"] == "False" and "nvidia.com/gpu" in scheduled["message"], scheduled

    server = api.pod(ns, "echo-server")
    assert server is not None and server["status"]["phase"] == "Running"
    netns = netns_with_address(node.prefix, server["status"]["podIP"])
    assert netns is not None
    pids = netns_pids(netns)
    assert pids
    kubectl("delete", "pod", "echo-server", "-n", ns, "--timeout=60s")  # waits until the object is gone
    assert not alive(pids), "the deleted pod's processes still run"
    assert netns not in netns_list(node.prefix)


@cluster
def test_agent_crash_leftovers_are_cleaned_up_on_restart(control_plane, api, kubectl, tmp_path) -> None:
    ensure_host_tools()
    ns, prefix = "jobs-crash", session_prefix("c")
    kubectl("create", "namespace", ns)
    agent = NodeAgent(control_plane.kubeconfig, tmp_path / "data", [ns], prefix=prefix, node="fedtune-crash-node")
    agent.data_dir.mkdir()
    try:
        agent.start(api)
        wait_for("the default ServiceAccount", lambda: kubectl("get", "sa", "default", "-n", ns, check=False)
                 .returncode == 0, 60)  # fmt: skip
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper"}, "spec": {"containers": [
            {"name": "main", "image": "busybox", "command": ["sh", "-c", "sleep 600 & sleep 600"]}]}}  # fmt: skip
        apply(kubectl, ns, pod)
        running = wait_for("sleeper to run", lambda: (p := api.pod(ns, "sleeper")) and
                           p["status"].get("phase") == "Running" and p, 60, agent.tail)  # fmt: skip
        netns = netns_with_address(prefix, running["status"]["podIP"])
        assert netns is not None
        pids = wait_for("both sleeps", lambda: len(netns_pids(netns)) >= 3 and netns_pids(netns), 10)

        agent.stop(signal.SIGKILL)  # a crash: no cleanup runs
        assert netns_list(prefix) and alive(pids)  # the background sleep outlives its shell

        agent.start(api)  # cleans up by prefix, then runs the pod again (restartPolicy Always)
        assert not alive(pids)
        restarted = wait_for("sleeper to run again", lambda: (p := api.pod(ns, "sleeper")) and
                             p["status"]["containerStatuses"][0]["restartCount"] == 1 and
                             p["status"].get("phase") == "Running" and p, 60, agent.tail)  # fmt: skip
        assert restarted["metadata"]["uid"] == running["metadata"]["uid"]
    finally:
        agent.stop()
        kubectl("delete", "namespace", ns, "--wait=false", check=False)
    assert not netns_list(prefix) and not links(prefix), agent.tail()
    assert api.node("fedtune-crash-node") is None


# --- jobs through the operator ------------------------------------------------------------------


def assert_lora_loads(model: Path, checkpoint: Path, final: dict) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model))
    loaded = PeftModel.from_pretrained(base, str(checkpoint))
    assert len([n for n, _ in loaded.named_parameters() if "lora_" in n]) == len(final)


def scrape_when(api: Api, ns: str, job: str, ready: Callable[[dict[str, Any]], bool], scraped: dict[str, str]) -> Hook:
    """A `during` hook: once `ready(status)`, read every role pod's /metrics (once), as Prometheus would."""

    def hook(status: dict[str, Any]) -> None:
        if scraped or not ready(status):
            return
        for pod in api.pods(ns):
            name, ip = pod["metadata"]["name"], pod["status"].get("podIP")
            if name != f"{job}-redis" and ip and pod["status"].get("phase") == "Running":
                url = f"http://{ip}:{roles.METRICS_PORT}/metrics"
                try:
                    scraped[name.removeprefix(f"{job}-")] = urllib.request.urlopen(url, timeout=5).read().decode()
                except OSError as err:
                    scraped[name.removeprefix(f"{job}-")] = f"cannot scrape {url}: {err}"

    return hook


def series(text: str, name: str, **labels: str) -> float:
    """The value of one series in a /metrics page (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@cluster
def test_lora_example_applied_with_kubectl_succeeds(node, operator, api, kubectl, workspace) -> None:
    ns = NS["lora"]
    folder = workspace(ns)
    kubectl("apply", "-n", ns, "-f", str(EXAMPLE))
    describe = diagnose(api, node, operator, ns, "poems-lora")
    scraped: dict[str, str] = {}
    scrape = scrape_when(api, ns, "poems-lora", lambda st: int(st.get("round", "0/5").split("/")[0]) >= 2, scraped)
    status, rounds = run_to_phase(api, ns, "poems-lora", ("Succeeded",), describe, scrape)

    # Mid-job, every role served its metrics (a scrape as Prometheus makes it, at the pod's address).
    assert set(scraped) == {"scheduler", "assist-trainer", "node-1", "node-2"}, sorted(scraped)
    failed = {k: v for k, v in scraped.items() if v.startswith("cannot scrape")}
    assert not failed, f"{failed}\n{describe()}"
    for party in PARTIES:  # the scheduler sees every party's round and loss
        assert series(scraped["scheduler"], "fedtune_round", party=party) >= 1, party
    node1, assist = scraped["node-1"], scraped["assist-trainer"]
    assert series(node1, "fedtune_round", party="node-1") >= 1 and series(node1, "fedtune_rounds", party="node-1") == 5
    assert series(node1, "fedtune_train_loss", party="node-1") > 0
    assert series(node1, "fedtune_sent_bytes_total", party="node-1") > 0
    assert series(node1, "fedtune_received_bytes_total", party="node-1") > 0
    assert series(node1, "fedtune_secure_aggregation_seconds_count", party="node-1", step="protect") >= 1
    assert series(node1, "fedtune_aggregation_wait_seconds_count", party="node-1") >= 1
    assert series(node1, "fedtune_round_duration_seconds_count", party="node-1") >= 1
    assert series(assist, "fedtune_received_bytes_total", party="assist_trainer") > 0
    assert series(assist, "fedtune_secure_aggregation_seconds_count", party="assist_trainer", step="combine") >= 1

    output = node.outputs(ns, "poems-lora")
    assert status["output"] == "pvc://poems-lora-output-<party>/"
    assert_every_round(status, rounds, output, ["0.2", "0.4", "0.6", "0.8", "1"])
    final = assert_identical_adapters(output, "checkpoint-1")
    assert all("lora_" in key for key in final)
    assert_lora_loads(folder / "models" / "tiny-glm", output / "node-1" / "checkpoint-1", final)
    # A finished job holds no processes and no addresses: Redis was stopped, the roles exited.
    addresses = [p["status"].get("podIP") for p in api.pods(ns)]
    assert not [a for a in addresses if a and netns_with_address(node.prefix, a)], addresses


@cluster
def test_ptuning_example_applied_with_kubectl_succeeds(node, operator, api, kubectl, workspace) -> None:
    ns = NS["ptuning"]
    folder = workspace(ns)
    kubectl("apply", "-n", ns, "-f", str(EXAMPLES / "k8s" / "ptuning-3party.yaml"))
    describe = diagnose(api, node, operator, ns, "poems-ptuning")
    status, rounds = run_to_phase(api, ns, "poems-ptuning", ("Succeeded",), describe)

    output = node.outputs(ns, "poems-ptuning")
    assert_every_round(status, rounds, output, ["0.5", "1"])
    final = assert_identical_adapters(output, "checkpoint-1")
    assert sum(t.numel() for t in final.values()) < 50_000  # the prefix alone

    from fedtune.chat import load_for_chat

    model, _ = load_for_chat(folder / "models" / "tiny-glm", output / "node-2" / "checkpoint-1")
    assert type(model).__name__.startswith("Peft")


def state_saved(output: Path, party: str) -> bool:
    from fedtune.party import STATE_DIR
    from fedtune.training import latest_state

    return latest_state(output / party / STATE_DIR / "trainer") is not None


def delete_pod_when(api: Api, kubectl, ns: str, pod: str, ready: Callable[[], bool], deleted: list[str]) -> Callable:
    """A `during` hook: once `ready()`, delete `pod` (once), recording its uid."""

    def hook(_status: dict[str, Any]) -> None:
        if deleted or not ready():
            return
        live = api.pod(ns, pod)
        assert live is not None and live["status"].get("phase") == "Running", f"{pod} is not running: {live}"
        deleted.append(live["metadata"]["uid"])
        kubectl("delete", "pod", pod, "-n", ns, "--wait=false")

    return hook


@cluster
def test_label_trainer_pod_deleted_mid_job_is_recreated(node, operator, api, kubectl, workspace) -> None:
    ns, name = NS["party-restart"], "poems-party-restart"
    workspace(ns)
    apply(kubectl, ns, example(EXAMPLE, name))
    output = node.outputs(ns, name)
    deleted: list[str] = []
    hook = delete_pod_when(api, kubectl, ns, f"{name}-node-1", lambda: state_saved(output, "node-1"), deleted)
    status, rounds = run_to_phase(api, ns, name, ("Succeeded",), diagnose(api, node, operator, ns, name), hook)

    assert deleted, "the job ended before node-1 could be deleted"
    assert status["parties"]["node-1"]["restarts"] >= 1
    assert status["parties"]["node-1"]["podUID"] != deleted[0]
    assert_every_round(status, rounds, output, ["0.2", "0.4", "0.6", "0.8", "1"])
    assert_identical_adapters(output, "checkpoint-1")


@cluster
def test_scheduler_and_redis_pods_deleted_mid_job(node, operator, api, kubectl, workspace) -> None:
    ns, name = NS["scheduler-restart"], "poems-scheduler-restart"
    workspace(ns)
    apply(kubectl, ns, example(EXAMPLE, name, redis={"persistence": True}))
    output = node.outputs(ns, name)
    scheduler: list[str] = []
    redis: list[str] = []
    # Both at once, once round 1 is behind node-1: the new scheduler finds its state in a
    # Redis that has just reloaded it from its append-only file.
    kill_scheduler = delete_pod_when(api, kubectl, ns, f"{name}-scheduler", lambda: state_saved(output, "node-1"),
                                     scheduler)  # fmt: skip
    kill_redis = delete_pod_when(api, kubectl, ns, f"{name}-redis", lambda: bool(scheduler), redis)

    def during(status: dict[str, Any]) -> None:
        kill_scheduler(status)
        kill_redis(status)

    status, rounds = run_to_phase(api, ns, name, ("Succeeded",), diagnose(api, node, operator, ns, name), during)
    assert scheduler and redis, "the job ended before its scheduler and Redis could be deleted"
    assert status["scheduler"]["restarts"] >= 1
    assert_every_round(status, rounds, output, ["0.2", "0.4", "0.6", "0.8", "1"])
    assert_identical_adapters(output, "checkpoint-1")


@cluster
def test_suspended_mid_job_resumes_from_its_last_round(node, operator, api, kubectl, workspace) -> None:
    """spec.runPolicy.suspend: the role pods go, Redis and the claims stay; resumed, the parties carry on
    from their saved state and the rounds already made."""
    ns, name = NS["suspend"], "poems-suspend"
    workspace(ns)
    doc = example(EXAMPLE, name)
    doc["spec"]["trainer"]["num_train_epochs"] = 10  # rounds long enough to suspend between them
    apply(kubectl, ns, doc)
    output = node.outputs(ns, name)
    describe = diagnose(api, node, operator, ns, name)
    suspended: list[str] = []

    def suspend(value: bool) -> None:
        patch = json.dumps({"spec": {"runPolicy": {"suspend": value}}})
        kubectl("patch", "fft", name, "-n", ns, "--type", "merge", "-p", patch)

    def suspend_after_a_round(status: dict[str, Any]) -> None:
        if not suspended and state_saved(output, "node-1"):
            suspend(True)
            suspended.append(status.get("round", ""))

    _, before = run_to_phase(api, ns, name, ("Suspended",), describe, suspend_after_a_round)
    wait_for("the role pods to go", lambda: {p["metadata"]["name"] for p in api.pods(ns)} == {f"{name}-redis"},
             60, describe)
    done = checkpoints(output, "node-1")
    assert 1 <= len(done) < 5, done  # suspended between rounds, with rounds still to go
    suspend(False)
    status, after = run_to_phase(api, ns, name, ("Succeeded",), describe)

    assert_every_round(status, [r for r in [*before, *after] if r], output, ["0.2", "0.4", "0.6", "0.8", "1"])
    assert_identical_adapters(output, "checkpoint-1")
    assert "node-1: resuming from its saved state" in node.container_logs(ns, lines=200)
    assert all(rec["restarts"] == 0 for rec in status["parties"].values()), status["parties"]


@cluster
def test_the_standby_operator_takes_over_when_the_leader_dies(node, operator, api, kubectl, workspace,
                                                              control_plane, tmp_path) -> None:
    """Two replicas with leader election: only the leader reconciles; SIGKILLed mid-job (and a party's pod
    deleted with it), the standby takes the Lease, makes the pod again and sees the job to its end."""
    ns, name = NS["ha"], "poems-ha"
    workspace(ns)
    replicas = {
        who: OperatorProcess(control_plane.kubeconfig, tmp_path / f"{who}.log", namespaces=[ns], args=(
            "--leader-elect", "--lease-namespace", ns, "--lease-duration", "6", "--identity", who)).start()
        for who in ("replica-a", "replica-b")
    }  # fmt: skip
    try:
        def holder() -> str:
            lease = kubectl("get", "lease", "fedtune-operator", "-n", ns, "-o", "jsonpath={.spec.holderIdentity}",
                            check=False)
            return lease.stdout.strip()

        leader_name = wait_for("a leader", holder, 60)
        leader = replicas[leader_name]
        standby_name, standby = next((w, r) for w, r in replicas.items() if w != leader_name)
        doc = example(EXAMPLE, name)
        doc["spec"]["trainer"]["num_train_epochs"] = 10  # rounds long enough to fail over between them
        apply(kubectl, ns, doc)
        output = node.outputs(ns, name)
        describe = diagnose(api, node, standby, ns, name)
        killed: list[str] = []

        def kill_the_leader(_status: dict[str, Any]) -> None:
            if not killed and state_saved(output, "node-1"):
                leader.stop(signal.SIGKILL)
                kubectl("delete", "pod", f"{name}-node-1", "-n", ns, "--wait=false")
                killed.append(leader_name)

        status, rounds = run_to_phase(api, ns, name, ("Succeeded",), describe, kill_the_leader)
        assert killed, "the job ended before its leader could be killed"
        assert holder() == standby_name
        assert status["parties"]["node-1"]["restarts"] >= 1  # the pod deleted with the leader was made again
        assert_every_round(status, rounds, output, ["0.2", "0.4", "0.6", "0.8", "1"])
        # Only the leader reconciled: the standby made nothing before it held the Lease.
        lines = standby.lines()
        took_over = next(i for i, line in enumerate(lines) if f"{standby_name} leads" in line)
        assert not [line for line in lines[:took_over] if "fedtune_operator.reconcile" in line]
        assert any("created Pod" in line for line in lines[took_over:])
        assert any("created Pod" in line for line in leader.lines())
    finally:
        for replica in replicas.values():
            replica.stop()


@cluster
def test_malformed_dataset_fails_naming_the_file(node, operator, api, kubectl, workspace) -> None:
    ns, name = NS["malformed"], "poems-malformed"
    folder = workspace(ns)
    (folder / "data" / "broken").mkdir()
    (folder / "data" / "broken" / "part-2.json").write_text('{"instruction": "x", "instances": [', encoding="utf-8")
    doc = example(EXAMPLE, name, backoffLimit=1)
    doc["spec"]["parties"][2]["trainset"] = [{"type": "QA", "path": "data/broken/part-2.json"}]
    apply(kubectl, ns, doc)
    status, _ = run_to_phase(api, ns, name, ("Failed",), diagnose(api, node, operator, ns, name))

    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "BackoffLimitExceeded", status
    assert "data/broken/part-2.json" in failed["message"], status
    # backoffLimit 1: each role is retried once at most; the one that gave up failed twice.
    failures = {key: rec["failures"] for key, rec in [("scheduler", status["scheduler"]), *status["parties"].items()]}
    assert max(failures.values()) == 2 and min(failures.values()) >= 0, status
    # No endless restarts: nothing is started again and nothing keeps running.
    time.sleep(3)
    pods = api.pods(ns)
    assert all(p["status"].get("phase") in ("Succeeded", "Failed") for p in pods), [
        (p["metadata"]["name"], p["status"].get("phase")) for p in pods]  # fmt: skip
    assert len([p for p in pods if p["metadata"]["name"] == f"{name}-node-2"]) <= 1


@cluster
def test_deleting_a_running_job_stops_every_process(node, operator, api, kubectl, workspace) -> None:
    ns, name = NS["delete"], "poems-delete"
    workspace(ns)
    apply(kubectl, ns, example(EXAMPLE, name))
    describe = diagnose(api, node, operator, ns, name)
    expected = {f"{name}-{suffix}" for suffix in (*ROLE_PODS, "redis")}
    pids = wait_for("every pod of the job to run", lambda: (found := role_pid_sets(api, node, ns)).keys() == expected
                    and all(found.values()) and found, 120, describe)  # fmt: skip
    every = set().union(*pids.values())

    kubectl("delete", "fft", name, "-n", ns, "--wait=false")
    wait_for("the job's pods to go", lambda: not api.pods(ns), 120, describe)
    wait_for("every process of the job to end", lambda: not alive(every), 30, describe)
    assert not [n for n in netns_list(node.prefix) if set(netns_pids(n)) & every]
