"""How fast the operator turns applied FederatedFineTunes into their children.

Against the local control plane (devtools/cluster; started here unless --kubeconfig names
a running one), with the operator running as it does in tests (kopf, subprocess):

- operator: 1, then 50 resources created at once (POSTed as `kubectl apply` would, but
  in-process so no kubectl start-up is timed) -> time until every child of every
  resource exists (Secrets for Redis, the CA and each role's certificate, ConfigMap,
  PVC, 5 Services, NetworkPolicy, 5 pods each for the 3-party example);
- baseline, side by side: exactly those children's manifests POSTed straight to the API
  server from 16 threads (the operator's worker count), no operator in between: what
  the API server itself needs to store them. The ratio is the operator's overhead
  (kopf's watches and queues, the reconcile passes' reads, status and events).

Each run gets a namespace of its own; they are left in place until the end (deleting
hundreds of objects in the background would load the API server during later runs).

Prints the medians and the ratio operator / baseline (the operator's own overhead).

    python bench/operator_reconcile.py                    # 1 and 50 resources, 5 and 3 runs
    python bench/operator_reconcile.py --kubeconfig ~/.kube/dev --counts 1 10 --repeat 3
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from common import kubectl, process

from fedtune_operator.kube import Kube

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # devtools/ is not installed: import it from the checkout

from devtools.cluster import devcluster  # noqa: E402

EXAMPLE = REPO / "examples" / "lora-3party.yaml"
CRD = REPO / "crds" / "federatedfinetune.yaml"
KINDS = ("Pod", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim", "NetworkPolicy")
SELECTOR = "app.kubernetes.io/part-of=fedtune"
# The operator's default thread pool (FEDTUNE_OPERATOR_WORKERS).
WORKERS = 16
METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"


@contextlib.contextmanager
def control_plane(kubeconfig: str | None) -> Iterator[Path]:
    if kubeconfig:
        yield Path(kubeconfig)
        return
    plane = devcluster.ControlPlane().start()
    try:
        yield plane.kubeconfig
    finally:
        plane.stop()


@contextlib.contextmanager
def operator(kubeconfig: Path, log: Path) -> Iterator[None]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "FEDTUNE_WATCH_TIMEOUT": "30"}
    argv = [sys.executable, "-m", "fedtune_operator.main", "--all-namespaces", "--liveness", "",
            "--log-level", "WARNING"]  # fmt: skip
    with process(argv, log, env, grace_s=20):
        yield


class Cluster:
    def __init__(self, kubeconfig: Path) -> None:
        import kubernetes

        self.kubeconfig = kubeconfig
        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=str(kubeconfig), client_configuration=config)
        config.connection_pool_maxsize = 2 * WORKERS
        self.api = kubernetes.client.ApiClient(config)
        self.kube = Kube(self.api)

    def kubectl(self, *args: str) -> str:
        return kubectl(self.kubeconfig, *args)

    def count_children(self, namespace: str) -> int:
        # Metadata only: the poll must not load the API server (or this process) it measures.
        total = 0
        for kind in KINDS:
            items = self.kube.request(
                "GET",
                Kube.path(kind, namespace),
                query={"labelSelector": SELECTOR},
                accept=METADATA_ONLY,
            ).get("items", [])
            total += len(items or [])
        return total

    def wait_for_count(self, namespace: str, count: int, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count_children(namespace) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{namespace}: fewer than {count} children after {timeout:.0f}s")
            time.sleep(0.05)

    def namespace(self, prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.kubectl("create", "namespace", name)
        return name


def jobs(count: int) -> list[dict[str, Any]]:
    base = yaml.safe_load(EXAMPLE.read_text())
    out = []
    for i in range(count):
        doc = copy.deepcopy(base)
        doc["metadata"]["name"] = f"bench-{i}"
        out.append(doc)
    return out


def children_of(doc: dict[str, Any], namespace: str) -> list[dict[str, Any]]:
    """The manifests the operator would create, without ownerReferences (no owner exists)."""
    from fedtune.spec import parse_job
    from fedtune_operator.children import all_children
    from fedtune_operator.jobs import Job

    document = copy.deepcopy(doc)
    document["metadata"]["namespace"] = namespace
    job = Job(doc["metadata"]["name"], namespace, "bench", doc["spec"], parse_job(document))
    manifests = all_children(job, "bench-password")
    for manifest in manifests:
        del manifest["metadata"]["ownerReferences"]
    return manifests


def run_operator(cluster: Cluster, count: int) -> float:
    ns = cluster.namespace("bench-op")
    docs = jobs(count)
    expected = count * len(children_of(docs[0], ns))
    path = f"/apis/fedtune.io/v1alpha1/namespaces/{ns}/federatedfinetunes"
    started = time.perf_counter()
    # Created the way the baseline creates its objects (in-process, in parallel), so the
    # two differ only by what the operator does.
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(lambda doc: cluster.kube.request("POST", path, body=doc), docs))
    cluster.wait_for_count(ns, expected)
    return time.perf_counter() - started


def run_baseline(cluster: Cluster, count: int) -> float:
    """The same children POSTed straight to the API server, as many at once as the operator's workers."""
    ns = cluster.namespace("bench-base")
    manifests = [m for d in jobs(count) for m in children_of(d, ns)]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(cluster.kube.create, manifests))
    cluster.wait_for_count(ns, len(manifests))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", help="use this running cluster instead of starting the local one")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--repeat", type=int, nargs="+", default=None, help="runs per count (default 5 for 1, else 3)")
    args = parser.parse_args(argv)
    repeats = args.repeat or [5 if c == 1 else 3 for c in args.counts]
    if len(repeats) == 1:
        repeats = repeats * len(args.counts)

    with control_plane(args.kubeconfig) as kubeconfig, tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(kubeconfig)
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
        cluster.kubectl("wait", "--for=condition=Established", "crd/federatedfinetunes.fedtune.io", "--timeout=60s")
        rows = []
        with operator(kubeconfig, Path(tmp) / "operator.log"):
            time.sleep(2)  # let kopf list and start its watches
            run_operator(cluster, 1)  # warm-up: imports, connections, first watch events
            for count, repeat in zip(args.counts, repeats):
                op = [run_operator(cluster, count) for _ in range(repeat)]
                base = [run_baseline(cluster, count) for _ in range(repeat)]
                rows.append((count, repeat, statistics.median(op), statistics.median(base)))
                print(f"  {count} resource(s): operator {op}, baseline {base}", file=sys.stderr)

    children = len(children_of(jobs(1)[0], "x"))
    print(f"apply -> all children created ({children} children per resource, 3-party example); medians:")
    print(
        f"{'resources':>9}  {'runs':>4}  {'operator s':>10}  {'baseline s':>10}  {'ratio':>6}  {'per resource ms':>15}"
    )
    for count, repeat, op, base in rows:
        per = 1000 * op / count
        print(f"{count:>9}  {repeat:>4}  {op:>10.3f}  {base:>10.3f}  {op / base:>6.2f}  {per:>15.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
