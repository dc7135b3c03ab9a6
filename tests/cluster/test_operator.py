"""The operator against a real kube-apiserver (devtools/cluster): chart, CRD, reconcile, status.

The chart is installed with the project's helm; the operator runs as a subprocess
(`python -m fedtune_operator.main`, kopf) with the chart's ServiceAccount token, so every
API call it makes is checked against the chart's RBAC. There is no kubelet: the tests
drive pod phases by patching `pods/status`, as a kubelet would.
"""

from __future__ import annotations

import base64
import copy
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedtune.local.launcher import free_port
from fedtune.spec import parse_job
from support import kube
from support.children import ESCALATIONS, by_kind_name, pod_secrets, set_pod_template
from support.jobs import EXAMPLE, REPO, example_documents
from support.kube import OperatorProcess, wait_for

pytestmark = pytest.mark.cluster

CHART = REPO / "charts" / "fedtune-operator"
RELEASE_NS = "fedtune-system"
RELEASE = "fedtune"
SA = "fedtune-fedtune-operator"
WAIT_S = 60.0  # generous: CI runs on 2 busy cores


# --- cluster plumbing -----------------------------------------------------------------------


class Api(kube.Api):
    """The admin's view, plus what a kubelet would do: this control plane has none."""

    def set_pod_phase(self, ns: str, name: str, phase: str, exit_code: int | None = None, **extra: Any) -> None:
        """What a kubelet would report: phase and, for a finished pod, the container's end."""
        pod = self.pod(ns, name)
        assert pod is not None, f"pod {name} does not exist"
        container = pod["spec"]["containers"][0]
        state: dict[str, Any] = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
        if exit_code is not None:
            state = {"terminated": {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error"}}
            if extra.get("message"):
                state["terminated"]["message"] = extra["message"]
        status = {
            "phase": phase,
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container["image"],
                    "imageID": "",
                    "ready": phase == "Running",
                    "restartCount": 0,
                    "state": state,
                }
            ],
        }
        if "ip" in extra:
            status["podIP"] = extra["ip"]
            status["podIPs"] = [{"ip": extra["ip"]}]
        self.core.patch_namespaced_pod_status(name, ns, {"status": status})


def subset(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Where `actual` differs from `expected`, ignoring what the API server adds (defaults)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected a mapping, got {actual!r}"]
        return [d for k, v in expected.items() for d in subset(v, actual.get(k), f"{path}.{k}")]
    if isinstance(expected, list):
        if path.endswith(".tolerations") and isinstance(actual, list):
            # Admission (DefaultTolerationSeconds) appends the not-ready and unreachable tolerations.
            actual = [t for t in actual if not t.get("key", "").startswith("node.kubernetes.io/")]
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{path}: expected {expected!r}, got {actual!r}"]
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in subset(e, a, f"{path}[{i}]")]
    return [] if expected == actual else [f"{path}: expected {expected!r}, got {actual!r}"]


def token_kubeconfig(path: Path, admin_kubeconfig: Path, token: str) -> Path:
    """A kubeconfig at `path` for the admin's cluster that authenticates with a ServiceAccount's `token`."""
    cluster = yaml.safe_load(Path(admin_kubeconfig).read_text())["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": cluster["name"], "user": "operator"}}],
        "current-context": "operator",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def assert_no_rbac_denial(op: OperatorProcess) -> None:
    """The chart's RBAC grants what the operator uses: none of its calls may be refused."""
    assert not op.denials(), "\n".join(op.denials()[:5])


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(control_plane) -> Api:
    return Api(control_plane.kubeconfig)


@pytest.fixture(scope="module")
def chart(control_plane, kubectl, helm) -> str:
    """`helm install` of the chart (CRDs, RBAC, Deployment) into fedtune-system."""
    result = helm(
        "install", RELEASE, str(CHART),
        "--kubeconfig", str(control_plane.kubeconfig),
        "--namespace", RELEASE_NS, "--create-namespace",
        "--set", "image.repository=fedtune/operator",
        "--wait=false",
    )  # fmt: skip
    assert "STATUS: deployed" in result.stdout, result.stdout
    return RELEASE


@pytest.fixture(scope="module")
def operator_kubeconfig(control_plane, kubectl, chart, tmp_path_factory) -> Path:
    """A kubeconfig for the chart's ServiceAccount: the operator gets the chart's RBAC, no more."""
    token = kubectl("create", "token", SA, "-n", RELEASE_NS, "--duration", "2h").stdout.strip()
    return token_kubeconfig(tmp_path_factory.mktemp("operator") / "kubeconfig", control_plane.kubeconfig, token)


@pytest.fixture(scope="module")
def operator(operator_kubeconfig, tmp_path_factory) -> Iterator[OperatorProcess]:
    op = OperatorProcess(operator_kubeconfig, tmp_path_factory.mktemp("operator-log") / "operator.log",
                         metrics_port=free_port()).start()
    try:
        yield op
    finally:
        op.stop()
        assert_no_rbac_denial(op)


@pytest.fixture
def namespace(api, kubectl) -> Iterator[str]:
    name = f"fft-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false")


def apply(kubectl, ns: str, doc: dict[str, Any], check: bool = True) -> subprocess.CompletedProcess[str]:
    return kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc), check=check)


def live_job(api: Api, ns: str, doc: dict[str, Any]) -> Any:
    from fedtune_operator.jobs import Job

    live = api.job(ns, doc["metadata"]["name"])
    assert live is not None
    document = copy.deepcopy(doc)
    document["metadata"]["namespace"] = ns
    return Job(live["metadata"]["name"], ns, live["metadata"]["uid"], live["spec"], parse_job(document))


def secret_data(api: Api, ns: str, name: str) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (api.core.read_namespaced_secret(name, ns).data or {}).items()}


def live_material(api: Api, ns: str, job: Any) -> Any:
    """The job's CA and certificates as the operator stored them."""
    from fedtune.trust import certs
    from fedtune_operator import tls
    from fedtune_operator.jobs import workloads

    if not tls.enabled(job):
        return None
    ca = secret_data(api, ns, tls.ca_secret_name(job))
    roles = {}
    for w in workloads(job):
        data = secret_data(api, ns, tls.role_secret_name(job, w))
        roles[w.key] = certs.Issued(data["tls.crt"], data["tls.key"])
    return tls.Material(certs.Issued(ca["ca.crt"], ca.get("ca.key", b"")), roles)


def expected_children(api: Api, ns: str, doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """What the resource builders say this resource must become (with its real uid, password, certificates)."""
    from fedtune_operator.children import all_children
    from fedtune_operator.jobs import child_name, hosts_federation

    job = live_job(api, ns, doc)
    password = ""
    if hosts_federation(job.spec):
        password = secret_data(api, ns, child_name(job.name, "redis"))["password"].decode()
    return by_kind_name(all_children(job, password, live_material(api, ns, job)))


def secret_names(api: Api, ns: str, doc: dict[str, Any]) -> set[tuple[str, str]]:
    """The Secrets the operator makes for this resource (the Redis one, the CA, the certificates)."""
    from fedtune_operator.children.secret import secrets

    job = live_job(api, ns, doc)
    return {("Secret", s["metadata"]["name"]) for s in secrets(job, "")}


def wait_for_children(api: Api, ns: str, doc: dict[str, Any], timeout: float = WAIT_S) -> dict:
    name = doc["metadata"]["name"]
    # The Secrets first: the builders need what they hold to say what the rest must be.
    secrets = wait_for("the resource", lambda: api.job(ns, name) and secret_names(api, ns, doc), timeout)
    wait_for(f"the Secrets of {name}", lambda: set(api.children(ns, name)) >= secrets, timeout)
    expected = expected_children(api, ns, doc)
    wait_for(f"every child of {name}", lambda: set(api.children(ns, name)) >= set(expected), timeout)
    return expected


def small_job(name: str, backoff: int = 3) -> dict[str, Any]:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"]["name"] = name
    doc["spec"]["backoffLimit"] = backoff
    return doc


ROLE_PODS = ("scheduler", "assist-trainer", "node-1", "node-2")


# --- tests ----------------------------------------------------------------------------------------


def test_helm_install_establishes_the_crd(chart, kubectl, helm) -> None:
    kubectl("wait", "--for=condition=Established", "crd/federatedfinetunes.fedtune.io", "--timeout=30s")
    names = kubectl("get", "crd", "federatedfinetunes.fedtune.io", "-o", "jsonpath={.spec.names.shortNames}").stdout
    assert "fft" in names
    deployed = kubectl("get", "deployment,serviceaccount", "-n", RELEASE_NS, "-o", "name").stdout.split()
    assert f"deployment.apps/{SA}" in deployed and f"serviceaccount/{SA}" in deployed
    role = kubectl("get", "clusterrole", SA, "-o", "name").stdout.strip()
    assert role == f"clusterrole.rbac.authorization.k8s.io/{SA}"
    lint = helm("lint", str(CHART), "--strict")
    assert "0 chart(s) failed" in lint.stdout


def test_one_replica_holds_the_lease_a_standby_takes_it_when_renewals_stop(operator_kubeconfig, kubectl) -> None:
    """The election itself, with the chart's RBAC: a renewed Lease stays; one left to expire, or released,
    goes to a standby; a leader that finds its Lease taken says so."""
    import threading

    import kubernetes

    from fedtune_operator.kube import Kube
    from fedtune_operator.leader import LeaseElector

    kube = Kube(kubernetes.config.new_client_from_config(str(operator_kubeconfig)), timeout_s=2)
    lease = f"lease-{uuid.uuid4().hex[:6]}"

    def replica(who: str) -> LeaseElector:
        return LeaseElector(kube, RELEASE_NS, lease, who, duration_s=6, renew_s=1, retry_s=0.2)

    def holder() -> str:
        return kubectl("get", "lease", lease, "-n", RELEASE_NS, "-o", "jsonpath={.spec.holderIdentity}").stdout

    first, second, third = replica("a"), replica("b"), replica("c")
    never, first_done = threading.Event(), threading.Event()
    assert first.acquire(never) and holder() == "a"
    first_lost = threading.Event()
    first.keep(first_lost.set, first_done)
    stop_second, got = threading.Event(), []
    waiting = threading.Thread(target=lambda: got.append(second.acquire(stop_second)))
    waiting.start()
    try:
        time.sleep(8)  # longer than the Lease: renewed, it stays with `a`
        assert not got and holder() == "a" and not first_lost.is_set()
        first_done.set()  # `a` stops renewing, as a killed replica would
        wait_for("b to take the Lease", lambda: got == [True], 30)
        assert holder() == "b"
        again = threading.Event()
        first.keep(first_lost.set, again)  # `a` comes back believing it leads: it learns otherwise
        wait_for("a to learn it lost the Lease", first_lost.is_set, 10)
        again.set()
        second.release()  # a clean stop hands over at once
        assert third.acquire(never) and holder() == "c"
    finally:
        stop_second.set()
        waiting.join(10)


def test_the_clusters_view_and_edit_roles_cover_jobs(chart, kubectl, namespace) -> None:
    """The chart's aggregated ClusterRoles: `view` reads jobs, `edit` also writes them."""
    for role in ("view", "edit"):
        kubectl("create", "serviceaccount", role, "-n", namespace)
        kubectl("create", "rolebinding", role, "-n", namespace, f"--clusterrole={role}",
                f"--serviceaccount={namespace}:{role}")

    def can(role: str, verb: str) -> bool:
        user = f"--as=system:serviceaccount:{namespace}:{role}"
        return kubectl("auth", "can-i", verb, "federatedfinetunes.fedtune.io", "-n", namespace, user,
                       check=False).stdout.strip() == "yes"

    # The aggregation controller fills `view` and `edit` in shortly after the chart's roles appear.
    wait_for("view to read jobs", lambda: can("view", "list") and can("edit", "create"))
    assert can("view", "get") and not can("view", "create") and not can("view", "delete")
    assert can("edit", "delete") and can("edit", "patch")


def create_ca_secret(api: Api, ns: str, name: str) -> Any:
    """A federation CA the user brings (spec.tls.caSecret), as `kubectl create secret generic` makes it."""
    from fedtune.trust import certs

    ca = certs.make_ca("federation")
    data = {"ca.crt": base64.b64encode(ca.cert_pem).decode(), "ca.key": base64.b64encode(ca.key_pem).decode()}
    api.core.create_namespaced_secret(ns, {"metadata": {"name": name}, "data": data})
    return ca


def assert_certificates_chain_to(api: Api, ns: str, doc: dict[str, Any], ca_pem: bytes) -> None:
    from cryptography import x509

    from fedtune.trust import certs
    from fedtune_operator import tls
    from fedtune_operator.jobs import workloads

    job = live_job(api, ns, doc)
    ca = x509.load_pem_x509_certificate(ca_pem)
    for w in workloads(job):
        data = secret_data(api, ns, tls.role_secret_name(job, w))
        assert data["ca.crt"] == ca_pem
        x509.load_pem_x509_certificate(data["tls.crt"]).verify_directly_issued_by(ca)
        assert certs.names(data["tls.crt"])[0] == w.key  # the common name


@pytest.mark.parametrize(("source", "doc"), example_documents(), ids=[s for s, _ in example_documents()])
def test_each_example_becomes_exactly_its_children(operator, api, kubectl, namespace, source, doc) -> None:
    user_ca = None
    if (doc["spec"].get("tls") or {}).get("caSecret"):  # the cross-silo example names the federation's CA
        user_ca = create_ca_secret(api, namespace, doc["spec"]["tls"]["caSecret"])
    apply(kubectl, namespace, doc)
    name = doc["metadata"]["name"]
    expected = wait_for_children(api, namespace, doc)
    live = api.children(namespace, name)
    assert set(live) == set(expected), f"{source}: unexpected children {set(live) ^ set(expected)}"
    for key, manifest in expected.items():
        diffs = subset({k: manifest[k] for k in manifest if k not in ("apiVersion", "kind")}, live[key])
        assert not diffs, f"{source}: {key} differs from the builders' manifest:\n" + "\n".join(diffs)
    ca_pem = user_ca.cert_pem if user_ca else secret_data(api, namespace, f"{name}-ca")["ca.crt"]
    assert_certificates_chain_to(api, namespace, doc, ca_pem)
    status = wait_for("status", lambda: api.status(namespace, name).get("phase"))
    assert status == "Pending"
    st = api.status(namespace, name)
    parse = parse_job({**doc, "metadata": {"name": name}})
    assert st["round"] == f"0/{len(parse.spec.fractions())}"
    assert st["output"].startswith("pvc://")
    columns = kubectl("get", "fft", name, "-n", namespace).stdout
    assert "PHASE" in columns and "ROUND" in columns and "LOSS" in columns and "Pending" in columns


INVALID = [
    ("agg_steps", lambda s: s["aggregation"].update(agg_steps=1.5), "spec.aggregation.agg_steps"),
    ("agg_steps-zero", lambda s: s["aggregation"].update(agg_steps=0), "spec.aggregation.agg_steps"),
    (
        "dh-bits",
        lambda s: s.update(encryption={"otp": {"key_exchange": {"key_bitlength": 1024}}}),
        "spec.encryption.otp.key_exchange.key_bitlength",
    ),
    ("otp-bits", lambda s: s.update(encryption={"otp": {"key_bitlength": 96}}), "spec.encryption.otp.key_bitlength"),
    ("role", lambda s: s["parties"][1].update(role="boss"), "spec.parties[1].role"),
    ("gpu", lambda s: s["parties"][2].update(resources={"gpu": -1}), "spec.parties[2].resources.gpu"),
    ("unknown-key", lambda s: s["aggregation"].update(agg_step=0.5), 'unknown field "spec.aggregation.agg_step"'),
    ("no-peft", lambda s: s.pop("peft"), "spec.peft"),
    ("two-adapters", lambda s: s["peft"].update(PREFIX_TUNING={"pre_seq_len": 8}), "spec.peft"),
    ("two-assist", lambda s: s["parties"][1].update(role="assist_trainer"), "spec.parties"),
    ("one-party", lambda s: s.update(parties=s["parties"][:1]), "spec.parties"),
    ("lr", lambda s: s["trainer"].update(learning_rate=-1), "spec.trainer.learning_rate"),
    ("reserved-party", lambda s: s["parties"][1].update(name="scheduler"), "spec.parties"),
    # Kubernetes types carry their own schema (fedtune_operator.kubeschema).
    ("toleration", lambda s: s.update(scheduling={"tolerations": [{"key": "nvidia.com/gpu", "effect": "NoSchedul"}]}),
     "spec.scheduling.tolerations[0].effect"),
    ("affinity", lambda s: s["parties"][1].update(scheduling={"affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {}}}}),
     "spec.parties[1].scheduling.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms"),
    ("pod-template", lambda s: s.update(scheduling={"podTemplate": {"spec": {"containers": [{"image": "x"}]}}}),
     "spec.scheduling.podTemplate.spec.containers[0].name"),
]


def _assert_rejected(kubectl: Any, name: str, mutate: Any, field: str) -> None:
    doc = small_job(name)
    mutate(doc["spec"])
    result = apply(kubectl, "default", doc, check=False)
    assert result.returncode != 0, f"{name}: accepted\n{result.stdout}"
    assert field in result.stderr, f"{name}: the error does not name {field}:\n{result.stderr}"


@pytest.mark.parametrize(("case", "mutate", "field"), INVALID, ids=[c for c, _, _ in INVALID])
def test_invalid_specs_are_rejected_by_the_api_server(chart, kubectl, case, mutate, field) -> None:
    _assert_rejected(kubectl, f"bad-{case}", mutate, field)


@pytest.mark.parametrize(("case", "where", "overlay", "field"), ESCALATIONS, ids=[c for c, *_ in ESCALATIONS])
def test_a_pod_template_that_would_escalate_is_rejected_by_the_api_server(chart, kubectl, case, where, overlay,
                                                                           field) -> None:  # fmt: skip
    _assert_rejected(kubectl, f"escalate-{case.lower()}", lambda spec: set_pod_template(spec, where, overlay), field)


def test_spec_is_immutable_once_applied(operator, api, kubectl, namespace) -> None:
    doc = small_job("fixed")
    apply(kubectl, namespace, doc)
    doc["spec"]["backoffLimit"] = 7
    result = apply(kubectl, namespace, doc, check=False)
    assert result.returncode != 0 and "immutable" in result.stderr
    doc["spec"]["backoffLimit"] = 3
    doc["spec"]["scheduling"] = {"labels": {"team": "a"}}  # not there before: adding it is a change too
    result = apply(kubectl, namespace, doc, check=False)
    assert result.returncode != 0 and "immutable" in result.stderr


def test_a_pod_the_api_refuses_fails_the_job_naming_the_field(operator, api, kubectl, namespace) -> None:
    """The CRD takes any string map as labels; the Pod API does not: the job fails saying why, once."""
    doc = small_job("badlabel")
    doc["spec"]["parties"][1]["scheduling"] = {"labels": {"team": "not a label value!"}}
    apply(kubectl, namespace, doc)
    wait_for("phase Failed", lambda: api.status(namespace, "badlabel").get("phase") == "Failed", describe=operator.tail)
    failed = next(c for c in api.status(namespace, "badlabel")["conditions"] if c["type"] == "Failed")
    assert "metadata.labels" in failed["message"] and "not a label value!" in failed["message"], failed
    assert "badlabel-node-1" not in {p["metadata"]["name"] for p in api.pods(namespace)}


def test_a_settled_job_is_not_written_again(operator, api, kubectl, namespace) -> None:
    """The status is written only when it changes (the operator resyncs every second here), carries the
    generation it was decided from, and a key that no longer holds goes (a merge patch kept it)."""
    doc = small_job("settled")
    doc["spec"]["runPolicy"] = {"activeDeadlineSeconds": 3600}
    apply(kubectl, namespace, doc)
    wait_for_children(api, namespace, doc)
    for suffix in ("redis", *ROLE_PODS):
        api.set_pod_phase(namespace, f"settled-{suffix}", "Running")
    wait_for("phase Running", lambda: api.status(namespace, "settled").get("phase") == "Running")
    time.sleep(3)  # the passes the pod updates started are done
    version = api.job(namespace, "settled")["metadata"]["resourceVersion"]
    time.sleep(5)  # five resyncs
    assert api.job(namespace, "settled")["metadata"]["resourceVersion"] == version, operator.tail()
    status = api.status(namespace, "settled")
    assert status["observedGeneration"] == 1 and {c.get("observedGeneration") for c in status["conditions"]} == {1}
    kubectl("patch", "fft", "settled", "-n", namespace, "--type", "merge",
            "-p", '{"spec": {"runPolicy": {"activeDeadlineSeconds": 3600, "suspend": true}}}')
    wait_for("Suspended, startTime gone", lambda: (st := api.status(namespace, "settled")).get("phase") == "Suspended"
             and "startTime" not in st and st["observedGeneration"] == 2)


def test_pod_phases_drive_the_resource_to_succeeded(operator, api, kubectl, namespace) -> None:
    doc = small_job("runs")
    apply(kubectl, namespace, doc)
    wait_for_children(api, namespace, doc)
    api.set_pod_phase(namespace, "runs-redis", "Running")
    api.set_pod_phase(namespace, "runs-node-1", "Running")
    wait_for("phase Running", lambda: api.status(namespace, "runs").get("phase") == "Running")
    st = api.status(namespace, "runs")
    assert st["parties"]["node-1"]["state"] == "Running" and st["startTime"]
    running = next(c for c in st["conditions"] if c["type"] == "Running")
    assert running["status"] == "True"
    for suffix in ROLE_PODS:
        api.set_pod_phase(namespace, f"runs-{suffix}", "Running")
    for suffix in ROLE_PODS:
        api.set_pod_phase(namespace, f"runs-{suffix}", "Succeeded", exit_code=0)
    wait_for("phase Succeeded", lambda: api.status(namespace, "runs").get("phase") == "Succeeded")
    st = api.status(namespace, "runs")
    assert any(c["type"] == "Succeeded" and c["status"] == "True" for c in st["conditions"])
    assert st["completionTime"] and st["output"] == "pvc://runs-output-<party>/"
    assert st["parties"]["node-1"]["output"] == "pvc://runs-output-node-1/node-1/"
    # Redis is stopped once the job is done; finished pods stay for `kubectl logs`.
    wait_for("redis stopped", lambda: api.pod(namespace, "runs-redis") is None)
    assert all(api.pod(namespace, f"runs-{s}") for s in ROLE_PODS)
    events = kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=runs").stdout
    assert "Succeeded" in events


def test_the_operator_counts_its_passes_and_jobs_by_phase(operator, api, kubectl, namespace) -> None:
    doc = small_job("counted")
    apply(kubectl, namespace, doc)
    wait_for_children(api, namespace, doc)
    api.set_pod_phase(namespace, "counted-redis", "Running")  # first: a finished job stops Redis
    for suffix in ROLE_PODS:
        api.set_pod_phase(namespace, f"counted-{suffix}", "Succeeded", exit_code=0)
    wait_for("Succeeded", lambda: api.status(namespace, "counted").get("phase") == "Succeeded")

    def scrape() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5).read().decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    found = wait_for("the job counted as Succeeded", lambda: (m := scrape()).get(
        'fedtune_operator_jobs{phase="Succeeded"}', 0) >= 1 and m)
    assert found['fedtune_operator_reconciles_total{result="ok"}'] > 0
    assert found["fedtune_operator_reconcile_duration_seconds_count"] > 0


def test_run_policy_deadline_then_ttl(operator, api, kubectl, namespace) -> None:
    """activeDeadlineSeconds fails a job that runs too long and stops its pods; ttlSecondsAfterFinished
    then deletes its pods and Services, and keeps the resource (where the adapters are) and the claims."""
    doc = small_job("bounded")
    doc["spec"]["runPolicy"] = {"activeDeadlineSeconds": 2, "ttlSecondsAfterFinished": 3}
    apply(kubectl, namespace, doc)
    wait_for_children(api, namespace, doc)
    for suffix in (*ROLE_PODS, "redis"):
        api.set_pod_phase(namespace, f"bounded-{suffix}", "Running")
    wait_for("Failed", lambda: api.status(namespace, "bounded").get("phase") == "Failed", describe=operator.tail)
    failed = condition(api.status(namespace, "bounded"), "Failed")
    assert failed["reason"] == "DeadlineExceeded" and "activeDeadlineSeconds (2 s)" in failed["message"]
    wait_for("the pods to be stopped", lambda: all(p["metadata"].get("deletionTimestamp") or not
                                                   p["metadata"]["name"].startswith("bounded-")
                                                   for p in api.pods(namespace)))
    # Without a kubelet a deleted pod stays, marked for deletion.
    kinds = lambda: {kind for (kind, _), obj in api.children(namespace, "bounded").items()  # noqa: E731
                     if not obj["metadata"].get("deletionTimestamp")}
    wait_for("the pods and Services deleted after its TTL", lambda: not {"Pod", "Service"} & kinds(), 30,
             describe=operator.tail)
    assert "PersistentVolumeClaim" in kinds()
    released = condition(api.status(namespace, "bounded"), "Released")
    assert released["reason"] == "TTLExpired" and "the adapters stay" in released["message"]


def test_spec_run_policy_alone_may_change(operator, api, kubectl, namespace) -> None:
    doc = small_job("pausable")
    apply(kubectl, namespace, doc)
    wait_for_children(api, namespace, doc)
    patch = '{"spec": {"runPolicy": {"suspend": true}}}'
    kubectl("patch", "fft", "pausable", "-n", namespace, "--type", "merge", "-p", patch)
    wait_for("Suspended", lambda: api.status(namespace, "pausable").get("phase") == "Suspended")
    # The role pods go (the status says Suspended first, then they are deleted); Redis keeps the state.
    wait_for("the role pods deleted", lambda: not [p for p in api.pods(namespace) if not p["metadata"].get(
        "deletionTimestamp") and p["metadata"]["name"] != "pausable-redis"])
    assert api.pod(namespace, "pausable-redis") is not None
    kubectl("patch", "fft", "pausable", "-n", namespace, "--type", "merge",
            "-p", '{"spec": {"runPolicy": {"suspend": false}}}')
    wait_for("Resumed", lambda: condition(api.status(namespace, "pausable"), "Suspended").get("reason") == "Resumed")
    # Anything else is fixed, an added field included.
    result = kubectl("patch", "fft", "pausable", "-n", namespace, "--type", "merge",
                     "-p", '{"spec": {"trainer": {"seed": 7}}}', check=False)
    assert result.returncode != 0 and "immutable but for runPolicy" in result.stderr


def test_a_failing_party_is_retried_then_fails_the_job_with_its_reason(operator, api, kubectl, namespace) -> None:
    doc = small_job("flaky", backoff=1)
    apply(kubectl, namespace, doc)
    wait_for_children(api, namespace, doc)
    for suffix in ("redis", *ROLE_PODS):
        api.set_pod_phase(namespace, f"flaky-{suffix}", "Running")
    wait_for("phase Running", lambda: api.status(namespace, "flaky").get("phase") == "Running")

    first_uid = api.pod(namespace, "flaky-node-1")["metadata"]["uid"]
    api.set_pod_phase(namespace, "flaky-node-1", "Failed", exit_code=2, message="data/poems/part-1.json: line 3")

    def recreated() -> bool:
        pod = api.pod(namespace, "flaky-node-1")
        return pod is not None and pod["metadata"]["uid"] != first_uid

    wait_for("node-1 recreated after its first failure", recreated)
    st = wait_for("restart counted", lambda: api.status(namespace, "flaky")["parties"]["node-1"].get("restarts") == 1)
    st = api.status(namespace, "flaky")
    assert st["parties"]["node-1"]["failures"] == 1 and st["phase"] != "Failed"

    api.set_pod_phase(namespace, "flaky-node-1", "Failed", exit_code=2, message="data/poems/part-1.json: line 3")
    wait_for("phase Failed", lambda: api.status(namespace, "flaky").get("phase") == "Failed")
    st = api.status(namespace, "flaky")
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "BackoffLimitExceeded"
    for needle in ("node-1", "exit code 2", "data/poems/part-1.json: line 3", "backoffLimit 1"):
        assert needle in failed["message"], failed["message"]
    # The others are stopped; the failed pod stays for its logs and is not run again.
    wait_for("others stopped", lambda: api.pod(namespace, "flaky-node-2") is None)
    assert api.pod(namespace, "flaky-node-1")["status"]["phase"] == "Failed"
    time.sleep(1.5)  # a resync later, still nothing recreated
    assert api.pod(namespace, "flaky-node-2") is None and api.pod(namespace, "flaky-redis") is None


def test_pods_are_locked_down_and_read_only_their_own_secrets(operator, api, kubectl, namespace) -> None:
    doc = small_job("locked")
    apply(kubectl, namespace, doc)
    wait_for_children(api, namespace, doc)
    live = api.children(namespace, "locked")
    password = secret_data(api, namespace, "locked-redis")["password"].decode()
    own = {
        "locked-redis": {"locked-redis"},  # its redis.conf
        "locked-scheduler": {"locked-tls-scheduler", "locked-redis"},
        "locked-assist-trainer": {"locked-tls-assist-trainer", "locked-redis"},
        "locked-node-1": {"locked-tls-node-1"},  # a label_trainer never talks to Redis
        "locked-node-2": {"locked-tls-node-2"},
    }
    pods = {name: obj for (kind, name), obj in live.items() if kind == "Pod"}
    assert set(pods) == set(own)
    for name, pod in pods.items():
        spec = pod["spec"]
        assert pod_secrets(pod) == own[name], name
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] >= 10000
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        (container,) = spec["containers"]
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True, name
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and container["resources"]["limits"]
        stated = [*(container.get("command") or []), *(container.get("args") or [])]
        stated += [e.get("value") or "" for e in container.get("env") or []]
        assert not any(password in v for v in stated), f"{name} states the Redis password"
    redis = pods["locked-redis"]["spec"]["containers"][0]
    assert redis["command"] == ["redis-server", "/etc/redis/redis.conf"] and not redis.get("env")
    assert f"requirepass {password}" in secret_data(api, namespace, "locked-redis")["redis.conf"].decode()
    # The TLS Secret is mounted read-only where FEDTUNE_TLS_DIR says.
    node1 = pods["locked-node-1"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in node1["env"]}
    assert {"name": "tls", "mountPath": env["FEDTUNE_TLS_DIR"], "readOnly": True} in node1["volumeMounts"]


def test_network_policy_selects_the_jobs_pods_and_admits_redis_clients_only(operator, api, kubectl, namespace):
    doc = small_job("fenced")
    apply(kubectl, namespace, doc)
    wait_for_children(api, namespace, doc)
    policy = api.client.sanitize_for_serialization(
        api.networking.read_namespaced_network_policy("fenced-network", namespace)
    )
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]

    def selected(selector: dict[str, Any]) -> set[str]:
        terms = [f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items()]
        terms += [f"{e['key']} in ({','.join(e['values'])})" for e in selector.get("matchExpressions") or []]
        return {p.metadata.name for p in api.core.list_namespaced_pod(namespace, label_selector=",".join(terms)).items}

    everyone = {f"fenced-{s}" for s in ("redis", *ROLE_PODS)}
    assert selected(spec["podSelector"]) == everyone
    redis, grpc, _metrics = spec["ingress"]
    assert [p["port"] for p in redis["ports"]] == [6379]
    (clients,) = redis["from"]  # the operator runs outside the cluster here: no rule for its pod
    assert selected(clients["podSelector"]) == {"fenced-scheduler", "fenced-assist-trainer"}
    assert sorted(p["port"] for p in grpc["ports"]) == [55004, 55005]
    (peers,) = grpc["from"]
    assert selected(peers["podSelector"]) == everyone
    # Deleted, it is made again.
    kubectl("delete", "networkpolicy", "fenced-network", "-n", namespace)
    wait_for("policy recreated", lambda: ("NetworkPolicy", "fenced-network") in api.children(namespace, "fenced"))


def events_of(api: Api, ns: str, name: str, reason: str) -> list[str]:
    """`TYPE message` of each Event with this reason on the resource."""
    selector = f"involvedObject.name={name},reason={reason}"
    return [f"{e.type} {e.message}" for e in api.core.list_namespaced_event(ns, field_selector=selector).items]


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def test_tls_turned_off_is_a_warning_and_a_condition(operator, api, kubectl, namespace) -> None:
    doc = small_job("clear")
    doc["spec"]["tls"] = {"enabled": False}
    apply(kubectl, namespace, doc)
    expected = wait_for_children(api, namespace, doc)
    assert [n for k, n in expected if k == "Secret"] == ["clear-redis"]
    tls_off = wait_for("TLS condition", lambda: condition(api.status(namespace, "clear"), "TLS"))
    assert tls_off["status"] == "False" and tls_off["reason"] == "TLSDisabled"
    assert "in the clear" in tls_off["message"]
    warnings = wait_for("the warning", lambda: events_of(api, namespace, "clear", "TLSDisabled"))
    assert warnings[0].startswith("Warning ") and "spec.tls.enabled is false" in warnings[0]
    time.sleep(2)  # resyncs later: still one warning
    assert len(events_of(api, namespace, "clear", "TLSDisabled")) == 1
    assert all(p["kind"] != "Pod" or "tls" not in str(p["spec"]["volumes"]) for p in expected.values())


def test_tls_on_by_default_says_where_certificates_come_from(operator, api, kubectl, namespace) -> None:
    doc = small_job("secure")
    apply(kubectl, namespace, doc)
    wait_for_children(api, namespace, doc)
    tls_on = wait_for("TLS condition", lambda: condition(api.status(namespace, "secure"), "TLS"))
    assert tls_on["status"] == "True" and "secure-ca" in tls_on["message"]
    assert not events_of(api, namespace, "secure", "TLSDisabled")


def test_a_named_ca_secret_is_waited_for_then_used(operator, api, kubectl, namespace) -> None:
    doc = small_job("fedca")
    doc["spec"]["tls"] = {"caSecret": "federation-ca"}
    apply(kubectl, namespace, doc)
    waiting = wait_for(
        "CAUnavailable",
        lambda: (
            condition(api.status(namespace, "fedca"), "TLS").get("reason") == "CAUnavailable"
            and api.status(namespace, "fedca")
        ),
    )
    assert waiting["phase"] == "Pending" and "federation-ca" in waiting["message"]
    assert not [k for k in api.children(namespace, "fedca") if k[0] == "Pod"]  # nothing runs without certificates
    assert events_of(api, namespace, "fedca", "CAUnavailable")
    ca = create_ca_secret(api, namespace, "federation-ca")
    expected = wait_for_children(api, namespace, doc)
    assert ("Secret", "fedca-ca") not in expected
    assert_certificates_chain_to(api, namespace, doc, ca.cert_pem)
    wait_for("TLS condition True", lambda: condition(api.status(namespace, "fedca"), "TLS").get("status") == "True")
    # The user's CA Secret is theirs: no owner reference was added to it.
    assert not api.core.read_namespaced_secret("federation-ca", namespace).metadata.owner_references


def test_a_missing_storage_class_is_waited_for_then_used(operator, api, kubectl, namespace) -> None:
    storage_class = f"fast-{namespace}"
    doc = small_job("fastdisk")
    doc["spec"]["storage"]["output"] = {"storageClassName": storage_class, "size": "2Gi"}
    apply(kubectl, namespace, doc)
    waiting = wait_for("StorageClassNotFound", lambda: condition(api.status(namespace, "fastdisk"), "Storage").get(
        "reason") == "StorageClassNotFound" and api.status(namespace, "fastdisk"), describe=operator.tail)
    assert waiting["phase"] == "Pending"
    assert f"spec.storage.output.storageClassName `{storage_class}`" in waiting["message"]
    assert events_of(api, namespace, "fastdisk", "StorageClassNotFound")
    children = api.children(namespace, "fastdisk")
    assert not [k for k in children if k[0] == "Pod"]  # nothing starts on claims that cannot bind
    claim = children[("PersistentVolumeClaim", "fastdisk-output-node-1")]
    assert claim["spec"]["storageClassName"] == storage_class
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    kubectl("create", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": storage_class},
        "provisioner": "example.com/none"}))
    try:
        wait_for_children(api, namespace, doc)
        found = wait_for("Storage True", lambda: condition(api.status(namespace, "fastdisk"), "Storage").get(
            "status") == "True" and condition(api.status(namespace, "fastdisk"), "Storage"))
        assert storage_class in found["message"]
    finally:
        kubectl("delete", "storageclass", storage_class)


def test_a_guest_organisation_runs_only_its_own_parties(operator, api, kubectl, namespace) -> None:
    """The assist_trainer, and with it the scheduler and Redis, run at another organisation."""
    doc = small_job("guest")
    spec = doc["spec"]
    spec["parties"][0]["remote"] = {"address": "fedtune.host.example:55004"}
    spec["parties"][1]["remote"] = {"address": "fedtune.bank-a.example:55006"}
    spec["scheduler"] = {"address": "fedtune.host.example:55005"}
    spec["tls"] = {"caSecret": "federation-ca"}
    create_ca_secret(api, namespace, "federation-ca")
    apply(kubectl, namespace, doc)
    expected = wait_for_children(api, namespace, doc)
    assert set(expected) == {
        ("ConfigMap", "guest-job"), ("Secret", "guest-tls-node-2"), ("PersistentVolumeClaim", "guest-output-node-2"),
        ("Service", "guest-node-2"), ("Pod", "guest-node-2"), ("NetworkPolicy", "guest-network"),
    }  # fmt: skip
    assert set(api.children(namespace, "guest")) == set(expected)
    st = wait_for("status", lambda: (s := api.status(namespace, "guest")).get("phase") and s)
    assert st["phase"] == "Pending" and "scheduler" not in st and set(st["parties"]) == {"node-2"}
    api.set_pod_phase(namespace, "guest-node-2", "Running")
    wait_for("Running", lambda: api.status(namespace, "guest").get("phase") == "Running")
    api.set_pod_phase(namespace, "guest-node-2", "Succeeded", exit_code=0)
    wait_for("Succeeded", lambda: api.status(namespace, "guest").get("phase") == "Succeeded")


def test_deleted_children_are_recreated(operator, api, kubectl, namespace) -> None:
    doc = small_job("again")
    apply(kubectl, namespace, doc)
    wait_for_children(api, namespace, doc)
    api.set_pod_phase(namespace, "again-scheduler", "Running")
    wait_for("phase Running", lambda: api.status(namespace, "again").get("phase") == "Running")
    uid = api.pod(namespace, "again-scheduler")["metadata"]["uid"]
    kubectl("delete", "pod", "again-scheduler", "-n", namespace)
    wait_for(
        "scheduler recreated",
        lambda: (p := api.pod(namespace, "again-scheduler")) is not None and p["metadata"]["uid"] != uid,
    )
    st = wait_for("restart counted", lambda: api.status(namespace, "again")["scheduler"].get("restarts") == 1)
    assert api.status(namespace, "again")["scheduler"]["failures"] == 0 and st
    # Static children too: a deleted Service or ConfigMap is made again.
    kubectl("delete", "service", "again-node-1", "-n", namespace)
    kubectl("delete", "configmap", "again-job", "-n", namespace)
    wait_for(
        "service and configmap recreated",
        lambda: {("Service", "again-node-1"), ("ConfigMap", "again-job")} <= set(api.children(namespace, "again")),
    )


def test_progress_is_mirrored_from_the_jobs_redis(operator, api, kubectl, namespace, tmp_path) -> None:
    """A real redis-server stands in for the Redis pod (at the 127/8 address its status names)."""
    import base64
    import random
    import shutil

    from fedtune.federation.jobstate import JobState

    redis_server = shutil.which("redis-server")
    if redis_server is None:
        pytest.skip("redis-server is not installed")
    doc = small_job("tracked")
    apply(kubectl, namespace, doc)
    wait_for_children(api, namespace, doc)
    secret = api.core.read_namespaced_secret("tracked-redis", namespace)
    password = base64.b64decode(secret.data["password"]).decode()
    host = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    conf = tmp_path / "redis.conf"
    conf.write_text(f'bind {host}\nport 6379\nrequirepass {password}\nsave ""\nappendonly no\ndir {tmp_path}\n')
    proc = subprocess.Popen([redis_server, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        state = wait_for("redis up", lambda: _connect(JobState, host, password))
        state.init(5, {"assist_trainer": "assist_trainer", "node-1": "label_trainer", "node-2": "label_trainer"})
        state.put_global(3, b"adapter")
        state.update_party("node-1", round=3, step=30, loss=0.75)
        api.set_pod_phase(namespace, "tracked-redis", "Running", ip=host)
        api.set_pod_phase(namespace, "tracked-node-1", "Running")
        st = wait_for("round 3/5", lambda: (s := api.status(namespace, "tracked")).get("round") == "3/5" and s)
        assert st["loss"] == pytest.approx(0.75)
        assert st["parties"]["node-1"]["step"] == 30
        assert "3/5" in kubectl("get", "fft", "tracked", "-n", namespace).stdout
        rounds = wait_for("an Event per round", lambda: len(e := events_of(api, namespace, "tracked",
                                                                          "RoundCompleted")) == 3 and e)
        assert sorted(rounds)[-1] == "Normal round 3/5 aggregated; loss 0.7500"
    finally:
        proc.terminate()
        proc.wait(10)


def _connect(job_state: Any, host: str, password: str) -> Any:
    try:
        state = job_state.connect(f"{host}:6379", password, "tracked", timeout_s=1.0)
        state.r.ping()
        return state
    except Exception:
        return None


def test_restarting_the_operator_mid_reconcile_leaves_no_duplicates(
    operator_kubeconfig, operator, api, kubectl, namespace, tmp_path
) -> None:
    docs = [small_job(f"burst-{i}") for i in range(8)]
    text = "\n---\n".join(yaml.safe_dump(d) for d in docs)
    operator.stop()  # the shared one: this test runs its own, killed mid-reconcile
    try:
        first = OperatorProcess(operator_kubeconfig, tmp_path / "first.log").start()
        kubectl("apply", "-n", namespace, "-f", "-", input=text)
        wait_for("the first children", lambda: any(api.children(namespace, d["metadata"]["name"]) for d in docs))
        first.stop(signal.SIGKILL)  # no clean shutdown: whatever it was doing is cut off
        second = OperatorProcess(operator_kubeconfig, tmp_path / "second.log").start()
        try:
            expected = {d["metadata"]["name"]: wait_for_children(api, namespace, d) for d in docs}
            uids_before = {}
            for name, want in expected.items():
                live = api.children(namespace, name)
                assert set(live) == set(want), f"{name}: {set(live) ^ set(want)}"
                uids_before.update({k: v["metadata"]["uid"] for k, v in live.items()})
            # Each Secret once, never regenerated: the password and certificates the pods were
            # given still hold.
            for name, doc in zip(expected, docs):
                secrets = api.core.list_namespaced_secret(namespace, label_selector=f"fedtune.io/job={name}").items
                assert {("Secret", s.metadata.name) for s in secrets} == secret_names(api, namespace, doc)
            contents_before = {
                s.metadata.name: s.data
                for s in api.core.list_namespaced_secret(namespace, label_selector="fedtune.io/job").items
            }
        finally:
            second.stop()
            assert_no_rbac_denial(first)
            assert_no_rbac_denial(second)
        third = OperatorProcess(operator_kubeconfig, tmp_path / "third.log").start()
        try:
            time.sleep(3)  # resumed, resynced: nothing is created again
            uids_after = {}
            for name in expected:
                uids_after.update({k: v["metadata"]["uid"] for k, v in api.children(namespace, name).items()})
            assert uids_after == uids_before
            contents_after = {
                s.metadata.name: s.data
                for s in api.core.list_namespaced_secret(namespace, label_selector="fedtune.io/job").items
            }
            assert contents_after == contents_before
        finally:
            third.stop()
            assert_no_rbac_denial(third)
    finally:
        operator.start()


def test_namespaced_install_needs_only_its_roles(
    control_plane, api, kubectl, helm, chart, operator, namespace, tmp_path
) -> None:
    """`watchNamespaces`: Role + RoleBinding in each namespace, nothing cluster-wide, and enough."""
    operator.stop()  # the cluster-wide one would do the work instead
    release = f"scoped-{namespace[-4:]}"
    helm(
        "install", release, str(CHART),
        "--kubeconfig", str(control_plane.kubeconfig),
        "--namespace", RELEASE_NS,
        "--set", f"watchNamespaces={{{namespace}}}",
        "--wait=false",
    )  # fmt: skip
    sa = f"{release}-fedtune-operator"
    try:
        assert kubectl("get", "clusterrole", sa, check=False).returncode != 0
        assert kubectl("get", "role", sa, "-n", namespace, "-o", "name").stdout.strip()
        allowed = kubectl(
            "auth", "can-i", "list", "pods", "--as", f"system:serviceaccount:{RELEASE_NS}:{sa}", "-A", check=False
        )
        assert allowed.stdout.strip() == "no"
        token = kubectl("create", "token", sa, "-n", RELEASE_NS, "--duration", "1h").stdout.strip()
        kubeconfig = token_kubeconfig(tmp_path / "kubeconfig", control_plane.kubeconfig, token)
        scoped = OperatorProcess(kubeconfig, tmp_path / "scoped.log", namespaces=[namespace], resync_s=None)
        scoped.start()
        try:
            doc = small_job("scoped")
            apply(kubectl, namespace, doc)
            wait_for_children(api, namespace, doc)
            wait_for("status", lambda: api.status(namespace, "scoped").get("phase") == "Pending")
        finally:
            scoped.stop()
        assert_no_rbac_denial(scoped)
    finally:
        helm("uninstall", release, "--kubeconfig", str(control_plane.kubeconfig), "--namespace", RELEASE_NS)
        operator.start()


# Last: kube-controller-manager's garbage collector finds a new CRD's kind at its periodic
# discovery (30 s); by now it has, so this measures the collection, not the discovery.
def test_deleting_the_resource_garbage_collects_every_child_but_the_adapters(operator, api, kubectl,
                                                                            namespace) -> None:  # fmt: skip
    doc = small_job("gone")
    apply(kubectl, namespace, doc)
    expected = wait_for_children(api, namespace, doc)
    assert ("PersistentVolumeClaim", "gone-redis-data") in expected  # Redis persistence: the default
    outputs = {key for key in expected if key[0] == "PersistentVolumeClaim" and "-output" in key[1]}
    assert outputs
    kubectl("delete", "fft", "gone", "-n", namespace, "--wait=true", "--timeout=30s")
    # kube-controller-manager's garbage collector follows the ownerReferences; the output claims have none.
    wait_for("every child but the output claims gone", lambda: set(api.children(namespace, "gone")) == outputs,
             timeout=60)
