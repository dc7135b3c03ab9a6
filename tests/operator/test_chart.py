"""The Helm chart renders what the operator needs in both scopes (helm template, no cluster)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.jobs import REPO

CHART = REPO / "charts" / "fedtune-operator"


def _helm() -> str:
    cache = Path(os.environ.get("FEDTUNE_CACHE") or Path.home() / ".cache" / "fedtune")
    built = cache / "bin" / "helm"
    found = str(built) if built.exists() else shutil.which("helm")
    if found is None:
        pytest.skip("helm not built (devtools/cluster/build.sh) nor on PATH")
    return found


def render(*values: str) -> list[dict[str, Any]]:
    args = [_helm(), "template", "fedtune", str(CHART), "--namespace", "fedtune-system", "--kube-version", "1.34.0"]
    for value in values:
        args += ["--set", value]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_lint_is_clean() -> None:
    result = subprocess.run([_helm(), "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def storage_class_reader(docs: list[dict]) -> dict:
    """The one cluster-wide grant every install has: reading StorageClasses by name."""
    (role,) = [r for r in by_kind(docs, "ClusterRole") if r["metadata"]["name"].endswith("-storageclasses")]
    assert role["rules"] == [{"apiGroups": ["storage.k8s.io"], "resources": ["storageclasses"], "verbs": ["get"]}]
    (binding,) = [b for b in by_kind(docs, "ClusterRoleBinding") if b["roleRef"]["name"] == role["metadata"]["name"]]
    return binding


def jobs_role(docs: list[dict]) -> dict:
    """The ClusterRole of a cluster-wide install for the jobs and their children."""
    (role,) = [r for r in by_kind(docs, "ClusterRole") if r["metadata"]["name"] == "fedtune-fedtune-operator"]
    return role


def test_cluster_wide_by_default() -> None:
    docs = render()
    storage_class_reader(docs)
    role = jobs_role(docs)
    (binding,) = [b for b in by_kind(docs, "ClusterRoleBinding") if b["roleRef"]["name"] == role["metadata"]["name"]]
    (leader,) = by_kind(docs, "Role")  # the Lease of leader election, in the release's namespace, nothing else
    assert leader["metadata"]["namespace"] == "fedtune-system"
    assert leader["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                                "verbs": ["get", "create", "update"]}]
    assert not by_kind(render("leaderElection.enabled=false", "replicas=1"), "Role")
    sa = {"kind": "ServiceAccount", "name": "fedtune-fedtune-operator", "namespace": "fedtune-system"}
    assert binding["subjects"] == [sa]
    (deploy,) = by_kind(docs, "Deployment")
    assert "--all-namespaces" in deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    # Least privilege: no wildcard, never list/watch Secrets, nothing outside the job's kinds.
    rules = role["rules"]
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
    secrets = next(r for r in rules if r["resources"] == ["secrets"])
    assert secrets["verbs"] == ["get", "create"]
    kinds = {res for r in rules for res in r["resources"]}
    assert kinds == {
        "federatedfinetunes", "federatedfinetunes/status", "federatedfinetunes/finalizers",
        "pods", "services", "configmaps", "persistentvolumeclaims", "secrets", "events", "networkpolicies",
    }  # fmt: skip
    # Deletes: pods (retries, a finished job's) and Services (its TTL); never a claim, nor a resource.
    deletes = {res for r in rules if "delete" in r["verbs"] for res in r["resources"]}
    assert deletes == {"pods", "services"}
    policies = next(r for r in rules if r["resources"] == ["networkpolicies"])
    assert policies["apiGroups"] == ["networking.k8s.io"] and policies["verbs"] == ["list", "watch", "create"]


def test_namespaced_install_grants_only_those_namespaces() -> None:
    docs = render("watchNamespaces={team-a,team-b}")
    # Cluster-wide, the operator may only read StorageClasses (the aggregated roles are for people).
    assert by_kind(docs, "ClusterRoleBinding") == [storage_class_reader(docs)]
    roles = [r for r in by_kind(docs, "Role") if not r["metadata"]["name"].endswith("-leader")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    bindings = [b for b in by_kind(docs, "RoleBinding") if not b["metadata"]["name"].endswith("-leader")]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert roles[0]["rules"] == jobs_role(render())["rules"]
    (deploy,) = by_kind(docs, "Deployment")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args


def test_deployment_is_hardened() -> None:
    (deploy,) = by_kind(render("image.tag=1.2.3", "logLevel=DEBUG"), "Deployment")
    spec = deploy["spec"]["template"]["spec"]
    assert deploy["spec"]["replicas"] == 2 and deploy["spec"]["strategy"]["type"] == "RollingUpdate"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = spec["containers"]
    assert container["image"] == "fedtune/operator:1.2.3"
    assert "--log-level=DEBUG" in container["args"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] and container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_operator_says_who_it_is_and_takes_only_health_checks() -> None:
    """Jobs' NetworkPolicies admit the operator's pod to Redis by these; its own admits only /healthz and metrics."""
    docs = render()
    (deploy,) = by_kind(docs, "Deployment")
    pod = deploy["spec"]["template"]
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["FEDTUNE_OPERATOR_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    pairs = dict(kv.split("=") for kv in env["FEDTUNE_OPERATOR_POD_LABELS"]["value"].split(","))
    assert pairs == {"app.kubernetes.io/name": "fedtune-operator", "app.kubernetes.io/instance": "fedtune"}
    assert all(pod["metadata"]["labels"][k] == v for k, v in pairs.items())
    (policy,) = by_kind(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == pairs
    assert policy["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8080},
                                                    {"protocol": "TCP", "port": 9090}]}]  # health, metrics
    assert not by_kind(render("networkPolicy.enabled=false"), "NetworkPolicy")


def test_values_schema_rejects_a_bad_namespace() -> None:
    args = [_helm(), "template", "x", str(CHART), "--kube-version", "1.34.0", "--set", "watchNamespaces={Bad_NS}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "watchNamespaces" in result.stderr


def test_chart_crd_is_the_generated_one() -> None:
    from fedtune_operator import crdgen

    assert (CHART / "crds" / crdgen.CRD_FILE).read_text() == crdgen.render()


def test_misspelled_values_are_refused() -> None:
    for value, key in [("imge.tag=1", "imge"), ("image.tagg=1", "tagg"), ("rbac.aggregated=false", "aggregated"),
                       ("serviceAccount.nmae=x", "nmae")]:
        args = [_helm(), "template", "x", str(CHART), "--kube-version", "1.34.0", "--set", value]
        result = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and f"'{key}' not allowed" in result.stderr, (value, result.stderr)


def test_name_overrides() -> None:
    docs = render("nameOverride=fft-operator")
    (deploy,) = by_kind(docs, "Deployment")
    assert deploy["metadata"]["name"] == "fedtune-fft-operator"
    assert deploy["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "fft-operator"
    docs = render("fullnameOverride=ops")
    names = {d["metadata"]["name"] for d in docs if d["kind"] in ("Deployment", "ServiceAccount", "ClusterRole")}
    assert names == {"ops", "ops-storageclasses", "ops-view", "ops-edit"}
    (binding,) = [b for b in by_kind(docs, "ClusterRoleBinding") if b["roleRef"]["name"] == "ops"]
    assert binding["subjects"][0]["name"] == "ops"


def test_jobs_join_the_clusters_view_edit_and_admin_roles() -> None:
    docs = render()
    roles = {r["metadata"]["name"]: r for r in by_kind(docs, "ClusterRole")}
    view, edit = roles["fedtune-fedtune-operator-view"], roles["fedtune-fedtune-operator-edit"]
    aggregate = "rbac.authorization.k8s.io/aggregate-to-"
    def aggregates_to(role: dict[str, Any]) -> set[str]:
        return {k.removeprefix(aggregate) for k, v in role["metadata"]["labels"].items() if k.startswith(aggregate)
                and v == "true"}

    assert aggregates_to(view) == {"view", "edit", "admin"} and aggregates_to(edit) == {"edit", "admin"}
    assert view["rules"] == [{"apiGroups": ["fedtune.io"], "verbs": ["get", "list", "watch"],
                              "resources": ["federatedfinetunes", "federatedfinetunes/status"]}]
    assert set(edit["rules"][0]["verbs"]) == {"create", "update", "patch", "delete", "deletecollection"}
    assert not [r for r in by_kind(render("rbac.aggregatedRoles=false"), "ClusterRole") if "aggregate" in str(r)]


def _value_paths(values: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        nested = isinstance(value, dict) and value and path not in FREE_FORM_VALUES
        out += _value_paths(value, f"{path}.") if nested else [path]
    return out


# Values that hold Kubernetes objects as they are: documented as one entry.
FREE_FORM_VALUES = {"resources", "podSecurityContext", "securityContext"}


def test_every_value_is_documented_in_the_charts_readme() -> None:
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [p for p in _value_paths(values) if f"`{p}`" not in readme]
    assert not missing, f"charts/fedtune-operator/README.md does not describe {missing}"
    assert "--server-side" in readme and "crds/" in readme  # how CRDs are upgraded


def test_metrics_service_service_monitors_and_json_logs() -> None:
    docs = render()
    (deploy,) = by_kind(docs, "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert "--metrics-port=9090" in container["args"] and "--log-format=text" in container["args"]
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert all(deploy["spec"]["template"]["metadata"]["labels"][k] == v for k, v in service["spec"]["selector"].items())
    (policy,) = by_kind(docs, "NetworkPolicy")
    assert {"protocol": "TCP", "port": 9090} in policy["spec"]["ingress"][0]["ports"]
    assert not by_kind(docs, "ServiceMonitor")  # needs the Prometheus Operator: only when asked

    docs = render("metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=prom",
                  "watchNamespaces={team-a}")
    monitors = {m["metadata"]["name"]: m for m in by_kind(docs, "ServiceMonitor")}
    operator, jobs = monitors["fedtune-fedtune-operator"], monitors["fedtune-fedtune-operator-jobs"]
    assert operator["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "metrics"
    assert jobs["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    assert jobs["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/part-of": "fedtune"}
    assert all(m["metadata"]["labels"]["release"] == "prom" and m["spec"]["endpoints"][0]["port"] == "metrics"
               for m in monitors.values())

    (deploy,) = by_kind(render("metrics.enabled=false", "logFormat=json"), "Deployment")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--log-format=json" in args and not any(a.startswith("--metrics-port") for a in args)


def test_two_replicas_elect_a_leader() -> None:
    (deploy,) = by_kind(render(), "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert {"--leader-elect", "--lease-name=fedtune-fedtune-operator", "--lease-duration=15"} <= set(container["args"])
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # its name in the Lease
    (deploy,) = by_kind(render("leaderElection.enabled=false", "replicas=1"), "Deployment")
    assert deploy["spec"]["strategy"]["type"] == "Recreate"
    assert "--leader-elect" not in deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    args = [_helm(), "template", "x", str(CHART), "--kube-version", "1.34.0", "--set", "leaderElection.enabled=false"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "replicas > 1 needs leaderElection.enabled" in result.stderr


def test_pod_template_allow_reaches_the_operator_and_knows_only_the_escalations() -> None:
    from fedtune_operator import podpolicy

    schema = json.loads((CHART / "values.schema.json").read_text())
    names = schema["properties"]["podTemplate"]["properties"]["allow"]["items"]["enum"]
    assert tuple(names) == podpolicy.NAMES
    (deploy,) = by_kind(render("podTemplate.allow={hostIPC,hostPath}"), "Deployment")
    env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert podpolicy.allowed_from_env(env) == {"hostIPC", "hostPath"}
    (deploy,) = by_kind(render(), "Deployment")
    assert podpolicy.ALLOW_ENV not in {e["name"] for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
