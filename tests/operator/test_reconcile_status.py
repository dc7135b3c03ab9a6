"""How the reconciler writes status, against a stand-in that keeps it as the API server does (a merge patch
removes only keys set to null): the status is replaced as a whole, nothing is sent when nothing changed,
conditions say which generation they were decided from, and suspended time never counts against the deadline."""

from __future__ import annotations

import datetime
from typing import Any

from fedtune_operator import status as s
from fedtune_operator.jobs import KIND
from support.children import UID
from support.memory_kube import MemoryKube, memory_job

NS = "team-a"


def start(example: dict[str, Any], **run_policy: Any) -> tuple[Any, MemoryKube, str]:
    if run_policy:
        example["spec"]["runPolicy"] = run_policy
    return memory_job(example, UID, NS)


def stored_status(kube: MemoryKube, name: str) -> dict[str, Any]:
    return kube.get(KIND, NS, name)["status"]


def set_pods_running(kube: MemoryKube) -> None:
    for (kind, _), obj in kube.objects.items():
        if kind == "Pod":
            obj["status"] = {"phase": "Running"}


def test_a_pass_that_changes_nothing_writes_nothing(example, monkeypatch) -> None:
    rec, kube, name = start(example)
    # The job's state as Redis gives it before a party's first step: no loss yet (None, which a merge
    # patch stores as no key at all). Redis itself is not what this test is about.
    progress = s.Progress(round=0, rounds=5, parties={"node-1": {"round": 0, "step": 0, "loss": None}})
    monkeypatch.setattr(rec, "_progress", lambda job, redis: progress)
    assert rec.reconcile(NS, name) == "Pending"  # creates the pods
    set_pods_running(kube)
    assert rec.reconcile(NS, name) == "Running"
    writes = kube.status_writes
    for _ in range(3):
        assert rec.reconcile(NS, name) == "Running"
    assert kube.status_writes == writes, "a pass that found nothing new still wrote the status"
    # What the stand-in holds is what the operator meant to write: no key it set to None is kept.
    status = stored_status(kube, name)
    assert all(v is not None for rec_ in status["parties"].values() for v in rec_.values()), status


def test_conditions_and_status_carry_the_generation_they_were_decided_from(example) -> None:
    rec, kube, name = start(example)
    rec.reconcile(NS, name)
    status = stored_status(kube, name)
    assert status["observedGeneration"] == 1
    assert status["conditions"] and all(c["observedGeneration"] == 1 for c in status["conditions"]), status
    kube.set_spec(KIND, name, runPolicy={"suspend": True})
    assert rec.reconcile(NS, name) == "Suspended"
    status = stored_status(kube, name)
    assert status["observedGeneration"] == 2
    assert all(c["observedGeneration"] == 2 for c in status["conditions"]), status["conditions"]


def _ago(seconds: int) -> str:
    then = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds)
    return then.strftime(s.TIME_FORMAT)


def test_suspended_time_does_not_count_against_the_deadline(example) -> None:
    """A job that ran a while, then stayed suspended past its deadline, starts its count anew when resumed
    (as a Kubernetes Job does): the suspension removes status.startTime, and the removal must reach the
    stored status (a merge patch that merely left the key out kept the old start, and failed the job)."""
    rec, kube, name = start(example, activeDeadlineSeconds=600)
    rec.reconcile(NS, name)
    set_pods_running(kube)
    assert rec.reconcile(NS, name) == "Running"
    kube.objects[(KIND, name)]["status"]["startTime"] = _ago(500)  # ran 500 s of its 600 before the suspension
    kube.set_spec(KIND, name, runPolicy={"activeDeadlineSeconds": 600, "suspend": True})
    assert rec.reconcile(NS, name) == "Suspended"
    assert "startTime" not in stored_status(kube, name)
    kube.set_spec(KIND, name, runPolicy={"activeDeadlineSeconds": 600, "suspend": False})
    assert rec.reconcile(NS, name) in ("Pending", "Running")
    set_pods_running(kube)
    assert rec.reconcile(NS, name) == "Running"
    status = stored_status(kube, name)
    assert s.seconds_between(status["startTime"], _ago(0)) < 60, status["startTime"]
    assert s.find_condition(status["conditions"], "Failed") is None


def test_a_message_that_no_longer_holds_disappears(example) -> None:
    rec, kube, name = start(example)
    rec.reconcile(NS, name)
    pod = next(obj for (kind, n), obj in kube.objects.items() if kind == "Pod" and n.endswith("node-1"))
    waiting = {"waiting": {"reason": "ErrImagePull", "message": "not found"}}
    pod["status"] = {"phase": "Pending", "containerStatuses": [{"image": "fedtune/trainer:x", "state": waiting}]}
    rec.reconcile(NS, name)
    assert "cannot be started" in stored_status(kube, name)["message"]
    pod["status"] = {"phase": "Running"}
    rec.reconcile(NS, name)
    status = stored_status(kube, name)
    assert "message" not in status, status["message"]
    assert s.find_condition(status["conditions"], "ImagesReady")["status"] == "True"


def test_merge_patch_removes_what_the_new_status_lacks() -> None:
    from fedtune_operator.kube import merge_patch, stored
    from support.memory_kube import apply_merge_patch

    old = {"phase": "Running", "message": "stale", "parties": {"a": {"state": "Running", "podUID": "u"}},
           "conditions": [{"type": "Running"}]}
    new = stored({"phase": "Running", "parties": {"a": {"state": "Running", "podUID": None}}, "conditions": []})
    patch = merge_patch(old, new)
    assert patch == {"message": None, "parties": {"a": {"podUID": None}}, "conditions": []}
    assert apply_merge_patch(old, patch) == new
    assert merge_patch(new, new) == {}
