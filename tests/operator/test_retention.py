"""What a finished job leaves: its TTL deletes the pods and Services, never the adapters' claims; the claims outlive
the resource; a new job of the same name never writes over an earlier one's adapters (in-memory API stand-in,
which keeps objects as the API server does; garbage collection is not part of it, owner references say what it
would take)."""

from __future__ import annotations

from typing import Any

from fedtune_operator import status as s
from fedtune_operator.jobs import API_VERSION, KIND
from support.children import UID
from support.memory_kube import MemoryKube, memory_job

NS = "team-a"


def start(example: dict[str, Any]) -> tuple[Any, MemoryKube, str]:
    return memory_job(example, UID, NS)


def names(kube: MemoryKube, kind: str) -> set[str]:
    return {n for k, n in kube.objects if k == kind}


def finish(kube: MemoryKube) -> None:
    for (kind, _), obj in kube.objects.items():
        if kind == "Pod":
            obj["status"] = {"phase": "Succeeded"}


def test_the_ttl_deletes_pods_and_services_and_keeps_the_adapters_and_the_record(example) -> None:
    example["spec"]["runPolicy"] = {"ttlSecondsAfterFinished": 0}
    rec, kube, name = start(example)
    rec.reconcile(NS, name)
    claims = names(kube, "PersistentVolumeClaim")
    assert {"poems-lora-output-node-1", "poems-lora-redis-data"} <= claims
    finish(kube)
    assert rec.reconcile(NS, name) == "Succeeded"
    assert not names(kube, "Pod") and not names(kube, "Service")
    assert names(kube, "PersistentVolumeClaim") == claims
    job = kube.get(KIND, NS, name)
    assert job is not None, "the TTL deleted the resource, and with it the record of where the adapters are"
    released = s.find_condition(job["status"]["conditions"], "Released")
    assert released["status"] == "True" and released["reason"] == "TTLExpired"
    assert "pvc://poems-lora-output-<party>/" in released["message"]
    assert job["status"]["parties"]["node-1"]["output"] == "pvc://poems-lora-output-node-1/node-1/"
    events = [o["reason"] for (k, _), o in kube.objects.items() if k == "Event"]
    assert events.count("TTLExpired") == 1
    writes = kube.status_writes
    assert rec.reconcile(NS, name) == "Succeeded" and kube.status_writes == writes  # released once
    assert not rec.awaits_ttl(NS, name)


def test_a_job_within_its_ttl_keeps_its_pods(example) -> None:
    example["spec"]["runPolicy"] = {"ttlSecondsAfterFinished": 3600}
    rec, kube, name = start(example)
    rec.reconcile(NS, name)
    finish(kube)
    assert rec.reconcile(NS, name) == "Succeeded"
    assert names(kube, "Pod") and names(kube, "Service") and rec.awaits_ttl(NS, name)


def test_a_new_job_of_the_same_name_waits_rather_than_write_over_kept_adapters(example) -> None:
    rec, kube, name = start(example)
    rec.reconcile(NS, name)
    kept = {n: kube.objects[("PersistentVolumeClaim", n)] for n in names(kube, "PersistentVolumeClaim")
            if "output" in n}
    # The job is deleted: garbage collection takes what it owns, and the output claims have no owner.
    kube.objects = {key: obj for key, obj in kube.objects.items() if "ownerReferences" not in obj["metadata"]
                    and key[0] != KIND}
    assert set(kept) <= names(kube, "PersistentVolumeClaim")
    rec.forget(NS, name, UID)
    second = "99999999-1111-2222-3333-444455556666"
    kube.create({"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": NS, "uid": second},
                 "spec": example["spec"]})
    assert rec.reconcile(NS, name) == "Pending"
    status = kube.get(KIND, NS, name)["status"]
    storage = s.find_condition(status["conditions"], "Storage")
    assert storage["status"] == "False" and storage["reason"] == "OutputClaimTaken", storage
    assert "poems-lora-output-" in storage["message"] and "delete it" in storage["message"]
    assert not names(kube, "Pod")
    for claim in kept:  # nothing of the earlier adapters was touched
        assert kube.objects[("PersistentVolumeClaim", claim)]["metadata"]["annotations"]["fedtune.io/job-uid"] == UID
    for claim in kept:  # someone copies them and deletes the claims: the job goes on
        del kube.objects[("PersistentVolumeClaim", claim)]
    assert rec.reconcile(NS, name) == "Pending"
    assert names(kube, "Pod")
    status = kube.get(KIND, NS, name)["status"]
    assert s.find_condition(status["conditions"], "Storage")["status"] == "True" and "message" not in status
    for claim in kept:
        assert kube.objects[("PersistentVolumeClaim", claim)]["metadata"]["annotations"]["fedtune.io/job-uid"] == second
