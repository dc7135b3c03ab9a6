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
