"""Names, workloads and the rules a job must meet before any child is made."""

from __future__ import annotations

from fedtune_operator.children import problems
from support.children import make_job


def test_names_the_api_server_would_refuse_are_reported(example) -> None:
    assert problems(make_job(example)) == []
    example["metadata"]["name"] = "j" * 30
    example["spec"]["parties"][1]["name"] = "n" * 33
    (problem,) = problems(make_job(example))
    assert "n" * 33 in problem and "63" in problem
    example["metadata"]["name"] = "job"
    example["spec"]["parties"][1]["name"] = "Redis"
    assert "reserved" in problems(make_job(example))[0]


def test_remote_parties_need_tls_and_a_shared_ca(example) -> None:
    example["spec"]["parties"][2]["remote"] = {"address": "bank-b.example:55006"}
    (problem,) = problems(make_job(example))
    assert "spec.tls.caSecret" in problem and "`node-2`" in problem
    example["spec"]["tls"] = {"enabled": False}
    (problem,) = problems(make_job(example))
    assert "unencrypted" in problem
    example["spec"]["tls"] = {"caSecret": "federation-ca"}
    assert problems(make_job(example)) == []


def test_output_path_when_given_is_where_each_party_writes(example) -> None:
    from fedtune_operator.children import all_children
    from fedtune_operator.jobs import output_location, party_outputs
    from support.children import container

    example["spec"]["output"] = {"path": "runs/[JOB_ID]/[NODE_ID]"}
    job = make_job(example)
    pods = {p["metadata"]["name"]: p for p in all_children(job, "pw") if p["kind"] == "Pod"}
    assert container(pods["poems-lora-node-1"])["command"][-2:] == [
        "--output-dir", "/fedtune/output/runs/poems-lora/node-1"]
    assert output_location(job) == "pvc://poems-lora-output-<party>/runs/poems-lora/<party>"
    assert party_outputs(job)["node-1"] == "pvc://poems-lora-output-node-1/runs/poems-lora/node-1/"
    assert problems(job) == []

    example["spec"]["output"] = {"path": "/opt/checkpoints/[JOB_ID]/[NODE_ID]"}
    found = problems(make_job(example))
    assert len(found) == 3 and all("/opt/checkpoints/poems-lora/" in p and "no writable volume" in p for p in found)
    example["spec"]["storage"]["volumes"].append({"claimName": "checkpoints", "mountPath": "/opt/checkpoints"})
    job = make_job(example)
    assert problems(job) == []
    assert output_location(job) == "/opt/checkpoints/poems-lora/<party>"


def test_a_party_training_alone_hosts_its_own_scheduler(example) -> None:
    from fedtune_operator.jobs import hosts_federation, workloads

    example["spec"]["parties"] = example["spec"]["parties"][1:2]
    job = make_job(example)
    assert hosts_federation(job.spec) and problems(job) == []
    assert [w.key for w in workloads(job)] == ["scheduler", "node-1"]
    from fedtune_operator.children.configmap import job_document

    spec = job_document(job)["spec"]
    assert spec["scheduler"]["address"] == "poems-lora-scheduler:55005" and "address" not in spec["parties"][0]
