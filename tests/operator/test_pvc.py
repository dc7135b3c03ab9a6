"""Claims: the adapters' output claim, or the one the user names."""

from __future__ import annotations

from fedtune_operator.children import static_children
from fedtune_operator.children.pod import role_pod
from fedtune_operator.children.pvc import output_pvc
from fedtune_operator.jobs import output_location, workloads
from support.children import make_job


def test_existing_output_claim_is_used_not_created(example) -> None:
    example["spec"]["storage"] = {"output": {"claimName": "shared-adapters"}}
    job = make_job(example)
    assert output_pvc(job) is None
    assert output_location(job) == "pvc://shared-adapters/"
    kinds = {c["kind"] for c in static_children(job, "pw")}
    assert "PersistentVolumeClaim" not in kinds
    pod = role_pod(job, workloads(job)[1])
    assert {"name": "output", "persistentVolumeClaim": {"claimName": "shared-adapters"}} in pod["spec"]["volumes"]
