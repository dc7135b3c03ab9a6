"""The whole set: one spec becomes exactly the documented children, and nothing for remote parties."""

from __future__ import annotations

import yaml

from fedtune_operator.children import all_children, problems
from fedtune_operator.children.configmap import job_configmap
from fedtune_operator.children.networkpolicy import network_policy
from fedtune_operator.jobs import redis_pod_name, workloads
from support.children import UID, by_kind_name, make_job


def test_example_becomes_exactly_the_documented_children(job) -> None:
    children = by_kind_name(all_children(job, "pw"))
    assert set(children) == {
        ("Secret", "poems-lora-redis"),
        ("Secret", "poems-lora-ca"),
        ("Secret", "poems-lora-tls-scheduler"),
        ("Secret", "poems-lora-tls-assist-trainer"),
        ("Secret", "poems-lora-tls-node-1"),
        ("Secret", "poems-lora-tls-node-2"),
        ("NetworkPolicy", "poems-lora-network"),
        ("ConfigMap", "poems-lora-job"),
        ("PersistentVolumeClaim", "poems-lora-output-assist-trainer"),
        ("PersistentVolumeClaim", "poems-lora-output-node-1"),
        ("PersistentVolumeClaim", "poems-lora-output-node-2"),
        ("PersistentVolumeClaim", "poems-lora-redis-data"),
        ("Pod", "poems-lora-redis"),
        ("Service", "poems-lora-redis"),
        ("Pod", "poems-lora-scheduler"),
        ("Service", "poems-lora-scheduler"),
        ("Pod", "poems-lora-assist-trainer"),
        ("Service", "poems-lora-assist-trainer"),
        ("Pod", "poems-lora-node-1"),
        ("Service", "poems-lora-node-1"),
        ("Pod", "poems-lora-node-2"),
        ("Service", "poems-lora-node-2"),
    }
    for child in children.values():
        meta = child["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["labels"]["app.kubernetes.io/part-of"] == "fedtune"
        assert meta["labels"]["fedtune.io/job"] == "poems-lora"
        assert meta["labels"]["fedtune.io/component"]
        if meta["labels"]["fedtune.io/component"] == "output":  # the adapters outlive the job
            assert "ownerReferences" not in meta and meta["annotations"] == {"fedtune.io/job-uid": UID}
            continue
        (owner,) = meta["ownerReferences"]
        assert owner == {
            "apiVersion": "fedtune.io/v1alpha1",
            "kind": "FederatedFineTune",
            "name": "poems-lora",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def test_remote_parties_get_nothing_here(example) -> None:
    example["spec"]["parties"][2]["remote"] = {"address": "bank-b.example.org:55006"}
    job = make_job(example)
    names = {c["metadata"]["name"] for c in all_children(job, "pw")}
    assert "poems-lora-node-2" not in names and "poems-lora-node-1" in names
    assert [w.key for w in workloads(job)] == ["scheduler", "assist_trainer", "node-1"]


def test_a_guest_organisation_runs_only_its_label_trainers(example) -> None:
    """The assist_trainer (and so the scheduler and Redis) runs at another organisation."""
    spec = example["spec"]
    spec["parties"][0]["remote"] = {"address": "fedtune.host.example:55004"}
    spec["parties"][1]["remote"] = {"address": "fedtune.bank-a.example:55006"}
    spec["tls"] = {"caSecret": "federation-ca"}
    job = make_job(example)
    assert any("spec.scheduler.address" in p for p in problems(job))
    spec["scheduler"] = {"address": "fedtune.host.example:55005"}
    job = make_job(example)
    assert problems(job) == []
    assert [w.key for w in workloads(job)] == ["node-2"] and redis_pod_name(job) is None
    names = {(c["kind"], c["metadata"]["name"]) for c in all_children(job, "pw")}
    assert names == {
        ("ConfigMap", "poems-lora-job"),
        ("Secret", "poems-lora-tls-node-2"),
        ("PersistentVolumeClaim", "poems-lora-output-node-2"),
        ("Service", "poems-lora-node-2"),
        ("Pod", "poems-lora-node-2"),
        ("NetworkPolicy", "poems-lora-network"),
    }
    document = yaml.safe_load(job_configmap(job)["data"]["job.yaml"])
    assert document["spec"]["scheduler"]["address"] == "fedtune.host.example:55005"
    assert document["spec"]["parties"][0]["address"] == "fedtune.host.example:55004"
    assert "address" not in document["spec"].get("redis", {})
    # Nothing here serves but its metrics: every other ingress is denied.
    assert network_policy(job)["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 9090}]}]
