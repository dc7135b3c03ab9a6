"""The operator path's overhead: the 3-party LoRA example through `kubectl apply` versus `fedtune run`.

Both run the very same spec (examples/lora-3party.yaml) over the very same files: a
tiny GLM model built here and the bundled poems, in one workspace folder that is both
`fedtune run --base-dir` and, on the dev cluster, the folder of the `fedtune-workspace`
claim the example mounts.

- baseline: `fedtune run examples/lora-3party.yaml` — every role a local process; wall
  time until it exits with the job Succeeded;
- cluster: on the local control plane (devtools/cluster) with the node agent
  (devtools/nodeagent) as its node and the operator as a subprocess: wall time from
  `kubectl apply -f examples/lora-3party.yaml` until the resource's phase is Succeeded.
  This includes everything the operator path adds: the operator's reconcile, pod
  binding and start, Redis as a pod, Service names, status round trips.

Runs alternate (cluster, baseline, cluster, ...) so that a busy moment on the machine
hits both. Prints the machine, each run, the medians and the ratio cluster / baseline
(goal: at most 1.25).

    sudo python bench/cluster_job.py               # 3 runs each
    sudo python bench/cluster_job.py --repeat 5

Needs root, iproute2 and util-linux (the node agent) and the control-plane binaries
(devtools/cluster/build.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml
from common import kubectl, machine, process

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # devtools/ is not installed: import it from the checkout

from devtools.cluster import devcluster  # noqa: E402

EXAMPLE = REPO / "examples" / "lora-3party.yaml"
WORKSPACE_PVC = REPO / "examples" / "k8s" / "workspace-pvc.yaml"
CRD = REPO / "crds" / "federatedfinetune.yaml"
POEMS = REPO / "examples" / "data" / "poems"
PREFIX = "fbench"  # the node agent's netns/link prefix: apart from a dev cluster's (fta)
TIMEOUT_S = 900.0


def free_pod_cidr() -> str:
    routes = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True, check=True).stdout
    taken = [ipaddress.ip_network(r.split()[0], strict=False) for r in routes.splitlines() if r and "default" not in r]
    for third in range(251, 200, -1):
        candidate = ipaddress.ip_network(f"10.{third}.0.0/24")
        if not any(candidate.overlaps(net) for net in taken):
            return str(candidate)
    raise RuntimeError("no free /24 in 10.201-251.x.x for the bench's pods")


class Cluster:
    def __init__(self, kubeconfig: Path, volumes: Path) -> None:
        import kubernetes

        self.kubeconfig = kubeconfig
        self.volumes = volumes
        client = kubernetes.config.new_client_from_config(str(kubeconfig))
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.ApiException = kubernetes.client.exceptions.ApiException

    def kubectl(self, *args: str) -> str:
        return kubectl(self.kubeconfig, *args)

    def phase(self, ns: str, name: str) -> str | None:
        try:
            body = self.custom.get_namespaced_custom_object("fedtune.io", "v1alpha1", ns, "federatedfinetunes", name)
        except self.ApiException as err:
            if err.status == 404:
                return None
            raise
        return (body.get("status") or {}).get("phase")

    def wait_node_ready(self, node: str, agent: subprocess.Popen[bytes], log: Path) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if agent.poll() is not None:
                raise RuntimeError(f"node agent exited:\n{log.read_text(errors='replace')[-3000:]}")
            ready = self.kubectl("get", "node", node, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                                 "--ignore-not-found")  # fmt: skip
            if ready.strip() == "True":
                return
            time.sleep(0.2)
        raise RuntimeError("node not Ready in 60s")

    def prepare_namespace(self, ns: str, workspace: Path) -> None:
        self.kubectl("create", "namespace", ns)
        deadline = time.monotonic() + 60
        while not self.kubectl("get", "serviceaccount", "-n", ns, "--ignore-not-found", "-o", "name").strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no default ServiceAccount in {ns}")
            time.sleep(0.2)
        self.kubectl("apply", "-n", ns, "-f", str(WORKSPACE_PVC))
        shutil.copytree(workspace, self.volumes / ns / "fedtune-workspace", dirs_exist_ok=True)

    def torch_threads(self, ns: str) -> str:
        """What the party pods tell torch (FEDTUNE_TORCH_THREADS), as the operator made them."""
        selector = "fedtune.io/component=label-trainer"
        pods = json.loads(self.kubectl("get", "pods", "-n", ns, "-l", selector, "-o", "json"))
        values = {
            var.get("value", "(from elsewhere)")
            for pod in pods["items"]
            for var in pod["spec"]["containers"][0].get("env") or []
            if var["name"] == "FEDTUNE_TORCH_THREADS"
        }
        return ", ".join(sorted(values)) or "not set (torch uses every core)"

    def run_job(self, ns: str) -> float:
        """`kubectl apply` of the example to Succeeded, in seconds."""
        name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
        started = time.perf_counter()
        self.kubectl("apply", "-n", ns, "-f", str(EXAMPLE))
        while (phase := self.phase(ns, name)) != "Succeeded":
            if phase == "Failed" or time.perf_counter() - started > TIMEOUT_S:
                raise RuntimeError(f"{ns}/{name} ended {phase}: {self.kubectl('get', 'fft', '-n', ns, '-o', 'yaml')}")
            time.sleep(0.1)
        return time.perf_counter() - started


def run_local(workspace: Path, out: Path) -> float:
    """`fedtune run` of the same spec over the same files, in seconds."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "fedtune", "run", str(EXAMPLE), "--base-dir", str(workspace), "--output", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"fedtune run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return elapsed


def build_workspace(folder: Path) -> Path:
    """models/tiny-glm (built here, as `make demo` does) and data/poems."""
    from fedtune.tinymodel import build_tiny_model

    build_tiny_model(folder / "models" / "tiny-glm", [POEMS])
    shutil.copytree(POEMS, folder / "data" / "poems")
    return folder


@contextlib.contextmanager
def dev_cluster(work: Path) -> Iterator[Cluster]:
    """Control plane + node agent + operator, all torn down afterwards."""
    if devcluster.missing_binaries():
        raise SystemExit(f"control-plane binaries missing: run {REPO}/devtools/cluster/build.sh")
    plane = devcluster.ControlPlane().start()
    try:
        data = work / "node"
        node = "fedtune-bench-node"
        agent_argv = [
            sys.executable, "-m", "devtools.nodeagent", "run", "--kubeconfig", str(plane.kubeconfig),
            "--data-dir", str(data), "--node-name", node, "--prefix", PREFIX, "--pod-cidr", free_pod_cidr(),
        ]  # fmt: skip
        operator_env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig), "FEDTUNE_WATCH_TIMEOUT": "30"}
        operator_argv = [sys.executable, "-m", "fedtune_operator.main", "--all-namespaces", "--liveness", ""]
        with process(agent_argv, work / "nodeagent.log", cwd=REPO) as agent, \
                process(operator_argv, work / "operator.log", operator_env, cwd=REPO):  # fmt: skip
            cluster = Cluster(plane.kubeconfig, data / "volumes")
            cluster.wait_node_ready(node, agent, work / "nodeagent.log")
            cluster.kubectl("apply", "-f", str(CRD))
            cluster.kubectl("wait", "--for=condition=Established", "crd/federatedfinetunes.fedtune.io")
            yield cluster
    finally:
        plane.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each (default 3)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("the node agent needs root (network and mount namespaces)")

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="fedtune-bench-cluster-") as tmp:
        work = Path(tmp)
        workspace = build_workspace(work / "workspace")
        cluster_times: list[float] = []
        local_times: list[float] = []
        threads = ""
        with dev_cluster(work) as cluster:
            for i in range(args.repeat):
                ns = f"bench-{i}"
                cluster.prepare_namespace(ns, workspace)
                cluster_times.append(cluster.run_job(ns))
                threads = threads or cluster.torch_threads(ns)
                local_times.append(run_local(workspace, work / f"local-{i}"))
                print(f"  run {i + 1}: kubectl apply {cluster_times[-1]:7.1f} s   fedtune run {local_times[-1]:7.1f} s",
                      flush=True)  # fmt: skip
    cluster_median, local_median = statistics.median(cluster_times), statistics.median(local_times)
    print(f"3-party LoRA example ({EXAMPLE.relative_to(REPO)}), wall time to Succeeded, median of {args.repeat}:")
    print(f"  kubectl apply on the dev cluster  {cluster_median:7.1f} s")
    print(f"  fedtune run (local processes)     {local_median:7.1f} s")
    ratio = cluster_median / local_median
    print(f"  ratio cluster / local             {ratio:7.2f}   (goal <= 1.25: {'met' if ratio <= 1.25 else 'NOT met'})")
    # The parties share this machine's cores either way; how many torch threads each runs
    # decides most of the difference (3 parties x every core oversubscribes the CPU).
    local_threads = max(1, (os.cpu_count() or 1) // 3)
    print(f"  torch threads per party: pods {threads}; fedtune run {local_threads} (cores / training parties)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
