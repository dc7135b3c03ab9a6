"""A federation at the party limit: 64 label_trainers and the assist_trainer, as the CRD and the builders see it.

Kubernetes limits what one object may hold (a ConfigMap's or a Secret's data 1 MiB; any object about
1.5 MiB in etcd) and the CRD bounds spec.parties; the job at the limit must fit all of them, and one
label_trainer more is refused by the spec with the reason, before Kubernetes sees it.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedtune.spec import MAX_LABEL_TRAINERS, MAX_PARTIES, SpecError
from fedtune_operator.children import all_children, problems
from support.children import OPERATOR, make_job

CRD = Path(__file__).resolve().parents[2] / "crds" / "federatedfinetune.yaml"
DATA_LIMIT = 1 << 20  # a ConfigMap's or Secret's data
OBJECT_LIMIT = 1_500_000  # etcd's request size, which bounds any object
DNS_LABEL = 63  # Pod and Service names


def with_label_trainers(example: dict[str, Any], count: int) -> dict[str, Any]:
    document = copy.deepcopy(example)
    assist, template = document["spec"]["parties"][:2]
    names = [f"node-{i}" for i in range(1, count + 1)]
    document["spec"]["parties"] = [assist] + [dict(copy.deepcopy(template), name=name) for name in names]
    return document


def crd_parties_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["parties"]


def size(obj: dict[str, Any]) -> int:
    return len(json.dumps(obj).encode())


def data_size(obj: dict[str, Any]) -> int:
    return sum(len(v.encode()) for v in (obj.get("data") or {}).values())


def test_the_crd_holds_the_spec_limit(example) -> None:
    parties = crd_parties_schema()
    assert parties["maxItems"] == MAX_PARTIES == MAX_LABEL_TRAINERS + 1
    document = with_label_trainers(example, MAX_LABEL_TRAINERS)
    assert len(document["spec"]["parties"]) <= parties["maxItems"]
    longest = max(len(p["name"]) for p in document["spec"]["parties"])
    assert longest <= parties["items"]["properties"]["name"]["maxLength"]
    # The CRD's root rule: every `<job>-<party>` name is a DNS label.
    assert len(document["metadata"]["name"]) + 1 + longest <= DNS_LABEL


def test_sixty_four_label_trainers_become_children_that_kubernetes_accepts(example) -> None:
    job = make_job(with_label_trainers(example, MAX_LABEL_TRAINERS))
    assert problems(job) == []
    children = all_children(job, "pw", operator=OPERATOR)
    kinds = Counter(c["kind"] for c in children)
    roles = MAX_PARTIES + 1  # every party and the scheduler
    # Redis: a Pod, a Service, a Secret and its state's claim; the CA: a Secret; each party: its output claim
    assert kinds == {"Pod": roles + 1, "Service": roles + 1, "Secret": roles + 2,
                     "PersistentVolumeClaim": MAX_PARTIES + 1, "ConfigMap": 1, "NetworkPolicy": 1}
    names = [(c["kind"], c["metadata"]["name"]) for c in children]
    assert len(set(names)) == len(names)
    assert max(len(c["metadata"]["name"]) for c in children if c["kind"] in ("Pod", "Service")) <= DNS_LABEL
    for child in children:
        assert size(child) < OBJECT_LIMIT, f"{child['kind']} {child['metadata']['name']}: {size(child)} bytes"
        if child["kind"] in ("ConfigMap", "Secret"):
            assert data_size(child) < DATA_LIMIT, f"{child['kind']} {child['metadata']['name']}"
    configmap = next(c for c in children if c["kind"] == "ConfigMap")
    served = yaml.safe_load(configmap["data"]["job.yaml"])
    assert [p["name"] for p in served["spec"]["parties"]] == [p.name for p in job.spec.parties]


def test_the_network_policy_does_not_grow_with_the_parties(example) -> None:
    """Selected by labels, not listed party by party: 64 label_trainers' policy is the 2-party one."""
    def policy(count: int) -> dict[str, Any]:
        children = all_children(make_job(with_label_trainers(example, count)), "pw", operator=OPERATOR)
        return next(c for c in children if c["kind"] == "NetworkPolicy")

    assert policy(MAX_LABEL_TRAINERS)["spec"] == policy(2)["spec"]


def test_one_label_trainer_over_the_limit_is_refused_with_the_reason(example) -> None:
    with pytest.raises(SpecError) as refused:
        make_job(with_label_trainers(example, MAX_LABEL_TRAINERS + 1))
    message = str(refused.value)
    assert f"at most {MAX_LABEL_TRAINERS} label_trainers" in message and "CRD" in message
    assert "\n" not in message.strip()
