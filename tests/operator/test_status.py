"""Status logic: phases, retries against backoffLimit, conditions, progress (pure, no cluster)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import yaml

from fedtune.spec import RunPolicy
from fedtune_operator import status as s
from fedtune_operator.jobs import output_location, workloads
from support.children import make_job
from support.jobs import EXAMPLE

_uids = itertools.count(1)


class World:
    """Pods as the API server would hold them, and the status the operator last wrote."""

    def __init__(self, backoff_limit: int = 2) -> None:
        doc = yaml.safe_load(EXAMPLE.read_text())
        doc["spec"]["backoffLimit"] = backoff_limit
        self.job = make_job(doc)
        self.pods: dict[str, s.PodView] = {}
        self.status: dict[str, Any] = {}
        self.events: list[tuple[str, str, str]] = []
        self.now = "2026-01-01T00:00:00Z"
        self.policy = RunPolicy()

    def step(self, progress: s.Progress | None = None) -> s.Plan:
        plan = s.plan(
            workloads=workloads(self.job),
            pods=self.pods,
            redis_pod_name="poems-lora-redis",
            prev=self.status,
            backoff_limit=self.job.spec.backoffLimit,
            rounds=len(self.job.spec.fractions()),
            output=output_location(self.job),
            now=self.now,
            progress=progress,
            run_policy=self.policy,
        )
        self.status = plan.status
        self.events += plan.events
        for name in plan.delete:
            self.pods.pop(name)  # no kubelet: deletion is immediate
        if plan.create_redis:
            self.pods["poems-lora-redis"] = s.PodView("poems-lora-redis", f"uid-{next(_uids)}", "Pending")
        for w in plan.create:
            assert w.pod_name not in self.pods, "created a pod that exists"
            self.pods[w.pod_name] = s.PodView(w.pod_name, f"uid-{next(_uids)}", "Pending")
        return plan

    def set_phase(self, name: str, phase: str, **kw: Any) -> None:
        pod = self.pods[name]
        self.pods[name] = s.PodView(pod.name, pod.uid, phase, **kw)

    def condition(self, type_: str) -> dict[str, Any] | None:
        return next((c for c in self.status.get("conditions", []) if c["type"] == type_), None)


ROLE_PODS = ["poems-lora-scheduler", "poems-lora-assist-trainer", "poems-lora-node-1", "poems-lora-node-2"]


@pytest.fixture
def world() -> World:
    w = World()
    w.step()
    return w


def test_first_pass_creates_every_pod_and_reports_pending(world) -> None:
    assert set(world.pods) == {"poems-lora-redis", *ROLE_PODS}
    assert world.status["phase"] == "Pending"
    assert world.status["round"] == "0/5"
    assert world.status["output"] == "pvc://poems-lora-output-<party>/"
    assert set(world.status["parties"]) == {"assist_trainer", "node-1", "node-2"}
    assert world.status["scheduler"]["pod"] == "poems-lora-scheduler"
    assert world.condition("SpecValid")["status"] == "True"
    # Passes with nothing changed create nothing and, once the pods were seen, change nothing.
    world.step()
    before = dict(world.status)
    plan = world.step()
    assert not plan.create and not plan.delete and not plan.create_redis
    assert world.status == before


def test_running_then_succeeded(world) -> None:
    world.set_phase("poems-lora-node-1", "Running")
    world.step()
    assert world.status["phase"] == "Running"
    assert world.condition("Running")["status"] == "True"
    assert world.status["startTime"]
    for name in ROLE_PODS:
        world.set_phase(name, "Succeeded", exit_code=0)
    world.step()
    assert world.status["phase"] == "Succeeded"
    assert world.condition("Succeeded")["status"] == "True"
    assert world.condition("Running")["status"] == "False"
    assert all(p["state"] == "Succeeded" for p in world.status["parties"].values())
    # Redis is stopped once the job is done; the finished pods stay for their logs.
    assert "poems-lora-redis" not in world.pods and set(ROLE_PODS) <= set(world.pods)
    # Final: a deleted finished pod is never run again.
    world.pods.pop("poems-lora-node-1")
    plan = world.step()
    assert not plan.create and world.status["phase"] == "Succeeded"


def test_a_party_that_finishes_early_is_not_rerun_when_its_pod_goes(world) -> None:
    world.set_phase("poems-lora-node-2", "Succeeded", exit_code=0)
    world.set_phase("poems-lora-node-1", "Running")
    world.step()
    world.pods.pop("poems-lora-node-2")
    plan = world.step()
    assert not plan.create
    assert world.status["parties"]["node-2"]["state"] == "Succeeded"


def test_failures_are_retried_then_fail_the_job_with_the_reason(world) -> None:
    world.set_phase("poems-lora-node-1", "Running")
    world.step()
    for attempt in (1, 2):  # backoffLimit 2: two retries
        world.set_phase("poems-lora-node-1", "Failed", exit_code=3, reason="Error", message="bad dataset x.json")
        plan = world.step()
        assert plan.delete == ["poems-lora-node-1"]
        rec = world.status["parties"]["node-1"]
        assert rec["failures"] == attempt and rec["state"] == "Restarting"
        world.step()  # pod gone: recreated
        assert world.status["parties"]["node-1"]["restarts"] == attempt
        assert world.pods["poems-lora-node-1"].phase == "Pending"
        assert world.status["phase"] != "Failed"
    world.set_phase("poems-lora-node-2", "Running")
    world.set_phase("poems-lora-node-1", "Failed", exit_code=3, reason="Error", message="bad dataset x.json")
    world.step()
    assert world.status["phase"] == "Failed"
    failed = world.condition("Failed")
    assert failed["status"] == "True" and failed["reason"] == "BackoffLimitExceeded"
    for needle in ("node-1", "exit code 3", "Error", "bad dataset x.json", "backoffLimit 2"):
        assert needle in failed["message"]
    # The rest of the job is stopped; the failed pod stays for `kubectl logs`.
    assert "poems-lora-node-2" not in world.pods and "poems-lora-redis" not in world.pods
    assert world.pods["poems-lora-node-1"].phase == "Failed"
    assert ("Warning", "BackoffLimitExceeded", failed["message"]) in world.events


def test_a_failed_pod_seen_twice_counts_once(world) -> None:
    world.set_phase("poems-lora-node-1", "Failed", exit_code=1)
    prev = world.status
    first = s.plan(
        workloads=workloads(world.job), pods=world.pods, redis_pod_name="poems-lora-redis", prev=prev,
        backoff_limit=2, rounds=5, output="pvc://x/", now="t",
    )  # fmt: skip
    # The delete did not happen (operator restarted): the next pass sees the same pod.
    again = s.plan(
        workloads=workloads(world.job), pods=world.pods, redis_pod_name="poems-lora-redis", prev=first.status,
        backoff_limit=2, rounds=5, output="pvc://x/", now="t",
    )  # fmt: skip
    assert again.status["parties"]["node-1"]["failures"] == 1
    assert again.delete == ["poems-lora-node-1"]


def test_a_started_job_stays_running_while_a_role_restarts(world) -> None:
    world.set_phase("poems-lora-node-1", "Running")
    world.step()
    world.set_phase("poems-lora-node-1", "Failed", exit_code=137)
    world.step()
    world.step()  # recreated, Pending again
    assert world.pods["poems-lora-node-1"].phase == "Pending"
    assert world.status["phase"] == "Running"


def test_deleted_pods_are_recreated_and_counted_as_restarts(world) -> None:
    world.set_phase("poems-lora-scheduler", "Running")
    world.step()
    world.pods.pop("poems-lora-scheduler")
    plan = world.step()
    assert [w.key for w in plan.create] == ["scheduler"]
    assert world.status["scheduler"]["restarts"] == 1 and world.status["scheduler"]["failures"] == 0
    assert any(e[1] == "Recreating" for e in world.events)


def test_terminating_pod_is_waited_for(world) -> None:
    pod = world.pods["poems-lora-node-1"]
    world.pods["poems-lora-node-1"] = s.PodView(pod.name, pod.uid, "Running", deleting=True)
    plan = world.step()
    assert not plan.create and not plan.delete


def test_redis_is_restarted_without_counting_against_the_job(world) -> None:
    world.set_phase("poems-lora-redis", "Failed", exit_code=137)
    plan = world.step()
    assert plan.delete == ["poems-lora-redis"]
    plan = world.step()
    assert plan.create_redis and world.status["phase"] == "Pending"


def test_progress_sets_round_and_loss_and_keeps_them(world) -> None:
    world.set_phase("poems-lora-node-1", "Running")
    progress = s.Progress(round=2, rounds=5, loss=1.25, parties={"node-1": {"round": 2, "step": 40, "loss": 1.3}})
    world.step(progress)
    assert world.status["round"] == "2/5" and world.status["loss"] == 1.25
    assert world.status["parties"]["node-1"]["step"] == 40
    world.step(None)  # Redis unreachable: the last known values stay
    assert world.status["round"] == "2/5" and world.status["loss"] == 1.25
    assert "privacy" not in world.status and "dropouts" not in world.status
    privacy = {"epsilon": 2.5, "delta": 1e-5, "rounds": 2, "noise_multiplier": 1.0, "clip_norm": 0.1}
    world.step(s.Progress(round=2, rounds=5, dropouts={"2": ["node-2"]}, privacy=privacy))
    assert world.status["privacy"] == privacy and world.status["dropouts"] == {"2": ["node-2"]}


def test_runtime_warnings_become_status_and_one_warning_event_each(world) -> None:
    loud = "privacy.dp without secure aggregation (encryption: plain): ..."
    plan = world.step(s.Progress(round=0, rounds=5, warnings=[loud]))
    assert world.status["warnings"] == [loud]
    assert ("Warning", "JobWarning", loud) in plan.events
    plan = world.step(s.Progress(round=1, rounds=5, warnings=[loud]))
    assert world.status["warnings"] == [loud] and not [e for e in plan.events if e[1] == "JobWarning"]


def test_progress_carries_the_valset_loss_by_round(world) -> None:
    world.set_phase("poems-lora-node-1", "Running")
    by_round = [{"round": 0, "loss": 3.1}, {"round": 1, "loss": 2.7}]
    progress = s.Progress(round=1, rounds=5, loss=1.25, eval_loss=by_round,
                          parties={"node-1": {"round": 1, "step": 20, "loss": 1.3, "eval_loss": 2.6}})
    world.step(progress)
    assert world.status["evalLosses"] == by_round and world.status["evalLoss"] == 2.7
    assert world.status["parties"]["node-1"]["evalLoss"] == 2.6


def test_conditions_keep_their_transition_time() -> None:
    conds = s.set_condition([], "Running", "False", "Pending", "m", "t1")
    conds = s.set_condition(conds, "Running", "False", "Pending", "m2", "t2")
    assert conds[0]["lastTransitionTime"] == "t1" and conds[0]["message"] == "m2"
    conds = s.set_condition(conds, "Running", "True", "Running", "m3", "t3")
    assert conds[0]["lastTransitionTime"] == "t3"


def test_invalid_spec_status() -> None:
    st = s.invalid_status({}, "spec.parties: exactly one assist_trainer", "t")
    assert st["phase"] == "Failed"
    reasons = {c["type"]: c["reason"] for c in st["conditions"]}
    assert reasons == {"SpecValid": "SpecInvalid", "Failed": "SpecInvalid"}


def test_pod_view_reads_termination_details() -> None:
    pod = {
        "metadata": {"name": "p", "uid": "u", "deletionTimestamp": None},
        "status": {
            "phase": "Failed",
            "podIP": "10.1.2.3",
            "containerStatuses": [
                {"name": "c", "state": {"terminated": {"exitCode": 2, "reason": "Error", "message": "boom\n"}}}
            ],
        },
    }
    view = s.pod_view(pod)
    assert (view.phase, view.exit_code, view.reason, view.message, view.ip) == (
        "Failed",
        2,
        "Error",
        "boom",
        "10.1.2.3",
    )
    evicted = s.pod_view({"metadata": {"name": "p"}, "status": {"phase": "Failed", "reason": "Evicted"}})
    assert evicted.reason == "Evicted" and evicted.exit_code is None


def test_tls_off_is_a_warning_once_and_a_false_condition() -> None:
    conditions, events = s.tls_condition([], s.Tls(enabled=False), "t0")
    (cond,) = conditions
    assert cond["type"] == "TLS" and cond["status"] == "False" and cond["reason"] == "TLSDisabled"
    assert events == [("Warning", "TLSDisabled", s.TLS_DISABLED_MESSAGE)]
    again, events = s.tls_condition(conditions, s.Tls(enabled=False), "t1")
    assert events == [] and again[0]["lastTransitionTime"] == "t0"
    on, events = s.tls_condition([], s.Tls(enabled=True, ca="Secret j-ca"), "t0")
    assert on[0]["status"] == "True" and "Secret j-ca" in on[0]["message"] and events == []


def test_a_missing_ca_secret_keeps_the_job_pending_and_says_why() -> None:
    st, events = s.waiting_status({}, "TLS", "CAUnavailable", "spec.tls.caSecret `fed-ca`: Secret not found", "t0")
    assert st["phase"] == "Pending" and "fed-ca" in st["message"]
    assert [e[1] for e in events] == ["CAUnavailable"]
    again, events = s.waiting_status(st, "TLS", "CAUnavailable", "spec.tls.caSecret `fed-ca`: Secret not found", "t1")
    assert again == st and events == []



def test_an_image_that_cannot_be_pulled_is_named_with_its_party(world) -> None:
    waiting = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "trainer", "image": "fedtune/trainer:9"}]},
               "status": {"phase": "Pending", "containerStatuses": [{"name": "trainer", "image": "fedtune/trainer:9",
                          "state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}}]}}  # fmt: skip
    view = s.pod_view(waiting)
    assert (view.image, view.image_error) == ("fedtune/trainer:9", "ErrImagePull: not found")

    world.set_phase("poems-lora-node-1", "Pending", image="fedtune/trainer:9", image_error="ImagePullBackOff: x")
    world.step()
    world.step()
    condition = world.condition("ImagesReady")
    assert condition is not None and condition["status"] == "False", world.status
    assert "party `node-1`" in condition["message"] and "fedtune/trainer:9" in condition["message"]
    assert world.status["message"] == condition["message"]
    assert [e for e in world.events if e[1] == "ImageUnavailable"] == [("Warning", "ImageUnavailable",
                                                                        condition["message"])]  # fmt: skip
    world.set_phase("poems-lora-node-1", "Running")
    world.step()
    assert world.condition("ImagesReady")["status"] == "True"
    assert "message" not in world.status


def test_a_failure_on_a_claim_names_the_claim_and_the_path(world) -> None:
    pod = {"metadata": {"name": "p"}, "spec": {
        "containers": [{"name": "t", "volumeMounts": [{"name": "out", "mountPath": "/fedtune/output"},
                                                      {"name": "ws", "mountPath": "/workspace"},
                                                      {"name": "tmp", "mountPath": "/tmp"}]}],
        "volumes": [{"name": "out", "persistentVolumeClaim": {"claimName": "poems-lora-output"}},
                    {"name": "ws", "persistentVolumeClaim": {"claimName": "fedtune-workspace"}},
                    {"name": "tmp", "emptyDir": {}}]}}  # fmt: skip
    claims = s.pod_view(pod).claims
    assert claims == (("/fedtune/output", "poems-lora-output"), ("/workspace", "fedtune-workspace"))
    assert s.claims_in("PermissionError: [Errno 13] Permission denied: '/workspace/models/x'", claims) == (
        "claim fedtune-workspace (mounted at /workspace)")
    assert s.claims_in("/tmp/cache is full", claims) == ""

    message = "PermissionError: [Errno 13] Permission denied: '/fedtune/output/node-1'"
    world.set_phase("poems-lora-node-1", "Failed", exit_code=1, reason="Error", message=message, claims=claims)
    world.step()
    failed = [e[2] for e in world.events if e[1] == "PodFailed"]
    assert failed and "[claim poems-lora-output (mounted at /fedtune/output)]" in failed[-1]
    assert "/fedtune/output/node-1" in failed[-1]


def test_a_missing_storage_class_keeps_the_job_pending_and_says_which() -> None:
    message = "spec.storage.output.storageClassName `fast`: no StorageClass of that name"
    st, events = s.waiting_status({}, "Storage", "StorageClassNotFound", message, "t0")
    assert st["phase"] == "Pending" and st["message"] == message
    (cond,) = st["conditions"]
    assert (cond["type"], cond["status"], cond["reason"]) == ("Storage", "False", "StorageClassNotFound")
    assert events == [("Warning", "StorageClassNotFound", message)]


def test_each_party_record_says_where_its_adapters_land_and_a_found_class_is_a_true_condition() -> None:
    world = World()
    plan = s.plan(workloads=workloads(world.job), pods={}, redis_pod_name="poems-lora-redis", prev={},
                  backoff_limit=1, rounds=5, output="pvc://j-output-<party>/", now="t0",
                  outputs={"node-1": "pvc://j-output-node-1/node-1/"}, storage_classes=("fast",))
    assert plan.status["parties"]["node-1"]["output"] == "pvc://j-output-node-1/node-1/"
    storage = next(c for c in plan.status["conditions"] if c["type"] == "Storage")
    assert storage["status"] == "True" and "fast" in storage["message"]
    assert not any(c["type"] == "Storage" for c in world.step().status["conditions"])  # none named: none
    assert "adapter" not in plan.status["parties"]["node-1"]
    pods = {w.pod_name: s.PodView(w.pod_name, w.key, "Succeeded") for w in workloads(world.job)}
    done = s.plan(workloads=workloads(world.job), pods=pods, redis_pod_name="poems-lora-redis", prev=plan.status,
                  backoff_limit=1, rounds=5, output="pvc://j-output-<party>/", now="t1",
                  outputs={"node-1": "pvc://j-output-node-1/node-1/"})
    assert done.status["phase"] == "Succeeded"
    assert done.status["parties"]["node-1"]["adapter"] == "pvc://j-output-node-1/node-1/checkpoint-1/"


def test_an_event_per_completed_round(world) -> None:
    world.step(s.Progress(round=1, rounds=5, loss=2.0))
    assert [e for e in world.events if e[1] == "RoundCompleted"] == [
        ("Normal", "RoundCompleted", "round 1/5 aggregated; loss 2.0000")]
    world.step(s.Progress(round=1, rounds=5, loss=1.9))  # the same round again: no new event
    world.step(s.Progress(round=3, rounds=5, loss=1.5))  # two rounds between passes: one event each
    assert [e[2] for e in world.events if e[1] == "RoundCompleted"] == [
        "round 1/5 aggregated; loss 2.0000", "round 2/5 aggregated", "round 3/5 aggregated; loss 1.5000"]


def running_world(**policy: Any) -> World:
    world = World()
    world.policy = RunPolicy(**policy)
    world.step()
    for name in [*ROLE_PODS, "poems-lora-redis"]:
        world.set_phase(name, "Running")
    world.step()
    return world


def test_suspend_removes_the_role_pods_and_resume_brings_them_back_without_counting_restarts() -> None:
    world = running_world()
    assert world.status["phase"] == "Running" and world.status["startTime"]
    world.policy = RunPolicy(suspend=True)
    plan = world.step()
    assert sorted(plan.delete) == sorted(ROLE_PODS) and not plan.create  # Redis keeps the job's state
    assert world.status["phase"] == "Suspended" and "startTime" not in world.status
    assert world.condition("Suspended")["status"] == "True" and world.condition("Running")["status"] == "False"
    assert all(r["state"] == "Suspended" for r in world.status["parties"].values())
    assert world.step().create == [] and [e[1] for e in world.events].count("Suspended") == 1
    world.policy = RunPolicy(suspend=False)
    plan = world.step()
    assert sorted(w.pod_name for w in plan.create) == sorted(ROLE_PODS)
    assert world.condition("Suspended")["reason"] == "Resumed" and world.events[-1][1] == "Resumed"
    assert all(r["restarts"] == 0 for r in world.status["parties"].values())
    assert not [e for e in world.events if e[1] == "Recreating"]


def test_a_job_created_suspended_starts_nothing() -> None:
    world = World()
    world.policy = RunPolicy(suspend=True)
    plan = world.step()
    assert not plan.create and not plan.create_redis and world.status["phase"] == "Suspended"


def test_past_its_active_deadline_a_running_job_fails_and_stops() -> None:
    world = running_world(activeDeadlineSeconds=60)
    world.now = "2026-01-01T00:00:59Z"
    assert world.step().delete == [] and world.status["phase"] == "Running"
    world.now = "2026-01-01T00:01:01Z"
    plan = world.step()
    assert world.status["phase"] == "Failed"
    failed = world.condition("Failed")
    assert failed["reason"] == "DeadlineExceeded" and "activeDeadlineSeconds (60 s)" in failed["message"]
    assert sorted(plan.delete) == sorted([*ROLE_PODS, "poems-lora-redis"])
