"""The local control plane is real: versions, garbage collection, namespaces, helm."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from support.kube import wait_for

pytestmark = pytest.mark.cluster

# The `kubectl` and `helm` fixtures of conftest.py (conftest modules are not imported by name).
Runner = Callable[..., subprocess.CompletedProcess[str]]

DEADLINE_S = 90.0  # controllers act asynchronously


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _gone(kubectl: Runner, *args: str) -> bool:
    result = kubectl("get", *args, check=False)
    return result.returncode != 0 and "NotFound" in result.stderr


def test_apiserver_reports_built_version(kubectl: Runner, expected_versions: dict[str, str]) -> None:
    version = json.loads(kubectl("get", "--raw", "/version").stdout)
    assert version["gitVersion"] == expected_versions["kubernetes"]
    assert version["gitVersion"] != "v0.0.0"
    assert version["major"] == "1"


def test_the_captured_kubernetes_schemas_are_this_apiservers(control_plane) -> None:
    """The CRD embeds the Pod API's schemas from kubeschema.json: it must be what this apiserver serves."""
    from devtools.cluster import openapi
    from fedtune_operator import kubeschema

    assert openapi.fetch(control_plane.kubeconfig) == kubeschema.CAPTURE.read_text(encoding="utf-8"), (
        "kubeschema.json is stale: run `python -m devtools.cluster.openapi`, then `python -m fedtune_operator.crdgen "
        "--write`")


def test_owner_deletion_garbage_collects_dependent(kubectl: Runner) -> None:
    namespace = _unique("gc")
    kubectl("create", "namespace", namespace)
    kubectl("-n", namespace, "create", "configmap", "owner", "--from-literal=role=owner")
    owner_uid = kubectl("-n", namespace, "get", "configmap", "owner", "-o", "jsonpath={.metadata.uid}").stdout
    dependent = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "dependent",
            "namespace": namespace,
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}],
        },
        "data": {"role": "dependent"},
    }
    kubectl("apply", "-f", "-", input=json.dumps(dependent))

    # Background propagation: the API server deletes only the owner; the
    # dependent disappears only if kube-controller-manager's GC is working.
    kubectl("-n", namespace, "delete", "configmap", "owner", "--cascade=background")
    wait_for("dependent to be collected", lambda: _gone(kubectl, "-n", namespace, "configmap", "dependent"), DEADLINE_S)
    kubectl("delete", "namespace", namespace, "--wait=false")


def test_namespace_is_set_up_and_finalised(kubectl: Runner) -> None:
    namespace = _unique("ns")
    kubectl("create", "namespace", namespace)
    # The service-account and root-CA publisher controllers fill a new namespace.
    wait_for("default serviceaccount", lambda: not _gone(kubectl, "-n", namespace, "serviceaccount", "default"),
             DEADLINE_S)
    wait_for("kube-root-ca.crt", lambda: not _gone(kubectl, "-n", namespace, "configmap", "kube-root-ca.crt"),
             DEADLINE_S)
    kubectl("-n", namespace, "create", "configmap", "content", "--from-literal=a=b")

    # Without the namespace controller a deleted namespace stays Terminating forever.
    kubectl("delete", "namespace", namespace, "--wait=false")
    wait_for("namespace deletion to finish", lambda: _gone(kubectl, "namespace", namespace), DEADLINE_S)


def test_helm_reports_built_version(helm: Runner, expected_versions: dict[str, str]) -> None:
    result = helm("version", "--template", "{{.Version}}")
    assert result.stdout.strip() == expected_versions["helm"]


def test_helm_installs_chart_with_kube_version_constraint(
    control_plane: object, kubectl: Runner, helm: Runner, tmp_path: Path
) -> None:
    # helm checks kubeVersion against the server's /version: a v0.0.0 build fails here.
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text('apiVersion: v2\nname: probe\nversion: 0.1.0\nkubeVersion: ">=1.28.0-0"\n')
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-probe\n"
        "data:\n  version: {{ .Capabilities.KubeVersion.Version | quote }}\n"
    )
    namespace = _unique("helm")
    kubeconfig = ("--kubeconfig", str(control_plane.kubeconfig))  # type: ignore[attr-defined]
    helm("install", "probe", str(chart), *kubeconfig, "-n", namespace, "--create-namespace", "--wait", "--timeout=60s")
    data = kubectl("-n", namespace, "get", "configmap", "probe-probe", "-o", "jsonpath={.data.version}").stdout
    assert data.startswith("v1.")
    helm("uninstall", "probe", *kubeconfig, "-n", namespace)
    kubectl("delete", "namespace", namespace, "--wait=false")
