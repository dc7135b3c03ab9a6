"""The job ConfigMap: the spec as given, with the in-cluster addresses the roles dial."""

from __future__ import annotations

import copy

import yaml

from fedtune.spec import parse_job
from fedtune_operator.children.configmap import job_configmap


def test_job_yaml_is_the_spec_with_in_cluster_addresses(job, example) -> None:
    cm = job_configmap(job)
    document = yaml.safe_load(cm["data"]["job.yaml"])
    parsed = parse_job(document)  # what every role reads must load with the same schema
    spec = parsed.spec
    assert spec.scheduler.address == "poems-lora-scheduler:55005"
    assert spec.redis.address == "poems-lora-redis:6379"
    assert spec.assist_trainer.address == "poems-lora-assist-trainer:55004"
    assert all(p.address is None for p in spec.label_trainers)
    assert document["metadata"] == {"name": "poems-lora", "namespace": "team-a"}
    # Otherwise the spec as given: no defaults filled in, nothing dropped.
    stripped = copy.deepcopy(document["spec"])
    del stripped["scheduler"], stripped["redis"], stripped["parties"][0]["address"]
    assert stripped == example["spec"]
