"""What the operator's no-cluster tests share: the example job as the operator sees it, and views of its children."""

from __future__ import annotations

import base64
import copy
from typing import Any

from fedtune.spec import parse_job
from fedtune_operator.children.networkpolicy import OperatorPeer
from fedtune_operator.jobs import Job

UID = "0b5e6f0e-1111-2222-3333-444455556666"
# The operator as the chart deploys it: the peer its NetworkPolicies let in.
OPERATOR = OperatorPeer("fedtune-system", {"app.kubernetes.io/name": "fedtune-operator"})
# The example's local roles (`Workload.key`) and the suffix of their pod, Service and Secret names.
ROLES = {"scheduler": "scheduler", "assist_trainer": "assist-trainer", "node-1": "node-1", "node-2": "node-2"}


def make_job(document: dict[str, Any], namespace: str = "team-a") -> Job:
    doc = copy.deepcopy(document)
    doc["metadata"]["namespace"] = namespace
    return Job(doc["metadata"]["name"], namespace, UID, doc["spec"], parse_job(doc))


def by_kind_name(children: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["kind"], c["metadata"]["name"]): c for c in children}


def container(pod: dict[str, Any]) -> dict[str, Any]:
    (c,) = pod["spec"]["containers"]
    return c


def pod_secrets(pod: dict[str, Any]) -> set[str]:
    """Every Secret a pod reads, as a volume or an env secretKeyRef."""
    names = {v["secret"]["secretName"] for v in pod["spec"].get("volumes") or [] if v.get("secret")}
    for c in pod["spec"]["containers"]:
        for env in c.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
    return names


def pods_of(children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["metadata"]["name"]: c for c in children if c["kind"] == "Pod"}


def secret_volumes(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v["secret"] for v in pod["spec"]["volumes"] if "secret" in v}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def secret_file(secret: dict[str, Any], key: str) -> bytes:
    return base64.b64decode(secret["data"][key])


# Pod templates that would escalate through the operator's pods (fedtune_operator.podpolicy), refused by the
# CRD and by the operator: (case, whose template (`set_pod_template`), its spec, the field the refusal names).
ESCALATIONS = [
    ("hostNetwork", "job", {"hostNetwork": True}, "spec.scheduling.podTemplate.spec.hostNetwork"),
    ("hostPID", "party", {"hostPID": True}, "spec.parties[1].scheduling.podTemplate.spec.hostPID"),
    ("hostIPC", "control", {"hostIPC": True}, "spec.controlPlane.scheduling.podTemplate.spec.hostIPC"),
    ("serviceAccountName", "job", {"serviceAccountName": "admin"},
     "spec.scheduling.podTemplate.spec.serviceAccountName"),
    ("automountServiceAccountToken", "job", {"automountServiceAccountToken": True},
     "spec.scheduling.podTemplate.spec.automountServiceAccountToken"),
    ("privileged", "party", {"containers": [{"name": "label-trainer", "securityContext": {"privileged": True}}]},
     "spec.parties[1].scheduling.podTemplate.spec.containers[0].securityContext.privileged"),
    ("allowPrivilegeEscalation", "job", {"initContainers": [
        {"name": "i", "securityContext": {"allowPrivilegeEscalation": True}}]},
     "spec.scheduling.podTemplate.spec.initContainers[0].securityContext.allowPrivilegeEscalation"),
    ("capabilities", "job", {"containers": [{"name": "c", "securityContext": {"capabilities": {
        "add": ["SYS_ADMIN"]}}}]},
     "spec.scheduling.podTemplate.spec.containers[0].securityContext.capabilities.add"),
    ("hostPath", "job", {"volumes": [{"name": "root", "hostPath": {"path": "/"}}]},
     "spec.scheduling.podTemplate.spec.volumes[0].hostPath"),
    ("hostPort", "job", {"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 80}]}]},
     "spec.scheduling.podTemplate.spec.containers[0].ports[0].hostPort"),
    # Not on the safe list: outside the CRD's schema (an unknown field) and refused by the operator.
    ("nodeName", "job", {"nodeName": "master"}, "spec.scheduling.podTemplate.spec.nodeName"),
]


def set_pod_template(spec: dict[str, Any], where: str, overlay: dict[str, Any]) -> None:
    """`overlay` as the pod template spec of the job (`job`), of parties[1] (`party`) or of the control plane."""
    scheduling = {"podTemplate": {"spec": overlay}}
    if where == "party":
        spec["parties"][1]["scheduling"] = scheduling
    elif where == "control":
        spec["controlPlane"] = {"scheduling": scheduling}
    else:
        spec["scheduling"] = scheduling
