"""The operator path's overhead on real containers: the 3-party LoRA example through `kubectl apply`
versus `fedtune run`, plus the image build times.

Both run the very same spec (examples/lora-3party.yaml) over the very same files: a
tiny GLM model built here and the bundled poems, in one workspace folder that is both
`fedtune run --base-dir` and, on the dev cluster, the folder of the `fedtune-workspace`
claim the example mounts.

- baseline: `fedtune run examples/lora-3party.yaml` — every role a local process; wall
  time until it exits with the job Succeeded;
- cluster: the dev cluster (devtools/cluster: control plane and a real node, kubelet and
  containerd) with the chart installed by helm, so the operator runs as its Deployment
  from fedtune/operator and every role as a container from fedtune/trainer: wall time
  from `kubectl apply -f examples/lora-3party.yaml` until the resource's phase is
  Succeeded. This includes everything the operator path adds: the operator's reconcile,
  scheduling, container start, Redis as a pod, DNS, status round trips.

Runs alternate (cluster, baseline, cluster, ...) so that a busy moment on the machine
hits both. Prints the machine, each run, the medians and the ratio cluster / baseline
(goal: at most 1.15). Then the images: `make images` once as it is (warm: nothing
changed) and once after a change to the project's code (a rebuild of the code layers),
with `--cold` first removing them and their stand-in bases (minutes).

    sudo python bench/cluster_job.py               # 3 runs each
    sudo python bench/cluster_job.py --repeat 5 --cold

Needs root, the cluster binaries (devtools/cluster/build.sh) and the images (make images).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import kubectl, machine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # devtools/ is not installed: import it from the checkout

from devtools.cluster.node import DevCluster, project_images  # noqa: E402

EXAMPLE = REPO / "examples" / "lora-3party.yaml"
WORKSPACE_PVC = REPO / "examples" / "k8s" / "workspace-pvc.yaml"
CHART = REPO / "charts" / "fedtune-operator"
POEMS = REPO / "examples" / "data" / "poems"
TIMEOUT_S = 900.0
GOAL = 1.15
TAG = next(line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines()
           if line.startswith("version = "))  # fmt: skip


class Cluster:
    def __init__(self, dev: DevCluster) -> None:
        import kubernetes

        assert dev.node is not None
        self.kubeconfig = dev.plane.kubeconfig
        self.node = dev.node
        client = kubernetes.config.new_client_from_config(str(self.kubeconfig))
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.ApiException = kubernetes.client.exceptions.ApiException

    def kubectl(self, *args: str) -> str:
        return kubectl(self.kubeconfig, *args)

    def install_chart(self, helm: Path) -> None:
        subprocess.run([str(helm), "install", "fedtune", str(CHART), "--kubeconfig", str(self.kubeconfig),
                        "--namespace", "fedtune-system", "--create-namespace", "--wait", "--timeout", "300s"],
                       check=True, capture_output=True)  # fmt: skip

    def phase(self, ns: str, name: str) -> str | None:
        try:
            body = self.custom.get_namespaced_custom_object("fedtune.io", "v1alpha1", ns, "federatedfinetunes", name)
        except self.ApiException as err:
            if err.status == 404:
                return None
            raise
        return (body.get("status") or {}).get("phase")

    def prepare_namespace(self, ns: str, workspace: Path) -> None:
        self.kubectl("create", "namespace", ns)
        deadline = time.monotonic() + 60
        while not self.kubectl("get", "serviceaccount", "-n", ns, "--ignore-not-found", "-o", "name").strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no default ServiceAccount in {ns}")
            time.sleep(0.2)
        self.kubectl("apply", "-n", ns, "-f", str(WORKSPACE_PVC))
        folder = self.node.claim_dir(ns, "fedtune-workspace")
        while not folder.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the workspace claim of {ns} got no volume")
            time.sleep(0.2)
        shutil.copytree(workspace, folder, dirs_exist_ok=True)

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
    from fedtune.model.tiny import build_tiny_model

    build_tiny_model(folder / "models" / "tiny-glm", [POEMS])
    shutil.copytree(POEMS, folder / "data" / "poems")
    return folder


def build_images(label: str) -> None:
    """`make images` (devtools/images/build.sh), timed; prints its per-image lines."""
    env = {**os.environ, "FEDTUNE_VENV": str(Path(sys.executable).parents[1])}
    started = time.perf_counter()
    result = subprocess.run(["bash", str(REPO / "devtools" / "images" / "build.sh"), TAG], env=env,
                            capture_output=True, text=True, check=True)  # fmt: skip
    print(f"  make images, {label}: {time.perf_counter() - started:6.1f} s")
    for line in result.stdout.splitlines():
        print(f"    {line}")


def bench_images(cold: bool) -> None:
    print("image builds:")
    if cold:
        images = [f"fedtune/operator:{TAG}", f"fedtune/trainer:{TAG}", "fedtune-standin/python:3.11-bookworm"]
        images += subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}",
                                  "fedtune-standin/torch"], capture_output=True, text=True, check=True).stdout.split()
        subprocess.run(["docker", "rmi", "--force", *images], capture_output=True, check=False)
        subprocess.run(["docker", "builder", "prune", "--all", "--force"], capture_output=True, check=False)
        build_images("cold (stand-in bases included)")
    build_images("warm, nothing changed")
    marker = REPO / "trainer_image" / "fedtune" / "__init__.py"
    original = marker.read_text()
    try:
        marker.write_text(original + f"# bench {time.time()}\n")
        build_images("after a change to the project's code")
    finally:
        marker.write_text(original)
    build_images("back to the checkout's code")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each (default 3)")
    parser.add_argument("--cold", action="store_true", help="also time a cold image build (removes the images)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("the dev cluster's node needs root")
    helm = Path(os.environ.get("FEDTUNE_CACHE") or Path.home() / ".cache" / "fedtune") / "bin" / "helm"

    print(f"machine: {machine()}")
    bench_images(args.cold)
    with tempfile.TemporaryDirectory(prefix="fedtune-bench-cluster-") as tmp:
        work = Path(tmp)
        workspace = build_workspace(work / "workspace")
        cluster_times: list[float] = []
        local_times: list[float] = []
        started = time.perf_counter()
        with DevCluster(project_images(TAG)) as dev:
            print(f"dev cluster up (images loaded) in {time.perf_counter() - started:.1f} s")
            cluster = Cluster(dev)
            cluster.install_chart(helm)
            for i in range(args.repeat):
                ns = f"bench-{i}"
                cluster.prepare_namespace(ns, workspace)
                cluster_times.append(cluster.run_job(ns))
                local_times.append(run_local(workspace, work / f"local-{i}"))
                print(f"  run {i + 1}: kubectl apply {cluster_times[-1]:7.1f} s   fedtune run {local_times[-1]:7.1f} s",
                      flush=True)  # fmt: skip
    cluster_median, local_median = statistics.median(cluster_times), statistics.median(local_times)
    print(f"3-party LoRA example ({EXAMPLE.relative_to(REPO)}), wall time to Succeeded, median of {args.repeat}:")
    print(f"  kubectl apply on the dev cluster (containers)  {cluster_median:7.1f} s")
    print(f"  fedtune run (local processes)                  {local_median:7.1f} s")
    ratio = cluster_median / local_median
    verdict = "met" if ratio <= GOAL else "NOT met"
    print(f"  ratio cluster / local                          {ratio:7.2f}   (goal <= {GOAL}: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
