"""Scheduling: spec.scheduling on every pod, parties[].scheduling laid over it, the pod template overlay."""

from __future__ import annotations

from typing import Any

from fedtune_operator.children import scheduling
from fedtune_operator.children.pod import redis_pod, role_pod
from fedtune_operator.jobs import workloads
from support.children import make_job

GPU = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
SPOT = {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
ZONE = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}]}}}


def pods(example: dict[str, Any]) -> dict[str, dict[str, Any]]:
    job = make_job(example)
    out = {w.key: role_pod(job, w) for w in workloads(job)}
    return {**out, "redis": redis_pod(job)}


def test_job_wide_scheduling_reaches_every_pod_and_a_party_lays_its_own_over_it(example) -> None:
    example["spec"]["scheduling"] = {
        "tolerations": [GPU], "nodeSelector": {"pool": "train", "disk": "ssd"}, "priorityClassName": "batch",
        "schedulerName": "volcano", "imagePullSecrets": [{"name": "registry"}],
        "labels": {"kueue.x-k8s.io/queue-name": "team-a", "fedtune.io/job": "not-this"},
        "annotations": {"owner": "nlp"},
    }
    example["spec"]["parties"][1]["scheduling"] = {
        "tolerations": [SPOT, GPU], "nodeSelector": {"pool": "gpu"}, "affinity": ZONE, "priorityClassName": "urgent",
        "imagePullSecrets": [{"name": "bank-a-registry"}], "labels": {"team": "bank-a"},
    }
    by_key = pods(example)
    node1 = by_key["node-1"]["spec"]
    assert node1["tolerations"] == [GPU, SPOT]  # lists add up, no duplicates
    assert node1["nodeSelector"] == {"pool": "gpu", "disk": "ssd"}  # maps merge, the party's keys win
    assert node1["affinity"] == ZONE and node1["priorityClassName"] == "urgent"  # single values replaced
    assert node1["schedulerName"] == "volcano"
    assert node1["imagePullSecrets"] == [{"name": "registry"}, {"name": "bank-a-registry"}]
    meta = by_key["node-1"]["metadata"]
    assert meta["labels"]["team"] == "bank-a" and meta["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert meta["labels"]["fedtune.io/job"] == "poems-lora"  # the operator's own labels win
    assert meta["annotations"] == {"owner": "nlp"}
    for key in ("node-2", "assist_trainer"):  # the job's scheduling alone
        spec = by_key[key]["spec"]
        assert spec["tolerations"] == [GPU] and spec["nodeSelector"] == {"pool": "train", "disk": "ssd"}, key
        assert "affinity" not in spec and spec["priorityClassName"] == "batch", key
        assert by_key[key]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a", key
    for key in ("scheduler", "redis"):  # no placement on the GPU pool: who they are, pulls and priority only
        spec = by_key[key]["spec"]
        assert "tolerations" not in spec and "nodeSelector" not in spec and "affinity" not in spec, key
        assert spec["priorityClassName"] == "batch" and spec["schedulerName"] == "volcano", key
        assert spec["imagePullSecrets"] == [{"name": "registry"}], key
        assert by_key[key]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a", key
        assert by_key[key]["metadata"]["annotations"] == {"owner": "nlp"}, key


def test_the_control_plane_has_scheduling_of_its_own(example) -> None:
    cpu_pool = {"key": "pool", "operator": "Equal", "value": "cpu", "effect": "NoSchedule"}
    example["spec"]["scheduling"] = {"tolerations": [GPU], "nodeSelector": {"pool": "gpu"},
                                     "imagePullSecrets": [{"name": "registry"}],
                                     "podTemplate": {"spec": {"runtimeClassName": "nvidia"}}}
    example["spec"]["controlPlane"] = {"scheduling": {
        "tolerations": [cpu_pool], "nodeSelector": {"pool": "cpu"}, "priorityClassName": "system-ish",
        "imagePullSecrets": [{"name": "mirror"}], "podTemplate": {"metadata": {"annotations": {"a": "1"}}}}}
    by_key = pods(example)
    for key in ("scheduler", "redis"):
        pod = by_key[key]
        assert pod["spec"]["tolerations"] == [cpu_pool] and pod["spec"]["nodeSelector"] == {"pool": "cpu"}, key
        assert pod["spec"]["priorityClassName"] == "system-ish", key
        assert pod["spec"]["imagePullSecrets"] == [{"name": "registry"}, {"name": "mirror"}], key
        assert "runtimeClassName" not in pod["spec"] and pod["metadata"]["annotations"] == {"a": "1"}, key
    node1 = by_key["node-1"]
    assert node1["spec"]["tolerations"] == [GPU] and node1["spec"]["runtimeClassName"] == "nvidia"
    assert node1["spec"]["imagePullSecrets"] == [{"name": "registry"}] and "annotations" not in node1["metadata"]


def test_no_scheduling_leaves_the_pods_as_they_were(example) -> None:
    for pod in pods(example).values():
        assert not {"tolerations", "nodeSelector", "affinity", "priorityClassName"} & set(pod["spec"])
        assert "annotations" not in pod["metadata"]


def test_the_pod_template_overlay_merges_like_a_strategic_patch(example) -> None:
    example["spec"]["scheduling"] = {"podTemplate": {
        "metadata": {"labels": {"sidecar": "yes"}, "annotations": {"a": "1"}},
        "spec": {"runtimeClassName": "nvidia", "terminationGracePeriodSeconds": 60,
                 "containers": [{"name": "label-trainer", "env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
                                 "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}]},
                                {"name": "log-shipper", "image": "fluent-bit:3"}],
                 "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}]}}}
    example["spec"]["parties"][2]["scheduling"] = {"podTemplate": {"spec": {"containers": [
        {"name": "label-trainer", "env": [{"name": "NCCL_DEBUG", "value": "WARN"}]}]}}}
    by_key = pods(example)
    node1, node2 = by_key["node-1"], by_key["node-2"]
    assert node1["spec"]["runtimeClassName"] == "nvidia" and node1["spec"]["terminationGracePeriodSeconds"] == 60
    trainer, shipper = node1["spec"]["containers"]
    assert trainer["command"][:2] == ["fedtune", "label-trainer"]  # merged into, not replaced
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert env["NCCL_DEBUG"] == "INFO" and "FEDTUNE_PARTY" in env
    mounts = {m["mountPath"]: m["name"] for m in trainer["volumeMounts"]}
    assert mounts["/dev/shm"] == "shm" and mounts["/fedtune/output"] == "output"
    assert shipper == {"name": "log-shipper", "image": "fluent-bit:3"}
    assert {"name": "shm", "emptyDir": {"medium": "Memory"}} in node1["spec"]["volumes"]
    assert node1["metadata"]["labels"]["sidecar"] == "yes" and node1["metadata"]["annotations"] == {"a": "1"}
    # The party's overlay goes over the job's.
    env2 = {e["name"]: e.get("value") for e in node2["spec"]["containers"][0]["env"]}
    assert env2["NCCL_DEBUG"] == "WARN"
    # The Redis container has another name: the trainer's overlay adds nothing to it.
    (redis,) = [c for c in by_key["redis"]["spec"]["containers"] if c["name"] == "redis"]
    assert "env" not in redis


def test_what_the_operator_relies_on_stays_its_own(example) -> None:
    example["spec"]["scheduling"] = {"podTemplate": {
        "metadata": {"labels": {"fedtune.io/party": "someone-else"}},
        "spec": {"restartPolicy": "Always"}}}
    pod = pods(example)["node-1"]
    assert pod["metadata"]["name"] == "poems-lora-node-1"
    assert pod["metadata"]["labels"]["fedtune.io/party"] == "node-1"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "FederatedFineTune"


def test_merge_keys_lists_on_their_key_and_replaces_the_rest() -> None:
    base = {"volumeMounts": [{"name": "v", "mountPath": "/a"}, {"name": "v", "mountPath": "/b"}], "args": ["x"]}
    overlay = {"volumeMounts": [{"mountPath": "/b", "readOnly": True}], "args": ["y"]}
    merged = scheduling.merge(base, overlay)
    assert merged["volumeMounts"] == [{"name": "v", "mountPath": "/a"},
                                      {"name": "v", "mountPath": "/b", "readOnly": True}]
    assert merged["args"] == ["y"]
    assert base["volumeMounts"][1] == {"name": "v", "mountPath": "/b"}  # neither input is changed
