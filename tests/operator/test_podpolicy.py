"""A pod template cannot escalate: the operator refuses the escalating fields and anything off the safe
list, naming the field; the CRD carries the same list (its CEL rules are run by the API server in
tests/cluster/test_operator.py); a cluster may allow some, in the operator and in the CRD alike."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from typing import Any

import pytest

from fedtune_operator import crdgen, kubeschema, podpolicy
from fedtune_operator.children import problems
from fedtune_operator.jobs import KIND
from support.children import ESCALATIONS, UID, make_job, set_pod_template
from support.memory_kube import memory_job

SAFE_TEMPLATE = {
    "metadata": {"labels": {"team": "nlp"}, "annotations": {"a": "1"}},
    "spec": {
        "runtimeClassName": "nvidia", "terminationGracePeriodSeconds": 60, "automountServiceAccountToken": False,
        "securityContext": {"fsGroup": 2000},
        "containers": [{"name": "label-trainer", "env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
                        "securityContext": {"readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
                                            "privileged": False, "allowPrivilegeEscalation": False},
                        "ports": [{"containerPort": 8888, "name": "debug"}]},
                       {"name": "log-shipper", "image": "fluent-bit:3"}],
        "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}],
    },
}


@pytest.mark.parametrize(("case", "where", "overlay", "field"), ESCALATIONS, ids=[c for c, *_ in ESCALATIONS])
def test_the_operator_refuses_an_escalating_template_naming_the_field(example, case, where, overlay, field) -> None:
    set_pod_template(example["spec"], where, copy.deepcopy(overlay))
    found = problems(make_job(example))
    assert len(found) == 1 and found[0].startswith(f"{field}: "), found


@pytest.mark.parametrize(("case", "where", "overlay", "field"), [e for e in ESCALATIONS if e[0] != "nodeName"],
                         ids=[c for c, *_ in ESCALATIONS if c != "nodeName"])
def test_a_cluster_may_allow_an_escalation(example, case, where, overlay, field) -> None:
    set_pod_template(example["spec"], where, copy.deepcopy(overlay))
    assert problems(make_job(example), allow={case}) == []
    assert problems(make_job(example), allow=set(podpolicy.NAMES) - {case})  # the others are no help


def test_a_safe_template_passes_everywhere(example) -> None:
    example["spec"]["scheduling"] = {"podTemplate": SAFE_TEMPLATE}
    example["spec"]["parties"][2]["scheduling"] = {"podTemplate": SAFE_TEMPLATE}
    example["spec"]["controlPlane"] = {"scheduling": {"podTemplate": {"metadata": SAFE_TEMPLATE["metadata"]}}}
    assert problems(make_job(example)) == []


@pytest.mark.parametrize(("overlay", "field"), [
    ({"spec": {"securityContext": {"runAsUser": 0}}}, "spec.securityContext.runAsUser"),
    ({"spec": {"containers": [{"name": "c", "securityContext": {"runAsUser": 0}}]}},
     "spec.containers[0].securityContext.runAsUser"),
    ({"spec": {"volumes": [{"name": "n", "nfs": {"server": "s", "path": "/"}}]}}, "spec.volumes[0].nfs"),
    ({"spec": {"shareProcessNamespace": True}}, "spec.shareProcessNamespace"),
    ({"metadata": {"name": "other"}}, "metadata.name"),
    ({"spec": {"containers": [{"name": "c", "ports": [{"containerPort": 1, "hostIP": "0.0.0.0"}]}]}},
     "spec.containers[0].ports[0].hostIP"),
])
def test_anything_off_the_safe_list_is_refused(example, overlay, field) -> None:
    example["spec"]["scheduling"] = {"podTemplate": overlay}
    (problem,) = problems(make_job(example))
    assert problem.startswith(f"spec.scheduling.podTemplate.{field}: not a field a pod template may set"), problem


def test_a_job_with_an_escalating_template_fails_before_any_child_is_made(example) -> None:
    set_pod_template(example["spec"], "party", {"hostNetwork": True})
    rec, kube, name = memory_job(example, UID)
    assert rec.reconcile("team-a", name) == "Failed"
    status = kube.get(KIND, "team-a", name)["status"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "SpecInvalid"
    assert "spec.parties[1].scheduling.podTemplate.spec.hostNetwork: hostNetwork: true is not allowed" \
        in failed["message"]
    assert kube.kinds() == {KIND, "Event"}


def _overlay_schema(allow: tuple[str, ...] = ()) -> dict[str, Any]:
    spec = crdgen.crd(allow)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec["properties"]["scheduling"]["properties"]["podTemplate"]


def _rules(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [r["rule"] for r in node.get("x-kubernetes-validations", [])]
        return own + [r for value in node.values() for r in _rules(value)]
    return [r for value in node for r in _rules(value)] if isinstance(node, list) else []


def test_the_crd_admits_the_safe_list_and_names_each_escalation() -> None:
    overlay = _overlay_schema()
    spec = overlay["properties"]["spec"]
    assert set(spec["properties"]) == set(podpolicy.POD) | {"hostNetwork", "hostPID", "hostIPC", "serviceAccountName",
                                                            "serviceAccount", "automountServiceAccountToken"}
    container = spec["properties"]["containers"]["items"]
    assert set(container["properties"]) == set(podpolicy.CONTAINER)
    assert set(container["properties"]["securityContext"]["properties"]) == {
        *podpolicy.CONTAINER_SECURITY, "privileged", "allowPrivilegeEscalation"}
    assert set(spec["properties"]["volumes"]["items"]["properties"]) == {*podpolicy.VOLUME, "hostPath"}
    levels = (spec, container["properties"]["securityContext"], container["properties"]["ports"]["items"],
              spec["properties"]["volumes"]["items"])
    paths = {r["fieldPath"] for node in levels for r in node["x-kubernetes-validations"]}
    assert paths == {"." + r.field for r in podpolicy.REFUSED}
    assert spec["properties"]["containers"]["maxItems"] and spec["properties"]["volumes"]["maxItems"]
    # The pod spec's own types still check what they hold (a toleration's effect, a container's name).
    assert container["required"] == ["name"]
    assert {**kubeschema.pod_template_overlay(), "nullable": True} == overlay


def test_a_crd_made_for_a_cluster_drops_only_the_allowed_rules() -> None:
    strict, relaxed = _rules(_overlay_schema()), _rules(_overlay_schema(("hostIPC", "hostPath")))
    assert set(strict) - set(relaxed) == {"!has(self.hostIPC) || !self.hostIPC", "!has(self.hostPath)"}
    assert set(relaxed) < set(strict)


def test_crdgen_allow_prints_and_never_writes(tmp_path) -> None:
    env_cmd = [sys.executable, "-m", "fedtune_operator.crdgen"]
    printed = subprocess.run([*env_cmd, "--allow", "hostIPC"], capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0 and "hostIPC: true is not allowed" not in printed.stdout
    assert "hostNetwork: true is not allowed" in printed.stdout
    refused = subprocess.run([*env_cmd, "--write", "--allow", "hostIPC"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--allow prints a CRD for one cluster" in refused.stderr
    bad = subprocess.run([*env_cmd, "--allow", "nodeName"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice: 'nodeName'" in bad.stderr


def test_the_operator_reads_what_the_chart_allows(monkeypatch) -> None:
    from fedtune_operator import main

    assert podpolicy.allowed_from_env({podpolicy.ALLOW_ENV: "hostIPC, hostPath"}) == {"hostIPC", "hostPath"}
    monkeypatch.setenv(podpolicy.ALLOW_ENV, "hostIPC,hostNetwrk")
    with pytest.raises(SystemExit) as exit_:
        main.parse_args(["--all-namespaces"])
    assert exit_.value.code == 2


def test_the_readme_lists_every_safe_field_and_every_escalation() -> None:
    from support.jobs import REPO

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("A pod template cannot escalate."):readme.index("### Secure by default")]
    names = {*podpolicy.METADATA, *podpolicy.POD, *podpolicy.POD_SECURITY, *podpolicy.CONTAINER,
             *podpolicy.CONTAINER_SECURITY, *podpolicy.VOLUME, *(r.path[0] for r in podpolicy.REFUSED)} - {
        "name", "livenessProbe", "readinessProbe", "startupProbe", "containerPort", "protocol", "serviceAccount"}
    missing = sorted(n for n in names if not re.search(rf"[`.]{n}\b", section))
    assert not missing, f"README.md's pod template section does not name {missing}"
