"""Whole jobs on a real local cluster, as a user runs them: `helm install`, `kubectl apply` -> Succeeded.

The dev cluster (devtools/cluster: control plane + node) runs every pod as a container
from its image with a real kubelet and containerd: the operator as the chart's Deployment
from fedtune/operator, Redis, the scheduler and the parties from their images with the
securityContext the operator writes, the roles finding each other through CoreDNS, the
adapters landing in the output claim (a folder on the node).

Needs root, the binaries of devtools/cluster/build.sh and the images of `make images`.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import signal
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedtune import roles
from support.jobs import EXAMPLE, EXAMPLES, PARTIES, POEMS, REPO, assert_identical_adapters
from support.kube import Api, OperatorProcess, Runner, kubectl_for, unavailable, wait_for

pytestmark = pytest.mark.cluster

CHART = REPO / "charts" / "fedtune-operator"
WORKSPACE_PVC = EXAMPLES / "k8s" / "workspace-pvc.yaml"
TAG = next(line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines()
           if line.startswith("version = "))  # fmt: skip
ROLE_PODS = ("scheduler", "assist-trainer", "node-1", "node-2")
JOB_TIMEOUT_S = 600.0


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    import os

    from devtools.cluster import devcluster
    from devtools.cluster.node import DevCluster, docker_has, project_images

    if os.geteuid() != 0:
        unavailable("the dev cluster's node needs root")
    missing = devcluster.missing_binaries()
    if missing:
        unavailable(f"cluster binaries not built ({', '.join(missing)}); run devtools/cluster/build.sh")
    images = project_images(TAG)
    absent = [source for source in images.values() if shutil.which("docker") is None or not docker_has(source)]
    if absent:
        unavailable(f"images not built ({', '.join(absent)}): run `make images`")
    # FEDTUNE_CLUSTER_DIR: keep the cluster's logs (kubelet, containerd, ...) there, to read after a failure.
    kept = os.environ.get("FEDTUNE_CLUSTER_DIR")
    dev = DevCluster(images, Path(kept) if kept else None).start()
    try:
        yield dev
    finally:
        dev.stop()


@pytest.fixture(scope="module")
def api(cluster) -> Api:
    return Api(cluster.plane.kubeconfig)


@pytest.fixture(scope="module")
def kubectl(cluster) -> Runner:
    return kubectl_for(cluster.plane.kubeconfig)


@pytest.fixture(scope="module")
def operator(cluster, kubectl, helm, api) -> str:
    """The chart, installed as the README says; its operator Deployment runs from fedtune/operator."""
    helm("install", "fedtune", str(CHART), "--kubeconfig", str(cluster.plane.kubeconfig),
         "--namespace", "fedtune-system", "--create-namespace", "--set", "resyncSeconds=2")  # fmt: skip
    wait_for("the operator pod to be ready", lambda: _operator_ready(api), 180, lambda: _describe(api, kubectl,
                                                                                                  "fedtune-system"))
    return "fedtune-system"


def _operator_ready(api: Api) -> bool:
    pods = api.pods("fedtune-system")
    return any(c.get("ready") for p in pods for c in p["status"].get("containerStatuses") or [])


def _describe(api: Api, kubectl: Runner, ns: str, job: str = "") -> str:
    parts = [f"status: {api.status(ns, job)}"] if job else []
    for pod in api.pods(ns):
        states = [(c["name"], c.get("state"), c.get("restartCount")) for c in
                  pod["status"].get("containerStatuses") or []]  # fmt: skip
        waiting = [(c["type"], c.get("reason"), c.get("message")) for c in pod["status"].get("conditions") or []
                   if c.get("status") != "True"]  # fmt: skip
        parts.append(f"pod {pod['metadata']['name']}: {pod['status'].get('phase')} {states} {waiting}")
        logs = kubectl("logs", "-n", ns, pod["metadata"]["name"], "--tail", "15", "--all-containers", check=False)
        parts.append(logs.stdout + logs.stderr)
    events = kubectl("get", "events", "-n", ns, "--sort-by=.lastTimestamp", check=False).stdout.splitlines()
    parts.append("events:\n" + "\n".join(events[-15:]))
    operator = kubectl("logs", "-n", "fedtune-system", "deployment/fedtune-fedtune-operator", "--tail", "25",
                       check=False)  # fmt: skip
    parts.append(f"operator:\n{operator.stdout}{operator.stderr}")
    return "\n".join(parts)


@pytest.fixture
def namespace(kubectl, request) -> Iterator[str]:
    # One per test, named after it (test_a_b_c_d -> a-b-c).
    name = "-".join(request.node.name.removeprefix("test_").split("_")[:3])[:20].strip("-")
    kubectl("create", "namespace", name)
    wait_for(f"the default ServiceAccount of {name}",
             lambda: kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0, 60)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def workspace(cluster, kubectl, tiny_model) -> Callable[[str], Path]:
    """The examples' workspace claim in a namespace, filled with the tiny model and the poems."""

    def make(ns: str) -> Path:
        kubectl("apply", "-n", ns, "-f", str(WORKSPACE_PVC))
        folder = cluster.node.claim_dir(ns, "fedtune-workspace")
        wait_for("the workspace claim's folder", folder.exists, 60)
        shutil.copytree(tiny_model, folder / "models" / "tiny-glm", dirs_exist_ok=True)
        shutil.copytree(POEMS, folder / "data" / "poems", dirs_exist_ok=True)
        return folder

    return make


def outputs(cluster: Any, ns: str, job: str) -> Path:
    """Every party's adapters as one folder: `<party>/` links into that party's own output claim."""
    view = cluster.node.volumes.parent / "outputs" / ns / job
    view.mkdir(parents=True, exist_ok=True)
    for party in PARTIES:
        if not (view / party).is_symlink():
            (view / party).symlink_to(cluster.node.claim_dir(ns, f"{job}-output-{party.replace('_', '-')}") / party)
    return view


def example(path: Path, name: str | None = None, **spec: Any) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    if name:
        doc["metadata"]["name"] = name
    doc["spec"].update(copy.deepcopy(spec))
    return doc


def apply(kubectl: Runner, ns: str, doc: dict[str, Any]) -> None:
    kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc, allow_unicode=True))


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
        time.sleep(0.3)
    raise AssertionError(f"{name} did not reach {phases} in {JOB_TIMEOUT_S:.0f}s\n{describe()}")


def checkpoints(output: Path, party: str) -> list[str]:
    return sorted(p.name for p in (output / party).glob("checkpoint-*"))


def assert_every_round(status: dict[str, Any], rounds_seen: list[str], output: Path, fractions: list[str]) -> None:
    total = len(fractions)
    assert status["round"] == f"{total}/{total}", status
    numbers = [int(r.split("/")[0]) for r in rounds_seen]
    assert numbers == sorted(numbers) and numbers[-1] == total, rounds_seen
    for party in PARTIES:
        assert status["parties"][party]["round"] == total, status["parties"][party]
        assert checkpoints(output, party) == [f"checkpoint-{f}" for f in fractions], party


def containers_of(cluster: Any, ns: str) -> list[dict[str, Any]]:
    """The containers containerd runs for pods of `ns` (running or not)."""
    listed = json.loads(cluster.node.crictl("ps", "--all", "--output", "json",
                                            "--label", f"io.kubernetes.pod.namespace={ns}").stdout)  # fmt: skip
    return listed.get("containers") or []


# What the runtime applied, seen from inside a role's container.
PROBE = (
    "import os\n"
    "status = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines())\n"
    "try:\n    open('/probe', 'w')\n    root = 'writable'\nexcept OSError as error:\n    root = error.errno\n"
    "print(os.getuid(), os.getgid(), root, status['CapEff'].strip(), status['Seccomp'].strip(),"
    " status['NoNewPrivs'].strip())\n"
)


# --- jobs through the operator ------------------------------------------------------------------


def test_lora_example_applied_with_kubectl_succeeds_in_locked_down_containers(
        cluster, operator, api, kubectl, namespace, workspace) -> None:  # fmt: skip
    ns = namespace
    folder = workspace(ns)
    # The example as it ships but for its epochs: at 2 the tiny model trains its five rounds in about a
    # second, too short a window to scrape every role mid-job.
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["trainer"]["num_train_epochs"] = 40
    kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))
    describe = lambda: _describe(api, kubectl, ns, "poems-lora")  # noqa: E731
    seen: dict[str, str] = {}
    scraped: dict[str, str] = {}
    scrape = scrape_when(api, ns, "poems-lora", lambda st: int(st.get("round", "0/5").split("/")[0]) >= 2, scraped)

    def probe(status: dict[str, Any]) -> None:
        scrape(status)
        pod = api.pod(ns, "poems-lora-node-1")
        if seen or not pod or pod["status"].get("phase") != "Running":
            return
        result = kubectl("exec", "-n", ns, "poems-lora-node-1", "--", "python", "-c", PROBE, check=False)
        if result.returncode == 0:
            seen["node-1"] = result.stdout.strip()

    status, rounds = run_to_phase(api, ns, "poems-lora", ("Succeeded",), describe, probe)

    # uid/gid 10001, a read-only root (EROFS = 30), no capabilities, seccomp filtering (2), no new privileges.
    assert seen.get("node-1") == "10001 10001 30 0000000000000000 2 1", seen
    # Mid-job, every role served its metrics (a scrape as Prometheus makes it, at the pod's address).
    failed = {k: v for k, v in scraped.items() if v.startswith("cannot scrape")}
    assert not failed, f"{failed}\n{describe()}"
    assert set(scraped) == {"scheduler", "assist-trainer", "node-1", "node-2"}, sorted(scraped)
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

    output = outputs(cluster, ns, "poems-lora")
    assert status["output"] == "pvc://poems-lora-output-<party>/"
    assert_every_round(status, rounds, output, ["0.2", "0.4", "0.6", "0.8", "1"])
    final = assert_identical_adapters(output, "checkpoint-1")
    assert all("lora_" in key for key in final)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(folder / "models" / "tiny-glm"))
    loaded = PeftModel.from_pretrained(base, str(output / "node-1" / "checkpoint-1"))
    assert len([n for n, _ in loaded.named_parameters() if "lora_" in n]) == len(final)
    # The files the roles wrote are theirs: uid 10001.
    assert (output / "node-1" / "checkpoint-1").stat().st_uid == 10001
    # A finished job holds no running container: the roles exited, and Redis is stopped (the operator deletes
    # its pod once the job has Succeeded; the runtime stops it within the pod's grace period).
    def running() -> list[str]:
        return [c["metadata"]["name"] for c in containers_of(cluster, ns) if c["state"] == "CONTAINER_RUNNING"]

    wait_for("the finished job's containers to stop", lambda: not running(), 60, lambda: f"{running()}\n{describe()}")


def test_ptuning_example_applied_with_kubectl_succeeds(cluster, operator, api, kubectl, namespace, workspace) -> None:
    ns = namespace
    folder = workspace(ns)
    kubectl("apply", "-n", ns, "-f", str(EXAMPLES / "k8s" / "ptuning-3party.yaml"))
    describe = lambda: _describe(api, kubectl, ns, "poems-ptuning")  # noqa: E731
    status, rounds = run_to_phase(api, ns, "poems-ptuning", ("Succeeded",), describe)

    output = outputs(cluster, ns, "poems-ptuning")
    assert_every_round(status, rounds, output, ["0.5", "1"])
    final = assert_identical_adapters(output, "checkpoint-1")
    assert sum(t.numel() for t in final.values()) < 50_000  # the prefix alone

    from fedtune.tools.chat import load_for_chat

    model, _ = load_for_chat(folder / "models" / "tiny-glm", output / "node-2" / "checkpoint-1")
    assert type(model).__name__.startswith("Peft")


def scrape_when(api: Api, ns: str, job: str, ready: Callable[[dict[str, Any]], bool], scraped: dict[str, str]) -> Hook:
    """A `during` hook: once `ready(status)`, read every role pod's /metrics as Prometheus would, each
    until one read answers (the last failure is kept for a role that never answered)."""

    def hook(status: dict[str, Any]) -> None:
        if not ready(status):
            return
        for pod in api.pods(ns):
            name, ip = pod["metadata"]["name"], pod["status"].get("podIP")
            role = name.removeprefix(f"{job}-")
            answered = role in scraped and not scraped[role].startswith("cannot scrape")
            if name != f"{job}-redis" and ip and pod["status"].get("phase") == "Running" and not answered:
                url = f"http://{ip}:{roles.METRICS_PORT}/metrics"
                try:
                    scraped[role] = urllib.request.urlopen(url, timeout=5).read().decode()
                except OSError as err:
                    scraped[role] = f"cannot scrape {url}: {err}"

    return hook


def series(text: str, name: str, **labels: str) -> float:
    """The value of one series in a /metrics page (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def state_saved(output: Path, party: str) -> bool:
    from fedtune.federation.party import STATE_DIR
    from fedtune.train.loop import latest_state

    return latest_state(output / party / STATE_DIR / "trainer") is not None


def delete_pod_when(api: Api, kubectl: Runner, ns: str, pod: str, ready: Callable[[], bool],
                    deleted: list[str]) -> Hook:  # fmt: skip
    """A `during` hook: once `ready()`, delete `pod` (once), recording its uid."""

    def hook(_status: dict[str, Any]) -> None:
        if deleted or not ready():
            return
        live = api.pod(ns, pod)
        assert live is not None and live["status"].get("phase") == "Running", f"{pod} is not running: {live}"
        deleted.append(live["metadata"]["uid"])
        kubectl("delete", "pod", pod, "-n", ns, "--wait=false")

    return hook


def test_label_trainer_scheduler_and_redis_deleted_mid_job(
        cluster, operator, api, kubectl, namespace, workspace) -> None:  # fmt: skip
    """node-1's pod once its first round is saved; then the scheduler's and Redis' together."""
    ns, name = namespace, "poems-restarts"
    workspace(ns)
    apply(kubectl, ns, example(EXAMPLE, name))  # Redis on a claim: the default
    output = outputs(cluster, ns, name)
    party: list[str] = []
    scheduler: list[str] = []
    redis: list[str] = []
    kill_party = delete_pod_when(api, kubectl, ns, f"{name}-node-1", lambda: state_saved(output, "node-1"), party)
    # The new scheduler finds its state in a Redis that has just reloaded it from its append-only file.
    kill_scheduler = delete_pod_when(api, kubectl, ns, f"{name}-scheduler",
                                     lambda: bool(party) and (api.status(ns, name).get("parties") or {})
                                     .get("node-1", {}).get("restarts", 0) >= 1, scheduler)  # fmt: skip
    kill_redis = delete_pod_when(api, kubectl, ns, f"{name}-redis", lambda: bool(scheduler), redis)

    def during(status: dict[str, Any]) -> None:
        kill_party(status)
        kill_scheduler(status)
        kill_redis(status)

    describe = lambda: _describe(api, kubectl, ns, name)  # noqa: E731
    status, rounds = run_to_phase(api, ns, name, ("Succeeded",), describe, during)
    assert party and scheduler and redis, "the job ended before node-1, its scheduler and Redis could be deleted"
    assert status["parties"]["node-1"]["restarts"] >= 1
    assert status["parties"]["node-1"]["podUID"] != party[0]
    assert status["scheduler"]["restarts"] >= 1
    assert_every_round(status, rounds, output, ["0.2", "0.4", "0.6", "0.8", "1"])
    assert_identical_adapters(output, "checkpoint-1")


def test_suspended_mid_job_resumes_from_its_last_round(cluster, operator, api, kubectl, namespace, workspace) -> None:
    """spec.runPolicy.suspend: the role pods go, Redis and the claims stay; resumed, the parties carry on
    from their saved state and the rounds already made."""
    ns, name = namespace, "poems-suspend"
    workspace(ns)
    doc = example(EXAMPLE, name)
    doc["spec"]["trainer"]["num_train_epochs"] = 10  # rounds long enough to suspend between them
    apply(kubectl, ns, doc)
    output = outputs(cluster, ns, name)
    describe = lambda: _describe(api, kubectl, ns, name)  # noqa: E731
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
    logs = kubectl("logs", "-n", ns, f"{name}-node-1", "--tail", "200").stdout
    assert "node-1: resuming from its saved state" in logs, logs
    assert all(rec["restarts"] == 0 for rec in status["parties"].values()), status["parties"]


def test_the_standby_operator_takes_over_when_the_leader_dies(cluster, operator, api, kubectl, namespace, workspace,
                                                              tmp_path) -> None:  # fmt: skip
    """Two replicas with leader election: only the leader reconciles; SIGKILLed mid-job (and a party's pod
    deleted with it), the standby takes the Lease, makes the pod again and sees the job to its end. The
    chart's operator is scaled to zero meanwhile: the replicas run on the node's host, as processes."""
    ns, name = namespace, "poems-ha"
    workspace(ns)
    chart_replicas = kubectl("get", "deployment", "fedtune-fedtune-operator", "-n", operator, "-o",
                             "jsonpath={.spec.replicas}").stdout.strip()
    kubectl("scale", "deployment", "fedtune-fedtune-operator", "-n", operator, "--replicas=0")
    wait_for("the chart's operator pod to go", lambda: not api.pods(operator), 120)
    replicas = {
        who: OperatorProcess(cluster.plane.kubeconfig, tmp_path / f"{who}.log", namespaces=[ns], args=(
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
        output = outputs(cluster, ns, name)
        describe = lambda: _describe(api, kubectl, ns, name) + f"\nstandby:\n{standby.tail()}"  # noqa: E731
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
        kubectl("scale", "deployment", "fedtune-fedtune-operator", "-n", operator, f"--replicas={chart_replicas}")
        wait_for("the chart's operator to be ready again", lambda: _operator_ready(api), 180)


def test_malformed_dataset_fails_naming_the_file(cluster, operator, api, kubectl, namespace, workspace) -> None:
    ns, name = namespace, "poems-malformed"
    folder = workspace(ns)
    (folder / "data" / "broken").mkdir()
    (folder / "data" / "broken" / "part-2.json").write_text('{"instruction": "x", "instances": [', encoding="utf-8")
    doc = example(EXAMPLE, name, backoffLimit=1)
    doc["spec"]["parties"][2]["trainset"] = [{"type": "QA", "path": "data/broken/part-2.json"}]
    apply(kubectl, ns, doc)
    describe = lambda: _describe(api, kubectl, ns, name)  # noqa: E731
    status, _ = run_to_phase(api, ns, name, ("Failed",), describe)

    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "BackoffLimitExceeded", status
    assert "data/broken/part-2.json" in failed["message"], status
    failures = {key: rec["failures"] for key, rec in [("scheduler", status["scheduler"]), *status["parties"].items()]}
    assert max(failures.values()) == 2 and min(failures.values()) >= 0, status


# Connects to each target of its JSON argument, [[HOST:PORT, WAIT], ...]: prints "open",
# "ConnectionRefusedError" or "timeout" (a policy rejects or drops). WAIT: keep trying for a
# while until it opens (what a policy lets through may take the engine a sync to open). Names
# are resolved first, retried too: a pod's first lookups may race the node's rules for it,
# and the lookup is not what is tested.
CONNECT = """
import json, socket, sys, time

def resolve(host):
    deadline = time.monotonic() + 60
    while True:
        try:
            return socket.gethostbyname(host)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)

def connect(address, port):
    try:
        socket.create_connection((address, port), timeout=5).close()
        return "open"
    except socket.timeout:
        return "timeout"
    except OSError as error:
        return type(error).__name__

for target, wait in json.loads(sys.argv[1]):
    host, port = target.rsplit(":", 1)
    address = resolve(host)
    deadline = time.monotonic() + (60 if wait else 0)
    while (seen := connect(address, int(port))) != "open" and time.monotonic() < deadline:
        time.sleep(1)
    print(target, seen, flush=True)
"""


BLOCKED = ("ConnectionRefusedError", "timeout")


def _accepts(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=5).close()
        return True
    except OSError:
        return False


def connects_from(kubectl: Runner, api: Api, ns: str, pod: str, targets: dict[str, bool],
                  labels: dict[str, str] | None = None) -> dict[str, str]:  # fmt: skip
    """Run CONNECT over `targets` (target -> wait until open) from pod `pod` of namespace `ns`, with
    `labels`: the trainer image, locked down like the job's pods. Returns what it saw of each target."""
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "labels": labels or {}}, "spec": {
        "restartPolicy": "Never",
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "probe", "image": f"fedtune/trainer:{TAG}", "imagePullPolicy": "Never",
                        "command": ["python", "-c", CONNECT, json.dumps(list(targets.items()))],
                        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}}],
    }}  # fmt: skip
    apply(kubectl, ns, manifest)
    try:
        wait_for(f"the probe {pod} to finish", lambda: ((api.pod(ns, pod) or {}).get("status") or {})
                 .get("phase") in ("Succeeded", "Failed"), 240, lambda: _describe(api, kubectl, ns))  # fmt: skip
        logs = kubectl("logs", "-n", ns, pod).stdout
    finally:
        kubectl("delete", "pod", pod, "-n", ns, "--wait=false", check=False)
    return dict(line.split(" ", 1) for line in logs.splitlines() if " " in line)


HOLD = "fedtune.io/test-hold"  # a scheduling gate: its pod is not scheduled until the gate is removed


def test_a_running_job_is_closed_to_other_namespaces_and_deleting_it_removes_every_container(
        cluster, operator, api, kubectl, namespace, workspace) -> None:  # fmt: skip
    """The job's NetworkPolicy, enforced by the node's policy engine: a pod in another namespace cannot
    open the job's Redis port or the assist_trainer's gRPC port, while the job runs through to
    Succeeded. The same probe opens those very ports from a pod the policy lets in (one labelled as the
    job's scheduler, in its namespace), and, from the other namespace, a port the policy leaves open to
    all (the roles' metrics) and CoreDNS: so what keeps the outsider out is the policy.

    node-2's pod is held back by a scheduling gate until the probes are done: the other roles wait for
    it with their ports open, so the probes meet a running job however fast it would train."""
    from fedtune_operator.jobs import component_of, labels

    ns, name = namespace, "poems-closed"
    workspace(ns)
    doc = example(EXAMPLE, name)
    doc["spec"]["parties"][2]["scheduling"] = {"podTemplate": {"spec": {"schedulingGates": [{"name": HOLD}]}}}
    assert doc["spec"]["parties"][2]["name"] == "node-2"
    apply(kubectl, ns, doc)
    describe = lambda: _describe(api, kubectl, ns, name)  # noqa: E731
    waiting = {f"{name}-{suffix}" for suffix in ("scheduler", "assist-trainer", "node-1", "redis")}

    def running() -> set[str]:
        return {c["labels"]["io.kubernetes.pod.name"] for c in containers_of(cluster, ns)
                if c["state"] == "CONTAINER_RUNNING"}  # fmt: skip

    wait_for("a running container for every pod of the job but node-2's", lambda: running() == waiting, 180,
             describe)  # fmt: skip
    redis = f"{name}-redis.{ns}.svc.cluster.local:6379"
    grpc = f"{name}-assist-trainer.{ns}.svc.cluster.local:55004"
    # Both ports listen: the node reaches them (the policy engine lets a pod's own node in, as the
    # kubelet's probes need)...
    for pod, port in ((f"{name}-redis", 6379), (f"{name}-assist-trainer", 55004)):
        # The runtime runs the container before the kubelet posts the pod's address.
        wait_for(f"{pod}'s address", lambda p=pod: bool(((api.pod(ns, p) or {}).get("status") or {}).get("podIP")),
                 60, describe)  # fmt: skip
        address = (api.pod(ns, pod) or {})["status"]["podIP"]
        wait_for(f"{pod} to accept connections on {port}", lambda a=address, p=port: _accepts(a, p), 180, describe)
    # ...and so does a pod the policy lets in: one with the labels of the job's scheduler.
    insider = connects_from(kubectl, api, ns, "insider", {redis: True, grpc: True},
                            labels(name, component_of(roles.SCHEDULER)))  # fmt: skip
    assert insider == {redis: "open", grpc: "open"}, f"{insider}\n{describe()}"

    outsiders = f"{ns}-outsider"
    kubectl("create", "namespace", outsiders)
    try:
        wait_for("the outsider namespace's ServiceAccount", lambda: kubectl(
            "get", "serviceaccount", "default", "-n", outsiders, check=False).returncode == 0, 60)  # fmt: skip
        metrics = f"{name}-assist-trainer.{ns}.svc.cluster.local:{roles.METRICS_PORT}"
        dns = "kube-dns.kube-system.svc.cluster.local:53"
        # The open ones first (waiting until they are): then the pod's network is up when the closed ones are tried.
        seen = connects_from(kubectl, api, outsiders, "outsider", {metrics: True, dns: True, redis: False, grpc: False})
        # From another namespace they are refused (the engine rejects) or unanswered (it drops).
        assert seen[metrics] == "open" and seen[dns] == "open", f"{seen}\n{describe()}"
        assert seen[redis] in BLOCKED and seen[grpc] in BLOCKED, f"{seen}\n{describe()}"
    finally:
        kubectl("delete", "namespace", outsiders, "--wait=false", check=False)
    assert running() == waiting, describe()  # the probes met the job running, still waiting for node-2

    kubectl("patch", "pod", f"{name}-node-2", "-n", ns, "--type", "json",
            "-p", json.dumps([{"op": "remove", "path": "/spec/schedulingGates"}]))  # fmt: skip
    status, rounds = run_to_phase(api, ns, name, ("Succeeded",), describe)
    output = outputs(cluster, ns, name)
    assert_every_round(status, rounds, output, ["0.2", "0.4", "0.6", "0.8", "1"])
    assert_identical_adapters(output, "checkpoint-1")
    kubectl("delete", "fft", name, "-n", ns, "--wait=false")
    wait_for("the job's pods to go", lambda: not api.pods(ns), 120, describe)
    wait_for("every container of the job to go", lambda: not containers_of(cluster, ns), 60, describe)


def test_bad_input_an_image_that_cannot_be_pulled_and_an_unwritable_output_claim(
        cluster, operator, api, kubectl, namespace, workspace) -> None:  # fmt: skip
    ns = namespace
    workspace(ns)
    # An image no registry serves: the job says which role waits for which image.
    missing = "127.0.0.1:1/fedtune/trainer:missing"
    apply(kubectl, ns, example(EXAMPLE, "poems-noimage", image=missing))
    # Output claims whose folders the pods' user (10001) cannot write: made before the claims are.
    for party in PARTIES:
        output = cluster.node.claim_dir(ns, f"poems-readonly-output-{party.replace('_', '-')}")
        output.mkdir(parents=True)
        output.chmod(0o755)
    apply(kubectl, ns, example(EXAMPLE, "poems-readonly", backoffLimit=0))

    def image_condition() -> dict[str, Any] | None:
        conditions = api.status(ns, "poems-noimage").get("conditions") or []
        return next((c for c in conditions if c["type"] == "ImagesReady" and c["status"] == "False"
                     and "party `node-1`" in c["message"]), None)  # fmt: skip

    waiting = wait_for("condition ImagesReady False", image_condition, 180,
                       lambda: _describe(api, kubectl, ns, "poems-noimage"))  # fmt: skip
    assert missing in waiting["message"] and "party `node-1`" in waiting["message"], waiting
    status = api.status(ns, "poems-noimage")
    assert status["phase"] == "Pending" and missing in status["message"], status

    status, _ = run_to_phase(api, ns, "poems-readonly", ("Failed",), lambda: _describe(api, kubectl, ns,
                                                                                     "poems-readonly"))  # fmt: skip
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    named = r"\[claim poems-readonly-output-[a-z0-9-]+ \(mounted at /fedtune/output\)\]"
    assert re.search(named, failed["message"]), failed
    assert "/fedtune/output/" in failed["message"].split("]", 1)[1], failed
