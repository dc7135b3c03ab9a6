"""Claims: one output claim per party, one ReadWriteMany claim they share, or the one the user names."""

from __future__ import annotations

import pytest

from fedtune.spec import SpecError, parse_job
from fedtune_operator.children import static_children
from fedtune_operator.children.pod import role_pod
from fedtune_operator.children.pvc import output_pvcs, redis_pvc
from fedtune_operator.jobs import output_location, party_outputs, storage_classes, workloads
from support.children import UID, make_job


def output_claims(pod: dict) -> list[str]:
    return [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if v["name"] == "output"]


def test_each_party_gets_its_own_claim_so_parties_may_run_on_different_nodes(example) -> None:
    example["spec"]["storage"]["output"] = {"size": "5Gi", "storageClassName": "fast"}
    job = make_job(example)
    claims = {c["metadata"]["name"]: c for c in output_pvcs(job)}
    assert set(claims) == {"poems-lora-output-assist-trainer", "poems-lora-output-node-1", "poems-lora-output-node-2"}
    for claim in claims.values():
        assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "5Gi"}},
                                 "storageClassName": "fast"}
    pods = {w.key: role_pod(job, w) for w in workloads(job)}
    assert output_claims(pods["node-1"]) == ["poems-lora-output-node-1"]
    assert output_claims(pods["assist_trainer"]) == ["poems-lora-output-assist-trainer"]
    assert output_claims(pods["scheduler"]) == []  # it writes no adapters
    assert output_location(job) == "pvc://poems-lora-output-<party>/"
    assert party_outputs(job)["node-2"] == "pvc://poems-lora-output-node-2/node-2/"
    assert storage_classes(job) == {"spec.storage.output.storageClassName": "fast"}


def test_read_write_many_makes_one_claim_every_party_mounts(example) -> None:
    example["spec"]["storage"]["output"] = {"accessMode": "ReadWriteMany", "storageClassName": "nfs"}
    job = make_job(example)
    (claim,) = output_pvcs(job)
    assert claim["metadata"]["name"] == "poems-lora-output"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"] == "nfs"
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    for w in workloads(job)[1:]:
        assert output_claims(role_pod(job, w)) == ["poems-lora-output"]
    assert output_location(job) == "pvc://poems-lora-output/"
    assert party_outputs(job)["node-1"] == "pvc://poems-lora-output/node-1/"


def test_existing_output_claim_is_used_not_created(example) -> None:
    example["spec"]["storage"] = {"output": {"claimName": "shared-adapters"}}
    job = make_job(example)
    assert output_pvcs(job) == [] and storage_classes(job) == {}
    assert output_location(job) == "pvc://shared-adapters/"
    claims = {c["metadata"]["name"] for c in static_children(job, "pw") if c["kind"] == "PersistentVolumeClaim"}
    assert claims == {"poems-lora-redis-data"}  # Redis' own, no output claim
    pod = role_pod(job, workloads(job)[1])
    assert {"name": "output", "persistentVolumeClaim": {"claimName": "shared-adapters"}} in pod["spec"]["volumes"]


def test_settings_an_existing_claim_would_ignore_are_refused(example) -> None:
    example["spec"]["storage"] = {"output": {"claimName": "shared-adapters", "storageClassName": "fast"}}
    with pytest.raises(SpecError, match=r"spec\.storage\.output.*storageClassName would not apply"):
        parse_job(example, "job.yaml")


def test_redis_keeps_its_state_on_a_claim_unless_told_not_to(example) -> None:
    claim = redis_pvc(make_job(example))
    assert claim["metadata"]["name"] == "poems-lora-redis-data" and claim["metadata"]["ownerReferences"]
    assert "storageClassName" not in claim["spec"]
    example["spec"]["redis"] = {"storage": "2Gi", "storageClassName": "ssd"}
    job = make_job(example)
    claim = redis_pvc(job)
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi" and claim["spec"]["storageClassName"] == "ssd"
    assert storage_classes(job) == {"spec.redis.storageClassName": "ssd"}
    example["spec"]["redis"] = {"persistence": False}
    assert redis_pvc(make_job(example)) is None


def test_output_claims_outlive_the_job_unless_retain_is_false(example) -> None:
    for claim in output_pvcs(make_job(example)):
        # No owner: garbage collection never deletes the adapters; the annotation says whose they are.
        assert "ownerReferences" not in claim["metadata"], claim["metadata"]
        assert claim["metadata"]["annotations"] == {"fedtune.io/job-uid": UID}
        assert claim["metadata"]["labels"]["fedtune.io/job"] == "poems-lora"
    example["spec"]["storage"]["output"] = {"retain": False}
    for claim in output_pvcs(make_job(example)):
        assert claim["metadata"]["ownerReferences"][0]["uid"] == UID and "annotations" not in claim["metadata"]
    example["spec"]["storage"]["output"] = {"claimName": "mine", "retain": False}
    with pytest.raises(SpecError, match=r"retain would not apply"):
        parse_job(example, "job.yaml")
